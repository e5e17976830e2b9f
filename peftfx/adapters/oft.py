"""OFT: orthogonal fine-tuning, a block-diagonal rotation of the weight's input side, on Linear, Conv2d, Embedding.

Each of ``D`` blocks (one stored and repeated with ``block_share``) is a ``b x b`` rotation ``R_j`` made from a
vector of ``b(b-1)/2`` numbers: they fill the strict upper triangle (row-major) of ``U``, ``Q = U - Uᵀ``, and

* Cayley (exact):        ``R = (I - Q)(I + Q)⁻¹``;
* Cayley-Neumann (n terms, PEFT's default): ``I`` for n ≤ 1, ``I + 2Q`` for n = 2, and for n ≥ 3
  ``R = I + 2(Q + Q² + … + Q^p) + Q^(p+1)`` with ``p = max(2, n - 2)``.

With COFT each block's ``Q`` is first shrunk onto the ball ``‖Q‖_F ≤ ε / sqrt(D_stored)``.
``BD = diag(R_1..R_D)`` acts on the weight's input dimension (``in * k * k`` for a conv, flattened as
``[in, kh, kw]``; the embedding dimension for an embedding):

* Linear / Conv2d: ``W' = W BDᵀ`` (a Linear's unmerged forward rotates the input instead: ``(x BD) Wᵀ + b``);
* Embedding: ``W' = W BD`` (the looked-up rows are rotated).

Divergence from PEFT, on purpose: PEFT's unmerged Conv2d forward unfolds the input with stride 1 and no
padding, rotates every patch and folds the patches back by summation, which is not its own merged weight
(its output differs from the base conv even at the identity init). Here a Conv2d site always computes with
``W'``, which is what PEFT's merge produces; tests compare against PEFT merged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import CheckpointError
from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules, uniform
from .orthogonal import orthogonal_site_problem, rotated_dim


class OftParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(32, ge=0, description="rotation block size (PEFT's oft_block_size); 0 to give r instead")
    r: int = Field(0, ge=0, description="number of blocks instead of a block size (0: use block_size)")
    block_share: bool = Field(False, description="one rotation block shared by all blocks of a site")
    coft: bool = Field(False, description="constrained OFT: keep each block's skew matrix within eps")
    eps: float = Field(6e-5, description="COFT radius")
    cayley_neumann: bool = Field(True, description="Neumann-series Cayley transform (PEFT's default) vs exact")
    neumann_terms: int = Field(5, ge=0, le=64, description="terms of the Neumann series")
    init: bool = Field(True, description="true: zero (identity rotation); false: N(0, 0.1²) like PEFT")

    @model_validator(mode="after")
    def _one_of(self) -> OftParams:
        if (self.r != 0) == (self.block_size != 0):
            raise ValueError("give exactly one of r and block_size (the other one must be 0)")
        return self


class Oft(AdapterKind):
    name = "oft"
    peft_types = ("OFT",)
    peft_prefix = "oft_"
    ops = frozenset({"linear", "conv2d", "embedding"})
    Params = OftParams
    scalable = False
    conv1d = False

    def site_problem(self, site: Site) -> str | None:
        return super().site_problem(site) or orthogonal_site_problem(site, "OFT", undilated=True)

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: OftParams = params
        blocks, size = _blocks(rotated_dim(site), p.r, p.block_size)
        vec = torch.zeros(1 if p.block_share else blocks, size * (size - 1) // 2, dtype=torch.float64)
        if not p.init:
            vec.normal_(0.0, 0.1, generator=generator)
        hyper = _hyper(blocks, size, p.block_share, p.coft, p.eps, p.cayley_neumann, p.neumann_terms, 1.0)
        hyper |= {"cfg_r": p.r, "cfg_block_size": p.block_size}
        return SiteAdapter(self, site, hyper, {"oft_R": vec.to(adapter_dtype(site.dtype))}, _peft_keys(site))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        keys = _peft_keys(site)
        source.refuse_others(keys.values(), "OFT")
        vec = source.take(keys["oft_R"])
        share = bool(cfg.get("block_share", False))
        blocks, size = _blocks(rotated_dim(site), int(cfg.get("r", 0)), int(cfg.get("oft_block_size", 32)))
        expected = (1 if share else blocks, size * (size - 1) // 2)
        source.check_shape(keys["oft_R"], vec, expected, site, f" ({blocks} blocks of {size})")
        hyper = _hyper(
            blocks,
            size,
            share,
            bool(cfg.get("coft", False)),
            float(cfg.get("eps", 6e-5)),
            bool(cfg.get("use_cayley_neumann", True)),
            int(cfg.get("num_cayley_neumann_terms", 5)),
            scale,
        )
        return SiteAdapter(self, site, hyper, {"oft_R": vec.to(adapter_dtype(site.dtype))}, keys)

    # -- graph ----------------------------------------------------------------------------------------------

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        site, dtype = a.site, a.tensors["oft_R"].dtype
        h = a.hyper
        R = _rotations(h, t["oft_R"])
        if site.op == "linear":
            xr = _rotate_rows(x.to(dtype), R, h).to(site.dtype)
            return F.linear(xr, weight, bias)
        if site.op == "embedding":
            return _rotate_rows(y.to(dtype), R, h).to(site.dtype)
        w = _rotate_weight(weight.to(dtype), R, h, site.weight_shape).to(site.dtype)
        return site.run(x, w, bias)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        R = _rotations(a.hyper, t["oft_R"].double())
        w = weight.double()
        if a.site.op == "embedding":
            merged = _rotate_rows(w, R, a.hyper)
        else:
            merged = _rotate_weight(w, R, a.hyper, a.site.weight_shape)
        return merged.to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "OFT", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        fields = ("cfg_r", "cfg_block_size", "block_share", "coft", "eps", "cayley_neumann", "neumann_terms")
        first = uniform(adapters, fields, "OFT")
        return {
            "peft_type": "OFT",
            "target_modules": target_modules(adapters),
            "r": first["cfg_r"],
            "oft_block_size": first["cfg_block_size"],
            "block_share": first["block_share"],
            "coft": first["coft"],
            "eps": first["eps"],
            "use_cayley_neumann": first["cayley_neumann"],
            "num_cayley_neumann_terms": first["neumann_terms"],
            "module_dropout": 0.0,
            "bias": "none",
            "init_weights": True,
            # the Cayley-Neumann form computed here is the one PEFT uses since 0.18.0 (older ones differ)
            "peft_version": "0.18.0",
        }


# Read here, or training-only (module_dropout only acts in training; init_weights only shapes the init).
_HANDLED = frozenset(
    {
        "r",
        "oft_block_size",
        "block_share",
        "coft",
        "eps",
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
        "module_dropout",
        "init_weights",
        "fan_in_fan_out",
        "bias",
    }
)


# -- helpers ---------------------------------------------------------------------------------------------------


def _nearest_divisor(n: int, p: int) -> int:
    """PEFT's fallback for a block count/size that does not divide ``n``: the nearest divisor (ties go down)."""
    if p >= n:
        return n
    up = p
    while up <= n and n % up:
        up += 1
    down = p
    while down > 1 and n % down:
        down -= 1
    return down if p - down <= up - p else up


