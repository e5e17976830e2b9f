"""HRA: a chain of Householder reflections on the input side of a Linear or Conv2d weight.

``hra_u`` [n, r] (``n`` = in_features, or in_channels * k * k flattened as ``[in, kh, kw]``). With its columns
normalised, ``u_i = U[:, i] / ‖U[:, i]‖``:

* plain:    ``H = (I - 2 u_0 u_0ᵀ)(I - 2 u_1 u_1ᵀ) ⋯ (I - 2 u_(r-1) u_(r-1)ᵀ)``;
* apply_GS: the columns are first made orthonormal by Gram-Schmidt (``Q``), and ``H = I - 2 Q Qᵀ``.

The adapted weight is ``W' = W_flat H``. A Linear's forward reflects the input instead, ``x Hᵀ`` (r rank-one
updates per token rather than an n x n matrix); a conv computes ``W'`` by reflecting the rows of ``W``.

Init as PEFT: an even r repeats each of r/2 Kaiming-uniform columns twice, so the reflections cancel in pairs
and the adapter starts as the identity; an odd r (or ``init: false``) is random and does not.

Divergence from PEFT, on purpose: PEFT's unmerged Conv2d forward passes only ``padding[0]`` and ``stride[0]``
(no dilation) to the convolution, its merge keeps the base conv's own arguments; here both use the base
conv's arguments (PEFT's merged result).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules, uniform
from .orthogonal import orthogonal_site_problem, rotated_dim


class HraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, gt=0, description="number of Householder reflections")
    apply_GS: bool = Field(False, description="orthogonalise the reflection vectors (Gram-Schmidt) first")
    init: bool = Field(True, description="true: PEFT's init (identity for even r); false: random vectors")


class Hra(AdapterKind):
    name = "hra"
    peft_types = ("HRA",)
    peft_prefix = "hra_"
    ops = frozenset({"linear", "conv2d"})
    Params = HraParams
    scalable = False
    conv1d = False

    def site_problem(self, site: Site) -> str | None:
        return super().site_problem(site) or orthogonal_site_problem(site, "HRA")

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: HraParams = params
        n = rotated_dim(site)
        if p.init and p.r % 2 == 0:
            half = torch.zeros(n, p.r // 2, dtype=torch.float64)
            torch.nn.init.kaiming_uniform_(half, a=math.sqrt(5), generator=generator)
            U = half.repeat_interleave(2, dim=1)
        else:
            U = torch.zeros(n, p.r, dtype=torch.float64)
            torch.nn.init.kaiming_uniform_(U, a=math.sqrt(5), generator=generator)
        hyper = {"r": p.r, "apply_GS": p.apply_GS, "scale": 1.0}
        return SiteAdapter(self, site, hyper, {"hra_u": U.to(adapter_dtype(site.dtype))}, dict(_KEYS))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        source.refuse_others(_KEYS.values(), "HRA")
        U = source.take("hra_u")
        expected = (rotated_dim(site), int(cfg.get("r", 8)))
        source.check_shape("hra_u", U, expected, site, f" (adapter_config.json r={expected[1]})")
        hyper = {"r": expected[1], "apply_GS": bool(cfg.get("apply_GS", False)), "scale": scale}
        return SiteAdapter(self, site, hyper, {"hra_u": U.to(adapter_dtype(site.dtype))}, dict(_KEYS))

    # -- graph ----------------------------------------------------------------------------------------------

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        site, dtype = a.site, a.tensors["hra_u"].dtype
        vectors = _vectors(t["hra_u"], a.hyper)
        if site.op == "linear":
            xr = _reflect_rows(x.to(dtype), vectors, a.hyper, transpose=True).to(site.dtype)
            return F.linear(xr, weight, bias)
        w = _reflect_rows(weight.to(dtype).flatten(1), vectors, a.hyper, transpose=False)
        return site.run(x, w.reshape(site.weight_shape).to(site.dtype), bias)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        vectors = _vectors(t["hra_u"].double(), a.hyper)
        merged = _reflect_rows(weight.double().flatten(1), vectors, a.hyper, transpose=False)
        return merged.reshape(weight.shape).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "HRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("r", "apply_GS"), "HRA")
        return {
            "peft_type": "HRA",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "apply_GS": first["apply_GS"],
            "bias": "none",
            "init_weights": True,
        }


_KEYS = {"hra_u": "hra_u"}
_HANDLED = frozenset({"r", "apply_GS", "init_weights", "bias"})  # init_weights only shapes the init


# -- helpers ---------------------------------------------------------------------------------------------------


def _vectors(U: Any, h: Mapping[str, Any]) -> list[Any]:
    """The unit reflection vectors, as rows: normalised columns, or Gram-Schmidt's orthonormal ones."""
    if not h["apply_GS"]:
        unit = U / U.norm(dim=0)
        return [unit[:, i] for i in range(h["r"])]
    basis: list[Any] = []
    for i in range(h["r"]):
        u = U[:, i]
        for q in basis:
            u = u - (q * u).sum() * q
        basis.append(u / u.norm())
    return basis


def _reflect_rows(v: Any, vectors: list[Any], h: Mapping[str, Any], transpose: bool) -> Any:
    """``v H`` (``transpose=False``) or ``v Hᵀ`` over the last dimension of ``v``."""
    if h["apply_GS"]:  # H = I - 2 Q Qᵀ is symmetric
        Q = torch.stack(vectors, dim=1)
        return v - 2.0 * ((v @ Q) @ Q.t())
    order = reversed(vectors) if transpose else vectors
    for u in order:
        v = v - 2.0 * (v @ u).unsqueeze(-1) * u
    return v
