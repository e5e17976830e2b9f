"""The merge algebra as pure tensor functions: no graphs, no sites, no adapters.

One routine, :func:`merge_tasks`, does generalized task arithmetic over task tensors ``T_i`` (same shape)
with weights ``w_i``:

1. *trim*: keep a ``density`` fraction of each ``T_i`` (``magnitude``: the largest ``|T_i|``, no rescale;
   ``random``: DARE's Bernoulli(density) mask, rescaled by ``1/density`` so the expectation is kept);
2. *elect* (optional): per entry, a sign from the **unweighted** trimmed tensors, ``total`` (sign of the sum)
   or ``frequency`` (sign of the vote); ties elect +1 and zero entries never agree;
3. *merge*: ``Σ w_i T_i``, or with an election the disjoint merge ``Σ_i w_i T_i [agrees] / max(1, #agree)``,
   a weighted *mean* over the agreeing entries (PEFT's TIES, quirk included).

PEFT's ``task_arithmetic``, ``magnitude_prune``, ``ties``, ``dare_linear`` and ``dare_ties`` are the
configurations in :data:`TASK_MERGES`. A density of 1 or more trims nothing (and does not rescale).

The factor-level helpers (:func:`linear_factors`, :func:`cat_factors`) and the SVD re-factorisation
(:func:`svd_factors`) work on LoRA factors in matrix form: ``A`` is ``[r, n]`` and ``B`` is ``[m, r]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Trim = Literal["magnitude", "random"] | None
Elect = Literal["total", "frequency"] | None


@dataclass(frozen=True)
class TaskMerge:
    """A configuration of :func:`merge_tasks`; ``elect=True`` takes the sign method from the spec."""

    trim: Trim = None
    elect: bool = False

    def __call__(
        self,
        tasks: Sequence[torch.Tensor],
        weights: Sequence[float],
        density: float | None = None,
        majority_sign: Literal["total", "frequency"] = "total",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return merge_tasks(
            tasks,
            weights,
            density=1.0 if self.trim is None else density,
            trim=self.trim,
            elect=majority_sign if self.elect else None,
            generator=generator,
        )


TASK_MERGES: dict[str, TaskMerge] = {
    "task_arithmetic": TaskMerge(),
    "magnitude_prune": TaskMerge(trim="magnitude"),
    "ties": TaskMerge(trim="magnitude", elect=True),
    "dare_linear": TaskMerge(trim="random"),
    "dare_ties": TaskMerge(trim="random", elect=True),
}


def merge_tasks(
    tasks: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    *,
    density: float | None = 1.0,
    trim: Trim = None,
    elect: Elect = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generalized task arithmetic: trim, elect a sign, merge (see the module docstring)."""
    if not tasks:
        raise ValueError("merge_tasks needs at least one task tensor")
    if len(weights) != len(tasks):
        raise ValueError(f"{len(tasks)} task tensors but {len(weights)} weights")
    stack = torch.stack([trim_task(t, density, trim, generator) for t in tasks])
    w = torch.as_tensor(weights, dtype=stack.dtype).reshape(-1, *[1] * (stack.ndim - 1))
    if elect is None:
        return (stack * w).sum(0)
    agree = agreement(stack, elect)
    return (stack * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def trim_task(
    task: torch.Tensor, density: float | None, trim: Trim, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep a ``density`` fraction of ``task`` by magnitude, or at random with rescale (DARE)."""
    if trim is None:
        return task
    if density is None:
        raise ValueError(f"{trim} trimming needs a density")
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    if density >= 1:
        return task
    if trim == "magnitude":
        keep = torch.zeros(task.numel(), dtype=torch.bool, device=task.device)
        keep[task.abs().flatten().topk(int(density * task.numel())).indices] = True
        return task * keep.reshape(task.shape)
    if trim == "random":
        if density == 0:
            return torch.zeros_like(task)
        keep = torch.bernoulli(torch.full_like(task, density), generator=generator)
        return task * keep / density
    raise ValueError(f"unknown trim {trim!r} (magnitude or random)")


def agreement(stack: torch.Tensor, elect: Literal["total", "frequency"]) -> torch.Tensor:
    """Which entries of the stacked tasks (dim 0) share the elected sign; ties elect +1."""
    signs = stack.sign()
    if elect == "total":
        score = stack.sum(0)
    elif elect == "frequency":
        score = signs.sum(0)
    else:
        raise ValueError(f"unknown sign election {elect!r} (total or frequency)")
    return signs == torch.where(score >= 0, 1.0, -1.0).to(signs.dtype)


# -- low-rank factors (matrix form: A [r, n], B [m, r], delta = s * B @ A) ------------------------------------


def split_weights(weights: Sequence[float], scalings: Sequence[float]) -> tuple[list[float], list[float]]:
    """PEFT's factor weights: ``w s`` split as ``sign(w s)·√|w s|`` on A and ``√|w s|`` on B."""
    roots = [math.sqrt(abs(w * s)) for w, s in zip(weights, scalings, strict=True)]
    signs = [1.0 if w * s >= 0 else -1.0 for w, s in zip(weights, scalings, strict=True)]
    return [g * r for g, r in zip(signs, roots, strict=True)], roots


def linear_factors(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    weights: Sequence[float],
    scalings: Sequence[float],
    merge: TaskMerge = TASK_MERGES["task_arithmetic"],
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's factor-level folds: ``merge`` applied to the A's and to the B's separately (equal ranks).

    The product of the merged factors has cross terms ``B_i A_j``, so this is not ``Σ w_i ΔW_i``
    (see ``cat_factors`` or the SVD methods for that).
    """
    ranks = {a.shape[0] for a in As}
    if len(ranks) != 1:
        raise ValueError(f"factor-level merges need equal ranks, got {sorted(ranks)}")
    wa, wb = split_weights(weights, scalings)
    generator = kwargs.pop("generator", None)
    A = merge(As, wa, generator=generator, **kwargs)
    B = merge(Bs, wb, generator=generator, **kwargs)
    return A.to(As[0].dtype), B.to(As[0].dtype)


def cat_factors(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float], scalings: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``Σ w_i s_i B_i A_i`` as one low-rank pair of rank ``Σ r_i`` (scaling 1)."""
    A = torch.cat([a * (w * s) for a, w, s in zip(As, weights, scalings, strict=True)])
    return A, torch.cat(list(Bs), dim=1)


def svd_factors(
    delta: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a ``[m, n]`` delta: ``A = Vh[:r]``, ``B = U[:, :r] diag(S[:r])`` (all of S in B).

    ``clamp`` is a quantile ``q``: both factors are clamped to ``±quantile(all their entries, q)`` (lossy).
    A rank above ``min(m, n)`` is zero-padded, so the factors always have ``rank`` rows/columns.
    """
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    k = min(rank, S.shape[0])
    B, A = U[:, :k] @ torch.diag(S[:k]), Vh[:k]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    if k < rank:
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return A, B


def exact_low_rank(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], coefs: Sequence[float], rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ c_i B_i A_i`` re-factorised without forming the ``[m, n]`` delta: QR of the stacked factors, then
    an SVD of the small ``[Σr, Σr]`` core. Exact when ``rank`` is None or at least the delta's rank."""
    A, B = cat_factors(As, Bs, coefs, [1.0] * len(coefs))
    if rank is None:
        return A, B
    Qb, Rb = torch.linalg.qr(B)  # B = Qb Rb
    Qa, Ra = torch.linalg.qr(A.t())  # A = Ra^T Qa^T
    core_A, core_B = svd_factors(Rb @ Ra.t(), rank, full_matrices=False)
    return core_A @ Qa.t(), Qb @ core_B
