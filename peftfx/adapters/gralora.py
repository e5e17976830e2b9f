"""GraLoRA on Linear and transformers Conv1D: a k x k grid of LoRA blocks that share rank chunks, plus optional LoRA.

Math (``N = gralora_k``, ``R = r``, ``c = R / N`` the chunk width, ``A = gralora_A ∈ R^{N, in/N, R}``,
``B = gralora_B ∈ R^{N, R, out/N}``, ``s = alpha / (r + hybrid_r)`` times the load-time ``scale``):

* input block ``n`` is projected to ``h_n = x_n @ A[n]`` (``R`` wide, cut into ``N`` chunks ``h_n^j`` of width ``c``);
* output block ``j`` is ``(h_0^j | h_1^j | ... | h_{N-1}^j) @ B[j]``;

so the update's block (out block ``j``, in block ``n``) is ``(A[n][:, chunk j] @ B[j][chunk n, :])ᵀ``. With
``hybrid_r > 0`` a plain LoRA ``B_g A_g`` (``gralora_{A,B}_general.weight``) is added. ``y += s · (both)``;
merge: ``W += s · ΔW`` (transposed back for Conv1D).
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
from .base import (
    AdditiveKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    refuse_unknown,
    target_modules,
    uniform,
)

_GENERAL = {"gralora_A_general": "gralora_A_general.weight", "gralora_B_general": "gralora_B_general.weight"}


class GraloraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(32, gt=0, description="rank of each block row (divisible by gralora_k)")
    alpha: float = Field(64.0, description="scaling numerator: the update is scaled by alpha / (r + hybrid_r)")
    gralora_k: int = Field(2, gt=0, description="number of blocks along each dimension (divides in and out)")
    hybrid_r: int = Field(0, ge=0, description="rank of an extra plain LoRA over the whole weight (0: none)")
    init: bool = Field(True, description="true: B = 0 (identity at init); false: random A and B")

    @model_validator(mode="after")
    def _rank_splits(self) -> GraloraParams:
        if self.r % self.gralora_k:
            raise ValueError(f"r={self.r} must be divisible by gralora_k={self.gralora_k}")
        return self


class Gralora(AdditiveKind):
    name = "gralora"
    peft_types = ("GRALORA",)
    peft_prefix = "gralora_"
    ops = frozenset({"linear"})
    Params = GraloraParams

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: GraloraParams = params
        _check_site(site, p.gralora_k, SpecError, "")
        out, inp = site.weight_shape
        k, r = p.gralora_k, p.r
        A = torch.empty(k, r, inp // k, dtype=torch.float64)
        B = torch.zeros(k, out // k, r, dtype=torch.float64)
        for n in range(k):  # each block as PEFT makes it: A kaiming (fan-in in/k), B zero unless init is false
            torch.nn.init.kaiming_uniform_(A[n], a=math.sqrt(5), generator=generator)
            if not p.init:
                torch.nn.init.kaiming_uniform_(B[n], a=math.sqrt(5), generator=generator)
        tensors = {"gralora_A": A.transpose(1, 2), "gralora_B": B.transpose(1, 2)}
        if p.hybrid_r:
            A_g = torch.empty(p.hybrid_r, inp, dtype=torch.float64)
            B_g = torch.zeros(out, p.hybrid_r, dtype=torch.float64)
            torch.nn.init.kaiming_uniform_(A_g, a=math.sqrt(5), generator=generator)
            if not p.init:
                torch.nn.init.kaiming_uniform_(B_g, a=math.sqrt(5), generator=generator)
            tensors |= {"gralora_A_general": A_g, "gralora_B_general": B_g}
        dtype = adapter_dtype(site.dtype)
        hyper = _hyper(r, p.alpha, k, p.hybrid_r, 1.0)
        tensors = {role: t.contiguous().to(dtype) for role, t in tensors.items()}
        return SiteAdapter(self, site, hyper, tensors, _peft_keys(p.hybrid_r))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        r, k, hybrid_r = int(cfg.get("r", 32)), int(cfg.get("gralora_k", 2)), int(cfg.get("hybrid_r", 0))
        if r % k:
            raise CheckpointError(f"{source.file}: GraLoRA r={r} is not divisible by gralora_k={k}")
        _check_site(site, k, CheckpointError, source.file)
        roles = _peft_keys(hybrid_r)
        tensors = {role: source.take(key) for role, key in roles.items()}
        source.refuse_others(roles.values(), "this GraLoRA site")
        out, inp = site.weight_shape
        expected = {
            "gralora_A": (k, inp // k, r),
            "gralora_B": (k, r, out // k),
            "gralora_A_general": (hybrid_r, inp),
            "gralora_B_general": (out, hybrid_r),
        }
        dtype = adapter_dtype(site.dtype)
        for role, tensor in tensors.items():
            source.check_shape(
                roles[role], tensor, expected[role], site, f" (r={r}, gralora_k={k}, hybrid_r={hybrid_r})"
            )
            tensors[role] = tensor.to(dtype)
        hyper = _hyper(r, cfg.get("alpha", 64), k, hybrid_r, scale)
        return SiteAdapter(self, site, hyper, tensors, roles)

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        h = a.hyper
        dtype = a.tensors["gralora_A"].dtype
        cast = dtype != a.site.dtype
        xa = x.to(dtype) if cast else x
        k = h["k"]
        proj = torch.einsum("...ni,nir->...nr", xa.unflatten(-1, (k, -1)), t["gralora_A"])  # [..., n, R]
        mixed = proj.unflatten(-1, (k, -1)).transpose(-3, -2).flatten(-2)  # [..., j, (n, c)]
        out = torch.einsum("...jr,jro->...jo", mixed, t["gralora_B"]).flatten(-2)
        if h["hybrid_r"]:
            out = out + F.linear(F.linear(xa, t["gralora_A_general"]), t["gralora_B_general"])
        out = out * h["scaling"]
        return y + (out.to(a.site.dtype) if cast else out)

    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h, site = a.hyper, a.site
        out, inp = site.weight_shape
        k = h["k"]
        A = t["gralora_A"].double().unflatten(-1, (k, -1))  # [n, i, j, c]
        B = t["gralora_B"].double().unflatten(1, (k, -1))  # [j, n, c, o]
        delta = torch.einsum("nijc,jnco->nijo", A, B).reshape(inp, out).t()
        if h["hybrid_r"]:
            delta = delta + t["gralora_B_general"].double() @ t["gralora_A_general"].double()
        return delta * h["scaling"]

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "GraLoRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("r", "alpha", "k", "hybrid_r"), "GraLoRA", " (it has no pattern)")
        return {
            "peft_type": "GRALORA",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "alpha": first["alpha"],
            "gralora_k": first["k"],
            "hybrid_r": first["hybrid_r"],
            "gralora_dropout": 0.0,
            "fan_in_fan_out": any(a.site.transposed for a in adapters),
            "bias": "none",
        }


# Read here, or training-only (dropout, init, which biases train); fan_in_fan_out PEFT sets per layer type.
_HANDLED = frozenset(
    {"r", "alpha", "gralora_k", "hybrid_r", "gralora_dropout", "fan_in_fan_out", "init_weights", "bias"}
)


def _hyper(r: int, alpha: float, k: int, hybrid_r: int, scale: float) -> dict[str, Any]:
    return {
        "r": r,
        "alpha": alpha,
        "k": k,
        "hybrid_r": hybrid_r,
        "scaling": alpha / (r + hybrid_r) * scale,
        "scale": scale,
    }


def _peft_keys(hybrid_r: int) -> dict[str, str]:
    keys = {"gralora_A": "gralora_A", "gralora_B": "gralora_B"}
    return keys | _GENERAL if hybrid_r else keys


def _check_site(site: Site, k: int, error: type[Exception], where: str) -> None:
    if site.in_features % k or site.out_features % k:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}GraLoRA needs gralora_k={k} to divide both dimensions of {site.describe()}")
