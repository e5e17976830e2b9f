"""The entry points: ``compile`` (capture, plan, rewrite), ``build`` (the same, with a summary) and ``explain``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .capture import Inputs, capture_graph
from .dropin import as_dropin, lora_scale_keyword
from .errors import PassError, PeftfxError, SpecError
from .gc_pause import gc_paused
from .inputs import without_index
from .ir import SCALE_INPUT, Override
from .kv_cache import capture_with_cache
from .passes import Causal, Cleanup, Insert, Merge, Pass, Route, run_passes
from .plan import Plan, make_plan, place, targets
from .rewrite import drop_input, get_attr
from .spec import CombineAdapter, Spec, load_spec

SpecLike = Spec | dict[str, Any] | str | Path


@dataclass(frozen=True)
class AdapterSummary:
    """What one active adapter became: its kind, how many sites it took, how many numbers its tensors hold."""

    name: str
    kind: str
    sites: int
    parameters: int
    merged: bool


@dataclass(frozen=True)
class Build:
    """A compiled graph, what each adapter added to it (or merged into it), and the seconds each step took."""

    gm: fx.GraphModule
    adapters: list[AdapterSummary]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        live = [p for name, p in self.gm.named_parameters() if name.startswith("peftfx.")]
        return {
            "nodes": len(self.gm.graph.nodes),
            "adapter_tensors": len(live),
            "adapter_parameters": sum(p.numel() for p in live),
            "adapters": [asdict(a) for a in self.adapters],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def compile(
    model: nn.Module,
    spec: SpecLike,
    example_inputs: Inputs | None = None,
    *,
    dynamic_shapes: Any = None,
    cache: bool | None = None,
    max_cache_len: int | None = None,
    inplace: bool = False,
) -> fx.GraphModule:
    """Capture ``model`` and apply ``spec``; call the result like the model.

    The model is never mutated, unless ``inplace``: then it is given up, and merged weights are written into its
    own tensors (no copy of the weights is made; the same bits as without it). With ``max_cache_len`` a decoder
    is captured as one generation step over a static KV cache of that many positions, for ``peftfx.generate``
    (see ``kv_cache``). A capture is reused from the capture cache unless ``cache=False`` (or ``$PEFTFX_CACHE=0``).
    """
    return build(
        model,
        spec,
        example_inputs,
        dynamic_shapes=dynamic_shapes,
        cache=cache,
        max_cache_len=max_cache_len,
        inplace=inplace,
    ).gm


def build(
    model: nn.Module,
    spec: SpecLike,
    example_inputs: Inputs | None = None,
    *,
    dynamic_shapes: Any = None,
    progress: Callable[[str, int, int | None], None] | None = None,
    cache: bool | None = None,
    max_cache_len: int | None = None,
    inplace: bool = False,
) -> Build:
    """``compile``, also saying what each adapter became.

    ``progress(what, done, total)`` hears of each step as it starts (``total`` None), and of each site placed
    while planning (``what`` is then ``plan <adapter>``).
    """
    spec, base_dir = load_spec(spec)
    return build_loaded(
        model,
        spec,
        base_dir,
        example_inputs,
        dynamic_shapes=dynamic_shapes,
        progress=progress,
        cache=cache,
        max_cache_len=max_cache_len,
        inplace=inplace,
    )


@gc_paused()
def build_loaded(
    model: nn.Module,
    spec: Spec,
    base_dir: Path | None,
    example_inputs: Inputs | None = None,
    *,
    dynamic_shapes: Any = None,
    progress: Callable[[str, int, int | None], None] | None = None,
    cache: bool | None = None,
    max_cache_len: int | None = None,
    inplace: bool = False,
    planned: Callable[[Plan], None] | None = None,
) -> Build:
    """``build`` of a loaded spec (``base_dir`` resolves its relative paths). ``planned(plan)`` sees the plan
    before the passes run: ``verify`` moves fresh adapters off their initial values there."""
    seconds: dict[str, float] = {}
    if spec.routed_adapters():  # a routed graph's callers pass adapter_index, so its example inputs may too
        example_inputs = without_index(example_inputs)
    with _step("capture", seconds, progress):
        if max_cache_len is None:
            gm = capture_graph(model, example_inputs, method=spec.capture, dynamic_shapes=dynamic_shapes, cache=cache)
        elif spec.capture == "symbolic_trace":
            raise SpecError("capture: symbolic_trace cannot capture a KV cache (max_cache_len); use auto or export")
        else:
            gm = capture_with_cache(model, example_inputs, max_cache_len, cache=cache)
    with _step("plan", seconds, progress):
        sites = None if progress is None else lambda adapter, done, total: progress(f"plan {adapter}", done, total)
        plan = make_plan(gm, spec, base_dir, sites)
        if planned is not None:
            planned(plan)
    with _step("rewrite", seconds, progress):
        scaled = lora_scale_keyword(model) is not None
        gm = rewrite(gm, spec, plan, inplace=inplace, runtime_scale=scaled, recompile=False)
        try:  # the drop-in generates the rewritten graph's code, once
            gm = as_dropin(gm, model, example_inputs, _scale_refusal(spec, plan) if scaled else None)
        except PeftfxError:
            raise
        except Exception as error:
            raise PassError(f"the rewritten graph does not compile to Python: {error}") from error
    return Build(gm, summarize(spec, plan), seconds)


def _scale_refusal(spec: Spec, plan: Plan) -> str | None:
    """Why a LoRA scale other than 1 cannot be honoured: merged adapters, routed ones, kinds with no scaling."""
    placed = {p.adapter: p.site_adapter.kind for p in plan.placements}
    routed = set(spec.routed_adapters())
    merged = [n for n in spec.merged_adapters() if n in placed]
    if merged:
        return f"{', '.join(map(repr, merged))} merged into the weights (a merged graph serves scale 1 only)"
    if routed & set(placed):
        return f"routed adapters ({', '.join(sorted(routed & set(placed)))}) take their scaling from the routing"
    fixed = [f"{name!r} ({kind.name})" for name, kind in placed.items() if not kind.runtime_scale]
    return f"{', '.join(fixed)} cannot be rescaled at run time" if fixed else None


def apply(gm: fx.GraphModule, spec: Spec, base_dir: Path | None = None) -> fx.GraphModule:
    """``compile`` after the capture: rewrites ``gm`` itself (the benchmarks time it apart from the capture)."""
    return rewrite(gm, spec, make_plan(gm, spec, base_dir))


def rewrite(
    gm: fx.GraphModule,
    spec: Spec,
    plan: Plan,
    *,
    inplace: bool = False,
    runtime_scale: bool = False,
    recompile: bool = True,
) -> fx.GraphModule:
    """Run the passes a planned spec needs on a captured graph (rewritten in place; ``inplace``: its weights too).

    ``runtime_scale`` gives live LoRAs the input ``lora_scale`` (dropped again when every one of them merged).
    ``recompile=False`` leaves the code generation to the caller.
    """
    routed = spec.routed_adapters()
    passes: list[Pass] = [Causal()]
    if routed:
        _check_routed(gm, plan, routed)
        passes.append(Route(routed, [p for p in plan.placements if p.adapter in routed]))
    always = [p for p in plan.placements if p.adapter not in routed]
    overrides = [o for o in plan.overrides if o.adapter not in routed]
    as_inputs = [name for name, adapter in spec.adapters.items() if adapter.as_inputs]
    passes.append(Insert(always, overrides, plan.configs, as_inputs, runtime_scale=runtime_scale))
    placed = {p.adapter for p in plan.placements}
    merged = [name for name in spec.merged_adapters() if name in placed]  # `expect: any` may have placed nothing
    _check_deployable(spec, merged, routed)
    if merged:
        passes.append(merge_pass(spec, merged, inplace=inplace))
    passes.append(Cleanup())
    gm = run_passes(gm, passes, recompile=recompile)
    drop_input(gm, SCALE_INPUT, recompile=recompile)
    return gm


def merge_pass(spec: Spec, names: list[str], *, inplace: bool = False) -> Merge:
    """The merge of ``names``, each with the NaN/inf opt-in its spec entry gives (``verify`` merges this way too)."""
    return Merge(names, [n for n in names if getattr(spec.adapters[n], "allow_nonfinite", False)], inplace)


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


def _check_routed(gm: fx.GraphModule, plan: Plan, routed: list[str]) -> None:
    """A routed adapter may not replace base tensors, except with their own values (PEFT saves embeddings); one
    that does more than add to its site's output reads the raw site, so no always-on adapter may share it."""
    always = {p.site_adapter.site.node: p.adapter for p in plan.placements if p.adapter not in routed}
    for p in plan.placements:
        a, other = p.site_adapter, always.get(p.site_adapter.site.node)
        if p.adapter in routed and other is not None and not a.kind.additive(a):
            raise SpecError(
                f"routing.adapters[{routed.index(p.adapter)}]: {p.adapter!r} ({a.kind.name}) does more than add to "
                f"{a.site.module}, where always-on {other!r} runs too: its rows would skip {other!r}'s effect there"
            )
    for o in plan.overrides:
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


