"""LN tuning: a trained copy of a module's weight (and bias) used in place of the base ones.

PEFT swaps in a deep copy of the targeted module (meant for LayerNorm/RMSNorm, allowed anywhere), so here the
site's own op is run again on its input with the copy's tensors: ``y = op(x, W', b')``. Merge is the swap
itself, ``(W, b) ← (W', b')``. The copy keeps the base dtype, as PEFT does (it never upcasts it).

Sites: LayerNorm, RMSNorm (the ``weight * normalized`` product, whose input is already normalized), and
Linear / Conv1D / Conv1d-3d / Embedding. There is no scaling factor, so a ``scale`` other than 1 is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import fx

from ..errors import CheckpointError
from ..sites import Site, signature_of
from .base import AdapterKind, PeftSource, SiteAdapter, refuse_unknown, target_modules

_KEYS = {"weight": "ln_tuning_layers.weight", "bias": "ln_tuning_layers.bias"}


class LnTuningParams(BaseModel):
    """No settings: the copy starts as the base module's own weight and bias."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LnTuning(AdapterKind):
    name = "ln_tuning"
    peft_types = ("LN_TUNING",)
    peft_prefix = "ln_tuning_"
    ops = frozenset({"layer_norm", "rms_norm", "linear", "conv1d", "conv2d", "conv3d", "embedding"})
    Params = LnTuningParams
    scalable = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        tensors = {"weight": site.base_weight().detach().clone()}
        if site.bias is not None:
            tensors["bias"] = site.base_bias().detach().clone()
        return SiteAdapter(self, site, {"scale": 1.0}, tensors, {role: _KEYS[role] for role in tensors})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        base = {"weight": site.base_weight()}
        if site.bias is not None:
            base["bias"] = site.base_bias()
        roles = {role: _KEYS[role] for role in base}
        extra = sorted(set(source.tensors) - set(roles.values()))
        if extra:
            has = "has a bias" if site.bias is not None else "has no bias"
            raise CheckpointError(
                f"{source.file}: unexpected tensor {source.keys[extra[0]]!r} for LN tuning of {site.describe()} "
                f"(which {has})"
            )
        tensors = {}
        for role, key in roles.items():
            tensor = source.take(key)
            if tensor.shape != base[role].shape:
                raise CheckpointError(
                    f"{source.file}: {source.keys[key]!r} has shape {list(tensor.shape)}, expected "
                    f"{list(base[role].shape)} (the {role} of {site.describe()})"
                )
            tensors[role] = tensor.to(base[role].dtype)
        return SiteAdapter(self, site, {"scale": scale}, tensors, roles)

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        node = a.site.node
        signature = signature_of(node)
        args = list(fx.node.map_arg(node.args, lambda n: fx.Proxy(n, x.tracer)))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: fx.Proxy(n, x.tracer))
        args[signature.input] = x
        args[signature.weight] = t["weight"]
        if "bias" in t:
            args[signature.bias] = t["bias"]
        return node.target(*args, **kwargs)  # the site's own op, so the copy computes exactly as the base would

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        new_bias = bias if bias is None else t["bias"].detach().to(bias.dtype).clone()
        return t["weight"].detach().to(weight.dtype).clone(), new_bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, frozenset(), "LN tuning", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        return {"peft_type": "LN_TUNING", "target_modules": target_modules(adapters)}
