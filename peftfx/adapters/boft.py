"""BOFT: butterfly orthogonal fine-tuning on Linear and Conv2d, a product of permuted block rotations and a scale.

``boft_R`` [N, D, b, b] holds N butterfly factors of D blocks each; every block becomes a rotation by the exact
Cayley transform of its skew part, ``S = (A - Aᵀ)/2``, ``R = (I - S)(I + S)⁻¹``. Factor i is
``M_i = P_i diag(R_i1..R_iD) P_iᵀ``, where ``P_i`` is the butterfly permutation that, within each of
``D / 2^i`` chunks of the rotated dimension, lists the half-block groups of even index before the odd ones
(``P_0`` and the single-factor case are the identity). With ``B = M_(N-1) ⋯ M_1 M_0`` and ``boft_s`` the
per-output scale:

* Linear: ``y = s ⊙ (W (xᵀ B)ᵀ) + b``, merged ``W' = s ⊙ (W Bᵀ)``;
* Conv2d: ``W' = s ⊙ (W_flat Bᵀ)`` over the flattened ``[in, kh, kw]`` input side, in both forms.

The rotated dimension is ``in_features`` or ``in_channels * k * k``.

PEFT builds N > 1 factors only when its CUDA block-diagonal extension loads; without it (any CPU) it silently
uses one factor, whatever ``boft_n_butterfly_factor`` says. So the number of factors is read from the stored
tensor (1, or the configured factor), and a fresh adapter with ``butterfly_factor > 1`` reloads in PEFT only
where that extension is available.

Divergence from PEFT, on purpose: PEFT's unmerged Conv2d forward passes only ``padding[0]`` and ``stride[0]``
(and no dilation) to the convolution, while its merge keeps the base conv's own arguments; here both forms use
the base conv's arguments, i.e. PEFT's merged result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import CheckpointError, SpecError
from ..sites import Site
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules
from .orthogonal import orthogonal_site_problem, rotated_dim


class BoftParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(4, ge=0, description="rotation block size (PEFT's boft_block_size); 0 to give block_num")
    block_num: int = Field(0, ge=0, description="number of blocks instead of a block size (PEFT's boft_block_num)")
    butterfly_factor: int = Field(
        1, gt=0, le=64, description="number of butterfly factors (PEFT's boft_n_butterfly_factor)"
    )
    init: bool = Field(True, description="true: identity rotation and unit scale; false: random, like PEFT")

    @model_validator(mode="after")
    def _one_of(self) -> BoftParams:
        if (self.block_size != 0) == (self.block_num != 0):
            raise ValueError("give exactly one of block_size and block_num (the other one must be 0)")
        return self


class Boft(AdapterKind):
    name = "boft"
    peft_types = ("BOFT",)
    peft_prefix = "boft_"
    ops = frozenset({"linear", "conv2d"})
    Params = BoftParams
    scalable = False
    conv1d = False

    def site_problem(self, site: Site) -> str | None:
        return super().site_problem(site) or orthogonal_site_problem(site, "BOFT")

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: BoftParams = params
        try:
            num, size = _blocks(rotated_dim(site), p.block_size, p.block_num, p.butterfly_factor)
        except ValueError as e:
            raise SpecError(f"boft at {site.describe()}: {e}") from None
        R = torch.zeros(p.butterfly_factor, num, size, size, dtype=torch.float64)
        s = torch.ones(_scale_shape(site), dtype=torch.float64)
        if not p.init:
            R.normal_(0.0, 0.1, generator=generator)
            s.normal_(1.0, 0.1, generator=generator)
        dtype = adapter_dtype(site.dtype)
        hyper = {"factors": p.butterfly_factor, "blocks": num, "block_size": size, "scale": 1.0}
        hyper |= {"cfg": (p.block_size, p.block_num, p.butterfly_factor)}
        return SiteAdapter(self, site, hyper, {"boft_R": R.to(dtype), "boft_s": s.to(dtype)}, dict(_KEYS))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        source.refuse_others(_KEYS.values(), "BOFT")
        R, s = source.take("boft_R"), source.take("boft_s")
        factor = int(cfg.get("boft_n_butterfly_factor", 1))
        # PEFT without its CUDA extension stores a single factor whatever the config says
        factors = 1 if R.ndim == 4 and R.shape[0] == 1 else factor
        try:
            num, size = _blocks(
                rotated_dim(site), int(cfg.get("boft_block_size", 4)), int(cfg.get("boft_block_num", 0)), factors
            )
        except ValueError as e:
            raise CheckpointError(f"{source.file}: adapter_config.json does not fit {site.describe()}: {e}") from None
        expected = {"boft_R": (factors, num, size, size), "boft_s": _scale_shape(site)}
        dtype = adapter_dtype(site.dtype)
        tensors = {}
        for role, tensor in (("boft_R", R), ("boft_s", s)):
            source.check_shape(role, tensor, expected[role], site)
            tensors[role] = tensor.to(dtype)
        hyper = {"factors": factors, "blocks": num, "block_size": size, "scale": scale}
        return SiteAdapter(self, site, hyper, tensors, dict(_KEYS))

    # -- graph ----------------------------------------------------------------------------------------------

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        site, h, dtype = a.site, a.hyper, a.tensors["boft_R"].dtype
        rotations = _rotations(t["boft_R"], h)
        if site.op == "linear":
            xr = _butterfly_rows(x.to(dtype), rotations, h).to(site.dtype)
            out = F.linear(xr, weight) * t["boft_s"].reshape(-1).to(site.dtype)
            return out if bias is None else out + bias
        n = rotated_dim(site)
        B = _butterfly_rows(torch.diag(t["boft_s"].new_ones(n)), rotations, h)
        w = _scaled_rotated(weight.to(dtype), B, t["boft_s"], site.weight_shape).to(site.dtype)
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
        h = a.hyper
        rotations = _rotations(t["boft_R"].double(), h)
        eye = torch.eye(rotated_dim(a.site), dtype=torch.float64)
        B = _butterfly_rows(eye, rotations, h)
        merged = _scaled_rotated(weight.double(), B, t["boft_s"].double(), a.site.weight_shape)
        return merged.to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "BOFT", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        cfgs = {a.hyper["cfg"] for a in adapters}
        if len(cfgs) > 1:
            raise SpecError("save_adapter: PEFT's BOFT needs one block_size/block_num/butterfly_factor per adapter")
        size, num, factor = cfgs.pop()
        return {
            "peft_type": "BOFT",
            "target_modules": target_modules(adapters),
            "boft_block_size": size,
            "boft_block_num": num,
            "boft_n_butterfly_factor": factor,
            "boft_dropout": 0.0,
            "bias": "none",
            "init_weights": True,
        }


_KEYS = {"boft_R": "boft_R", "boft_s": "boft_s"}
# Read here, or training-only (boft_dropout acts in training; init_weights only shapes the init).
_HANDLED = frozenset(
    {"boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout", "init_weights", "bias"}
    | {"fan_in_fan_out"}
)


# -- helpers ---------------------------------------------------------------------------------------------------


def _scale_shape(site: Site) -> tuple[int, int]:
    return (site.out_features, 1) if site.op == "linear" else (1, site.out_features)


def _blocks(n: int, size: int, num: int, factors: int) -> tuple[int, int]:
    """(number of blocks, block size) for a rotated dimension ``n``, with PEFT's constraints."""
    extra = factors - 1  # factors beyond the first need halvable block counts
    if size == 0 and num != 0:
        if n % num:
            raise ValueError(f"{n} features are not divisible by boft_block_num={num}")
        if extra and (num % 2**extra or 2**extra > num):
            raise ValueError(f"boft_block_num={num} must be a multiple of 2^{extra} for {factors} butterfly factors")
        size = n // num
    elif size != 0 and num == 0:
        if n % size:
            raise ValueError(f"{n} features are not divisible by boft_block_size={size}")
        if extra and n % (size * 2**extra):
            raise ValueError(f"{n} features do not fit {factors} butterfly factors of blocks of {size}")
        num = n // size
    else:
        raise ValueError(f"exactly one of boft_block_size ({size}) and boft_block_num ({num}) must be non-zero")
    if extra and (num % 2 or size % 2):
        raise ValueError(f"butterfly factors need an even block count and size (got {num} blocks of {size})")
    return num, size