def summarize(spec: Spec, plan: Plan) -> list[AdapterSummary]:
    """Per active adapter, from its placements: adapter-wide (shared) tensors count once."""
    merged = set(spec.merged_adapters())
    out = []
    for target in plan.targets:
        mine = [p.site_adapter for p in plan.placements if p.adapter == target.name]
        adapter = spec.adapters[target.name]
        kind = target.kind.name
        if isinstance(adapter, CombineAdapter):
            kind = f"{adapter.method} fold" if adapter.method else "fold"
        tensors: dict[str, int] = {}
        for i, a in enumerate(mine):
            for role, tensor in a.tensors.items():
                tensors[role if role in a.shared else f"{i}.{role}"] = tensor.numel()
        out.append(AdapterSummary(target.name, kind, len(mine), sum(tensors.values()), target.name in merged))
    return out


@contextmanager
def _step(
    name: str, seconds: dict[str, float], progress: Callable[[str, int, int | None], None] | None
) -> Iterator[None]:
    if progress is not None:
        progress(name, 0, None)
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


@dataclass(frozen=True)
class Row:
    adapter: str
    site: str
    op: str
    module: str
    layer: int | None
    matched: bool
    reason: str
    params: dict[str, Any]  # the adapter's resolved values at this site (rank, alpha, fold weights, ...)


