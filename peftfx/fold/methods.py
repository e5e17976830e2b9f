"""Fold methods: a method name maps to how one site's folded adapter is built from its tasks.

PEFT's LoRA methods (``add_weighted_adapter``), with PEFT's numbers, quirks included:

* factor level (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): the task merge runs on
  the A's (weights ``sign(w s)√|w s|``) and on the B's (``√|w s|``) separately; equal ranks; cross terms.
* ``cat``: exact ``Σ w_i s_i B_i A_i`` at rank ``Σ r_i``.
* delta level (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``): the task
  merge runs on the full ``ΔW_i``, then a truncated SVD to ``svd_rank`` (default: the largest source rank).
  Inputs may be of any mergeable kind here (beyond PEFT): a non-LoRA's ``ΔW`` is ``merge(W) - W``.

The folded LoRA's scaling is PEFT's: ``alpha = r = new_r``, so 1, or ``√new_r`` when the first source uses
rsLoRA (PEFT copies that flag; the fold then comes out ``√new_r`` too large, reproduced on purpose).

Beyond PEFT (scaling always 1, no rsLoRA carry-over):

* ``task_arithmetic``: exact ``Σ w_i ΔW_i``. LoRA sources: the concatenated factors, or with ``svd_rank`` the
  best rank-``svd_rank`` approximation computed from a QR of the factors (no ``[m, n]`` matrix is formed).
  Other kinds: a dense delta, or an SVD LoRA with ``svd_rank``.
* ``ties_delta``, ``dare_linear_delta``, ``dare_ties_delta``, ``magnitude_prune_delta``: the delta-level task
  merge kept as a dense delta (no SVD, so no truncation error).
* IA³ sources only (method ``linear``, the default for them): PEFT's ``l = Σ w_i l_i``.

Where peftfx differs from PEFT, on purpose (outputs are PEFT's unless stated):

* DARE draws from one generator per site seeded by ``(seed, module)``, so a fold is reproducible and does not
  change when other sites are added; without ``seed`` it uses torch's global RNG, as PEFT does. Density 0
  gives zeros (PEFT: 0/0, NaN).
* ``cat`` keeps each site at its own rank ``Σ r_i`` there (PEFT zero-pads every site to the global sum).
* ``svd`` of LoRAs without a clamp is computed from a QR of the stacked factors, and the SVD methods use the
  reduced SVD unless ``svd_clamp`` is set: the same result to float rounding, much cheaper.
* Factor-level methods need equal ranks per site, not per adapter config; every conv is flattened for the
  SVD (PEFT flattens Conv2d only, and its Conv1d/Conv3d SVD folds fail).
* A source missing at a site is skipped there (as in PEFT); weights are not renormalised. Sources may mix
  regex and list ``target_modules`` (PEFT refuses); sources that replace base tensors (``modules_to_save``,
  trained biases) are refused. PEFT's ``svd_driver`` (CUDA only) has no counterpart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..adapters import SiteAdapter
from ..errors import SpecError
from ..sites import Site
from .site import Task, delta_result, lora_result
from .tensors import TASK_MERGES, TaskMerge, cat_factors, exact_low_rank, linear_factors, svd_factors


@dataclass(frozen=True)
class Context:
    """What a method needs beyond the site's tasks: resolved parameters and adapter-wide facts."""

    method: str
    field: str  # adapters.<name>
    density: float | None
    majority_sign: str
    svd_rank: int | None  # the spec's svd_rank
    svd_clamp: float | None
    svd_full_matrices: bool
    source_ranks: Sequence[int]  # per LoRA source, its largest rank (PEFT's config rank)
    first_rslora: bool  # the first source is an rsLoRA (PEFT carries the flag over)
    generator: torch.Generator | None
    single: bool = False  # the combine names one adapter
    ia3: bool = False  # every source is an IA³ adapter (PEFT's IA³ fold)
    given: frozenset[str] = frozenset()  # the FOLD_FIELDS the spec sets (each must be one the method reads)


Build = Callable[[Site, Sequence[Task], Context], SiteAdapter]


# The combine fields a method may read; each method reads the ones its entry implies (``FoldMethod.reads``).
FOLD_FIELDS = ("density", "majority_sign", "seed", "svd_rank", "svd_clamp", "svd_full_matrices")


