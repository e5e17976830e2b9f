"""FRoD on Linear and transformers Conv1D: the weight re-expressed in a shared basis, with a trained diagonal and
a fixed sparse pattern.

Math (``W`` logical ``[out, in]``; per category of layers, e.g. every ``self_attn.q_proj``, a shared
``V = frod_V.<category> ∈ R^{in, in}`` and sparse positions ``frod_s_indices.<category>``; per layer the trained
``λ = frod_lambda_l ∈ R^{in}`` and sparse values ``S = scatter(frod_lambda_s_values)``):

    B = W V⁻ᵀ (float64),  U = B / ‖B‖_columns (zero columns stay zero), rounded to float32 as PEFT stores it
    W_eff = U (S + diag λ) Vᵀ,   y += W_eff x - W x,   merge: W ← W + (W_eff - W_raw)

``U`` is not saved by PEFT but derived from the base weight at load; here it is derived in the graph from the weight
the adapter reads, so nothing beyond PEFT's tensors is stored. ``V``, the positions and their size are frozen buffers
in PEFT: frozen roles here. Checkpoints saved with ``save_projection=False`` (no ``V`` to read) are refused.

Fresh adapters are built as PEFT's initialisation builds them. Per category, the float32 weights of its layers
(ordered by layer index) are stacked; fewer rows than columns: ``V`` = the right singular vectors (full SVD);
otherwise ``stacked = QR``, ``T = mean_i (Q_iᵀ Q_i + a I)⁻¹`` over the row blocks ``Q_i`` of each layer,
``V = Rᵀ eigvecs(T)`` (``a = regularization_alpha``), cast to the weight dtype. The positions are drawn, category by
category in sorted order, from one CPU generator seeded with ``projection_prng_key``: ``nnz = int(in² · rate)``
(at least 1 when ``rate > 0``) off-diagonal positions, a ``randperm`` prefix of the row-major off-diagonal list.
``λ`` = the column norms of ``W V⁻ᵀ`` (so ``W_eff ≈ W``: identity at init up to float32 rounding of ``U`` and ``λ``),
``S = 0``. ``create`` sees one site at a time, so a per-graph record of the fresh sites redoes a category's ``V``
and its sites' ``λ``, and every category's positions, as each site arrives (as PEFT sees all sites at once).
``init_weights=False`` adds PEFT's ``N(0, 0.1²)`` noise to ``S`` and ``λ``, drawn here from the spec's generator
(PEFT draws it from the global one, so those values cannot be PEFT's for a given config).
Refused (PEFT's result would depend on module order, which a site does not know): two sites of one category
without a layer index in their path, or with the same one. Divergence: PEFT falls back to a pseudo-inverse when
``V`` is singular; here ``V`` must be invertible (it is, for the bases PEFT's decomposition produces).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
from ..sites import Site
from ..sizes import Seed
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules, uniform

_EPS = 1e-12  # PEFT's threshold for a zero column of W V⁻ᵀ


class FrodParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    projection_prng_key: Seed = Field(0, description="seed of the CPU generator that draws the sparse positions")
    sparse_rate: float = Field(0.01, ge=0, le=1, description="fraction of in x in off-diagonal positions trained in S")
    regularization_alpha: float = Field(1e-3, description="ridge term of the joint decomposition (QR branch)")
    init_weights: bool = Field(True, description="true: S = 0 (identity); false: PEFT's N(0, 0.1²) noise on S and λ")


class Frod(AdapterKind):
    name = "frod"
    peft_types = ("FROD",)
    peft_prefix = "frod_"
    ops = frozenset({"linear"})
    Params = FrodParams
    scalable = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: FrodParams = params
        if site.op != "linear":
            raise SpecError(f"frod supports Linear and Conv1D only, not {site.describe()}")
        cat = _category(site.module)
        roles = _roles(cat)
        shared = frozenset(role for role in roles if "__" in role)
        nnz = _nnz(site.in_features, p.sparse_rate)
        values, noise = torch.zeros(nnz, dtype=site.dtype), None
        if not p.init_weights:  # PEFT: S ~ N(0, 0.1²), then λ += 0.1·N(0, 1), both in the weight dtype
            values = torch.empty(nnz, dtype=site.dtype).normal_(0.0, 0.1, generator=generator)
            noise = torch.randn(site.in_features, dtype=site.dtype, generator=generator) * 0.1
        hyper = {
            "category": cat,
            "scale": 1.0,
            "prng_key": p.projection_prng_key,
            "sparse_rate": p.sparse_rate,
            "alpha": p.regularization_alpha,
            "init_weights": p.init_weights,
        }
        V, lam, indices = prepared[_group_key(p)]
        if noise is not None:
            lam = {**lam, site.module: lam[site.module] + noise}
        dtype = adapter_dtype(site.dtype)
        tensors = {
            "s_values": values.to(dtype),
            "lambda_l": lam[site.module].to(dtype),
            f"V__{cat}": V[cat].to(dtype),
            f"s_indices__{cat}": indices[cat],
            f"s_size__{cat}": torch.tensor([site.in_features, site.in_features]),
        }
        return SiteAdapter(self, site, hyper, tensors, roles, shared, frozen=shared)

    def prepare(self, sites: Sequence[Site], params: Sequence[BaseModel]) -> dict[tuple, tuple]:
        """PEFT decomposes every targeted layer of a category at once: per group of equal settings, each category's
        basis ``V``, each layer's ``λ`` (before ``init_weights=False`` noise) and each category's positions."""
        groups: dict[tuple, tuple[FrodParams, dict[str, Site]]] = {}
        for site, params_ in zip(sites, params, strict=True):
            p: FrodParams = params_
            groups.setdefault(_group_key(p), (p, {}))[1].setdefault(site.module, site)
        return {key: _decompose(list(members.values()), p) for key, (p, members) in groups.items()}

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cat = _category(site.module)
        inp = site.in_features
        roles = _roles(cat)
        shared = frozenset(role for role in roles if "__" in role)
        source.refuse_others({"frod_lambda_l", "frod_lambda_s_values"}, "a FRoD site")
        tensors: dict[str, torch.Tensor] = {}
        for role, key in roles.items():
            if role in shared:
                if key not in source.shared:
                    raise CheckpointError(
                        f"{source.file}: missing tensor 'base_model.{key}', the shared FRoD basis of category "
                        f"{cat!r} ({site.describe()})"
                    )
                tensors[role] = source.shared[key]
            else:
                tensors[role] = source.take(key)
        indices, size = tensors[f"s_indices__{cat}"], tensors[f"s_size__{cat}"]
        nnz = indices.shape[-1] if indices.ndim == 2 else -1
        expected = {
            f"V__{cat}": (inp, inp),
            f"s_indices__{cat}": (2, nnz),
            f"s_size__{cat}": (2,),
            "lambda_l": (inp,),
            "s_values": (nnz,),
        }
        for role, shape in expected.items():
            if tuple(tensors[role].shape) != shape:
                where = f"'base_model.{roles[role]}'" if role in shared else repr(source.keys[roles[role]])
                raise CheckpointError(
                    f"{source.file}: {where} has shape {list(tensors[role].shape)}, expected {list(shape)} "
                    f"for {site.describe()}"
                )
        bad = indices.is_floating_point() or bool((indices < 0).any() | (indices >= inp).any())
        if bad or size.is_floating_point() or size.tolist() != [inp, inp]:
            raise CheckpointError(
                f"{source.file}: 'base_model.frod_s_indices.{cat}' / 'base_model.frod_s_size.{cat}' do not describe "
                f"integer positions in a {inp}x{inp} matrix for {site.describe()}"
            )
        dtype = adapter_dtype(site.dtype)
        for role in ("lambda_l", "s_values", f"V__{cat}"):
            tensors[role] = tensors[role].to(dtype)
        hyper = {"category": cat, "scale": scale}
        return SiteAdapter(self, site, hyper, tensors, roles, shared, frozen=shared)

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        cat, site = a.hyper["category"], a.site
        dtype = a.tensors["lambda_l"].dtype
        cast = dtype != site.dtype
        W = site.logical(weight)
        V = t[f"V__{cat}"].detach()
        U = _basis(W, V, dtype)
        S = _sparse(site, t["s_values"], t[f"s_indices__{cat}"], t[f"s_size__{cat}"])
        xa = x.to(dtype) if cast else x
        z = xa @ V
        out = F.linear(F.linear(z, S) + z * t["lambda_l"], U) - F.linear(xa, W.to(dtype) if cast else W)
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
        cat, site = a.hyper["category"], a.site
        raw = site.logical(raw_weight.double())
        V = t[f"V__{cat}"].double()
        U = _basis(raw, V, torch.float64)
        S = _sparse(site, t["s_values"].double(), t[f"s_indices__{cat}"], t[f"s_size__{cat}"])
        effective = U @ (S + torch.diag(t["lambda_l"].double())) @ V.t()
        merged = site.logical(weight.double()) + (effective - raw)
        return (merged.t().contiguous() if site.transposed else merged).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        if config.get("save_projection", True) is False:
            raise CheckpointError(
                f"{file}: save_projection=false: the FRoD bases are not in the file and peftfx does not recompute "
                "PEFT's joint decomposition; save the adapter with save_projection=True"
            )
        refuse_unknown(config, _HANDLED, "FRoD", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("prng_key", "sparse_rate", "alpha", "init_weights"), "FRoD")
        return {
            "peft_type": "FROD",
            "target_modules": target_modules(adapters),
            "projection_prng_key": first["prng_key"],
            "sparse_rate": first["sparse_rate"],
            "regularization_alpha": first["alpha"],
            "init_weights": first["init_weights"],
            "save_projection": True,
            "fan_in_fan_out": any(a.site.transposed for a in adapters),
            "bias": "none",
            "progressbar": False,
        }


# Read here, or fixed by the stored tensors (the bases and positions are saved), or training/runtime-only.
_HANDLED = frozenset(
    {
        "projection_prng_key",
        "save_projection",
        "sparse_rate",
        "regularization_alpha",
        "init_weights",
        "frod_dropout",
        "fan_in_fan_out",
        "bias",
        "progressbar",
        "runtime_offload_base_weight",
    }
)


def _category(module: str) -> str:
    """PEFT's sharing category: the last two path parts (``self_attn_q_proj``), BERT's attention output apart."""
    parts = module.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category


def _roles(cat: str) -> dict[str, str]:
    """role -> PEFT suffix; the category-wide roles (``<name>__<category>``) are shared."""
    return {
        "lambda_l": "frod_lambda_l",
        "s_values": "frod_lambda_s_values",
        f"V__{cat}": f"frod_V.{cat}",
        f"s_indices__{cat}": f"frod_s_indices.{cat}",
        f"s_size__{cat}": f"frod_s_size.{cat}",
    }


def _layer_index(module: str) -> int | None:
    """PEFT's order of the layers of a category: the number after ``layers``, else the first number in the path."""
    parts = module.split(".")
    if "layers" in parts:
        after = parts[parts.index("layers") + 1 : parts.index("layers") + 2]
        if after and after[0].isdigit():
            return int(after[0])
    return next((int(part) for part in parts if part.isdigit()), None)