def _rotations(R: Any, h: Mapping[str, Any]) -> Any:
    """[N, D, b, b]: the exact Cayley rotation of each block's skew part."""
    n_, d, b = h["factors"], h["blocks"], h["block_size"]
    A = R.reshape(n_ * d, b, b)
    S = 0.5 * (A - A.transpose(1, 2))
    eye = torch.diag_embed(A.new_ones(n_ * d, b))
    return torch.linalg.solve(eye + S, eye - S, left=False).reshape(n_, d, b, b)


def _butterfly_rows(v: Any, rotations: Any, h: Mapping[str, Any]) -> Any:
    """``v B`` over the last dimension, factor by factor: ``v M_(N-1)``, then ``M_(N-2)``, ... ``M_0``."""
    n_, d, b = h["factors"], h["blocks"], h["block_size"]
    for i in reversed(range(n_)):
        if n_ > 1:
            v = _permute(v, d // 2**i, b // 2, inverse=True)  # v P_i
        v = torch.einsum("...dk,dkc->...dc", v.unflatten(-1, (d, b)), rotations[i]).flatten(-2)
        if n_ > 1:
            v = _permute(v, d // 2**i, b // 2, inverse=False)  # (.) P_iᵀ
    return v


def _permute(v: Any, chunks: int, half: int, inverse: bool) -> Any:
    """PEFT's block butterfly permutation as a gather (``v P_iᵀ``) or its inverse (``v P_i``), by reshapes.

    Each of ``chunks`` chunks holds an even number of groups of ``half`` features; the gather lists the even
    groups, then the odd ones.
    """
    shape = (chunks, 2, -1, half) if inverse else (chunks, -1, 2, half)
    return v.unflatten(-1, shape).transpose(-3, -2).flatten(-4)


def _scaled_rotated(w: Any, B: Any, s: Any, shape: tuple[int, ...]) -> Any:
    """``s ⊙ (W_flat Bᵀ)`` in the weight's own shape."""
    return (w.flatten(1) @ B.t() * s.reshape(-1, 1)).reshape(shape)
