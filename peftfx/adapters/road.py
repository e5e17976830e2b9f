"""RoAd: 2D rotations with scales on the output of a Linear, elementwise.

The output is split into groups of ``g`` (``group_size``); within a group, element ``i`` of the first half is
paired with element ``i`` of the second half. With ``rot(y)`` = ``[-y_second_half, y_first_half]`` per group:

    ``y' = c ⊙ y + s ⊙ rot(y)``

where the per-output columns come from ``road_theta`` and ``road_alpha`` by variant:

* road_1 (out/2 each): ``c = alpha cos θ``, ``s = alpha sin θ``, one (θ, alpha) per pair (both halves share it);
* road_2 (out each):   ``c = alpha cos θ``, ``s = alpha sin θ``, per output;
* road_4 (2·out each, per group ``[first; second]`` halves of length g): ``c = alpha_1 cos θ₁``, ``s = alpha_2 sin θ₂``.

``y`` includes the bias, so merging is ``W' = R W`` and ``b' = R b`` with ``R`` that map applied to rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules, uniform

_SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # tensor length per output feature


class RoadParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["road_1", "road_2", "road_4"] = Field("road_1", description="how many angles/scales per pair")
    group_size: int = Field(64, gt=0, multiple_of=2, description="outputs per rotation group (even, divides out)")
    init: bool = Field(True, description="true: θ = 0, alpha = 1 (identity); false: θ ~ N(0, 0.5²), alpha ~ N(1, 0.5²)")


class Road(AdapterKind):
    name = "road"
    peft_types = ("ROAD",)
    peft_prefix = "road_"
    ops = frozenset({"linear"})
    Params = RoadParams
    scalable = False
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: RoadParams = params
        _check_site(site, p.group_size, SpecError)
        size = int(site.out_features * _SIZE[p.variant])
        theta = torch.zeros(size, dtype=torch.float64)
        alpha = torch.ones(size, dtype=torch.float64)
        if not p.init:
            theta.normal_(0.0, 0.5, generator=generator)
            alpha.normal_(1.0, 0.5, generator=generator)
        dtype = adapter_dtype(site.dtype)
        hyper = {"variant": p.variant, "group_size": p.group_size, "scale": 1.0}
        return SiteAdapter(
            self, site, hyper, {"road_theta": theta.to(dtype), "road_alpha": alpha.to(dtype)}, dict(_KEYS)
        )

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        variant, group = str(cfg.get("variant", "road_1")), int(cfg.get("group_size", 64))
        if variant not in _SIZE:
            raise CheckpointError(f"{source.file}: unknown RoAd variant {variant!r} (road_1, road_2, road_4)")
        _check_site(site, group, CheckpointError, source.file)
        source.refuse_others(_KEYS.values(), "RoAd")
        expected = (int(site.out_features * _SIZE[variant]),)
        tensors = {}
        for role in _KEYS:
            tensor = source.take(role)
            source.check_shape(role, tensor, expected, site, f" ({variant})")
            tensors[role] = tensor.to(adapter_dtype(site.dtype))
        return SiteAdapter(self, site, {"variant": variant, "group_size": group, "scale": scale}, tensors, dict(_KEYS))

    # -- graph ----------------------------------------------------------------------------------------------

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        dtype = a.tensors["road_theta"].dtype
        c, s = _columns(a.hyper, t["road_theta"], t["road_alpha"])
        return _apply(y.to(dtype), c, s, a.hyper["group_size"]).to(a.site.dtype)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        c, s = _columns(a.hyper, t["road_theta"].double(), t["road_alpha"].double())
        g = a.hyper["group_size"]
        merged = _apply(weight.double().t(), c, s, g).t()  # R W: the output map applied to every column of W
        new_bias = None if bias is None else _apply(bias.double(), c, s, g).to(bias.dtype)
        return merged.contiguous().to(weight.dtype), new_bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "RoAd", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("variant", "group_size"), "RoAd")
        return {
            "peft_type": "ROAD",
            "target_modules": target_modules(adapters),
            "variant": first["variant"],
            "group_size": first["group_size"],
            "init_weights": True,
        }


_KEYS = {"road_theta": "road_theta", "road_alpha": "road_alpha"}
_HANDLED = frozenset({"variant", "group_size", "init_weights"})  # init_weights only shapes the init


def _check_site(site: Site, group: int, error: type[Exception], where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    if group <= 0 or group % 2 or site.out_features % group:
        raise error(f"{prefix}RoAd group_size={group} must be even and divide {site.out_features} ({site.describe()})")


def _columns(h: Mapping[str, Any], theta: Any, alpha: Any) -> tuple[Any, Any]:
    """(c, s), one entry per output feature."""
    variant, half = h["variant"], h["group_size"] // 2
    if variant == "road_1":  # both halves of a group share the pair's angle and scale
        theta = theta.unflatten(0, (-1, 1, half)).expand(-1, 2, half).flatten()
        alpha = alpha.unflatten(0, (-1, 1, half)).expand(-1, 2, half).flatten()
    if variant == "road_4":
        theta = theta.unflatten(0, (-1, 2, 2 * half))
        alpha = alpha.unflatten(0, (-1, 2, 2 * half))
        return alpha[:, 0].flatten() * theta[:, 0].cos().flatten(), alpha[:, 1].flatten() * theta[:, 1].sin().flatten()
    return alpha * theta.cos(), alpha * theta.sin()


def _apply(y: Any, c: Any, s: Any, group: int) -> Any:
    """``c ⊙ y + s ⊙ rot(y)`` over the last dimension of ``y``."""
    grouped = y.unflatten(-1, (-1, 2, group // 2))
    rotated = torch.stack((-grouped[..., 1, :], grouped[..., 0, :]), dim=-2).flatten(-3)
    return y * c + rotated * s
