"""WaveFT on Linear and transformers Conv1D: trained wavelet coefficients at fixed positions, inverse-DWT'd to ΔW.

Math (``W`` logical ``[out, in]``; ``n`` coefficients at the first ``n`` positions of ``randperm(out * in)`` from
a CPU generator seeded with ``random_loc_seed``, as row ``p // in``, column ``p % in``; PEFT never saves them):

* ``use_idwt: false``: ``ΔW`` is zero except ``ΔW[row, col] = spectrum * scaling``.
* ``use_idwt: true``: the positions are shifted into the centre of an ``H x W`` grid (``out + 2N - 2`` and
  ``in + 2N - 2`` for Daubechies ``dbN``, rounded up to even); its quadrants are the one-level coefficients
  ``cA`` (top left), ``cH`` (top right), ``cV`` (bottom left), ``cD`` (bottom right) of a 2-D inverse DWT:
  ``R = Σ up2(c) ⋆ (f_rows ⊗ f_cols)`` with ``(f_rows, f_cols)`` = (lo, lo), (hi, lo), (lo, hi), (hi, hi), cropped by
  ``(2L - 3) // 2`` on each side (``L`` the filter length), then centre-cropped to ``out x in``; ``ΔW = R * scaling``.

``y += x ΔWᵀ``; merge ``W += ΔW`` (transposed into Conv1D storage).

The Daubechies reconstruction filters are computed here by spectral factorisation (the minimum-phase root of
the Daubechies polynomial), which reproduces PEFT's tables for db1-db10 to 1e-15 (db3 to 4e-12, PEFT's table
is rounded there). Symlets and coiflets (PEFT's ``sym*``, ``coif*``) are refused: their filters are not
derived here. PEFT itself only has filters for db1-db10, so db11+ fail in PEFT too.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import CheckpointError, SpecError
from ..sites import Site
from .base import (
    AdditiveKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    add_linear_delta,
    pattern_value,
    refuse_unknown,
)
from .spectral import check_n, random_positions, spectral_config, take_spectrum

SPECTRUM = "waveft_spectrum"
MAX_DB = 10  # PEFT has reconstruction filters for db1-db10 only


class WaveFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n_frequency: int = Field(2592, gt=0, description="number of trained wavelet coefficients (at most out*in)")
    scaling: float = Field(25.0, description="factor on the reconstructed ΔW (PEFT's scaling)")
    wavelet_family: str = Field("db1", description="Daubechies wavelet db1..db10 (haar = db1)")
    use_idwt: bool = Field(True, description="inverse-DWT the coefficients; false: ΔW is the sparse matrix itself")
    random_loc_seed: int = Field(777, description="seed of the coefficients' positions")
    init_weights: bool = Field(True, description="true: zero coefficients (identity at init); false: N(0, 0.01²)")

    @field_validator("wavelet_family")
    @classmethod
    def _known(cls, value: str) -> str:
        _order(value, ValueError, "")
        return value


class WaveFT(AdditiveKind):
    name = "waveft"
    peft_types = ("WAVEFT",)
    peft_prefix = "waveft_"
    ops = frozenset({"linear"})
    Params = WaveFTParams

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: WaveFTParams = params
        check_n(site, p.n_frequency, "WaveFT", SpecError, "")
        spectrum = torch.zeros(p.n_frequency, dtype=torch.float64)
        if not p.init_weights:
            spectrum.normal_(0.0, 0.01, generator=generator)
        hyper = _hyper(p.n_frequency, p.scaling, p.random_loc_seed, p.wavelet_family, p.use_idwt, 1.0)
        tensors = {"spectrum": spectrum.to(adapter_dtype(site.dtype))}
        return SiteAdapter(self, site, hyper, tensors, {"spectrum": SPECTRUM})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        spectrum = take_spectrum(source, SPECTRUM, "WaveFT")
        if spectrum.ndim != 1:
            raise CheckpointError(
                f"{source.file}: {source.keys[SPECTRUM]!r} has shape {list(spectrum.shape)}, expected a vector"
            )
        n = spectrum.shape[0]
        if not cfg.get("proportional_parameters"):  # else PEFT spreads a budget over the layers: the file says n
            expected = pattern_value(cfg.get("n_frequency_pattern") or {}, site.module, cfg.get("n_frequency", 2592))
            if n != expected:
                raise CheckpointError(
                    f"{source.file}: {source.keys[SPECTRUM]!r} has shape {list(spectrum.shape)}, expected "
                    f"[{expected}] (n_frequency of adapter_config.json) for {site.describe()}"
                )
        check_n(site, n, "WaveFT", CheckpointError, source.file)
        family = str(cfg.get("wavelet_family", "db1"))
        use_idwt = bool(cfg.get("use_idwt", True))
        if use_idwt:
            _order(family, CheckpointError, source.file)
        hyper = _hyper(
            n, float(cfg.get("scaling", 25.0)), int(cfg.get("random_loc_seed", 777)), family, use_idwt, scale
        )
        tensors = {"spectrum": spectrum.to(adapter_dtype(site.dtype))}
        return SiteAdapter(self, site, hyper, tensors, {"spectrum": SPECTRUM})

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        return add_linear_delta(a.site, x, y, _delta(a, t["spectrum"]), a.tensors["spectrum"].dtype)

    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _delta(a, t["spectrum"].double())

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "WaveFT", file)
        if config.get("use_idwt", True):
            _order(str(config.get("wavelet_family", "db1")), CheckpointError, file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = adapters[0].hyper
        return {
            **spectral_config(adapters, "WAVEFT", "WaveFT", ("wavelet_family", "use_idwt")),
            "wavelet_family": first["wavelet_family"],
            "use_idwt": first["use_idwt"],
            "proportional_parameters": False,
            "init_weights": True,
        }


# Read here, or training-only (init_weights: the spectrum is stored; proportional_parameters: its length says n).
_HANDLED = frozenset(
    {
        "n_frequency",
        "n_frequency_pattern",
        "scaling",
        "wavelet_family",
        "use_idwt",
        "random_loc_seed",
        "fan_in_fan_out",
        "bias",
        "proportional_parameters",
        "init_weights",
    }
)


def _hyper(n: int, scaling: float, seed: int, family: str, use_idwt: bool, scale: float) -> dict[str, Any]:
    return {
        "n_frequency": n,
        "scaling": scaling,
        "random_loc_seed": seed,
        "wavelet_family": family,
        "use_idwt": use_idwt,
        "scale": scale,
    }


def _order(family: str, error: type[Exception], where: str) -> int:
    """The N of a Daubechies family name (haar = db1)."""
    match = re.fullmatch(r"db(\d+)", family.lower())
    order = 1 if family.lower() == "haar" else int(match.group(1)) if match else 0
    if not 1 <= order <= MAX_DB:
        prefix = f"{where}: " if where else ""
        raise error(
            f"{prefix}wavelet_family={family!r} is not supported by peftfx's WaveFT (Daubechies db1-db{MAX_DB} and "
            "haar are; symlet and coiflet filters are not derived here)"
        )
    return order


@functools.cache
def _lowpass(order: int) -> tuple[float, ...]:
    """Daubechies reconstruction lowpass filter: √2 ((1 + z⁻¹)/2)^N Q(z⁻¹), Q the minimum-phase factor."""
    if order == 1:
        return (1 / math.sqrt(2),) * 2
    # |Q|² = Σ_k C(N-1+k, k) y^k with y = sin²(ω/2) = (2 - z - z⁻¹) / 4: roots in y via a companion matrix.
    coeffs = [math.comb(order - 1 + k, k) for k in range(order)]
    companion = torch.zeros(order - 1, order - 1, dtype=torch.float64)
    companion[0] = -torch.tensor(coeffs[-2::-1], dtype=torch.float64) / coeffs[-1]
    companion[1:, :-1] = torch.eye(order - 2, dtype=torch.float64)
    poly = torch.ones(1, dtype=torch.complex128)

    def times(poly: torch.Tensor, root: complex) -> torch.Tensor:  # poly * (1 - root z⁻¹)
        zero = poly.new_zeros(1)
        return torch.cat([poly, zero]) - root * torch.cat([zero, poly])

    for _ in range(order):
        poly = times(poly, -1.0)
    for y in torch.linalg.eigvals(companion).tolist():
        b = 2 - 4 * y  # z + 1/z = b: keep the root inside the unit circle
        z = (b - (b * b - 4) ** 0.5) / 2
        poly = times(poly, z if abs(z) < 1 else 1 / z)
    h = poly.real
    return tuple((h * (math.sqrt(2) / h.sum())).tolist())


@functools.lru_cache(maxsize=256)
def _positions(out: int, inp: int, n: int, seed: int, family: str, use_idwt: bool) -> tuple[tuple[int, ...], int, int]:
    """Flat positions in the (padded) coefficient grid, and the grid's shape."""
    flat = torch.tensor(random_positions(out, inp, n, seed), dtype=torch.long)
    rows, cols = flat // inp, flat % inp
    if not use_idwt:
        return tuple((rows * inp + cols).tolist()), out, inp
    extra = 2 * _order(family, ValueError, "") - 2
    height, width = out + extra + (out + extra) % 2, inp + extra + (inp + extra) % 2
    rows, cols = rows + (height - out) // 2, cols + (width - inp) // 2
    return tuple((rows * width + cols).tolist()), height, width


