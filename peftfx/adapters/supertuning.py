"""Super-Tuning on Linear: trained values at fixed weight positions, plus an optional LoRA ("Supra").

Math (``W`` is ``[out, in]``; ``v = supertuning_values``, ``p = supertuning_indices`` flat positions into ``W``,
chosen at creation as the largest (or smallest) ``|W|`` entries; ``A``/``B`` the optional LoRA, ``s`` the load-time
``scale``):

    ΔW = s · (scatter_add(0, p, v) + lora_alpha / r · B A),   y += x ΔWᵀ;  merge: ``W += ΔW``.

The positions are saved by default; a checkpoint saved with ``save_precomputed_indices=False`` has none, and they
are chosen again from the base weight, as PEFT does when it loads one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import CheckpointError, SpecError
from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules, uniform

_KEYS = {
    "values": "supertuning_values",
    "indices": "supertuning_indices",
    "lora_A": "supertuning_lora_A.weight",
    "lora_B": "supertuning_lora_B.weight",
}


class SupertuningParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sparsity: float = Field(0.99, ge=0.0, lt=1.0, description="share of the weight's entries left frozen")
    select_top: bool = Field(True, description="train the largest-magnitude entries (false: the smallest)")
    r: int | None = Field(None, gt=0, description="rank of the additional LoRA (Supra); none: sparse only")
    lora_alpha: float | None = Field(None, description="LoRA scaling numerator (default 2 r); needs r")
    init: bool = Field(True, description="true: values and LoRA B at zero (identity at init); false: random")

    @model_validator(mode="after")
    def _alpha_needs_rank(self) -> SupertuningParams:
        if self.lora_alpha is not None and self.r is None:
            raise ValueError("lora_alpha is set but r is not: the LoRA part needs a rank")
        return self


class Supertuning(AdapterKind):
    name = "supertuning"
    peft_types = ("SUPERTUNING",)
    peft_prefix = "supertuning_"
    ops = frozenset({"linear"})
    Params = SupertuningParams
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: SupertuningParams = params
        n = _count(site, p.sparsity, SpecError, "")
        indices = _select(site, n, p.select_top)
        values = torch.zeros(n, dtype=torch.float64)
        if not p.init:
            values.normal_(generator=generator)
        dtype = adapter_dtype(site.dtype)
        tensors = {"values": values.to(dtype), "indices": indices}
        alpha = None
        if p.r is not None:
            alpha = p.lora_alpha if p.lora_alpha is not None else 2.0 * p.r
            A = torch.empty(p.r, site.in_features, dtype=torch.float64)
            B = torch.zeros(site.out_features, p.r, dtype=torch.float64)
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            if not p.init:
                torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=generator)
            tensors |= {"lora_A": A.to(dtype), "lora_B": B.to(dtype)}
        hyper = _hyper(p.sparsity, p.select_top, p.r, alpha, True, 1.0)
        return SiteAdapter(self, site, hyper, tensors, {role: _KEYS[role] for role in tensors})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        sparsity, select_top = float(cfg.get("sparsity", 0.99)), cfg.get("select_top", True) is not False
        r = cfg.get("r")
        alpha = cfg.get("lora_alpha")
        if r is not None and alpha is None:
            alpha = 2.0 * r
        saved = cfg.get("save_precomputed_indices", True) is not False
        n = _count(site, sparsity, CheckpointError, source.file)
        expected: dict[str, tuple[int, ...]] = {"values": (n,)}
        if saved:
            expected["indices"] = (n,)
        if r is not None:
            expected |= {"lora_A": (r, site.in_features), "lora_B": (site.out_features, r)}
        wanted = {_KEYS[role] for role in expected}
        source.refuse_others(wanted, "this Super-Tuning site")
        dtype = adapter_dtype(site.dtype)
        tensors = {}
        for role, shape in expected.items():
            tensor = source.take(_KEYS[role])
            source.check_shape(_KEYS[role], tensor, shape, site, f" (sparsity={sparsity}, r={r})")
            tensors[role] = tensor.to(dtype) if role != "indices" else tensor
        if saved:
            _check_indices(site, tensors["indices"], source)
        else:
            tensors["indices"] = _select(site, n, select_top)
        hyper = _hyper(sparsity, select_top, r, alpha, saved, scale)
        return SiteAdapter(self, site, hyper, tensors, {role: _KEYS[role] for role in tensors})

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        dtype = a.tensors["values"].dtype
        cast = dtype != a.site.dtype
        xa = x.to(dtype) if cast else x
        out = F.linear(xa, _sparse(a, t["values"], t["indices"]))
        if a.hyper["r"] is not None:
            out = out + F.linear(F.linear(xa, t["lora_A"]), t["lora_B"]) * (a.hyper["lora_alpha"] / a.hyper["r"])
        if a.hyper["scale"] != 1.0:
            out = out * a.hyper["scale"]
        return y + (out.to(a.site.dtype) if cast else out)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = a.hyper
        delta = _sparse(a, t["values"].double(), t["indices"])
        if h["r"] is not None:
            delta = delta + (h["lora_alpha"] / h["r"]) * (t["lora_B"].double() @ t["lora_A"].double())
        return (weight.double() + h["scale"] * delta).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "Super-Tuning", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("sparsity", "select_top", "r", "lora_alpha"), "Super-Tuning")
        return {
            "peft_type": "SUPERTUNING",
            "target_modules": target_modules(adapters),
            "sparsity": first["sparsity"],
            "select_top": first["select_top"],
            "r": first["r"],
            "lora_alpha": first["lora_alpha"],
            "lora_dropout": 0.0,
            "save_precomputed_indices": True,
        }

    def additive(self, a: SiteAdapter) -> bool:
        return True  # the positions are fixed tensors; the update does not read the live weight


# Read here, or training-only (dropout; init_weights only seeds the stored values).
_HANDLED = frozenset(
    {"sparsity", "select_top", "r", "lora_alpha", "lora_dropout", "init_weights", "save_precomputed_indices"}
)


def _hyper(sparsity: float, top: bool, r: int | None, alpha: float | None, saved: bool, scale: float) -> dict:
    return {"sparsity": sparsity, "select_top": top, "r": r, "lora_alpha": alpha, "saved": saved, "scale": scale}


def _count(site: Site, sparsity: float, error: type[Exception], where: str) -> int:
    """PEFT's number of trained entries: ``int(numel · (1 - sparsity))``, at least one."""
    numel = site.out_features * site.in_features
    n = int(numel * (1 - sparsity))
    if n < 1:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}sparsity={sparsity} leaves no trained entry in {site.describe()}")
    return n


def _select(site: Site, n: int, top: bool) -> torch.Tensor:
    """The ``n`` largest (or smallest) ``|W|`` positions, flat, as PEFT picks them."""
    weight = site.base_weight().detach()
    return torch.topk(weight.abs().flatten(), k=n, largest=top)[1].to(torch.int32)


def _check_indices(site: Site, indices: torch.Tensor, source: PeftSource) -> None:
    numel = site.out_features * site.in_features
    as_long = indices.long()
    if indices.is_floating_point() or bool((as_long < 0).any() or (as_long >= numel).any()):
        raise CheckpointError(
            f"{source.file}: {source.keys[_KEYS['indices']]!r} must hold integer positions below {numel} "
            f"for {site.describe()}"
        )


def _sparse(a: SiteAdapter, values: Any, indices: Any) -> Any:
    """``scatter_add(0, p, v)`` reshaped to ``[out, in]``."""
    out, inp = a.site.weight_shape
    flat = values.new_zeros(out * inp).scatter_add(0, indices.long(), values)
    return flat.reshape(out, inp)
