"""LoHa (low-rank Hadamard product, PEFT's ``LOHA``) on Linear and Conv1d/2d.

Math (``s = alpha / r``; conv weights flattened to ``[out, in·Πk]`` unless the CP form is used):

* ``ΔW = s · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` with ``w*_a: [out, r]``, ``w*_b: [r, in·Πk]``, reshaped to W's shape.
* Conv, ``use_effective_conv2d``, kernel not 1: ``R_j[o,i,k] = Σ_{p,q} t_j[p,q,k] w_j_a[p,o] w_j_b[q,i]``
  (``t_j: [r, r, k1, k2]``, Conv1d stores ``k2 = 1``; ``w_j_a: [r, out]``, ``w_j_b: [r, in]``);
  ``ΔW = s · R_1 ⊙ R_2``.
* Forward ``y + op(x, ΔW)`` with the base op's stride/padding/dilation/groups (ΔW is materialised, as PEFT does);
  merge ``W += ΔW``.

PEFT builds LoHa on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` only (not transformers' Conv1D), so those are the
sites accepted here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..sites import Site
from .base import (
    AdditiveKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    kaiming_factors,
    pattern_value,
    refuse_unknown,
)
from .lycoris import (
    LYCORIS_FIELDS,
    add_delta_output,
    cp_rebuild,
    lycoris_config,
    take_rank,
    take_tensors,
    uses_cp,
)

_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_CP_ROLES = ("hada_t1", "hada_t2")


class LohaParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, gt=0, description="rank of each of the two factor pairs")
    alpha: float = Field(8.0, description="scaling numerator (scaling = alpha / r)")
    use_effective_conv2d: bool = Field(
        False, description="conv kernels other than 1: CP form (hada_t1/t2 cores) instead of a flattened weight"
    )
    init_weights: bool = Field(True, description="true: w2_b = 0 (identity at init); false: every factor random")


class Loha(AdditiveKind):
    name = "loha"
    peft_types = ("LOHA",)
    peft_prefix = "hada_"
    ops = frozenset({"linear", "conv1d", "conv2d"})
    Params = LohaParams
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: LohaParams = params
        cp = uses_cp(site, p.use_effective_conv2d)
        shapes = _shapes(site, p.r, cp)
        zero = "hada_w2_b" if p.init_weights else None
        tensors = kaiming_factors(shapes, zero, generator, adapter_dtype(site.dtype))
        hyper = _hyper(p.r, p.alpha, p.use_effective_conv2d, cp, 1.0)
        return SiteAdapter(self, site, hyper, tensors, {role: role for role in shapes})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        effective = bool(cfg.get("use_effective_conv2d"))
        cp = uses_cp(site, effective)
        r = take_rank(site, source, "hada_w1_b", cfg)
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, site.module, cfg.get("alpha", 8))
        expected = _shapes(site, r, cp)
        tensors = take_tensors(site, source, expected, "LoHa")
        hyper = _hyper(r, alpha, effective, cp, scale)
        return SiteAdapter(self, site, hyper, tensors, {role: role for role in expected})

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        dtype = a.tensors["hada_w1_a"].dtype
        delta = _delta(a, t)
        return add_delta_output(a.site, x, y, delta, dtype)

    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _delta(a, {role: v.double() for role, v in t.items()})

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, LYCORIS_FIELDS, "LoHa", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        return {**lycoris_config(adapters, "LOHA", "LoHa"), "init_weights": True}


def _hyper(r: int, alpha: float, effective: bool, cp: bool, scale: float) -> dict[str, Any]:
    return {
        "r": r,
        "alpha": alpha,
        "use_effective_conv2d": effective,
        "cp": cp,
        "scaling": alpha / r * scale,
        "scale": scale,
    }


def _shapes(site: Site, r: int, cp: bool) -> dict[str, tuple[int, ...]]:
    out, inp, *kernel = site.weight_shape
    if cp:
        core = (r, r, *kernel, *[1] * (2 - len(kernel)))
        return {
            "hada_w1_a": (r, out),
            "hada_w1_b": (r, inp),
            "hada_t1": core,
            "hada_w2_a": (r, out),
            "hada_w2_b": (r, inp),
            "hada_t2": core,
        }
    flat = inp * math.prod(kernel)
    return {"hada_w1_a": (out, r), "hada_w1_b": (r, flat), "hada_w2_a": (out, r), "hada_w2_b": (r, flat)}


def _delta(a: SiteAdapter, t: Mapping[str, Any]) -> Any:
    """ΔW, scaled, in W's logical shape and the tensors' dtype."""
    s = a.hyper["scaling"]
    if a.hyper["cp"]:
        r1 = cp_rebuild(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        r2 = cp_rebuild(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        delta = r1 * r2 * s
    else:
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * s
    return delta.reshape(a.site.weight_shape)
