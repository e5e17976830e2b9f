"""Between site adapters and the matrix form the merge algebra works on.

Matrix form of a site's weight update is ``[m, n]`` with ``m`` the output units and ``n`` the flattened input
(``in·Πk``); for an embedding it is ``[dim, num]`` (the transpose of its logical ``[num, dim]``), which is
the ``B @ A`` layout of PEFT's LoRA factors everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters import KINDS, SiteAdapter
from ..adapters.base import adapter_dtype
from ..adapters.delta import build as build_delta
from ..adapters.lora import _factor_shapes, _hyper, _peft_keys
from ..errors import MergeError, SpecError
from ..sites import Site, attr


@dataclass(frozen=True)
class Task:
    """One source adapter at one site, with its resolved weight; ``field`` names it in the spec."""

    adapter: SiteAdapter
    weight: float
    field: str

    @property
    def is_lora(self) -> bool:
        return self.adapter.kind.name in ("lora", "dora")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA ``(A [r, n], B [m, r])`` in matrix form, unscaled."""
        t = self.adapter.tensors
        return t["lora_A"].flatten(1), t["lora_B"].flatten(1)

    @property
    def scaling(self) -> float:
        return float(self.adapter.hyper["scaling"])

    def delta(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The site's weight update in matrix form (and the bias update, None if the bias is untouched).

        LoRA: ``s B @ A`` in the factors' dtype, as PEFT computes it. Any other kind: ``merge(W) - W`` at the
        base weight, in float64 then cast to the adapter's dtype, so every mergeable kind can be folded.
        """
        a = self.adapter
        if self.is_lora:
            A, B = self.factors()
            return (B @ A) * self.scaling, None
        site = a.site
        gm = site.weight.graph.owning_module
        weight = attr(gm, str(site.weight.target)).double()
        bias = attr(gm, str(site.bias.target)).double() if site.bias is not None else None
        merged, new_bias = a.kind.merge(a, weight, weight, bias, bias, a.tensors)
        dtype = adapter_dtype(site.dtype)
        delta = to_matrix(site, logical(site, merged - weight)).to(dtype)
        db = None
        if new_bias is not None and bias is not None and not torch.equal(new_bias, bias):
            db = (new_bias - bias).to(dtype)
        return delta, db


def logical(site: Site, stored: torch.Tensor) -> torch.Tensor:
    return stored.t() if site.transposed else stored


def to_matrix(site: Site, delta: torch.Tensor) -> torch.Tensor:
    """Logical ``[out, in, *k]`` (embedding ``[num, dim]``) to matrix form."""
    return delta.t() if site.op == "embedding" else delta.flatten(1)


def from_matrix(site: Site, matrix: torch.Tensor) -> torch.Tensor:
    return matrix.t() if site.op == "embedding" else matrix.reshape(site.weight_shape)


def lora_result(
    site: Site, A: torch.Tensor, B: torch.Tensor, scaling: float, rslora: bool, field: str = "combine"
) -> SiteAdapter:
    """A plain LoRA at ``site`` from matrix-form factors, with the given scaling.

    ``alpha`` is chosen so that PEFT's rule (``alpha/r``, or ``alpha/√r``) gives back ``scaling`` at this
    site's rank, so the adapter saves as an ordinary PEFT LoRA.
    """
    if site.op.startswith("conv") and site.conv_args["groups"] != 1:
        raise SpecError(f"{field}.method: a LoRA cannot hold a fold at the grouped conv {site.describe()}; use *_delta")
    r = A.shape[0]
    a_shape, b_shape = _factor_shapes(site, r)
    alpha = scaling * (math.sqrt(r) if rslora else r)
    hyper = _hyper(site, r, alpha, rslora, False, False, 1.0)
    hyper["scaling"] = scaling
    tensors = {"lora_A": A.reshape(a_shape).contiguous(), "lora_B": B.reshape(b_shape).contiguous()}
    return SiteAdapter(KINDS["lora"], site, hyper, tensors, _peft_keys(site, False, False))


def delta_result(site: Site, matrix: torch.Tensor, bias: torch.Tensor | None) -> SiteAdapter:
    return build_delta(site, from_matrix(site, matrix).contiguous(), bias)


FOLDABLE_OPS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "embedding"})


def check_foldable(task: Task) -> None:
    """Refuse inputs whose fold would silently drop part of their math."""
    h, name = task.adapter.hyper, task.adapter.kind.name
    if task.adapter.site.op not in FOLDABLE_OPS and name != "ia3":
        raise SpecError(
            f"{task.field}: {name} adapts {task.adapter.site.describe()}, and folds are built for weight updates "
            f"of {', '.join(sorted(FOLDABLE_OPS))} sites only"
        )
    if task.is_lora and h.get("dora"):
        raise SpecError(
            f"{task.field}: DoRA adapters cannot be folded (their magnitudes do not combine; PEFT's fold drops "
            "them). Merge the DoRA adapter instead, or fold plain LoRAs"
        )
    if task.is_lora and h.get("lora_bias"):
        raise SpecError(f"{task.field}: a LoRA with lora_bias cannot be folded (the bias has no folded form)")
    if name not in KINDS:
        raise SpecError(f"{task.field}: unknown adapter kind {name!r}")
    for role, tensor in task.adapter.tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise MergeError(
                f"{task.field}: tensor {role} at {task.adapter.site.module} holds NaN or inf, which no fold can combine"
            )
