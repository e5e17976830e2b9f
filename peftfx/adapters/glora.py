"""GLoRA (PEFT's ``GLORA``, generalised LoRA) on plain Linear layers.

Each of five paths is a low-rank product (``lora``: ``Xd @ Xu``), a vector (``vector``), a scalar (``constant``)
or absent (``none``, zero):

* ``W' = W + W ⊙ A + B`` (A, B: ``[out, in]``, ``[out, 1]`` or scalar);
* ``b' = b + b ⊙ D + E + (W @ C)`` (C: ``[in, 1]``; D, E: ``[out]`` or scalar); without a base bias, C, D and E
  are absent, as in PEFT.

Forward ``y + linear(x, W ⊙ A + B, b ⊙ D + E + W C)`` (PEFT's ``y + linear(x, W', b') - y``, without the
cancellation); merge ``W ← W'``, ``b ← b'``, the deltas taken from the weight the live adapter reads. PEFT keeps
absent paths as zero buffers (``glora_*.zeros``) and saves them; they must be zero and are not written back (PEFT
rebuilds them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules

_PATHS = ("A", "B", "C", "D", "E")


class GloraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, gt=0, description="rank of the low-rank (lora) paths")
    config_A_B: Literal["lora", "vector", "constant", "none"] = Field("lora", description="form of the A and B paths")
    config_C: Literal["lora", "vector", "none"] = Field("lora", description="form of the C path (bias from W)")
    config_D_E: Literal["vector", "constant", "none"] = Field("constant", description="form of the D and E paths")
    init_weights: bool = Field(True, description="true: every path starts at zero (identity); false: random")


class Glora(AdapterKind):
    name = "glora"
    peft_types = ("GLORA",)
    peft_prefix = "glora_"
    ops = frozenset({"linear"})
    Params = GloraParams
    scalable = False
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: GloraParams = params
        hyper = _hyper(site, p.r, p.config_A_B, p.config_C, p.config_D_E)
        keys = _keys(hyper)
        shapes = _shapes(site, hyper)
        tensors = {}
        for role in keys:
            t = torch.zeros(shapes[role], dtype=torch.float64)
            if role.endswith("_u"):  # PEFT draws every Xu, even with init_weights
                torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            elif not p.init_weights:
                if t.numel() == 1:
                    t.normal_(0.0, 0.02, generator=generator)
                else:
                    view = t.unsqueeze(0) if t.dim() == 1 else t
                    torch.nn.init.kaiming_uniform_(view, a=math.sqrt(5), generator=generator)
            tensors[role] = t.to(adapter_dtype(site.dtype))
        return SiteAdapter(self, site, hyper, tensors, keys)

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        hyper = _hyper(
            site,
            int(cfg.get("r", 8)),
            cfg.get("config_A_B", "lora"),
            cfg.get("config_C", "lora"),
            cfg.get("config_D_E", "constant"),
        )
        keys, shapes = _keys(hyper), _shapes(site, hyper)
        tensors = {}
        for role, key in keys.items():
            tensor = source.take(key)
            source.check_shape(key, tensor, shapes[role], site)
            tensors[role] = tensor.to(adapter_dtype(site.dtype))
        for key in sorted(set(source.tensors) - set(keys.values())):
            path = key.removeprefix("glora_").removesuffix(".zeros")
            if not (key.endswith(".zeros") and path in _PATHS and hyper[path] == "none"):
                raise CheckpointError(f"{source.file}: unexpected tensor {source.keys[key]!r} for this GLoRA config")
            if torch.count_nonzero(source.tensors[key]):
                raise CheckpointError(f"{source.file}: {source.keys[key]!r} is an absent path and must be zero")
        return SiteAdapter(self, site, hyper, tensors, keys)

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        v = {path: _value(a.hyper, t, path, a.site.dtype) for path in _PATHS}  # PEFT: paths in the weight's dtype
        db = None if bias is None else bias * v["D"] + v["E"] + _wc(weight, v["C"])
        return y + F.linear(x, weight * v["A"] + v["B"], db)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # the deltas read the weight the live adapter reads (``raw``), as the forward does
        v = {path: _value(a.hyper, t, path, torch.float64) for path in _PATHS}
        raw = raw_weight.double()
        new_weight = (weight.double() + raw * v["A"] + v["B"]).to(weight.dtype)
        if bias is None:
            return new_weight, None
        b = bias.double()
        return new_weight, (b + b * v["D"] + v["E"] + _wc(raw, v["C"])).to(bias.dtype)

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "GLoRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = adapters[0].hyper
        for key in ("r", "A", "C_config", "D_config"):
            if any(a.hyper[key] != first[key] for a in adapters):
                raise SpecError("save_adapter: PEFT's GLoRA needs one r and one path configuration per adapter")
        return {
            "peft_type": "GLORA",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "config_A_B": first["A"],
            "config_C": first["C_config"],
            "config_D_E": first["D_config"],
            "bias": "none",
        }


# Read here; init_weights shapes training only; a non-"none" bias arrives as base-tensor overrides.
_HANDLED = frozenset({"r", "config_A_B", "config_C", "config_D_E", "init_weights", "bias"})


def _hyper(site: Site, r: int, ab: str, c: str, de: str) -> dict[str, Any]:
    """The form of each path at this site: C, D and E are absent without a base bias, as PEFT builds them."""
    has_bias = site.bias is not None
    return {
        "r": r,
        "A": ab,
        "B": ab,
        "C": c if has_bias else "none",
        "D": de if has_bias else "none",
        "E": de if has_bias else "none",
        "C_config": c,
        "D_config": de,
        "scale": 1.0,
    }


def _keys(h: Mapping[str, Any]) -> dict[str, str]:
    keys = {}
    for path in _PATHS:
        if h[path] == "lora":
            keys[f"{path}_d"], keys[f"{path}_u"] = f"glora_{path}.Xd", f"glora_{path}.Xu"
        elif h[path] in ("vector", "constant"):
            keys[path] = f"glora_{path}.X"
    return keys


def _shapes(site: Site, h: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    out, inp = site.weight_shape
    r = h["r"]
    shapes: dict[str, tuple[int, ...]] = {}
    for path in ("A", "B"):
        shapes.update({f"{path}_d": (out, r), f"{path}_u": (r, inp), path: (out, 1) if h[path] == "vector" else (1,)})
    shapes.update({"C_d": (inp, r), "C_u": (r, 1), "C": (inp, 1)})
    for path in ("D", "E"):
        shapes[path] = (out,) if h[path] == "vector" else (1,)
    return shapes


def _value(h: Mapping[str, Any], t: Mapping[str, Any], path: str, dtype: torch.dtype) -> Any:
    """The path's value in ``dtype``; an absent path is 0 (scalars stay ``[1]``-shaped, which broadcasts the same)."""
    if h[path] == "none":
        return 0.0
    if h[path] == "lora":
        return t[f"{path}_d"].to(dtype) @ t[f"{path}_u"].to(dtype)
    return t[path].to(dtype)


def _wc(weight: Any, C: Any) -> Any:
    return 0.0 if isinstance(C, float) else (weight @ C).squeeze(-1)
