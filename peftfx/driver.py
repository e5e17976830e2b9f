"""The two entry points: ``compile`` (capture, plan, rewrite) and ``explain`` (capture, plan, report)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .capture import Inputs, capture
from .errors import SpecError
from .passes import Cleanup, Insert, Merge, Pass, Route, run_passes
from .passes.insert import Override
from .passes.records import adapters
from .plan import make_plan, targets
from .rewrite import get_attr
from .spec import Spec, load_spec

SpecLike = Spec | dict[str, Any] | str | Path


def compile(
    model: nn.Module, spec: SpecLike, example_inputs: Inputs | None = None, *, dynamic_shapes: Any = None
) -> fx.GraphModule:
    """Capture ``model`` and apply ``spec``. The model is never mutated; call the result like the model."""
    spec, base_dir = load_spec(spec)
    gm = capture(model, example_inputs, method=spec.capture, dynamic_shapes=dynamic_shapes)
    plan = make_plan(gm, spec, base_dir)
    routed = spec.routed_adapters()
    passes: list[Pass] = []
    if routed:
        _check_routed(gm, plan.overrides, routed)
        passes.append(Route(routed, [p for p in plan.placements if p.adapter in routed]))
    always = [p for p in plan.placements if p.adapter not in routed]
    overrides = [o for o in plan.overrides if o.adapter not in routed]
    passes.append(Insert(always, overrides, plan.configs))
    merged = spec.merged_adapters()
    _check_deployable(spec, merged, routed)
    if merged:
        passes.append(Merge(merged))
    passes.append(Cleanup())
    gm = run_passes(gm, passes)
    for name, info in adapters(gm).items():
        info.as_inputs = name in spec.adapters and spec.adapters[name].as_inputs
    return gm


def _check_deployable(spec: Spec, merged: list[str], routed: list[str]) -> None:
    """``max_rank`` and ``as_inputs`` shape a live adapter of the graph; anywhere else they would do nothing."""
    active = spec.active_adapters()
    for name, adapter in spec.adapters.items():
        for field in ("max_rank", "as_inputs"):
            if getattr(adapter, field) in (None, False):
                continue
            where = f"adapters.{name}.{field}: {name!r}"
            if name not in active:
                raise SpecError(f"{where} is not active (not in the graph), so it would do nothing")
            if name in merged:
                raise SpecError(f"{where} is merged, so it has no tensors it could apply to")
            if name in routed:
                raise SpecError(f"{where} is routed: its tensors live in the routing stacks, padded already")


def _check_routed(gm: fx.GraphModule, overrides: list[Override], routed: list[str]) -> None:
    """A routed adapter may not replace base tensors, except with their own values (PEFT saves embeddings)."""
    for o in overrides:
        if o.adapter in routed and not _same(gm, o):
            raise SpecError(
                f"routing.adapters[{routed.index(o.adapter)}]: {o.adapter!r} replaces the base tensor {o.target} "
                f"({o.key} in {o.file}: modules_to_save or a trained bias), which cannot differ per sample"
            )


def _same(gm: fx.GraphModule, o: Override) -> bool:
    try:
        current = get_attr(gm, o.target)
    except AttributeError:
        return False
    return current.shape == o.tensor.shape and torch.equal(current, o.tensor.to(current.dtype))


@dataclass(frozen=True)
class Row:
    adapter: str
    site: str
    op: str
    module: str
    layer: int | None
    matched: bool
    reason: str


@dataclass(frozen=True)
class Explanation:
    """For every site and every active adapter: matched, or the first predicate that failed."""

    rows: list[Row]

    def matches(self, adapter: str) -> list[str]:
        return [r.module for r in self.rows if r.adapter == adapter and r.matched]

    def to_dict(self) -> list[dict[str, Any]]:
        return [r.__dict__.copy() for r in self.rows]

    def __str__(self) -> str:
        width = max((len(r.module) for r in self.rows), default=6)
        lines = [f"{'adapter':<10} {'op':<10} {'module':<{width}}  verdict"]
        for r in self.rows:
            verdict = "match" if r.matched else f"no: {r.reason}"
            lines.append(f"{r.adapter:<10} {r.op:<10} {r.module:<{width}}  {verdict}")
        return "\n".join(lines)


def explain(model: nn.Module, spec: SpecLike, example_inputs: Inputs | None = None) -> Explanation:
    """Which sites each active adapter selects, and why the others are left out. Rewrites nothing."""
    spec, base_dir = load_spec(spec)
    gm = capture(model, example_inputs, method=spec.capture)
    plan = targets(gm, spec, base_dir)
    rows = []
    for target in plan.targets:
        for site in plan.matcher.sites:
            verdict = plan.matcher.test(target.selector, site)
            rows.append(Row(target.name, site.node.name, site.op, site.module, site.layer, verdict.ok, verdict.reason))
    return Explanation(rows)