def _basis(W: Any, V: Any, dtype: torch.dtype) -> Any:
    """``U``: the columns of ``W V⁻ᵀ`` normalised, in float64, then rounded to float32 as PEFT keeps it."""
    B = torch.linalg.solve(V.to(torch.float64), W.to(torch.float64).t()).t()
    norms = torch.linalg.vector_norm(B, dim=0)
    nonzero = norms > _EPS
    U = torch.where(nonzero, B / torch.where(nonzero, norms, torch.ones_like(norms)), torch.zeros_like(B))
    return U.to(torch.float32).to(dtype)


def _sparse(site: Site, values: Any, indices: Any, size: Any) -> Any:
    """``S``: the values summed at their ``(row, col)`` positions of the ``size`` (``[in, in]``) matrix."""
    inp = site.in_features
    flat = indices[0].long() * size[1].long() + indices[1].long()
    return values.new_zeros(inp * inp).scatter_add(0, flat, values).reshape(inp, inp)


def _group_key(p: FrodParams) -> tuple:
    return (p.projection_prng_key, p.sparse_rate, p.regularization_alpha, p.init_weights)


def _decompose(sites: list[Site], p: FrodParams) -> tuple[dict, dict, dict]:
    """({category: V}, {module: λ}, {category: positions}) for the fresh sites of one adapter and setting."""
    by_cat: dict[str, list[Site]] = {}
    for site in sites:
        if site.op != "linear":
            raise SpecError(f"frod supports Linear and Conv1D only, not {site.describe()}")
        by_cat.setdefault(_category(site.module), []).append(site)
    V: dict[str, torch.Tensor] = {}
    lam: dict[str, torch.Tensor] = {}
    for cat, members in by_cat.items():
        V[cat] = _category_basis(cat, members, p.regularization_alpha, lam)
    generator = torch.Generator().manual_seed(p.projection_prng_key)
    # one stream over the categories in sorted order, as PEFT draws them
    indices = {c: _positions(by_cat[c][0].in_features, p.sparse_rate, generator) for c in sorted(by_cat)}
    return V, lam, indices