@dataclass(frozen=True)
class FoldMethod:
    """Every fact about one fold method: how it builds a site's result, its task merge, what it reads."""

    build: Build
    merge: TaskMerge
    lora_only: bool = False  # works on LoRA factors, so every source must be a plain LoRA
    peft: bool = False  # PEFT's add_weighted_adapter has it, with the same numbers
    svd: bool = False  # its result is re-factorised: reads svd_rank, svd_clamp and svd_full_matrices

    @property
    def needs_density(self) -> bool:
        return self.merge.trim is not None

    @property
    def random(self) -> bool:
        """It drops entries at random (DARE): only a seed makes two runs agree."""
        return self.merge.trim == "random"

    @property
    def reads(self) -> frozenset[str]:
        """The spec fields this method reads; setting any other is an error, not a silent no-op."""
        fields = {"density"} if self.needs_density else set()
        fields |= {"majority_sign"} if self.merge.elect else set()
        fields |= {"seed"} if self.random else set()
        fields |= {"svd_rank", "svd_clamp", "svd_full_matrices"} if self.svd else set()
        return frozenset(fields)


def _peft_scaling(new_rank: int, ctx: Context) -> float:
    return new_rank**0.5 if ctx.first_rslora else 1.0


def _merge_kwargs(ctx: Context) -> dict:
    return {"density": ctx.density, "majority_sign": ctx.majority_sign, "generator": ctx.generator}


def _factors(site: Site, tasks: Sequence[Task], ctx: Context) -> SiteAdapter:
    As, Bs = zip(*(t.factors() for t in tasks), strict=True)
    ranks = sorted({a.shape[0] for a in As})
    if len(ranks) > 1:
        raise SpecError(
            f"{ctx.field}.method: {ctx.method} merges LoRA factors entry by entry, so the ranks must be equal, but "
            f"at {site.module} they are {ranks} (use cat, svd or task_arithmetic)"
        )
    merge = METHODS[ctx.method].merge
    A, B = linear_factors(As, Bs, [t.weight for t in tasks], [t.scaling for t in tasks], merge, **_merge_kwargs(ctx))
    new_rank = ctx.source_ranks[0] if ctx.source_ranks else ranks[0]
    return lora_result(site, A, B, _peft_scaling(new_rank, ctx), ctx.first_rslora, ctx.field)


def _cat(site: Site, tasks: Sequence[Task], ctx: Context) -> SiteAdapter:
    As, Bs = zip(*(t.factors() for t in tasks), strict=True)
    A, B = cat_factors(As, Bs, [t.weight for t in tasks], [t.scaling for t in tasks])
    return lora_result(site, A, B, _peft_scaling(sum(ctx.source_ranks), ctx), ctx.first_rslora, ctx.field)


def _svd_rank(site: Site, ctx: Context) -> int:
    if ctx.svd_rank is not None:
        return ctx.svd_rank
    if not ctx.source_ranks:
        raise SpecError(f"{ctx.field}.svd_rank: no source is a LoRA, so there is no rank to default to; set svd_rank")
    return max(ctx.source_ranks)


def _delta_merge(site: Site, tasks: Sequence[Task], ctx: Context) -> tuple[torch.Tensor, torch.Tensor | None]:
    deltas, biases = zip(*(t.delta() for t in tasks), strict=True)
    weights = [t.weight for t in tasks]
    merged = METHODS[ctx.method].merge(deltas, weights, **_merge_kwargs(ctx))
    if all(b is None for b in biases):
        return merged, None
    zeros = next(b for b in biases if b is not None).new_zeros(())
    bias = sum(w * (zeros if b is None else b) for w, b in zip(weights, biases, strict=True))
    return merged, bias


def _no_bias(site: Site, bias: torch.Tensor | None, ctx: Context) -> None:
    if bias is not None:
        raise SpecError(
            f"{ctx.field}.method: at {site.module} a source also changes the bias, which a LoRA cannot carry; use "
            "a *_delta method or task_arithmetic without svd_rank (dense results keep the bias)"
        )


def _svd(site: Site, tasks: Sequence[Task], ctx: Context) -> SiteAdapter:
    """Truncated SVD of the merged ΔW. Plain ``svd`` of LoRAs without a clamp takes the SVD from a QR of the
    factors (same result to rounding, no ``[m, n]`` SVD); a clamp needs PEFT's own SVD, whose sign convention
    the clamp's quantile depends on. The reduced SVD is used unless a clamp makes the choice visible."""
    rank = _svd_rank(site, ctx)
    scaling = _peft_scaling(rank, ctx)
    if ctx.method == "svd" and ctx.svd_clamp is None and all(t.is_lora for t in tasks):
        As, Bs = zip(*(t.factors() for t in tasks), strict=True)
        A, B = exact_low_rank(As, Bs, [t.weight * t.scaling for t in tasks], rank)
        return lora_result(site, A, B, scaling, ctx.first_rslora, ctx.field)
    delta, bias = _delta_merge(site, tasks, ctx)
    _no_bias(site, bias, ctx)
    full = ctx.svd_full_matrices and ctx.svd_clamp is not None
    A, B = svd_factors(delta, rank, ctx.svd_clamp, full)
    return lora_result(site, A, B, scaling, ctx.first_rslora, ctx.field)


