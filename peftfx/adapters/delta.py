"""A dense weight delta (and optional bias delta) on Linear, transformers Conv1D, Conv1d/2d/3d and Embedding.

Math (``ΔW`` in logical ``[out, in, *k]`` layout; embeddings ``[num, dim]``): ``y += op(x, ΔW) + Δb``;
merge ``W += ΔW``, ``b += Δb``. It is what a fold of adapters of different kinds becomes when no low-rank
result is asked (``peftfx.fold``), and as ``type: delta`` a zero-initialised full-rank trainable update.
There is no PEFT checkpoint type for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import SpecError
from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, add_to_weight


class DeltaParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bias: bool = Field(False, description="also learn a bias delta")


class Delta(AdapterKind):
    name = "delta"
    ops = frozenset({"linear", "conv1d", "conv2d", "conv3d", "embedding"})
    Params = DeltaParams

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: DeltaParams = params
        dtype = adapter_dtype(site.dtype)
        tensors = {"delta": torch.zeros(site.weight_shape, dtype=dtype)}
        if p.bias:
            if site.op == "embedding":
                raise SpecError(f"a bias delta needs a site with a bias, not {site.describe()}")
            tensors["bias"] = torch.zeros(site.out_features, dtype=dtype)
        return build(site, tensors["delta"], tensors.get("bias"))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        raise SpecError("a dense delta has no PEFT checkpoint format")

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        site, delta = a.site, t["delta"]
        dtype = delta.dtype
        out = site.run(x if site.op == "embedding" else x.to(dtype), delta, t.get("bias"))
        return y + out.to(site.dtype)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        merged = add_to_weight(weight, t["delta"].double(), a.site)
        new_bias = bias
        if "bias" in t:
            new_bias = (bias.double() + t["bias"].double()).to(bias.dtype)
        return merged, new_bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        raise SpecError(f"{file}: a dense delta has no PEFT checkpoint format")

    def additive(self, a: SiteAdapter) -> bool:
        return True


def build(site: Site, delta: torch.Tensor, bias: torch.Tensor | None = None) -> SiteAdapter:
    """A delta adapter at ``site`` from ``ΔW`` (logical layout) and an optional ``Δb``."""
    if tuple(delta.shape) != tuple(site.weight_shape):
        raise SpecError(f"a delta for {site.describe()} must have shape {list(site.weight_shape)}")
    if bias is not None and site.bias is None:
        raise SpecError(f"{site.describe()} has no bias, so a bias delta cannot be applied")
    tensors = {"delta": delta}
    if bias is not None:
        tensors["bias"] = bias
    return SiteAdapter(Delta(), site, {"scale": 1.0}, tensors, {})
