"""AdaLoRA (PEFT's ``ADALORA``): an SVD-shaped LoRA, on Linear, transformers Conv1D and Conv2d.

Math (tensors ``A: [r, in·Πk]``, ``E: [r, 1]``, ``B: [out, r]``; ``c = alpha`` or, when ``alpha <= 0``, the module's
rank r; ``n = init_r + 1e-5`` taken in the adapter dtype, where PEFT keeps ``ranknum``):

* Linear / Conv1D: ``y += ((x @ (A⊙E)ᵀ) @ Bᵀ) · c / n``;  Conv2d: ``y += conv(x, reshape(B @ (A⊙E) · c / n))``.
* Merge: ``W += B @ (A⊙E) · c / n`` (transposed for Conv1D, reshaped for Conv2d).

After training, PEFT's ``rank_pattern`` holds one boolean mask over the ``init_r`` triplets per module, named
``<module>.lora_E``; the file stores only the kept triplets, and ``ranknum`` (not saved) stays ``init_r``, so the
scaling does not change. ``r``, ``use_rslora`` and ``alpha_pattern`` are ignored by PEFT's AdaLoRA, and so here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError
from ..sites import Site
from .base import (
    AdditiveKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    refuse_unknown,
    target_modules,
    uniform,
)

_ROLES = ("lora_A", "lora_B", "lora_E")


class AdaloraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(12, gt=0, description="initial rank (PEFT's init_r); the scaling divides by it")
    alpha: float = Field(8.0, description="scaling numerator (PEFT's lora_alpha); <= 0 means r")
    init: bool = Field(True, description="true: E = 0 (identity at init), A and B ~ N(0, 0.02²); false: all N(0, 1)")


class Adalora(AdditiveKind):
    name = "adalora"
    peft_types = ("ADALORA",)
    peft_prefix = "lora_"
    ops = frozenset({"linear", "conv2d"})
    Params = AdaloraParams
    grouped_conv = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: AdaloraParams = params
        shapes = _shapes(site, p.r)
        tensors = {}
        for role in _ROLES:
            t = torch.empty(shapes[role], dtype=torch.float64)
            if p.init:
                t.zero_() if role == "lora_E" else t.normal_(0.0, 0.02, generator=generator)
            else:
                t.normal_(generator=generator)
            tensors[role] = t.to(adapter_dtype(site.dtype))
        return SiteAdapter(self, site, _hyper(site, p.r, p.r, p.alpha, 1.0), tensors, {r: r for r in _ROLES})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        init_r = int(cfg.get("init_r", 12))
        mask = _mask(cfg.get("rank_pattern") or {}, site.module, init_r, source.file)
        r = init_r if mask is None else sum(bool(m) for m in mask)
        expected = _shapes(site, r)
        tensors = {}
        for role in _ROLES:
            tensor = source.take(role)
            source.check_shape(role, tensor, expected[role], site, f" (rank {r} of init_r={init_r})")
            tensors[role] = tensor.to(adapter_dtype(site.dtype))
        source.refuse_others(_ROLES, "an AdaLoRA site")
        hyper = _hyper(site, r, init_r, cfg.get("lora_alpha", 8), scale)
        return SiteAdapter(self, site, hyper, tensors, {role: role for role in _ROLES})

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        site, h = a.site, a.hyper
        dtype = a.tensors["lora_A"].dtype
        xa = x.to(dtype) if dtype != site.dtype else x
        AE = t["lora_A"] * t["lora_E"]
        if site.op == "linear":
            out = (xa @ AE.t() @ t["lora_B"].t()) * h["scaling"] / h["ranknum"]
        else:
            delta = (t["lora_B"] @ AE * h["scaling"] / h["ranknum"]).reshape(site.weight_shape)
            out = site.run(xa, delta)
        result = y + out
        return result.to(site.dtype) if dtype != site.dtype else result

    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        site, h = a.site, a.hyper
        A, B, E = (t[role].double() for role in _ROLES)
        return (B @ (A * E) * h["scaling"] / h["ranknum"]).reshape(site.weight_shape)

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "AdaLoRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("r", "alpha"), "AdaLoRA", " (r is its init_r)")
        return {
            "peft_type": "ADALORA",
            "target_modules": target_modules(adapters),
            "init_r": first["r"],
            "target_r": first["r"],
            "lora_alpha": first["alpha"],
            "total_step": 1,
            "fan_in_fan_out": any(a.site.transposed for a in adapters),
            "bias": "none",
        }


# Read here; or shaping training only (the rank allocator's schedule, dropout, orthogonal regulariser); or, like
# r, use_rslora and alpha_pattern, ignored by PEFT's AdaLoRA layers. ``bias`` biases arrive as overrides.
_HANDLED = frozenset(
    {
        "init_r",
        "lora_alpha",
        "rank_pattern",
        "fan_in_fan_out",
        "bias",
        "init_lora_weights",
        "target_r",
        "tinit",
        "tfinal",
        "deltaT",
        "beta1",
        "beta2",
        "orth_reg_weight",
        "total_step",
        "lora_dropout",
        "r",
        "use_rslora",
        "alpha_pattern",
        "megatron_core",
        "qalora_group_size",
        "runtime_config",
        "loftq_config",
    }
)


def _shapes(site: Site, r: int) -> dict[str, tuple[int, ...]]:
    out, inp, *kernel = site.weight_shape
    for k in kernel:
        inp *= k
    return {"lora_A": (r, inp), "lora_B": (out, r), "lora_E": (r, 1)}


def _hyper(site: Site, r: int, init_r: int, alpha: float, scale: float) -> dict[str, Any]:
    # PEFT keeps ranknum = init_r as a parameter in the adapter dtype (the base's, half precisions upcast to float32)
    # and adds 1e-5 there.
    ranknum = float(torch.tensor([float(init_r)], dtype=adapter_dtype(site.dtype)) + 1e-5)
    numerator = alpha if alpha > 0 else float(r)
    return {"r": r, "init_r": init_r, "alpha": alpha, "ranknum": ranknum, "scaling": numerator * scale, "scale": scale}


def _mask(patterns: Mapping[str, Any], module: str, init_r: int, file: str) -> list | None:
    """This module's keep-mask from PEFT's rank_pattern (keys ``<module>.lora_E``, maybe with the adapter name)."""
    for key, mask in patterns.items():
        if key.split(".lora_E")[0] == module:
            if len(mask) != init_r:
                raise CheckpointError(
                    f"{file}: rank_pattern[{key!r}] should be a list of {init_r} booleans (one per init_r triplet)"
                )
            return mask
    return None
