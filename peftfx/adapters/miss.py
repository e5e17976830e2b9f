"""MiSS (formerly Bone) on Linear: a shared block ``D`` tiled over the weight, or, in ``bat`` mode, mixed with it.

Math (``W`` is ``[out, in]``, ``s`` the load-time ``scale``, 1 for PEFT):

* default (``init_weights`` true/false): ``D = miss_block ∈ R^{r, out}``, ``ΔW[o, i] = D[i mod r, o]``. Forward:
  the input is zero-padded to a multiple of ``r``, its ``r``-wide groups are summed, then ``y += s · Σ_g x_g @ D``.
* ``mini``: ``D ∈ R^{r, mini_r}`` is repeated ``out / mini_r`` times along the output, then as above.
* ``bat``: ``D ∈ R^{out/r, r, r}``; ``W`` cut into ``r x r`` blocks ``W[a, c]``, ``ΔW[a, c] = W[a, c] @ D[a] + D[a]``.
  This depends on the base weight (the one the live adapter reads), so it is not additive.

Merge: ``W ← W + s · ΔW``. PEFT only wraps ``nn.Linear`` (not transformers' Conv1D), so Conv1D sites are refused.
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
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules, uniform

_KEY = "miss_block"


class MissParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(64, gt=0, description="block width along the input features (at most in_features)")
    init: bool | Literal["bat", "mini"] = Field(
        True,
        description="true: default MiSS, block at zero (identity at init); false: default MiSS with a random block; "
        "bat: blocks mixed with the base weight; mini: a block of mini_r output columns, repeated",
    )
    mini_r: int = Field(1, gt=0, description="output width of the block in mini mode (must divide out_features)")


class Miss(AdapterKind):
    name = "miss"
    peft_types = ("MISS",)
    peft_prefix = "miss_"
    ops = frozenset({"linear"})
    Params = MissParams
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: MissParams = params
        mode = _mode(p.init)
        _check(site, p.r, mode, p.mini_r, SpecError, "")
        block = torch.zeros(_block_shape(site, p.r, mode, p.mini_r), dtype=torch.float64)
        if p.init is False:
            torch.nn.init.kaiming_uniform_(block, a=math.sqrt(5), generator=generator)
        hyper = _hyper(p.r, mode, p.init, p.mini_r, 1.0)
        return SiteAdapter(self, site, hyper, {_KEY: block.to(adapter_dtype(site.dtype))}, {_KEY: _KEY})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        init = cfg.get("init_weights", True)
        mode = _mode(init)
        r, mini_r = int(cfg.get("r", 64)), int(cfg.get("mini_r", 1))
        _check(site, r, mode, mini_r, CheckpointError, source.file)
        block = source.take(_KEY)
        source.refuse_others({_KEY}, "a MiSS site")
        expected = _block_shape(site, r, mode, mini_r)
        source.check_shape(_KEY, block, expected, site, f" (MiSS {mode}, r={r})")
        hyper = _hyper(r, mode, init, mini_r, scale)
        return SiteAdapter(self, site, hyper, {_KEY: block.to(adapter_dtype(site.dtype))}, {_KEY: _KEY})

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        h, site = a.hyper, a.site
        dtype = a.tensors[_KEY].dtype
        cast = dtype != site.dtype
        xa = x.to(dtype) if cast else x
        if h["mode"] == "bat":
            out = F.linear(xa, _delta(a, weight.to(dtype) if cast else weight, t[_KEY]))
        else:
            block = _full_block(a, t[_KEY])
            r, pad = h["r"], -site.in_features % h["r"]
            if pad:
                xa = F.pad(xa, (0, pad))
            out = xa.unflatten(-1, (-1, r)).sum(-2) @ block
        if h["scale"] != 1.0:
            out = out * h["scale"]
        return y + (out.to(site.dtype) if cast else out)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        block = t[_KEY].double()
        if a.hyper["mode"] == "bat":
            delta = _delta(a, raw_weight.double(), block)
        else:
            rows = torch.arange(a.site.in_features) % a.hyper["r"]
            delta = _full_block(a, block)[rows].t()
        return (weight.double() + a.hyper["scale"] * delta).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        init = config.get("init_weights", True)
        if init not in (True, False, "bat", "mini"):
            raise CheckpointError(f"{file}: init_weights={init!r} is not a MiSS mode (true, false, 'bat', 'mini')")
        refuse_unknown(config, _HANDLED, "MiSS", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("r", "init", "mini_r"), "MiSS", " (it has no pattern)")
        return {
            "peft_type": "MISS",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "init_weights": first["init"],
            "mini_r": first["mini_r"],
            "miss_dropout": 0.0,
            "bias": "none",
        }

    def additive(self, a: SiteAdapter) -> bool:
        return a.hyper["mode"] != "bat"


# Read here, or training-only (dropout; which biases train, saved as plain base tensors).
_HANDLED = frozenset({"r", "mini_r", "init_weights", "miss_dropout", "bias"})


def _mode(init: Any) -> str:
    return init if init in ("bat", "mini") else "default"


def _hyper(r: int, mode: str, init: Any, mini_r: int, scale: float) -> dict[str, Any]:
    return {"r": r, "mode": mode, "init": init, "mini_r": mini_r, "scale": scale}


def _check(site: Site, r: int, mode: str, mini_r: int, error: type[Exception], where: str) -> None:
    prefix = f"{where}: " if where else ""
    out, inp = site.weight_shape
    if r > inp:
        raise error(f"{prefix}MiSS r={r} exceeds in_features of {site.describe()}")
    if mode == "bat" and (inp % r or out % r):
        raise error(f"{prefix}MiSS bat needs r={r} to divide both dimensions of {site.describe()}")
    if mode == "mini" and out % mini_r:
        raise error(f"{prefix}MiSS mini needs mini_r={mini_r} to divide out_features of {site.describe()}")


def _block_shape(site: Site, r: int, mode: str, mini_r: int) -> tuple[int, ...]:
    out = site.out_features
    if mode == "bat":
        return (out // r, r, r)
    return (r, mini_r if mode == "mini" else out)


def _full_block(a: SiteAdapter, block: Any) -> Any:
    """The ``[r, out]`` block of default mode (mini's block repeated along the output)."""
    if a.hyper["mode"] == "mini":
        return block.repeat(1, a.site.out_features // a.hyper["mini_r"])
    return block


def _delta(a: SiteAdapter, weight: Any, block: Any) -> Any:
    """bat's ``ΔW`` (``[out, in]``): each ``r x r`` block ``W[a, c]`` becomes ``W[a, c] @ D[a] + D[a]``."""
    out, inp = a.site.weight_shape
    r = a.hyper["r"]
    blocks = weight.reshape(out // r, r, inp // r, r).permute(0, 2, 1, 3)  # [a, c, r, r]
    mixed = blocks @ block.unsqueeze(1) + block.unsqueeze(1)
    return mixed.permute(0, 2, 1, 3).reshape(out, inp)