def _delta(a: SiteAdapter, spectrum: Any) -> Any:
    """ΔW (logical ``[out, in]``) in the spectrum's dtype, scaled; on tensors and fx proxies alike."""
    h = a.hyper
    out, inp = a.site.weight_shape
    flat, height, width = _positions(
        out, inp, h["n_frequency"], h["random_loc_seed"], h["wavelet_family"], h["use_idwt"]
    )
    index = spectrum.new_tensor(flat, dtype=torch.long)
    grid = spectrum.new_zeros(height * width).scatter(0, index, spectrum).reshape(height, width)
    scale = h["scaling"] * h["scale"]
    if not h["use_idwt"]:
        return grid * scale
    lo = _lowpass(_order(h["wavelet_family"], ValueError, ""))
    size = len(lo)
    lo_t = spectrum.new_tensor(lo)
    hi_t = spectrum.new_tensor([(-1) ** i * lo[size - 1 - i] for i in range(size)])
    # One 2-D filter per quadrant (cA, cH, cV, cD): rows filtered by the first factor, columns by the second.
    pairs = ((lo_t, lo_t), (hi_t, lo_t), (lo_t, hi_t), (hi_t, hi_t))
    filters = torch.stack([fr.unsqueeze(1) * fc.unsqueeze(0) for fr, fc in pairs]).unsqueeze(1)
    h2, w2 = height // 2, width // 2
    quadrants = torch.stack([grid[:h2, :w2], grid[:h2, w2:], grid[h2:, :w2], grid[h2:, w2:]]).unsqueeze(0)
    full = F.conv_transpose2d(quadrants, filters, stride=2)[0, 0]
    trim = (2 * size - 3) // 2
    rows, cols = height + size - 2 - 2 * trim, width + size - 2 - 2 * trim  # the trimmed reconstruction's shape
    top, left = trim + (rows - out) // 2, trim + (cols - inp) // 2
    return full[top : top + out, left : left + inp] * scale
