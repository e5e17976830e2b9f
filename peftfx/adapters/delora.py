"""DeLoRA on Linear: a low-rank update with normalised directions, a learned norm bound and the base's column norms.

Math (``A = delora_A ∈ R^{r, in}``, ``B = delora_B ∈ R^{out, r}``, ``λ = delora_lambda``,
``w = delora_w_norm ∈ R^{in}`` the column norms of the base weight frozen when the adapter was created, ``s`` the
load-time ``scale``):

    d_k = λ / r / (max(‖A[k, :]‖, 1e-4) · max(‖B[:, k]‖, 1e-4))
    y += s · B diag(d) A (w ⊙ x)          ΔW = s · B diag(d) A diag(w)

``w`` is a buffer in PEFT: here it is stored like the other tensors but detached in the graph, so it never trains.
PEFT only wraps ``nn.Linear`` (not transformers' Conv1D), so Conv1D sites are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..sites import Site
from .base import (
    AdapterKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    pattern_value,
    per_module,
    refuse_unknown,
    target_modules,
)

_ROLES = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
_EPS = 1e-4  # PEFT's floor on the row/column norms


class DeloraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, gt=0, description="rank")
    delora_lambda: float = Field(15.0, description="initial norm bound of the update (trained afterwards)")
    init: bool = Field(True, description="true: B = 0 (identity at init); false: random A and B")


class Delora(AdapterKind):
    name = "delora"
    peft_types = ("DELORA",)
    peft_prefix = "delora_"
    ops = frozenset({"linear"})
    Params = DeloraParams
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: DeloraParams = params
        out, inp = site.weight_shape
        A = torch.empty(p.r, inp, dtype=torch.float64)
        B = torch.zeros(out, p.r, dtype=torch.float64)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        if not p.init:
            torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=generator)
        weight = site.base_weight()
        tensors = {
            "delora_A": A,
            "delora_B": B,
            "delora_lambda": torch.full((1,), p.delora_lambda, dtype=torch.float64),
            "delora_w_norm": torch.linalg.vector_norm(weight.double(), dim=0),
        }
        dtype = adapter_dtype(site.dtype)
        hyper = {"r": p.r, "lambda": p.delora_lambda, "scale": 1.0}
        return SiteAdapter(
            self,
            site,
            hyper,
            {k: v.to(dtype) for k, v in tensors.items()},
            {k: k for k in _ROLES},
            frozen=frozenset({"delora_w_norm"}),
        )

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        tensors = {role: source.take(role) for role in _ROLES}
        source.refuse_others(_ROLES, "a DeLoRA site")
        r = pattern_value(cfg.get("rank_pattern") or {}, site.module, cfg.get("r", 8))
        out, inp = site.weight_shape
        expected = {"delora_A": (r, inp), "delora_B": (out, r), "delora_lambda": (1,), "delora_w_norm": (inp,)}
        dtype = adapter_dtype(site.dtype)
        for role, tensor in tensors.items():
            source.check_shape(role, tensor, expected[role], site, f" (r={r} from adapter_config.json)")
            tensors[role] = tensor.to(dtype)
        lam = pattern_value(cfg.get("lambda_pattern") or {}, site.module, cfg.get("delora_lambda", 15))
        hyper = {"r": r, "lambda": lam, "scale": scale}
        return SiteAdapter(self, site, hyper, tensors, {k: k for k in _ROLES}, frozen=frozenset({"delora_w_norm"}))

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        dtype = a.tensors["delora_A"].dtype
        cast = dtype != a.site.dtype
        xa = x.to(dtype) if cast else x
        h = F.linear(xa * t["delora_w_norm"].detach(), t["delora_A"]) * _diag(a, t)
        out = F.linear(h, t["delora_B"])
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
        t64 = {k: v.double() for k, v in t.items()}
        delta = (t64["delora_B"] * _diag(a, t64)) @ t64["delora_A"] * t64["delora_w_norm"]
        return (weight.double() + a.hyper["scale"] * delta).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "DeLoRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = adapters[0].hyper
        return {
            "peft_type": "DELORA",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "delora_lambda": first["lambda"],
            "rank_pattern": per_module(adapters, "r", first["r"]),
            "lambda_pattern": per_module(adapters, "lambda", first["lambda"]),
            "module_dropout": 0.0,
            "bias": "none",
        }

    def additive(self, a: SiteAdapter) -> bool:
        return True  # w is frozen in the adapter, so the update does not read the live base weight


# Read here, or init/training-only: lambda and its pattern only seed delora_lambda, which the file stores.
_HANDLED = frozenset({"r", "rank_pattern", "delora_lambda", "lambda_pattern", "module_dropout", "init_weights", "bias"})


def _diag(a: SiteAdapter, t: Mapping[str, Any]) -> Any:
    """The per-rank factor ``λ / r / (‖A_k‖ ‖B^k‖)``, norms floored at 1e-4."""
    a_norm = torch.linalg.vector_norm(t["delora_A"], dim=1).clamp(min=_EPS)
    b_norm = torch.linalg.vector_norm(t["delora_B"], dim=0).clamp(min=_EPS)
    return t["delora_lambda"] / a.hyper["r"] / (a_norm * b_norm)
