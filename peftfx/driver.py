"""The two entry points: ``compile`` (capture, plan, rewrite) and ``explain`` (capture, plan, report)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import fx, nn

from .capture import Inputs, capture
from .passes import Cleanup, Insert, Merge, run_passes
from .plan import make_plan, targets
from .spec import Spec, load_spec

SpecLike = Spec | dict[str, Any] | str | Path


def compile(
    model: nn.Module, spec: SpecLike, example_inputs: Inputs | None = None, *, dynamic_shapes: Any = None
) -> fx.GraphModule:
    """Capture ``model`` and apply ``spec``. The model is never mutated; call the result like the model."""
    spec, base_dir = load_spec(spec)
    gm = capture(model, example_inputs, method=spec.capture, dynamic_shapes=dynamic_shapes)
    return apply(gm, spec, base_dir)


def apply(gm: fx.GraphModule, spec: Spec, base_dir: Path | None = None) -> fx.GraphModule:
    """``compile`` after the capture: rewrites ``gm`` itself (the benchmarks time it apart from the capture)."""
    plan = make_plan(gm, spec, base_dir)
    passes = [Insert(plan.placements, plan.overrides, plan.configs)]
    merged = spec.merged_adapters()
    if merged:
        passes.append(Merge(merged))
    passes.append(Cleanup())
    return run_passes(gm, passes)


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
