"""FRoD on Linear and transformers Conv1D: the weight re-expressed in a shared basis, with a trained diagonal and
a fixed sparse pattern.

Math (``W`` logical ``[out, in]``; per category of layers, e.g. every ``self_attn.q_proj``, a shared
``V = frod_V.<category> ∈ R^{in, in}`` and sparse positions ``frod_s_indices.<category>``; per layer the trained
``λ = frod_lambda_l ∈ R^{in}`` and sparse values ``S = scatter(frod_lambda_s_values)``):

    B = W V⁻ᵀ (float64),  U = B / ‖B‖_columns (zero columns stay zero), rounded to float32 as PEFT stores it
    W_eff = U (S + diag λ) Vᵀ,   y += W_eff x - W x,   merge: W ← W + (W_eff - W_raw)

``U`` is not saved by PEFT but derived from the base weight at load; here it is derived in the graph from the weight
the adapter reads, so nothing beyond PEFT's tensors is stored. ``V`` is a frozen buffer in PEFT: detached here.
A fresh FRoD needs a joint decomposition over every targeted layer of a category, which a per-site adapter cannot
see, so fresh adapters are refused, as are checkpoints saved with ``save_projection=False`` (no ``V`` to read).
Divergence: PEFT falls back to a pseudo-inverse when ``V`` is singular; here ``V`` must be invertible (it is, for
the bases PEFT's decomposition produces).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from ..errors import CheckpointError, SpecError
from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown

_EPS = 1e-12  # PEFT's threshold for a zero column of W V⁻ᵀ


class FrodParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Frod(AdapterKind):
    name = "frod"
    peft_types = ("FROD",)
    peft_prefix = "frod_"
    ops = frozenset({"linear"})
    Params = FrodParams

    def create(self, site: Site, params: BaseModel, generator: torch.Generator) -> SiteAdapter:
        raise SpecError(
            f"frod: a fresh FRoD adapter needs PEFT's joint decomposition over all targeted layers of a category, "
            f"which peftfx does not reproduce ({site.describe()}); train it with PEFT and load the checkpoint"
        )

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        if scale != 1.0:
            raise CheckpointError(
                f"{source.file}: FRoD replaces the weight and has no natural scaling; `scale` must be 1"
            )
        cat = _category(site.module)
        inp = site.in_features
        roles = {
            "lambda_l": "frod_lambda_l",
            "s_values": "frod_lambda_s_values",
            f"V__{cat}": f"frod_V.{cat}",
            f"s_indices__{cat}": f"frod_s_indices.{cat}",
            f"s_size__{cat}": f"frod_s_size.{cat}",
        }
        shared = frozenset(role for role in roles if "__" in role)
        extra = sorted(set(source.tensors) - {"frod_lambda_l", "frod_lambda_s_values"})
        if extra:
            raise CheckpointError(f"{source.file}: unexpected tensor {source.keys[extra[0]]!r} for a FRoD site")
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
        return SiteAdapter(
            self, site, hyper, tensors, roles, shared, frozen=frozenset(r for r in roles if r.startswith("V__"))
        )

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        cat, site = a.hyper["category"], a.site
        dtype = a.tensors["lambda_l"].dtype
        cast = dtype != site.dtype
        W = _logical(site, weight)
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
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cat, site = a.hyper["category"], a.site
        raw = _logical(site, raw_weight.double())
        V = t[f"V__{cat}"].double()
        U = _basis(raw, V, torch.float64)
        S = _sparse(site, t["s_values"].double(), t[f"s_indices__{cat}"], t[f"s_size__{cat}"])
        effective = U @ (S + torch.diag(t["lambda_l"].double())) @ V.t()
        merged = _logical(site, weight.double()) + (effective - raw)
        return (merged.t().contiguous() if site.transposed else merged).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        if config.get("save_projection", True) is False:
            raise CheckpointError(
                f"{file}: save_projection=false: the FRoD bases are not in the file and peftfx does not recompute "
                "PEFT's joint decomposition; save the adapter with save_projection=True"
            )
        refuse_unknown(config, _HANDLED, "FRoD", file)


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


def _logical(site: Site, weight: Any) -> Any:
    return weight.t() if site.transposed else weight


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