def _blocks(n: int, r: int, block_size: int) -> tuple[int, int]:
    """(number of blocks, block size) for a rotated dimension ``n``, from PEFT's r or oft_block_size."""
    if r == 0 and block_size != 0:
        size = block_size if n % block_size == 0 and block_size <= n else _nearest_divisor(n, block_size)
        return n // size, size
    if r != 0 and block_size == 0:
        r = r if n % r == 0 and r <= n else _nearest_divisor(n, r)
        return r, n // r
    raise CheckpointError(f"OFT needs exactly one of r ({r}) and oft_block_size ({block_size}) to be non-zero")


def _hyper(
    blocks: int, size: int, share: bool, coft: bool, eps: float, neumann: bool, terms: int, scale: float
) -> dict[str, Any]:
    stored = 1 if share else blocks
    # COFT's radius per block, as PEFT computes it (in float32)
    radius = (torch.tensor(eps, dtype=torch.float32) * torch.tensor(stored).sqrt().reciprocal()).item()
    return {
        "blocks": blocks,
        "block_size": size,
        "block_share": share,
        "coft": coft,
        "eps": eps,
        "coft_radius": radius,
        "cayley_neumann": neumann,
        "neumann_terms": terms,
        "scale": scale,
    }


def _peft_keys(site: Site) -> dict[str, str]:
    return {"oft_R": "oft_embedding_R.weight" if site.op == "embedding" else "oft_R.weight"}


def _skew(vec: Any, size: int) -> Any:
    """``U - Uᵀ`` with ``vec`` [D, size(size-1)/2] filling U's strict upper triangle row by row (traceable)."""
    mask = vec.new_ones(size, size).triu(1).flatten()
    index = ((mask.cumsum(0) - 1).clamp(min=0)).long()
    upper = (vec.index_select(1, index) * mask).unflatten(1, (size, size))
    return upper - upper.transpose(1, 2)


def _cayley(Q: Any, blocks: int, size: int, exact: bool, terms: int) -> Any:
    """The rotation of each skew block [blocks, size, size]: exact Cayley, or PEFT's truncated Neumann form."""
    eye = torch.diag_embed(Q.new_ones(blocks, size))
    if exact:
        return torch.linalg.solve(eye + Q, eye - Q, left=False)
    R = eye
    if terms > 1:
        R = R + 2.0 * Q
    if terms > 2:
        power = torch.bmm(Q, Q)
        R = R + 2.0 * power
        for _ in range(3, terms - 1):
            power = torch.bmm(power, Q)
            R = R + 2.0 * power
        R = R + torch.bmm(power, Q)
    return R


def _rotations(h: Mapping[str, Any], vec: Any) -> Any:
    """[D, b, b]: every block's rotation (the shared one repeated)."""
    Q = _skew(vec, h["block_size"])
    if h["coft"]:
        norm = torch.linalg.matrix_norm(Q, keepdim=True)
        Q = torch.where(norm <= h["coft_radius"], Q, h["coft_radius"] * (Q / norm))
    stored = 1 if h["block_share"] else h["blocks"]
    R = _cayley(Q, stored, h["block_size"], not h["cayley_neumann"], h["neumann_terms"])
    if h["block_share"]:
        R = R.expand(h["blocks"], h["block_size"], h["block_size"])
    return R


def _rotate_rows(v: Any, R: Any, h: Mapping[str, Any]) -> Any:
    """``v BD`` over the last dimension: block j of v times R_j."""
    blocks, size = h["blocks"], h["block_size"]
    return torch.einsum("...rk,rkc->...rc", v.unflatten(-1, (blocks, size)), R).flatten(-2)


def _rotate_weight(w: Any, R: Any, h: Mapping[str, Any], shape: tuple[int, ...]) -> Any:
    """``W BDᵀ`` on the flattened input side of a Linear or conv weight, in its own shape."""
    flat = w.flatten(1).unflatten(1, (h["blocks"], h["block_size"]))
    return torch.einsum("ork,rck->orc", flat, R).flatten(1).reshape(shape)
