"""HiRA (PEFT's ``HIRA``, Hadamard high-rank adaptation) on Linear, Conv1D, Conv1d/2d/3d and Embedding.

A low-rank ``M`` modulates the base weight elementwise (``W`` in logical ``[out, in, *k]`` layout):

* Linear / Conv1D: ``M = B @ A`` (``A: [r, in]``, ``B: [out, r]``); conv: ``M[o,i,k] = Σ_r B[o,r] A[r,i,k]``
  (``A: [r, in, *k]``, ``B: [out, r, 1...]``); embedding: ``M = (B @ A)ᵀ`` (``hira_embedding_A: [r, num]``,
  ``hira_embedding_B: [dim, r]``).
* Forward ``y + op(x, W ⊙ M)`` (the base conv's stride/padding/dilation; a plain lookup for embeddings).
* Merge ``W ← W + W_raw ⊙ M``, ``W_raw`` being the weight before any merge, as PEFT keeps it.

HiRA has no scaling factor, so a ``scale`` other than 1 is refused. PEFT 0.21 builds every new HiRA layer with the
config's ``r`` (its ``rank_pattern`` is looked up but never reaches the layer), so the tensors are
checked against ``r``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules, uniform


class HiraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(32, gt=0, description="rank of the modulation B @ A; one value for the whole adapter")
    init_weights: bool | Literal["gaussian"] = Field(
        True, description="true: B = 0 (identity at init), A kaiming; gaussian: A ~ N(0, 1/r) (Linear); false: random"
    )


class Hira(AdapterKind):
    name = "hira"
    peft_types = ("HIRA",)
    peft_prefix = "hira_"
    ops = frozenset({"linear", "conv1d", "conv2d", "conv3d", "embedding"})
    Params = HiraParams
    scalable = False
    grouped_conv = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: HiraParams = params
        shapes = _shapes(site, p.r)
        A = torch.empty(shapes["A"], dtype=torch.float64)
        B = torch.zeros(shapes["B"], dtype=torch.float64)
        if p.init_weights is False:
            A.normal_(generator=generator)
            B.normal_(generator=generator)
        elif site.op == "embedding":
            A.zero_()
            B.normal_(generator=generator)
        elif p.init_weights == "gaussian" and site.op == "linear":
            A.normal_(0.0, 1.0 / p.r, generator=generator)
        else:
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        dtype = adapter_dtype(site.dtype)
        return SiteAdapter(self, site, {"r": p.r, "scale": 1.0}, {"A": A.to(dtype), "B": B.to(dtype)}, _keys(site))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        r = int(source.config.get("r", 32))
        keys = _keys(site)
        shapes = _shapes(site, r)
        dtype = adapter_dtype(site.dtype)
        tensors = {}
        for role, key in keys.items():
            tensor = source.take(key)
            source.check_shape(key, tensor, shapes[role], site, f" (r={r})")
            tensors[role] = tensor.to(dtype)
        source.refuse_others(keys.values(), "a HiRA site")
        return SiteAdapter(self, site, {"r": r, "scale": scale}, tensors, keys)

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        site = a.site
        dtype = a.tensors["A"].dtype
        cast = dtype != site.dtype
        w = site.logical(weight.to(dtype) if cast else weight) * _modulation(site, t["A"], t["B"])
        result = y + site.run(x if site.op == "embedding" or not cast else x.to(dtype), w)
        return result.to(site.dtype) if cast else result

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        site = a.site
        m = _modulation(site, t["A"].double(), t["B"].double())
        merged = site.logical(weight.double()) + site.logical(raw_weight.double()) * m
        return (merged.t().contiguous() if site.transposed else merged).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "HiRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        r = uniform(adapters, ("r",), "HiRA", " (it builds every layer with one r)")["r"]
        return {
            "peft_type": "HIRA",
            "target_modules": target_modules(adapters),
            "r": r,
            "fan_in_fan_out": any(a.site.transposed for a in adapters),
        }


# Read here; or training-only (dropout, init); rank_pattern never reaches PEFT's layers (see above).
_HANDLED = frozenset({"r", "fan_in_fan_out", "hira_dropout", "init_weights", "rank_pattern", "runtime_config"})


def _keys(site: Site) -> dict[str, str]:
    if site.op == "embedding":
        return {"A": "hira_embedding_A", "B": "hira_embedding_B"}
    return {"A": "hira_A", "B": "hira_B"}


def _shapes(site: Site, r: int) -> dict[str, tuple[int, ...]]:
    if site.op == "embedding":
        num, dim = site.weight_shape
        return {"A": (r, num), "B": (dim, r)}
    out, inp, *kernel = site.weight_shape
    return {"A": (r, inp, *kernel), "B": (out, r, *[1] * len(kernel))}


def _modulation(site: Site, A: Any, B: Any) -> Any:
    """M in logical weight layout (embeddings: ``[num, dim]``)."""
    if site.op == "embedding":
        return (B @ A).t()
    if site.op == "linear":
        return B @ A
    return (B.flatten(1) @ A.flatten(1)).reshape(site.weight_shape)
