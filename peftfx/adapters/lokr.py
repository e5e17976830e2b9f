"""LoKr (low-rank Kronecker product, PEFT's ``LOKR``) on Linear and Conv1d/2d.

Math (``s = alpha / r``, even when no factor is low-rank). PEFT's ``factorization`` splits ``out = out_l·out_k`` and
``in = in_m·in_n`` (in = in_channels / groups), then:

* ``w1: [out_l, in_m]`` is a full matrix ``lokr_w1``, or ``lokr_w1_a @ lokr_w1_b`` when ``decompose_both`` and
  ``r < max(out_l, in_m) / 2``;
* ``w2`` is a full ``lokr_w2: [out_k, in_n, *k]`` when ``r >= max(out_k, in_n) / 2``; otherwise
  ``lokr_w2_a @ lokr_w2_b`` (conv flattened to ``[out_k, in_n·Πk]``), or, with ``use_effective_conv2d`` on a conv
  whose kernel is not 1, the CP rebuild of ``lokr_t2: [r, r, k1, k2]``,
  ``lokr_w2_a: [r, out_k]``, ``lokr_w2_b: [r, in_n]``;
* ``ΔW = s · kron(w1, w2)`` (``w1`` gets two trailing unit axes when ``w2`` is 4-D), reshaped to W's shape exactly as
  PEFT reshapes it (so a full 3-D ``w2`` on a Conv1d keeps PEFT's element order).

Forward ``y + op(x, ΔW)`` with the base op's conv arguments, as PEFT (ΔW materialised); merge ``W += ΔW``. Rank
dropout and module dropout act only in training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

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
    uniform,
)
from .lycoris import (
    LYCORIS_FIELDS,
    add_delta_output,
    cp_rebuild,
    lycoris_config,
    take_tensors,
    uses_cp,
)


class LokrParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, gt=0, description="rank of the low-rank factors (and the denominator of the scaling)")
    alpha: float = Field(8.0, description="scaling numerator (scaling = alpha / r)")
    use_effective_conv2d: bool = Field(
        False, description="conv kernels other than 1: a low-rank w2 in CP form (lokr_t2) instead of flattened"
    )
    decompose_both: bool = Field(False, description="also factor w1 as w1_a @ w1_b when r is small enough")
    decompose_factor: int = Field(-1, description="split dimensions around this factor (-1: around the square root)")
    init_weights: bool | Literal["lycoris"] = Field(
        True, description="true: w1 = 0 (identity at init); lycoris: w2 = 0 instead; false: every factor random"
    )


class Lokr(AdditiveKind):
    name = "lokr"
    peft_types = ("LOKR",)
    peft_prefix = "lokr_"
    ops = frozenset({"linear", "conv1d", "conv2d"})
    Params = LokrParams
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: LokrParams = params
        hyper = _hyper(site, p.r, p.alpha, p.use_effective_conv2d, p.decompose_both, p.decompose_factor, 1.0)
        shapes = _shapes(site, hyper)
        zero = _zero_role(shapes, p.init_weights)
        tensors = kaiming_factors(shapes, zero, generator, adapter_dtype(site.dtype))
        return SiteAdapter(self, site, hyper, tensors, {role: role for role in shapes})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        r = pattern_value(cfg.get("rank_pattern") or {}, site.module, cfg.get("r", 8))
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, site.module, cfg.get("alpha", 8))
        hyper = _hyper(
            site,
            r,
            alpha,
            bool(cfg.get("use_effective_conv2d")),
            bool(cfg.get("decompose_both")),
            int(cfg.get("decompose_factor", -1)),
            scale,
        )
        expected = _shapes(site, hyper)
        tensors = take_tensors(site, source, expected, "LoKr")
        return SiteAdapter(self, site, hyper, tensors, {role: role for role in expected})

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        dtype = next(iter(a.tensors.values())).dtype
        return add_delta_output(a.site, x, y, _delta(a, t), dtype)

    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _delta(a, {role: v.double() for role, v in t.items()})

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "LoKr", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("decompose_both", "decompose_factor"), "LoKr")
        return {
            **lycoris_config(adapters, "LOKR", "LoKr"),
            "decompose_both": first["decompose_both"],
            "decompose_factor": first["decompose_factor"],
            "init_weights": True,
        }


# LyCORIS' fields, LoKr's factorisation, and the dropout rescaling (training only).
_HANDLED = LYCORIS_FIELDS | {"decompose_both", "decompose_factor", "rank_dropout_scale"}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``dimension = m·n`` with ``m <= n``: ``m = factor`` when it divides, else the most square pair.

    The same search as PEFT's (and LyCORIS'), so the factor shapes, and therefore the checkpoints, agree.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


def _hyper(
    site: Site, r: int, alpha: float, effective: bool, decompose_both: bool, factor: int, scale: float
) -> dict[str, Any]:
    out, inp = site.weight_shape[:2]
    out_l, out_k = factorization(out, factor)
    in_m, in_n = factorization(inp, factor)
    return {
        "r": r,
        "alpha": alpha,
        "use_effective_conv2d": effective,
        "decompose_both": decompose_both,
        "decompose_factor": factor,
        "out": (out_l, out_k),
        "in": (in_m, in_n),
        "full_w1": not (decompose_both and r < max(out_l, in_m) / 2),
        "full_w2": r >= max(out_k, in_n) / 2,
        "cp": uses_cp(site, effective),
        "scaling": alpha / r * scale,
        "scale": scale,
    }


def _shapes(site: Site, h: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    (out_l, out_k), (in_m, in_n), r = h["out"], h["in"], h["r"]
    kernel = tuple(site.weight_shape[2:])
    shapes: dict[str, tuple[int, ...]] = {}
    if h["full_w1"]:
        shapes["lokr_w1"] = (out_l, in_m)
    else:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (out_l, r), (r, in_m)
    if h["full_w2"]:
        shapes["lokr_w2"] = (out_k, in_n, *kernel)
    elif h["cp"]:
        shapes["lokr_t2"] = (r, r, *kernel, *[1] * (2 - len(kernel)))
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (r, out_k), (r, in_n)
    else:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (out_k, r), (r, in_n * math.prod(kernel))
    return shapes


def _zero_role(shapes: Mapping[str, Any], init: bool | str) -> str | None:
    """The factor PEFT zeroes so that ΔW = 0 at init (none for random init)."""
    if init is False:
        return None
    if init == "lycoris":
        return "lokr_w2" if "lokr_w2" in shapes else "lokr_w2_b"
    return "lokr_w1" if "lokr_w1" in shapes else "lokr_w1_a"


def _delta(a: SiteAdapter, t: Mapping[str, Any]) -> Any:
    """ΔW, scaled, in W's logical shape and the tensors' dtype."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = cp_rebuild(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if "lokr_t2" in t or ("lokr_w2" in t and a.site.op == "conv2d"):  # w2 is 4-D
        w1 = w1.reshape(a.hyper["out"][0], a.hyper["in"][0], 1, 1)
    return (torch.kron(w1, w2) * a.hyper["scaling"]).reshape(a.site.weight_shape)