def _category_basis(cat: str, members: list[Site], alpha: float, lam: dict[str, torch.Tensor]) -> torch.Tensor:
    """The shared ``V`` of one category, filling ``lam`` with its layers' ``λ`` (column norms of ``W V⁻ᵀ``)."""
    layers = [_layer_index(s.module) for s in members]
    if len(members) > 1:
        if None in layers or len(set(layers)) < len(layers):
            raise SpecError(
                f"frod: the layers of category {cat!r} ({', '.join(s.module for s in members)}) need distinct layer "
                "indices in their paths; otherwise PEFT orders (or drops) them by module order, which peftfx "
                "does not reproduce"
            )
        if len({(s.in_features, s.dtype) for s in members}) > 1:
            raise SpecError(f"frod: the layers of category {cat!r} differ in input size or dtype (PEFT stacks them)")
    weights = {s.module: s.logical(s.base_weight().detach()) for s in members}
    ordered = sorted(members, key=lambda s: _layer_index(s.module) or 0)
    site_dtype = members[0].dtype
    V = _joint_basis([weights[s.module].to(torch.float32) for s in ordered], alpha).to(site_dtype)
    for s in members:
        try:
            B = torch.linalg.solve(V.to(torch.float64), weights[s.module].to(torch.float64).t()).t()
        except RuntimeError:
            raise SpecError(f"frod: the joint basis of category {cat!r} is singular") from None
        lam[s.module] = torch.linalg.vector_norm(B, dim=0).to(torch.float32).to(site_dtype)
    return V


