"""C3A on Linear: ΔW is block-circulant, applied as a circular convolution through the FFT.

Math (``b`` the block size, ``K = c3a_kernel`` of shape ``[out/b, in/b, b]``): the input is cut into ``in/b``
blocks ``x_n`` of ``b`` values; output block ``m`` is ``Re(fft(Σ_n ifft(x_n) ⊙ fft(K[m, n])))``, all of it divided
by ``in``; ``y += that``. Equivalently ``ΔW`` is the ``(out/b) x (in/b)`` grid of ``b x b`` circulant blocks of
``K[m, n]``, over ``in``. Merge: ``W += ΔW``, with ΔW built by the same FFT pipeline applied to the identity.
C3A has no scaling factor, so a spec ``scale`` other than 1 is refused.

Divergence from PEFT: PEFT runs the FFTs in float32 whatever the model's dtype; here they run in the adapter
dtype, so a float64 model gets float64 FFTs (float32/16 models compute what PEFT computes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
from ..sites import Site
from .base import (
    AdapterKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    per_module,
    refuse_unknown,
    strict_suffix_value,
    target_modules,
)

KERNEL = "c3a_kernel"


class C3AParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(256, gt=0, description="size of the circulant blocks; must divide in and out")
    init_weights: bool | Literal["gaussian", "kaiming_uniform", "xavier_uniform"] = Field(
        "xavier_uniform",
        description="true: zero kernel (identity at init); gaussian: N(0, 1); kaiming_uniform: U(±1/√in); "
        "xavier_uniform or false: U(±√(6/(in+out))), as PEFT",
    )


class C3A(AdapterKind):
    name = "c3a"
    peft_types = ("C3A",)
    peft_prefix = "c3a_"
    ops = frozenset({"linear"})
    Params = C3AParams
    scalable = False
    conv1d = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: C3AParams = params
        shape = _kernel_shape(site, p.block_size, SpecError, "")
        out, inp = site.weight_shape
        kernel = torch.zeros(shape, dtype=torch.float64)
        if p.init_weights == "gaussian":
            kernel.normal_(generator=generator)
        elif p.init_weights in ("xavier_uniform", False):
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (inp + out))
            kernel.uniform_(-bound, bound, generator=generator)
        elif p.init_weights == "kaiming_uniform":
            bound = math.sqrt(1.0 / inp)
            kernel.uniform_(-bound, bound, generator=generator)
        hyper = {"block_size": p.block_size, "scale": 1.0}
        return SiteAdapter(self, site, hyper, {"kernel": kernel.to(adapter_dtype(site.dtype))}, {"kernel": KERNEL})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        source.refuse_others({KERNEL}, "a C3A site")
        kernel = source.take(KERNEL)
        b = strict_suffix_value(cfg.get("block_size_pattern") or {}, site.module, cfg.get("block_size", 256))
        shape = _kernel_shape(site, int(b), CheckpointError, source.file)
        source.check_shape(KERNEL, kernel, shape, site, f" (block_size={b} of adapter_config.json)")
        hyper = {"block_size": int(b), "scale": 1.0}
        return SiteAdapter(self, site, hyper, {"kernel": kernel.to(adapter_dtype(site.dtype))}, {"kernel": KERNEL})

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        dtype = a.tensors["kernel"].dtype
        out = _convolve(x.to(dtype), t["kernel"], a.hyper["block_size"]) / a.site.in_features
        return y + out.to(a.site.dtype)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        eye = torch.eye(a.site.in_features, dtype=torch.float64)
        delta = _convolve(eye, t["kernel"].double(), a.hyper["block_size"]).t() / a.site.in_features
        return (weight.double() + delta).to(weight.dtype), bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "C3A", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = adapters[0].hyper
        return {
            "peft_type": "C3A",
            "target_modules": target_modules(adapters),
            "block_size": first["block_size"],
            "block_size_pattern": per_module(adapters, "block_size", first["block_size"]),
            "init_weights": True,
        }

    def additive(self, a: SiteAdapter) -> bool:
        return True


# Read here, or training-only (init_weights: the kernel is stored; trained biases come as base overrides).
_HANDLED = frozenset({"block_size", "block_size_pattern", "init_weights", "bias"})


def _kernel_shape(site: Site, b: int, error: type[Exception], where: str) -> tuple[int, int, int]:
    prefix = f"{where}: " if where else ""
    out, inp = site.weight_shape
    if b <= 0 or out % b or inp % b:
        raise error(f"{prefix}C3A block_size={b} must divide both in={inp} and out={out} of {site.describe()}")
    return out // b, inp // b, b


def _convolve(x: Any, kernel: Any, b: int) -> Any:
    """Block circular convolution of ``x`` (``[..., in]``) with the kernel: ``[..., out]``, unscaled."""
    blocks = torch.fft.ifft(x.unflatten(-1, (-1, b)))
    mixed = torch.einsum("...nb,mnb->...mb", blocks, torch.fft.fft(kernel))
    return torch.fft.fft(mixed).real.flatten(-2)
