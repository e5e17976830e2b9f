"""(IA)³ on Linear, transformers Conv1D and Conv2d/3d: one learned vector ``l`` per site scales activations.

Math (``W`` in logical ``[out, in, *k]`` layout):

* output site (the default)  ``y = l ⊙ (W x + b)``;  merge ``W ← diag(l) W``, ``b ← l ⊙ b``.
* feed-forward site (PEFT's ``feedforward_modules``)  ``y = W (l ⊙ x) + b``;  merge ``W ← W diag(l)`` over the
  input channels (expanded per group for grouped convs); the bias is unchanged.

``l`` has PEFT's shapes: ``(out, 1)`` / ``(1, in)`` for Linear and Conv1D, ``(1, C, 1, ...)`` for convs. There is
no scaling factor, so a ``scale`` other than 1 is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError
from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules

_KEY = "ia3_l"


class Ia3Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    feedforward: bool = Field(
        False, description="scale the site's input instead of its output (PEFT's feedforward_modules)"
    )
    init: bool = Field(True, description="true: l = 1 (identity at init); false: l ~ N(0, 1), as PEFT")


class Ia3(AdapterKind):
    name = "ia3"
    peft_types = ("IA3",)
    peft_prefix = "ia3_"
    folds_by_vector = True
    ops = frozenset({"linear", "conv2d", "conv3d"})
    Params = Ia3Params
    scalable = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: Ia3Params = params
        shape = _shape(site, p.feedforward)
        if p.init:
            vector = torch.ones(shape, dtype=torch.float64)
        else:
            vector = torch.randn(shape, generator=generator, dtype=torch.float64)
        hyper = {"feedforward": p.feedforward, "scale": 1.0}
        return SiteAdapter(self, site, hyper, {"l": vector.to(adapter_dtype(site.dtype))}, {"l": _KEY})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        vector = source.take(_KEY)
        source.refuse_others({_KEY}, "an (IA)³ site")
        feedforward = _is_feedforward(source.config.get("feedforward_modules"), site.module)
        expected = _shape(site, feedforward)
        if tuple(vector.shape) != expected:
            what = "feed-forward (input)" if feedforward else "output"
            raise CheckpointError(
                f"{source.file}: {source.keys[_KEY]!r} has shape {list(vector.shape)}, expected {list(expected)} "
                f"for the {what} scaling of {site.describe()}"
            )
        hyper = {"feedforward": feedforward, "scale": scale}
        return SiteAdapter(self, site, hyper, {"l": vector.to(adapter_dtype(site.dtype))}, {"l": _KEY})

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        site, l_vec = a.site, t["l"]
        dtype = a.tensors["l"].dtype
        if a.site.op == "linear":
            l_vec = l_vec.flatten()
        if not a.hyper["feedforward"]:
            return (y.to(dtype) * l_vec).to(site.dtype)
        scaled = (x.to(dtype) * l_vec).to(site.dtype)
        if site.op == "linear" and site.transposed:  # transformers Conv1D: addmm(bias, x, W[in, out])
            return scaled @ weight if bias is None else torch.addmm(bias, scaled, weight)
        return site.run(scaled, weight, bias)

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
        l_vec = t["l"].double().flatten()
        logical = (weight.t() if site.transposed else weight).double()
        extra = [1] * (logical.ndim - 2)
        if a.hyper["feedforward"]:
            if site.op == "linear":
                factor = l_vec.reshape(1, -1)
            else:  # the input channel a weight column reads depends on the output channel's group
                groups, out, per_group = site.conv_args["groups"], site.out_features, site.weight_shape[1]
                factor = l_vec.reshape(groups, 1, per_group).expand(groups, out // groups, per_group)
                factor = factor.reshape(out, per_group)
            merged = logical * factor.reshape(*factor.shape, *extra)
            new_bias = bias
        else:
            merged = logical * l_vec.reshape(-1, 1, *extra)
            new_bias = None if bias is None else (bias.double() * l_vec).to(bias.dtype)
        merged = merged.t().contiguous() if site.transposed else merged
        return merged.to(weight.dtype), new_bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "(IA)³", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        return {
            "peft_type": "IA3",
            "target_modules": target_modules(adapters),
            # a regex, matched whole: a list would mark every module whose name merely ends like one of these
            "feedforward_modules": _exact_regex([a.site.module for a in adapters if a.hyper["feedforward"]]),
            "fan_in_fan_out": any(a.site.transposed for a in adapters),
            "init_ia3_weights": True,
        }

    def additive(self, a: SiteAdapter) -> bool:
        return False


# Fields read here, and ones that only shape training or targeting (fan_in_fan_out is forced per layer type by
# PEFT itself, and the site knows its own layout).
_HANDLED = frozenset({"feedforward_modules", "fan_in_fan_out", "init_ia3_weights"})


def _shape(site: Site, feedforward: bool) -> tuple[int, ...]:
    if site.op == "linear":
        return (1, site.in_features) if feedforward else (site.out_features, 1)
    channels = site.weight_shape[1] * site.conv_args["groups"] if feedforward else site.out_features
    return (1, channels, *[1] * (len(site.weight_shape) - 2))


def _is_feedforward(patterns: Any, module: str) -> bool:
    """PEFT's rule: a string is a regex matched whole; a list matches a bare name suffix (no dot boundary)."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module.endswith(p) for p in patterns)


def _exact_regex(modules: list[str]) -> str | list[str]:
    if not modules:
        return []  # PEFT iterates this field, so "none" is an empty list, not null
    return "(" + "|".join(re.escape(m) for m in sorted(set(modules))) + ")"