def _joint_basis(matrices: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """PEFT's shared basis of one category from its layers' float32 weights (see the module docstring)."""
    stacked = torch.cat(matrices)
    rows, cols = stacked.shape
    if rows < cols:
        return torch.linalg.svd(stacked, full_matrices=True).Vh.t()
    Q, R = torch.linalg.qr(stacked)
    ridge = alpha * torch.eye(cols, dtype=R.dtype)
    blocks = Q.split([m.shape[0] for m in matrices])
    mean = sum(torch.linalg.inv(q.t() @ q + ridge) for q in blocks) / len(blocks)
    return R.t() @ torch.linalg.eigh(mean).eigenvectors


def _nnz(n: int, rate: float) -> int:
    off = n * (n - 1)
    nnz = min(int(n * n * rate), off)
    return max(1, nnz) if rate > 0 and off > 0 else nnz


def _positions(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """``[2, nnz]`` (row, col) off-diagonal positions: a random prefix of their row-major enumeration."""
    nnz = _nnz(n, rate)
    if nnz == 0:
        return torch.empty(2, 0, dtype=torch.long)
    pick = torch.randperm(n * (n - 1), generator=generator)[:nnz]
    row, col = pick // (n - 1), pick % (n - 1)
    return torch.stack([row, col + (col >= row).long()])
