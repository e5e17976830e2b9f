"""RandLoRA (PEFT's ``RANDLORA``): trained scales on shared random bases, on Linear and transformers Conv1D.

Shared (adapter-wide, PEFT's ``base_model.randlora_A/B``): ``A: [r, 1, min_dim]``, ``B: [max_dim, n, r]`` for the
largest targeted ``(out, in)``. Per site, with ``m = min(in, out)``, ``M = max(in, out)``, ``b = ceil(m / r)``:

* ``U = flatten_{0,1}(lam[:, :, None] · A[:, :b, :m] · g[None])``  (``lam: [r, b]``, ``g: [b, m]``; ``U: [r·b, m]``),
  ``V = flatten_{1,2}(B[:M, :b, :])``  (``[M, b·r]``; note PEFT flattens U rank-major and V basis-major);
* ``(P, Q) = (U, V)`` when ``m == in``, else ``(Vᵀ, Uᵀ)``; ``y += (x Pᵀ) Qᵀ · s`` with ``s = alpha / r``;
* merge ``W += Q P · s`` (transposed for Conv1D).

The shared bases are frozen (never trained), as PEFT's buffers are. PEFT also stores a copy of the shared
bases under every adapted module; they are checked against the shared ones on load and written back only once
(``base_model.*``), which PEFT reloads as the same buffers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError
from ..sites import Site
from ..sizes import Seed
from .base import (
    AdditiveKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    refuse_unknown,
    target_modules,
    uniform,
)

_OWN = ("randlora_lambda", "randlora_gamma")
_SHARED = ("randlora_A", "randlora_B")


class RandloraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(32, gt=0, description="rank of each random basis (PEFT's r); one value for the whole adapter")
    alpha: float = Field(640.0, description="scaling numerator (PEFT's randlora_alpha; scaling = alpha / r)")
    projection_prng_key: Seed = Field(0, description="seed of the shared random bases")
    init_weights: bool = Field(True, description="true: lambda = 0 (identity at init); false: lambda ~ N(0, 1)")


class Randlora(AdditiveKind):
    name = "randlora"
    peft_types = ("RANDLORA",)
    peft_prefix = "randlora_"
    ops = frozenset({"linear"})
    Params = RandloraParams

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: RandloraParams = params
        dtype = adapter_dtype(site.dtype)
        m, M = min(site.weight_shape), max(site.weight_shape)
        b = math.ceil(m / p.r)
        if p.init_weights:
            lam, gamma = torch.zeros(p.r, b), torch.full((b, m), 1.0 / max(b, m))
        else:
            lam = torch.randn(p.r, b, generator=generator, dtype=torch.float64)
            gamma = torch.full((b, m), 1.0 / M)
        A, B = prepared[p.r, p.projection_prng_key]
        tensors = {"randlora_lambda": lam, "randlora_gamma": gamma, "randlora_A": A, "randlora_B": B}
        tensors = {role: t.to(dtype) for role, t in tensors.items()}
        a = SiteAdapter(self, site, _hyper(site, p.r, p.alpha, 1.0, p.projection_prng_key), tensors, _keys())
        a.shared = a.frozen = frozenset(_SHARED)
        return a

    def prepare(self, sites: Sequence[Site], params: Sequence[BaseModel]) -> dict[tuple[int, int], tuple]:
        """The shared bases of each (r, key), sized over the largest targeted (out, in), as PEFT's ``_find_dim``."""
        groups: dict[tuple[int, int], list[Site]] = {}
        for site, p in zip(sites, params, strict=True):
            groups.setdefault((p.r, p.projection_prng_key), []).append(site)
        bases = {}
        for (r, key), members in groups.items():
            out = max(s.weight_shape[0] for s in members)
            inp = max(s.weight_shape[1] for s in members)
            bases[r, key] = _generate(r, key, max(out, inp), min(out, inp))
        return bases

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        r = int(cfg.get("r", 32))
        hyper = _hyper(site, r, cfg.get("randlora_alpha", 640), scale, cfg.get("projection_prng_key", 0))
        m, M, b = hyper["min"], hyper["max"], hyper["bases"]
        dtype = adapter_dtype(site.dtype)
        tensors = {}
        for role, shape in (("randlora_lambda", (r, b)), ("randlora_gamma", (b, m))):
            tensor = source.take(role)
            source.check_shape(role, tensor, shape, site, f" (r={r})")
            tensors[role] = tensor.to(dtype)
        for role in _SHARED:
            if role not in source.shared:
                raise CheckpointError(
                    f"{source.file}: no shared tensor 'base_model.{role}'; checkpoints saved with "
                    "save_projection=false "
                    "(bases regenerated from projection_prng_key) are not supported"
                )
            shared = source.shared[role]
            ok = (
                shared.ndim == 3 and shared.shape[0] == r and shared.shape[1] == 1 and shared.shape[2] >= m
                if role == "randlora_A"
                else shared.ndim == 3 and shared.shape[0] >= M and shared.shape[1] >= b and shared.shape[2] == r
            )
            if not ok:
                want = f"[{r}, 1, >={m}]" if role == "randlora_A" else f"[>={M}, >={b}, {r}]"
                raise CheckpointError(
                    f"{source.file}: 'base_model.{role}' has shape {list(shared.shape)}, expected {want} for "
                    f"{site.describe()}"
                )
            copy = source.tensors.get(role)  # PEFT's per-module copy of the same buffer
            if copy is not None and not torch.equal(copy, shared):
                raise CheckpointError(
                    f"{source.file}: {source.keys[role]!r} differs from the shared 'base_model.{role}'"
                )
            tensors[role] = shared.to(dtype)
        source.refuse_others({*_OWN, *_SHARED}, "a RandLoRA site")
        a = SiteAdapter(self, site, hyper, tensors, _keys())
        a.shared = a.frozen = frozenset(_SHARED)
        return a

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        dtype = a.tensors["randlora_lambda"].dtype
        first, second = _bases(a, t)
        xa = x.to(dtype) if dtype != a.site.dtype else x
        result = y + F.linear(F.linear(xa, first), second) * a.hyper["scaling"]
        return result.to(a.site.dtype) if dtype != a.site.dtype else result

    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        first, second = _bases(a, {role: v.double() for role, v in t.items()})
        return second @ first * a.hyper["scaling"]

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        if config.get("save_projection", True) is False:
            raise CheckpointError(
                f"{file}: save_projection=false (bases regenerated from projection_prng_key) is not supported; "
                "save the adapter with save_projection=true"
            )
        refuse_unknown(config, _HANDLED, "RandLoRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("r", "alpha", "key"), "RandLoRA")
        return {
            "peft_type": "RANDLORA",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "randlora_alpha": first["alpha"],
            "projection_prng_key": first["key"],
            "save_projection": True,
            "fan_in_fan_out": any(a.site.transposed for a in adapters),
            "bias": "none",
        }


# Read here; or only used to generate the bases, which the file holds (sparse, very_sparse); or training-only.
_HANDLED = frozenset(
    {
        "r",
        "randlora_alpha",
        "projection_prng_key",
        "save_projection",
        "sparse",
        "very_sparse",
        "randlora_dropout",
        "fan_in_fan_out",
        "bias",
        "init_weights",
    }
)


def _keys() -> dict[str, str]:
    return {role: role for role in (*_OWN, *_SHARED)}


def _hyper(site: Site, r: int, alpha: float, scale: float, key: int) -> dict[str, Any]:
    out, inp = site.weight_shape
    m = min(out, inp)
    return {
        "r": r,
        "alpha": alpha,
        "key": key,
        "min": m,
        "max": max(out, inp),
        "bases": math.ceil(m / r),
        "in_is_min": m == inp,
        "scaling": alpha / r * scale,
        "scale": scale,
    }


def _bases(a: SiteAdapter, t: Mapping[str, Any]) -> tuple[Any, Any]:
    """(P, Q) with ``ΔW = Q P · s``: the scaled small basis U and the sliced large basis V, oriented to in/out."""
    h = a.hyper
    m, M, b = h["min"], h["max"], h["bases"]
    A = t["randlora_A"][:, :b, :m]
    U = (t["randlora_lambda"][:, :, None] * A * t["randlora_gamma"][None]).flatten(0, 1)
    V = t["randlora_B"][:M, :b, :].flatten(1)
    return (U, V) if h["in_is_min"] else (V.t(), U.t())


def _generate(r: int, key: int, max_dim: int, min_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaiming-uniform bases normalised to unit std, drawn from ``projection_prng_key`` as PEFT draws them (PEFT
    draws in bfloat16/float16; these are float32 draws, saved with the adapter so PEFT reloads them as they are)."""
    generator = torch.Generator().manual_seed(key)
    A = torch.nn.init.kaiming_uniform_(torch.empty(r, 1, min_dim), a=math.sqrt(5), generator=generator)
    b = math.ceil(min_dim / r)
    parts = [
        torch.nn.init.kaiming_uniform_(torch.empty(max_dim, 1, r), a=math.sqrt(5), generator=generator)
        for _ in range(b)
    ]
    B = torch.cat(parts, dim=1)
    return A / A.std(), B / B.std()
