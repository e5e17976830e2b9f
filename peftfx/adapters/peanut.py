"""PEANuT on Linear: an update that is a small nonlinear network applied to the base weight itself.

Math (``W`` is ``[out, in]``, ``A = peanut_A.weight ∈ R^{r, out}``, ``B = peanut_B.weight ∈ R^{out, r}``,
``E_i``/``D_i`` the ``depth`` encoder/decoder weights ``∈ R^{r, r}``, ``act = act_fn``,
``s = scaling`` times the load-time ``scale``):

    h_0 = act(Wᵀ Aᵀ);  h_{i+1} = act(h_i E_iᵀ)  (i < depth);  then for i < depth: h ← act(h D_iᵀ) + h_{depth-1-i}
    ΔW = s · (h Bᵀ)ᵀ,   y += x ΔWᵀ

``ΔW`` depends on the base weight the live adapter reads, so the adapter is not additive; the merge computes it
from that same weight, as PEFT does (it caches the weight from before merging).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers.activations import ACT2FN

from ..errors import CheckpointError
from ..sites import Site
from .base import (
    AdapterKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    add_linear_delta,
    kaiming_factors,
    refuse_unknown,
    target_modules,
    uniform,
)


class PeanutParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(32, gt=0, description="width of the network applied to the weight")
    depth: int = Field(0, ge=0, le=64, description="number of residual encoder/decoder layer pairs")
    act_fn: str = Field("relu", description="activation, a name from transformers' ACT2FN")
    scaling: float = Field(1.0, description="factor on the update")
    init: bool = Field(True, description="true: B = 0 (identity at init); false: random B")

    @field_validator("act_fn")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ACT2FN:
            raise ValueError(f"unknown activation {value!r} (one of transformers' ACT2FN names)")
        return value


class Peanut(AdapterKind):
    name = "peanut"
    peft_types = ("PEANUT",)
    peft_prefix = "peanut_"
    ops = frozenset({"linear"})
    Params = PeanutParams
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: PeanutParams = params
        shapes = _shapes(site, p.r, p.depth)
        tensors = kaiming_factors(shapes, "peanut_B" if p.init else None, generator, adapter_dtype(site.dtype))
        hyper = _hyper(p.r, p.depth, p.act_fn, p.scaling, 1.0)
        return SiteAdapter(self, site, hyper, tensors, _peft_keys(p.depth))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        r, depth = int(cfg.get("r", 32)), int(cfg.get("depth", 0))
        roles = _peft_keys(depth)
        source.refuse_others(roles.values(), f"a PEANuT site of depth {depth}")
        tensors = {}
        for role, shape in _shapes(site, r, depth).items():
            tensor = source.take(roles[role])
            source.check_shape(roles[role], tensor, shape, site, f" (r={r})")
            tensors[role] = tensor.to(adapter_dtype(site.dtype))
        hyper = _hyper(r, depth, cfg.get("act_fn", "relu"), float(cfg.get("scaling", 1.0)), scale)
        return SiteAdapter(self, site, hyper, tensors, roles)

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        dtype = a.tensors["peanut_A"].dtype
        delta = _delta(a, weight.to(dtype) if dtype != a.site.dtype else weight, t)
        return add_linear_delta(a.site, x, y, delta, dtype)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        delta = _delta(a, raw_weight.double(), {role: v.double() for role, v in t.items()})
        return (weight.double() + delta).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        act = config.get("act_fn", "relu")
        if act not in ACT2FN:
            raise CheckpointError(f"{file}: act_fn={act!r} is not an activation transformers knows")
        refuse_unknown(config, _HANDLED, "PEANuT", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("r", "depth", "act_fn", "scaling"), "PEANuT", " (it has no pattern)")
        return {
            "peft_type": "PEANUT",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "depth": first["depth"],
            "act_fn": first["act_fn"],
            "scaling": first["scaling"],
        }


# Read here, or init-only.
_HANDLED = frozenset({"r", "depth", "act_fn", "scaling", "init_weights"})


def _hyper(r: int, depth: int, act_fn: str, scaling: float, scale: float) -> dict[str, Any]:
    return {"r": r, "depth": depth, "act_fn": act_fn, "scaling": scaling, "scale": scale}


def _peft_keys(depth: int) -> dict[str, str]:
    keys = {"peanut_A": "peanut_A.weight", "peanut_B": "peanut_B.weight"}
    for i in range(depth):
        keys[f"peanut_encoders_{i}"] = f"peanut_encoders.{i}.weight"
        keys[f"peanut_decoders_{i}"] = f"peanut_decoders.{i}.weight"
    return keys


def _shapes(site: Site, r: int, depth: int) -> dict[str, tuple[int, ...]]:
    out = site.out_features
    shapes = {"peanut_A": (r, out), "peanut_B": (out, r)}
    for i in range(depth):
        shapes[f"peanut_encoders_{i}"] = (r, r)
        shapes[f"peanut_decoders_{i}"] = (r, r)
    return shapes


def _delta(a: SiteAdapter, weight: Any, t: Mapping[str, Any]) -> Any:
    """``ΔW`` (``[out, in]``) from the base weight, scaled."""
    h = a.hyper
    act = ACT2FN[h["act_fn"]]
    state = act(F.linear(weight.t(), t["peanut_A"]))  # [in, r]
    residuals = []
    for i in range(h["depth"]):
        residuals.append(state)
        state = act(F.linear(state, t[f"peanut_encoders_{i}"]))
    for i in range(h["depth"]):
        state = act(F.linear(state, t[f"peanut_decoders_{i}"])) + residuals[h["depth"] - 1 - i]
    return F.linear(state, t["peanut_B"]).t() * (h["scaling"] * h["scale"])
