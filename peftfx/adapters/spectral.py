"""What the sparse-coefficient kinds (FourierFT, WaveFT) share: ``n`` trained coefficients at seeded random
positions of an ``out x in`` grid, a linear-only ΔW added to the output, and the checkpoint fields around them."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ..sites import Site
from .base import PeftSource, SiteAdapter, per_module, target_modules, uniform


def check_n(site: Site, n: int, kind: str, error: type[Exception], where: str) -> None:
    """PEFT draws the positions from ``out * in``: ``n`` may not exceed it."""
    out, inp = site.weight_shape
    if n > out * inp:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{kind} n_frequency={n} exceeds out*in={out * inp} of {site.describe()}")


@functools.lru_cache(maxsize=256)
def random_positions(out: int, inp: int, n: int, seed: int) -> tuple[int, ...]:
    """Flat positions (row * in + col) of the coefficients: the first ``n`` of ``randperm(out * in)`` from a CPU
    generator seeded with ``seed``, as PEFT draws them (it never saves them)."""
    return tuple(torch.randperm(out * inp, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def take_spectrum(source: PeftSource, key: str, kind: str) -> torch.Tensor:
    """The site's one tensor, ``key``; any other is refused."""
    source.refuse_others({key}, f"a {kind} site")
    return source.take(key)


def spectral_config(
    adapters: Sequence[SiteAdapter], peft_type: str, kind: str, uniform_keys: Sequence[str] = ()
) -> dict[str, Any]:
    """The adapter_config.json fields FourierFT and WaveFT share, once ``scaling``, the seed and ``uniform_keys``
    are one value across the adapter (PEFT has no pattern for them)."""
    first = uniform(adapters, ("scaling", "random_loc_seed", *uniform_keys), kind)
    return {
        "peft_type": peft_type,
        "target_modules": target_modules(adapters),
        "n_frequency": first["n_frequency"],
        "n_frequency_pattern": per_module(adapters, "n_frequency", first["n_frequency"]),
        "scaling": first["scaling"],
        "random_loc_seed": first["random_loc_seed"],
        "fan_in_fan_out": any(a.site.transposed for a in adapters),
        "bias": "none",
    }
