"""DeFT on Linear and transformers Conv1D: remove a learned subspace from the weight and inject a low-rank part.

Math (``W`` logical ``[out, in]``, ``P = deft_P ∈ R^{out, r}``, ``R = deft_R ∈ R^{r, in}``, ``r = min(r, out)``,
``s = alpha / r``, or 1 without alpha):

* ``relu``: ``Q = P``, ``P_proj = P relu(P)ᵀ``;  ``qr``: ``Q`` = the reduced QR factor of ``P``, ``P_proj = Q Qᵀ``.
* ``W' = (I - P_proj) W + s Q R``  (PaRa, ``para``: no ``R``, ``W' = (I - P_proj) W``).

Forward, on the base product ``z = y - b``: ``y' = y - (z right) Qᵀ + s (x Rᵀ) Qᵀ`` with ``right = relu(P)`` or
``Q``. The base product is the current output, so the merge projects the current weight. Not additive.
PEFT computes all of this in float32 whatever the model's dtype; here it is computed in the adapter dtype
(the model's, float32 for half precisions), so float64 models get float64 results.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules, uniform


class DeftParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, gt=0, description="rank of the removed/injected subspace (capped at out_features)")
    decomposition_method: Literal["relu", "qr"] = Field(
        "relu", description="relu: projector P relu(P)^T; qr: orthogonal projector from the QR factor of P"
    )
    alpha: float | None = Field(None, description="scale the injection by alpha / r (none: by 1)")
    para: bool = Field(False, description="PaRa: subspace removal only, no injection matrix R")
    init: bool = Field(True, description="true: R chosen so the adapter is the identity at init; false: random R")
    init_scale: float = Field(1.0, ge=0, description="std multiplier of the random R when init is false")


class Deft(AdapterKind):
    name = "deft"
    peft_types = ("DEFT",)
    peft_prefix = "deft_"
    ops = frozenset({"linear"})
    Params = DeftParams
    scalable = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: DeftParams = params
        out, inp = site.weight_shape
        hyper = _hyper(p.r, out, p.decomposition_method, p.alpha, p.para, 1.0)
        r = hyper["r"]
        P = torch.empty(out, r, dtype=torch.float64).normal_(0.0, 0.02, generator=generator)
        tensors = {"deft_P": P}
        if not p.para:
            if p.init:  # R = rightᵀ W / s: the injection puts back exactly what the projection removes
                weight = site.base_weight().double()
                _, right = _project(P, p.decomposition_method)
                tensors["deft_R"] = right.t() @ site.logical(weight) / hyper["scaling"]
            else:
                tensors["deft_R"] = torch.empty(r, inp, dtype=torch.float64).normal_(
                    0.0, 0.02 * p.init_scale, generator=generator
                )
        dtype = adapter_dtype(site.dtype)
        tensors = {role: t.to(dtype) for role, t in tensors.items()}
        return SiteAdapter(self, site, hyper, tensors, {role: role for role in tensors})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        out, inp = site.weight_shape
        hyper = _hyper(
            int(cfg.get("r", 8)),
            out,
            cfg.get("decomposition_method", "relu"),
            cfg.get("alpha"),
            bool(cfg.get("para")),
            scale,
        )
        r = hyper["r"]
        expected = {"deft_P": (out, r)} if hyper["para"] else {"deft_P": (out, r), "deft_R": (r, inp)}
        source.refuse_others(expected, "this DeFT site")
        tensors = {}
        for role, shape in expected.items():
            tensor = source.take(role)
            source.check_shape(role, tensor, shape, site, f" (r={r})")
            tensors[role] = tensor.to(adapter_dtype(site.dtype))
        return SiteAdapter(self, site, hyper, tensors, {role: role for role in expected})

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        h = a.hyper
        dtype = a.tensors["deft_P"].dtype
        cast = dtype != a.site.dtype
        Q, right = _project(t["deft_P"], h["method"])
        out = y.to(dtype) if cast else y
        product = out if bias is None else out - (bias.to(dtype) if cast else bias)
        out = out - (product @ right) @ Q.t()
        if not h["para"]:
            xa = x.to(dtype) if cast else x
            out = out + F.linear(xa, t["deft_R"] * h["scaling"]) @ Q.t()
        return out.to(a.site.dtype) if cast else out

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, site = a.hyper, a.site
        Q, right = _project(t["deft_P"].double(), h["method"])
        W = site.logical(weight.double())
        inner = -(right.t() @ W)
        if not h["para"]:
            inner = inner + t["deft_R"].double() * h["scaling"]
        merged = W + Q @ inner
        return (merged.t().contiguous() if site.transposed else merged).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "DeFT", file)

    def peft_config(self, adapters: list[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("r_config", "method", "alpha", "para"), "DeFT", " (it has no pattern)")
        return {
            "peft_type": "DEFT",
            "target_modules": target_modules(adapters),
            "r": first["r_config"],
            "decomposition_method": first["method"],
            "alpha": first["alpha"],
            "para": first["para"],
            "deft_dropout": 0.0,
            "fan_in_fan_out": any(a.site.transposed for a in adapters),
            "bias": "none",
        }


# Read here, or init/training-only (init_weights and init_scale only seed R; dropout; which biases train).
_HANDLED = frozenset(
    {
        "r",
        "decomposition_method",
        "alpha",
        "para",
        "init_scale",
        "init_weights",
        "deft_dropout",
        "fan_in_fan_out",
        "bias",
    }
)


def _hyper(r: int, out: int, method: str, alpha: float | None, para: bool, scale: float) -> dict[str, Any]:
    r_eff = min(r, out)
    return {
        "r": r_eff,
        "r_config": r,
        "method": method,
        "alpha": alpha,
        "para": para,
        "scaling": alpha / r_eff if alpha else 1.0,
        "scale": scale,
    }


def _project(P: Any, method: str) -> tuple[Any, Any]:
    """``(Q, right)`` with the projector ``Q rightᵀ`` and the injection direction ``Q``."""
    if method == "qr":
        Q = torch.linalg.qr(P)[0]
        return Q, Q
    return P, torch.relu(P)
