"""BEFT on Linear: a trained offset on the output, ``y += s · beft_bias`` (``s`` the load-time ``scale``).

Merge: ``b += s · beft_bias``. As in PEFT, a layer without a bias can run the adapter but cannot merge it.
PEFT only wraps ``nn.Linear`` (not transformers' Conv1D), so Conv1D sites are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import MergeError
from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules

_KEY = "beft_bias"


class BeftParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    init: bool = Field(True, description="true: the offset starts at zero (identity at init); false: N(0, 1)")


class Beft(AdapterKind):
    name = "beft"
    peft_types = ("BEFT",)
    peft_prefix = "beft_"
    ops = frozenset({"linear"})
    Params = BeftParams
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: BeftParams = params
        offset = torch.zeros(1, site.out_features, dtype=torch.float64)
        if not p.init:
            offset.normal_(generator=generator)
        return SiteAdapter(self, site, {"scale": 1.0}, {_KEY: offset.to(adapter_dtype(site.dtype))}, {_KEY: _KEY})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        offset = source.take(_KEY)
        source.refuse_others({_KEY}, "a BEFT site")
        source.check_shape(_KEY, offset, (1, site.out_features), site)
        return SiteAdapter(self, site, {"scale": scale}, {_KEY: offset.to(adapter_dtype(site.dtype))}, {_KEY: _KEY})

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        offset = t[_KEY].flatten()
        if a.hyper["scale"] != 1.0:
            offset = offset * a.hyper["scale"]
        if a.tensors[_KEY].dtype != a.site.dtype:
            return (y + offset).to(a.site.dtype)  # PEFT adds in the adapter's (wider) dtype, then casts back
        return y + offset

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if bias is None:
            raise MergeError(
                f"merge: BEFT at {a.site.describe()} cannot be merged: the layer has no bias to fold the offset into "
                "(PEFT refuses this too); keep the adapter live"
            )
        offset = a.hyper["scale"] * t[_KEY].double().flatten()
        return weight, (bias.double() + offset).to(bias.dtype)

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, frozenset({"init_weights"}), "BEFT", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        return {"peft_type": "BEFT", "target_modules": target_modules(adapters)}

    def additive(self, a: SiteAdapter) -> bool:
        return True
