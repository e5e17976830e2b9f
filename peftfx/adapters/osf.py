"""OSF: orthogonal subspace fine-tuning, the low singular part of a Linear weight made trainable.

The base weight's SVD ``W = U diag(S) Vh`` (computed in float32, then cast to the weight's dtype, as PEFT does)
is split at ``k`` (effective_rank): the top ``k`` directions stay frozen, the remaining ``m - k``
(``m = min(out, in)``) are the stored ``U_low`` [out, m-k], ``S_low`` [m-k], ``V_low`` [m-k, in]. With the
initial low part ``L₀ = U[:, k:] diag(S[k:]) Vh[k:]`` rebuilt from the base weight whenever the adapter loads:

    ``y += (U_low diag(S_low) V_low - L₀) x``,   merged ``W += U_low diag(S_low) V_low - L₀``.

``k`` is PEFT's: ``effective_rank`` (or the first ``rank_pattern`` regex found in the module path), a float in
(0, 1] meaning that fraction of ``m``, None meaning ``m // 2``, clipped to [0, m].

Limits: ``L₀`` needs the base weight's SVD; a live OSF adapter recomputes it (detached) at every call, which is
exact but not cheap on large layers; merge it for inference. PEFT's gradient projection (keeping the update
orthogonal to the frozen directions while training) is not reproduced: in a peftfx graph the three tensors
train freely.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, refuse_unknown, target_modules

_ROLES = ("U_low", "S_low", "V_low")


class OsfParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    effective_rank: int | float | None = Field(
        None,
        description="frozen top singular directions: a count, a fraction in (0, 1] of min(out, in), or None (half)",
    )
    init: bool = Field(True, description="true: the base weight's own low singular part (identity); false: random")


class Osf(AdapterKind):
    name = "osf"
    peft_types = ("OSF",)
    peft_prefix = "osf_"
    ops = frozenset({"linear"})
    Params = OsfParams
    scalable = False
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: OsfParams = params
        k = _resolve(p.effective_rank, min(site.weight_shape))
        if k <= 0:
            raise SpecError(f"osf at {site.describe()}: effective_rank must leave at least one frozen direction")
        weight = site.base_weight()
        U, S, V = _low(weight, k, site.dtype)
        if not p.init:
            U, S, V = (torch.randn(m.shape, generator=generator, dtype=torch.float64).to(m.dtype) for m in (U, S, V))
        hyper = {"k": k, "scale": 1.0}
        return SiteAdapter(self, site, hyper, dict(zip(_ROLES, (U, S, V), strict=True)), dict(_KEYS))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        source.refuse_others(_KEYS.values(), "OSF")
        out, inp = site.weight_shape
        m = min(out, inp)
        value = cfg.get("effective_rank")
        for pattern, rank in (cfg.get("rank_pattern") or {}).items():
            if re.search(pattern, site.module):
                value = rank
                break
        k = _resolve(value, m)
        if k <= 0:
            raise CheckpointError(f"{source.file}: effective_rank {value!r} gives no frozen direction at {site.module}")
        low = m - k
        expected = {"U_low": (out, low), "S_low": (low,), "V_low": (low, inp)}
        tensors = {}
        for role, key in _KEYS.items():
            tensor = source.take(key)
            source.check_shape(key, tensor, expected[role], site, f" (effective_rank {k})")
            tensors[role] = tensor.to(site.dtype)
        return SiteAdapter(self, site, {"k": k, "scale": scale}, tensors, dict(_KEYS))

    # -- graph ----------------------------------------------------------------------------------------------

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        U0, S0, V0 = _low(weight.detach(), a.hyper["k"], a.site.dtype)
        A = torch.cat([t["U_low"] * t["S_low"].unsqueeze(0), -(U0 * S0.unsqueeze(0))], dim=1)
        B = torch.cat([t["V_low"], V0], dim=0)
        return y + F.linear(F.linear(x, B), A)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        U0, S0, V0 = (m.double() for m in _low(raw_weight, a.hyper["k"], raw_weight.dtype))
        U, S, V = (t[r].double() for r in _ROLES)
        delta = (U * S) @ V - (U0 * S0) @ V0
        return (weight.double() + delta).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "OSF", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        ranks = {a.site.module: a.hyper["k"] for a in adapters}
        return {
            "peft_type": "OSF",
            "target_modules": target_modules(adapters),
            "effective_rank": None,
            # each module's resolved rank, anchored so that it matches that module's path only
            "rank_pattern": {rf"(^|\.){re.escape(module)}$": k for module, k in ranks.items()},
            "init_weights": True,
        }


_KEYS = {role: f"osf_svd_params.{role}" for role in _ROLES}
# target_svd_config is accepted and ignored by PEFT itself; init_weights only shapes the init.
_HANDLED = frozenset({"effective_rank", "rank_pattern", "init_weights", "target_svd_config"})


def _resolve(value: Any, m: int) -> int:
    """PEFT's effective rank: None -> m // 2, a float in (0, 1] -> that fraction of m, else the count; clipped."""
    if value is None:
        return m // 2
    k = int(m * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(m, k), 0)


def _low(weight: Any, k: int, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """The base weight's low singular part (U[:, k:], S[k:], Vh[k:]) from a float32 SVD, in the weight's dtype."""
    svd = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    return svd[0][:, k:].to(dtype), svd[1][k:].to(dtype), svd[2][k:].to(dtype)
