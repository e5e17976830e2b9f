"""Between site adapters and the matrix form the merge algebra works on.

Matrix form of a site's weight update is ``[m, n]`` with ``m`` the output units and ``n`` the flattened input
(``in·Πk``); for an embedding it is ``[dim, num]`` (the transpose of its logical ``[num, dim]``), which is
the ``B @ A`` layout of PEFT's LoRA factors everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import KINDS, SiteAdapter
from ..adapters.base import LowRank, adapter_dtype
from ..adapters.delta import build as build_delta
from ..errors import MergeError, SpecError
from ..sites import Site


@dataclass(frozen=True)
class Task:
    """One source adapter at one site, with its resolved weight; ``field`` names it in the spec."""

    adapter: SiteAdapter
    weight: float
    field: str

    @property
    def low_rank(self) -> LowRank | None:
        return self.adapter.kind.low_rank(self.adapter)

    @property
    def is_lora(self) -> bool:
        return self.low_rank is not None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA ``(A [r, n], B [m, r])`` in matrix form, unscaled."""
        lr = self.low_rank
        return lr.A.flatten(1), lr.B.flatten(1)

    @property
    def scaling(self) -> float:
        return float(self.low_rank.scaling)

    def delta(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The site's weight update in matrix form (and the bias update, None if the bias is untouched).

        LoRA: ``s B @ A`` in the factors' dtype, as PEFT computes it. Any other kind: its dense delta
        (``merge(W) - W`` in float64), cast to the adapter's dtype, so every mergeable kind can be folded.
        """
        if self.is_lora:
            A, B = self.factors()
            return (B @ A) * self.scaling, None
        site = self.adapter.site
        delta, bias = self.adapter.kind.dense_delta(self.adapter)
        dtype = adapter_dtype(site.dtype)
        return to_matrix(site, delta).to(dtype), None if bias is None else bias.to(dtype)


def to_matrix(site: Site, delta: torch.Tensor) -> torch.Tensor:
    """Logical ``[out, in, *k]`` (embedding ``[num, dim]``) to matrix form."""
    return delta.t() if site.op == "embedding" else delta.flatten(1)


def from_matrix(site: Site, matrix: torch.Tensor) -> torch.Tensor:
    return matrix.t() if site.op == "embedding" else matrix.reshape(site.weight_shape)


def lora_result(
    site: Site, A: torch.Tensor, B: torch.Tensor, scaling: float, rslora: bool, field: str = "combine"
) -> SiteAdapter:
    """A plain LoRA at ``site`` from matrix-form factors, with the given scaling (see ``Lora.from_factors``)."""
    if site.op.startswith("conv") and site.conv_args["groups"] != 1:
        raise SpecError(f"{field}.method: a LoRA cannot hold a fold at the grouped conv {site.describe()}; use *_delta")
    return KINDS["lora"].from_factors(site, A, B, scaling, rslora)


def delta_result(site: Site, matrix: torch.Tensor, bias: torch.Tensor | None) -> SiteAdapter:
    return build_delta(site, from_matrix(site, matrix).contiguous(), bias)


FOLDABLE_OPS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "embedding"})


def check_foldable(task: Task) -> None:
    """Refuse inputs whose fold would silently drop part of their math."""
    lr, name = task.low_rank, task.adapter.kind.name
    if task.adapter.site.op not in FOLDABLE_OPS and not task.adapter.kind.folds_by_vector:
        raise SpecError(
            f"{task.field}: {name} adapts {task.adapter.site.describe()}, and folds are built for weight updates "
            f"of {', '.join(sorted(FOLDABLE_OPS))} sites only"
        )
    if lr is not None and lr.magnitude is not None:
        raise SpecError(
            f"{task.field}: DoRA adapters cannot be folded (their magnitudes do not combine; PEFT's fold drops "
            "them). Merge the DoRA adapter instead, or fold plain LoRAs"
        )
    if lr is not None and lr.bias is not None:
        raise SpecError(f"{task.field}: a LoRA with lora_bias cannot be folded (the bias has no folded form)")
    if name not in KINDS:
        raise SpecError(f"{task.field}: unknown adapter kind {name!r}")
    for role, tensor in task.adapter.tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise MergeError(
                f"{task.field}: tensor {role} at {task.adapter.site.module} holds NaN or inf, which no fold can combine"
            )