def _dense(site: Site, tasks: Sequence[Task], ctx: Context) -> SiteAdapter:
    delta, bias = _delta_merge(site, tasks, ctx)
    return delta_result(site, delta, bias)


def _task_arithmetic(site: Site, tasks: Sequence[Task], ctx: Context) -> SiteAdapter:
    if all(t.is_lora for t in tasks):
        As, Bs = zip(*(t.factors() for t in tasks), strict=True)
        A, B = exact_low_rank(As, Bs, [t.weight * t.scaling for t in tasks], ctx.svd_rank)
        return lora_result(site, A, B, 1.0, False, ctx.field)
    if ctx.svd_rank is None:
        return _dense(site, tasks, ctx)
    delta, bias = _delta_merge(site, tasks, ctx)
    _no_bias(site, bias, ctx)
    A, B = svd_factors(delta, ctx.svd_rank, ctx.svd_clamp, ctx.svd_full_matrices and ctx.svd_clamp is not None)
    return lora_result(site, A, B, 1.0, False, ctx.field)


def fold_ia3(site: Site, tasks: Sequence[Task], ctx: Context) -> SiteAdapter:
    """PEFT's IA³ fold: ``l = Σ w_i l_i`` over the sources present at the site."""
    modes = {t.adapter.hyper["feedforward"] for t in tasks}
    if len(modes) > 1:
        raise SpecError(
            f"{ctx.field}.combine: at {site.module} some IA³ sources scale the input (feedforward) and some the "
            "output, which one IA³ vector cannot express"
        )
    first = tasks[0].adapter
    vector = sum(t.weight * t.adapter.tensors["l"] for t in tasks)
    return replace(first, hyper={**first.hyper, "scale": 1.0}, tensors={"l": vector})


_TA = TASK_MERGES["task_arithmetic"]
METHODS: dict[str, FoldMethod] = {
    "linear": FoldMethod(_factors, _TA, lora_only=True, peft=True),
    "ties": FoldMethod(_factors, TASK_MERGES["ties"], lora_only=True, peft=True),
    "dare_linear": FoldMethod(_factors, TASK_MERGES["dare_linear"], lora_only=True, peft=True),
    "dare_ties": FoldMethod(_factors, TASK_MERGES["dare_ties"], lora_only=True, peft=True),
    "magnitude_prune": FoldMethod(_factors, TASK_MERGES["magnitude_prune"], lora_only=True, peft=True),
    "cat": FoldMethod(_cat, _TA, lora_only=True, peft=True),
    "svd": FoldMethod(_svd, _TA, peft=True, svd=True),
    "ties_svd": FoldMethod(_svd, TASK_MERGES["ties"], peft=True, svd=True),
    "dare_linear_svd": FoldMethod(_svd, TASK_MERGES["dare_linear"], peft=True, svd=True),
    "dare_ties_svd": FoldMethod(_svd, TASK_MERGES["dare_ties"], peft=True, svd=True),
    "magnitude_prune_svd": FoldMethod(_svd, TASK_MERGES["magnitude_prune"], peft=True, svd=True),
    "task_arithmetic": FoldMethod(_task_arithmetic, _TA, svd=True),
    "ties_delta": FoldMethod(_dense, TASK_MERGES["ties"]),
    "dare_linear_delta": FoldMethod(_dense, TASK_MERGES["dare_linear"]),
    "dare_ties_delta": FoldMethod(_dense, TASK_MERGES["dare_ties"]),
    "magnitude_prune_delta": FoldMethod(_dense, TASK_MERGES["magnitude_prune"]),
}


def unread_field(reads: frozenset[str], given: set[str]) -> str | None:
    """The first of the ``given`` combine fields a method reading ``reads`` ignores, in ``FOLD_FIELDS`` order.

    IA³ sources fold linearly over their vectors (``fold_ia3``), which reads none of them."""
    return next((f for f in FOLD_FIELDS if f in given and f not in reads), None)