@dataclass(frozen=True)
class Explanation:
    """For every site and every active adapter: matched, or the first predicate that failed.

    ``errors`` holds, per adapter, what compiling it would raise (a selector matching too few sites, a bad
    value at one site): explain reports it rather than raising, since finding it is what a dry run is for.
    """

    rows: list[Row]
    errors: dict[str, str]

    def matches(self, adapter: str) -> list[str]:
        return [r.module for r in self.rows if r.adapter == adapter and r.matched]

    def to_dict(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def __str__(self) -> str:
        width = max((len(r.module) for r in self.rows), default=6)
        lines = [f"{'adapter':<10} {'op':<10} {'module':<{width}}  verdict"]
        for r in self.rows:
            verdict = f"match {format_params(r.params)}".rstrip() if r.matched else f"no: {r.reason}"
            lines.append(f"{r.adapter:<10} {r.op:<10} {r.module:<{width}}  {verdict}")
        lines += [f"{name}: {error}" for name, error in self.errors.items()]
        return "\n".join(lines)


def explain(model: nn.Module, spec: SpecLike, example_inputs: Inputs | None = None) -> Explanation:
    """Which sites each active adapter selects, why the others are left out, and its values at each site.

    Rewrites nothing; the model is never mutated.
    """
    spec, base_dir = load_spec(spec)
    gm = capture_graph(model, example_inputs, method=spec.capture)
    plan = targets(gm, spec, base_dir)
    errors = {}
    for target in plan.targets:
        try:
            place(plan, spec, target)
        except PeftfxError as e:
            errors[target.name] = str(e)
    params: dict[tuple[str, str], dict[str, Any]] = {}
    for p in plan.placements:
        node = p.site_adapter.site.node.name
        params[p.adapter, node] = {**_shown(p.site_adapter.hyper), **plan.fold_values.get((p.adapter, node), {})}
    rows = []
    for target in plan.targets:
        for site in plan.matcher.candidates(target.selector):
            verdict = plan.matcher.test(target.selector, site)
            values = params.get((target.name, site.node.name), {})
            name = site.qualified_name
            rows.append(Row(target.name, site.node.name, site.op, name, site.layer, verdict.ok, verdict.reason, values))
    return Explanation(rows, errors)


def _shown(hyper: dict[str, Any]) -> dict[str, Any]:
    """The values worth a reader's eye: numbers and set flags, not defaults (off flags, a scale of 1)."""
    shown = {}
    for key, value in hyper.items():
        if isinstance(value, bool):
            if value:
                shown[key] = value
        elif isinstance(value, int | float | str) and not (key == "scale" and value == 1.0):
            shown[key] = value
    return shown


def format_params(params: dict[str, Any]) -> str:
    """``r=4 alpha=16 scaling=4 weights=[1, -0.4]``: compact, numbers to four significant digits."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return str(value)

    return " ".join(k if v is True else f"{k}={fmt(v)}" for k, v in params.items())
