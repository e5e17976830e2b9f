"""Folding several adapters into one (spec form 3: ``combine``), site by site.

``tensors`` holds the merge algebra as pure functions, ``methods`` the registry of fold methods (one small
entry per method), ``site`` the conversions between site adapters and matrix form. Only one site's deltas
are ever materialised at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..adapters import SiteAdapter
from ..errors import SpecError
from ..sites import Site
from .methods import FOLD_FIELDS, METHODS, Context, FoldMethod, fold_ia3, unread_field
from .site import Task, check_foldable
from .tensors import TASK_MERGES, TaskMerge, merge_tasks

__all__ = [
    "FOLD_FIELDS",
    "METHODS",
    "TASK_MERGES",
    "Context",
    "FoldMethod",
    "Task",
    "TaskMerge",
    "fold_site",
    "merge_tasks",
    "unread_field",
]


def fold_site(site: Site, tasks: Sequence[Task], ctx: Context) -> SiteAdapter:
    """The folded adapter at ``site`` from the sources present there (missing sources are skipped, as in PEFT)."""
    for task in tasks:
        check_foldable(task)
    if ctx.ia3:
        if ctx.method not in (None, "linear"):
            raise SpecError(f"{ctx.field}.method: IA³ adapters fold only linearly (method: linear), not {ctx.method}")
        _check_reads(frozenset(), "linear (IA³)", ctx)
        return fold_ia3(site, tasks, ctx)
    name = ctx.method or "svd"
    _check_reads(METHODS[name].reads, name, ctx)
    if ctx.single and METHODS[name].peft and all(t.is_lora for t in tasks):
        name = "linear"  # PEFT folds a single LoRA linearly, whatever the method asked
    method = METHODS[name]
    if method.lora_only:
        for task in tasks:
            if not task.is_lora:
                raise SpecError(
                    f"{task.field}: method {name} works on LoRA factors, but this source is a "
                    f"{task.adapter.kind.name} adapter; fold different kinds with a delta-level method (svd, ties_svd, "
                    "..., task_arithmetic, ties_delta, ...)"
                )
    return method.build(site, tasks, replace(ctx, method=name))


def _check_reads(reads: frozenset[str], name: str, ctx: Context) -> None:
    unread = unread_field(reads, set(ctx.given))
    if unread is not None:
        raise SpecError(f"{ctx.field}.{unread}: method {name} does not read {unread}; remove it")
