"""FourierFT on Linear and transformers Conv1D: a few trained spectral coefficients, inverse-FFT'd to ΔW.

Math (``W`` logical ``[out, in]``): ``S`` is an ``out x in`` matrix that is zero except at ``n`` positions,
which hold ``fourierft_spectrum``; ``ΔW = Re(ifft2(S)) * scaling``; ``y += x ΔWᵀ``. Merge: ``W += ΔW``.

PEFT never saves the positions: they are the first ``n`` entries of ``torch.randperm(out * in)`` drawn from a CPU
generator seeded with ``random_loc_seed`` (flat index ``p`` is row ``p // in``, column ``p % in``). They are
rebuilt here the same way, so a checkpoint reloads to the same positions in PEFT and in peftfx. In the graph
they are a literal index list, so the graph needs no extra integer tensor.

Divergence from PEFT: PEFT always takes the inverse FFT in float32; here it runs in the adapter dtype, so a
float64 model gets a float64 ΔW (float32 models compute exactly what PEFT computes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
from ..sites import Site
from ..sizes import Seed
from .base import (
    AdditiveKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    add_linear_delta,
    refuse_unknown,
    strict_suffix_value,
)
from .spectral import check_n, random_positions, spectral_config, take_spectrum

SPECTRUM = "fourierft_spectrum"


class FourierFTParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n_frequency: int = Field(1000, gt=0, description="number of trained spectral coefficients (at most out*in)")
    scaling: float = Field(150.0, description="factor on the inverse FFT (PEFT's scaling)")
    random_loc_seed: Seed = Field(777, description="seed of the coefficients' positions (PEFT's random_loc_seed)")
    init_weights: bool = Field(False, description="true: zero spectrum (identity at init); false: N(0, 1) as PEFT")


class FourierFT(AdditiveKind):
    name = "fourierft"
    peft_types = ("FOURIERFT",)
    peft_prefix = "fourierft_"
    ops = frozenset({"linear"})
    Params = FourierFTParams

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: FourierFTParams = params
        check_n(site, p.n_frequency, "FourierFT", SpecError, "")
        spectrum = torch.zeros(p.n_frequency, dtype=torch.float64)
        if not p.init_weights:
            spectrum.normal_(generator=generator)
        hyper = _hyper(p.n_frequency, p.scaling, p.random_loc_seed, 1.0)
        return SiteAdapter(
            self, site, hyper, {"spectrum": spectrum.to(adapter_dtype(site.dtype))}, {"spectrum": SPECTRUM}
        )

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        spectrum = take_spectrum(source, SPECTRUM, "FourierFT")
        n = strict_suffix_value(cfg.get("n_frequency_pattern") or {}, site.module, cfg.get("n_frequency", 1000))
        source.check_shape(SPECTRUM, spectrum, (n,), site, " (n_frequency of adapter_config.json)")
        check_n(site, n, "FourierFT", CheckpointError, source.file)
        seed = cfg.get("random_loc_seed", 777)
        if seed is None:
            raise CheckpointError(f"{source.file}: random_loc_seed is null; PEFT cannot rebuild the positions either")
        hyper = _hyper(n, float(cfg.get("scaling", 150.0)), int(seed), scale)
        return SiteAdapter(
            self, site, hyper, {"spectrum": spectrum.to(adapter_dtype(site.dtype))}, {"spectrum": SPECTRUM}
        )

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        return add_linear_delta(a.site, x, y, _delta(a, t["spectrum"]), a.tensors["spectrum"].dtype)

    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _delta(a, t["spectrum"].double())

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "FourierFT", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        return {**spectral_config(adapters, "FOURIERFT", "FourierFT"), "init_weights": False}


# Read here, or training-only (init_weights: the spectrum is stored).
_HANDLED = frozenset(
    {"n_frequency", "n_frequency_pattern", "scaling", "random_loc_seed", "fan_in_fan_out", "bias", "init_weights"}
)


def _hyper(n: int, scaling: float, seed: int, scale: float) -> dict[str, Any]:
    return {"n_frequency": n, "scaling": scaling, "random_loc_seed": seed, "scale": scale}


def _delta(a: SiteAdapter, spectrum: Any) -> Any:
    """ΔW (logical ``[out, in]``) in the spectrum's dtype, scaled; works on tensors and fx proxies alike."""
    h = a.hyper
    out, inp = a.site.weight_shape
    index = spectrum.new_tensor(random_positions(out, inp, h["n_frequency"], h["random_loc_seed"]), dtype=torch.long)
    dense = spectrum.new_zeros(out * inp).scatter(0, index, spectrum).reshape(out, inp)
    return torch.fft.ifft2(dense).real * (h["scaling"] * h["scale"])
