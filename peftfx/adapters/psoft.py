"""PSOFT: an r x r orthogonal map between the base weight's own principal subspaces, on Linear.

``A`` and ``B`` are not stored: PEFT rebuilds them from the base weight's SVD ``W = U diag(S) Vh`` (computed in
float32) whenever it loads, and so does peftfx. With ``s = alpha / r`` and ``S_r = S[:r] / s``:

* psoft_init: ``A = Vh[:r]``, ``B = U[:, :r] diag(S_r)``;
* pissa_init: ``A = diag(√S_r) Vh[:r]``, ``B = U[:, :r] diag(√S_r)``.

``R`` is a free r x r matrix, or (psoft_orth) a rotation from a vector filling the strict upper triangle of
``U_q`` with ``Q = U_q - U_qᵀ``: exact ``R = (I + Q)(I - Q)⁻¹``, or n terms of the Neumann series (``I``; ``I + 2Q``;
for n ≥ 3 ``I + 2(Q + … + Q^p) + Q^(p+1)``, ``p = max(2, n - 2)``), ``Q`` first scaled onto ``‖Q‖_F ≤ eps``
when cayley_neumann_eps is set. Optional magnitudes scale it:
``R ← diag(b) R diag(a)``. Then

    ``y += s · B (R - I) A x``,   merged ``W += s · B (R - I) A``.

Limits: the SVD is part of the graph (a live PSOFT adapter recomputes it at every call, detached, as PEFT
recomputes it at every load), so it is exact but not cheap on large layers; merge it for inference. PEFT's
``psoft_svd: lowrank`` draws random numbers inside ``torch.svd_lowrank`` and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules, uniform


class PsoftParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(32, gt=0, description="size of the principal subspace (≤ min(in, out))")
    alpha: float = Field(32.0, description="scaling numerator (PEFT's psoft_alpha): s = alpha / r")
    ab_svd_init: Literal["psoft_init", "pissa_init"] = Field("psoft_init", description="how A and B split S")
    orth: bool = Field(True, description="R is a Cayley rotation (else a free matrix)")
    mag_b: bool = Field(True, description="a learned scale on R's output side")
    mag_a: bool = Field(True, description="a learned scale on R's input side")
    cayley_neumann: bool = Field(False, description="Neumann-series Cayley transform instead of the exact one")
    neumann_terms: int = Field(5, gt=0, description="terms of the Neumann series")
    neumann_eps: float | None = Field(None, gt=0, lt=1, description="Frobenius bound on Q before the series")
    init: bool = Field(True, description="true: R = I (identity adapter); false: R randomly off I, like PEFT")


class Psoft(AdapterKind):
    name = "psoft"
    peft_types = ("PSOFT",)
    peft_prefix = "psoft_"
    ops = frozenset({"linear"})
    Params = PsoftParams
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: PsoftParams = params
        _check_site(site, p.r, SpecError)
        if p.orth:
            R = torch.zeros(p.r * (p.r - 1) // 2, dtype=torch.float64)
            if not p.init:
                R.normal_(0.0, 0.1, generator=generator)
        else:
            R = torch.eye(p.r, dtype=torch.float64)
            if not p.init:
                R += 0.1 * torch.randn(p.r, p.r, generator=generator, dtype=torch.float64)
        tensors = {"R": R}
        if p.mag_b:
            tensors["vector_b"] = torch.ones(p.r, dtype=torch.float64)
        if p.mag_a:
            tensors["vector_a"] = torch.ones(p.r, dtype=torch.float64)
        hyper = _hyper(
            p.r, p.alpha, p.ab_svd_init, p.orth, p.cayley_neumann, p.neumann_terms, p.neumann_eps, p.mag_b, p.mag_a, 1
        )
        dtype = adapter_dtype(site.dtype)
        return SiteAdapter(self, site, hyper, {k: v.to(dtype) for k, v in tensors.items()}, _keys(tensors))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        r = int(cfg.get("r", 32))
        _check_site(site, r, CheckpointError, source.file)
        orth, mag_b, mag_a = (bool(cfg.get(k, True)) for k in ("psoft_orth", "psoft_mag_b", "psoft_mag_a"))
        expected = {"R": (r * (r - 1) // 2,) if orth else (r, r)}
        if mag_b:
            expected["vector_b"] = (r,)
        if mag_a:
            expected["vector_a"] = (r,)
        keys = _keys(expected)
        source.refuse_others(keys.values(), "PSOFT")
        tensors = {}
        for role, key in keys.items():
            tensor = source.take(key)
            source.check_shape(key, tensor, expected[role], site, f" (r={r})")
            tensors[role] = tensor.to(adapter_dtype(site.dtype))
        eps = cfg.get("cayley_neumann_eps")
        hyper = _hyper(
            r,
            float(cfg.get("psoft_alpha", 32)),
            str(cfg.get("ab_svd_init", "psoft_init")),
            orth,
            bool(cfg.get("use_cayley_neumann", False)),
            int(cfg.get("num_cayley_neumann_terms", 5)),
            None if eps is None else float(eps),
            mag_b,
            mag_a,
            scale,
        )
        return SiteAdapter(self, site, hyper, tensors, keys)

    # -- graph ----------------------------------------------------------------------------------------------

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        h = a.hyper
        A, B = _subspaces(weight.detach(), h)
        R = _matrix(t, h).to(torch.float32)
        xa = x.to(torch.float32) @ A.t()
        delta = ((xa @ R.t()) - xa) @ B.t()
        return y + (delta * (h["scaling"] * h["scale"])).to(a.site.dtype)

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
        A, B = (m.double() for m in _subspaces(raw_weight, h))
        R = _matrix({k: v.double() for k, v in t.items()}, h)
        delta = B @ (R - torch.eye(h["r"], dtype=torch.float64)) @ A * (h["scaling"] * h["scale"])
        return (weight.double() + delta).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        if config.get("psoft_svd", "full") != "full":
            raise CheckpointError(
                f"{file}: psoft_svd={config['psoft_svd']!r} rebuilds A and B from a randomised SVD; peftfx supports "
                "psoft_svd='full' only"
            )
        refuse_unknown(config, _HANDLED, "PSOFT", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        fields = (
            "r",
            "alpha",
            "ab_svd_init",
            "orth",
            "cayley_neumann",
            "neumann_terms",
            "neumann_eps",
            "mag_b",
            "mag_a",
        )
        first = uniform(adapters, fields, "PSOFT")
        return {
            "peft_type": "PSOFT",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "psoft_alpha": first["alpha"],
            "ab_svd_init": first["ab_svd_init"],
            "psoft_svd": "full",
            "psoft_orth": first["orth"],
            "psoft_mag_b": first["mag_b"],
            "psoft_mag_a": first["mag_a"],
            "use_cayley_neumann": first["cayley_neumann"],
            "num_cayley_neumann_terms": first["neumann_terms"],
            "cayley_neumann_eps": first["neumann_eps"],
            "psoft_dropout": 0.0,
            "init_weights": True,
        }


# Read here, or without effect on inference: dropout acts in training, init_weights shapes the init, and the
# low-rank SVD's settings only matter for psoft_svd='lowrank' (refused above).
_HANDLED = frozenset(
    {
        "r",
        "psoft_alpha",
        "ab_svd_init",
        "psoft_svd",
        "psoft_orth",
        "psoft_mag_b",
        "psoft_mag_a",
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
        "cayley_neumann_eps",
        "psoft_dropout",
        "init_weights",
        "fan_in_fan_out",
        "psoft_svd_lowrank_niter",
        "random_seed",
    }
)


def _keys(roles: Mapping[str, Any]) -> dict[str, str]:
    return {role: "psoft_R.weight" if role == "R" else f"psoft_R.{role}" for role in roles}


def _hyper(
    r: int,
    alpha: float,
    init: str,
    orth: bool,
    neumann: bool,
    terms: int,
    eps: float | None,
    mag_b: bool,
    mag_a: bool,
    scale: float,
) -> dict[str, Any]:
    return {
        "r": r,
        "alpha": alpha,
        "scaling": alpha / r,
        "ab_svd_init": init,
        "orth": orth,
        "cayley_neumann": neumann,
        "neumann_terms": terms,
        "neumann_eps": eps,
        "mag_b": mag_b,
        "mag_a": mag_a,
        "scale": scale,
    }


def _check_site(site: Site, r: int, error: type[Exception], where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    if site.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise error(
            f"{prefix}PSOFT needs a float32/16 or bfloat16 weight, as PEFT does ({site.describe()}: {site.dtype})"
        )
    if r > min(site.weight_shape):
        raise error(f"{prefix}PSOFT r={r} exceeds min(in, out) of {site.describe()}")


def _subspaces(weight: Any, h: Mapping[str, Any]) -> tuple[Any, Any]:
    """(A [r, in], B [out, r]) from the float32 SVD of the base weight, as PEFT builds them."""
    r = h["r"]
    svd = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    U, S, Vh = svd[0][:, :r], svd[1][:r] / h["scaling"], svd[2][:r]
    if h["ab_svd_init"] == "pissa_init":
        root = S.sqrt()
        return root.unsqueeze(1) * Vh, U * root
    return Vh, U * S


def _matrix(t: Mapping[str, Any], h: Mapping[str, Any]) -> Any:
    """R [r, r], magnitudes included."""
    r, R = h["r"], t["R"]
    if h["orth"]:
        mask = R.new_ones(r, r).triu(1).flatten()
        index = (mask.cumsum(0) - 1).clamp(min=0).long()
        upper = (R.index_select(0, index) * mask).reshape(r, r)
        Q = upper - upper.t()
        eye = torch.diag(R.new_ones(r))
        if h["cayley_neumann"]:
            if h["neumann_eps"] is not None:
                eps, norm = h["neumann_eps"], torch.linalg.matrix_norm(Q)
                Q = torch.where(torch.isfinite(norm) & (norm > eps), Q * (eps / (norm + 1e-12)), Q)
            R, terms = eye, h["neumann_terms"]
            if terms > 1:
                R = R + 2.0 * Q
            if terms > 2:
                power = Q @ Q
                R = R + 2.0 * power
                for _ in range(3, terms - 1):
                    power = power @ Q
                    R = R + 2.0 * power
                R = R + power @ Q
        else:
            R = torch.linalg.solve(eye - Q, eye + Q, left=False)
    if h["mag_b"]:
        R = t["vector_b"].unsqueeze(1) * R
    if h["mag_a"]:
        R = R * t["vector_a"].unsqueeze(0)
    return R
