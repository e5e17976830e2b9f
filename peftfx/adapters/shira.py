"""SHiRA on Linear: a sparse, high-rank ΔW, trained values at a fixed set of positions.

Math (``W`` logical ``[out, in]``): ``ΔW[rows[k], cols[k]] += scale * shira_weight[k]`` with
``(rows, cols) = shira_indices`` (``[2, r (in + out)]``), ``y += x ΔWᵀ``. Merge: ``W += ΔW``.

PEFT saves the positions (``shira_indices``, int32; float32 when saved on Windows), so they are a tensor role
here too: kept as int32, registered in the graph as a non-trainable parameter, and written back unchanged.
A fresh adapter draws them as PEFT's random mask does: ``randperm(out * in)`` from a CPU generator seeded with
``random_seed`` (torch's default seed when unset), first ``r (in + out)``, in row-major order.

PEFT builds ``W + ΔW`` and calls the linear on it; the adapter here adds ``x ΔWᵀ`` to the base output
instead (the same sum, rounded differently in float32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
from ..sites import Site
from ..sizes import Seed
from .base import (
    AdapterKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    add_linear_delta,
    refuse_unknown,
    target_modules,
    uniform,
)

KEYS = {"weight": "shira_weight", "indices": "shira_indices"}


class ShiraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(32, gt=0, description="sizes the adapter like a LoRA of rank r: r * (in + out) trained values")
    random_seed: Seed | None = Field(None, description="seed of the random mask (PEFT's random_seed)")
    init_weights: bool = Field(True, description="true: zero values (identity at init); false: N(0, 1)")


class Shira(AdapterKind):
    name = "shira"
    peft_types = ("SHIRA",)
    peft_prefix = "shira_"
    ops = frozenset({"linear"})
    Params = ShiraParams
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: ShiraParams = params
        n = _count(site, p.r, SpecError, "")
        out, inp = site.weight_shape
        mask_generator = torch.Generator()
        if p.random_seed is not None:
            mask_generator.manual_seed(p.random_seed)
        flat = torch.randperm(out * inp, generator=mask_generator)[:n].sort().values
        indices = torch.stack([flat // inp, flat % inp]).to(torch.int32)
        values = torch.zeros(n, dtype=torch.float64)
        if not p.init_weights:
            values.normal_(generator=generator)
        tensors = {"weight": values.to(adapter_dtype(site.dtype)), "indices": indices}
        return SiteAdapter(self, site, {"r": p.r, "random_seed": p.random_seed, "scale": 1.0}, tensors, dict(KEYS))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        source.refuse_others(KEYS.values(), "a SHiRA site")
        r = int(source.config.get("r", 32))
        n = _count(site, r, CheckpointError, source.file)
        values, indices = source.take(KEYS["weight"]), source.take(KEYS["indices"])
        for role, tensor, shape in (("weight", values, (n,)), ("indices", indices, (2, n))):
            source.check_shape(KEYS[role], tensor, shape, site, f" (r={r} of adapter_config.json)")
        out, inp = site.weight_shape
        as_int = indices.to(torch.int64)
        if (
            (indices.is_floating_point() and not torch.equal(as_int.to(indices.dtype), indices))
            or bool((as_int < 0).any())
            or bool((as_int[0] >= out).any() or (as_int[1] >= inp).any())
        ):
            raise CheckpointError(
                f"{source.file}: {source.keys[KEYS['indices']]!r} holds positions outside {out}x{inp} "
                f"(or non-integers) for {site.describe()}"
            )
        tensors = {"weight": values.to(adapter_dtype(site.dtype)), "indices": as_int.to(torch.int32)}
        hyper = {"r": r, "random_seed": source.config.get("random_seed"), "scale": scale}
        return SiteAdapter(self, site, hyper, tensors, dict(KEYS))

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        delta = _delta(a, t["weight"], t["indices"])
        return add_linear_delta(a.site, x, y, delta, a.tensors["weight"].dtype)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (weight.double() + _delta(a, t["weight"].double(), t["indices"])).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "SHiRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("r", "random_seed"), "SHiRA", " (no per-module pattern)")
        return {
            "peft_type": "SHIRA",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "mask_type": "random",
            "random_seed": first["random_seed"],
            "fan_in_fan_out": False,
            "init_weights": True,
        }

    def additive(self, a: SiteAdapter) -> bool:
        return True


# Read here, or training-only (init_weights: the values are stored; the mask: the indices are stored).
_HANDLED = frozenset({"r", "mask_type", "random_seed", "fan_in_fan_out", "init_weights"})


def _count(site: Site, r: int, error: type[Exception], where: str) -> int:
    prefix = f"{where}: " if where else ""
    out, inp = site.weight_shape
    n = r * (out + inp)
    if n > out * inp:
        raise error(f"{prefix}SHiRA r={r} gives {n} values, more than the {out * inp} weights of {site.describe()}")
    return n


def _delta(a: SiteAdapter, values: Any, indices: Any) -> Any:
    """Dense ΔW (logical ``[out, in]``), scaled; on tensors and fx proxies alike."""
    index = indices.long()
    dense = values.new_zeros(a.site.weight_shape)
    return dense.index_put((index[0], index[1]), values * a.hyper["scale"], accumulate=True)
