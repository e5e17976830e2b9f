"""``verify``: the merged graph computes what the live graph does, and both what PEFT does.

This is what a user's CI runs before shipping a merged model. Every active adapter is checked on its own
(live vs merged, and against PEFT when it is a PEFT checkpoint or a PEFT fold of checkpoints), then all of
them together. A routed spec (``routing:``) has no "all together": its routed graph runs a batch mixing every
routed adapter and the base model, and each row must be what its adapter computes alone over the always-on
adapters (``routed vs alone``), and, when every active adapter is a PEFT checkpoint, what PEFT's
``adapter_names`` computes (``routed vs PEFT``). A "live vs base" row shows how far each adapter moves the
outputs, informational only: an adapter that changes nothing passes every other check trivially, and the report
says so.

Errors are measured per output tensor as the largest absolute difference and that difference relative to
the reference's largest magnitude (robust where outputs cross zero). A check passes when
``max_abs <= atol + rtol * max|reference|``.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import warnings
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub
from .capture import Inputs, split_inputs
from .driver import SpecLike, build_loaded, merge_pass
from .errors import SpecError
from .fold import METHODS
from .inputs import batch_size
from .ir import records
from .model_ref import token_inputs
from .passes import Cleanup, run_passes
from .plan import Plan
from .spec import CombineAdapter, FreshAdapter, PeftAdapter, Spec, load_spec


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def allows(self, max_abs: float, scale: float) -> bool:
        return max_abs <= self.atol + self.rtol * scale


# Merging rounds each weight once in its dtype; outputs then differ by a few ulps times the depth of the model.
# These leave room for deep models and still catch a wrong adapter, which moves outputs by percents.
DEFAULT_TOLERANCE = {
    torch.float64: Tolerance(rtol=1e-9, atol=1e-12),
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5),
    torch.float16: Tolerance(rtol=5e-3, atol=1e-3),
    torch.bfloat16: Tolerance(rtol=2e-2, atol=1e-2),
}


def default_tolerance(model: nn.Module) -> Tolerance:
    """The tolerance for the dtype of the model's first floating-point parameter."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE[torch.float32])


@dataclass(frozen=True)
class Comparison:
    """One output of one adapter (or ``all`` of them, or the ``routing`` graph), compared one way."""

    adapter: str
    check: str  # "merged vs live", "live vs PEFT", "merged vs PEFT merged", "routed vs alone", "routed vs PEFT",
    # or "live vs base" (informational)
    output: str
    max_abs: float
    max_rel: float
    ok: bool | None  # None: informational, never fails the report


@dataclass
class VerifyReport:
    """The comparisons made, the tolerance they were held to and what could not be compared (``notes``)."""

    rows: list[Comparison]
    tolerance: Tolerance
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(row.ok is not False for row in self.rows)

    @property
    def failures(self) -> list[Comparison]:
        return [row for row in self.rows if row.ok is False]

    def to_dict(self) -> dict[str, Any]:
        rows = [{k: _finite(v) for k, v in asdict(row).items()} for row in self.rows]
        return {"ok": self.ok, "tolerance": asdict(self.tolerance), "rows": rows, "notes": self.notes}

    def __str__(self) -> str:
        lines = [f"{'adapter':<12} {'check':<22} {'output':<10} {'max abs':>10} {'max rel':>10}  verdict"]
        for r in self.rows:
            verdict = "info" if r.ok is None else ("ok" if r.ok else "FAIL")
            numbers = f"{r.max_abs:>10.2e} {r.max_rel:>10.2e}"
            lines.append(f"{r.adapter:<12} {r.check:<22} {r.output:<10} {numbers}  {verdict}")
        return "\n".join([*lines, *self.notes])


def verify(
    model: nn.Module,
    spec: SpecLike,
    example_inputs: Inputs | None = None,
    *,
    tolerance: Tolerance | None = None,
    peft: bool = True,
    perturb: bool = True,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> VerifyReport:
    """Compare live, merged and (with ``peft``) PEFT's outputs on ``example_inputs``; nothing is saved.

    ``example_inputs`` default to random token ids for a model with a vocabulary; ``tolerance`` to one for the
    model's dtype. The spec's own ``merge`` is ignored: every active adapter is checked live, then that same
    graph merged. With ``perturb``, fresh adapters are first moved off their initial value (as if trained,
    seeded), since at init most are the identity and merging them would prove nothing. ``progress(what, done,
    total)`` hears of each adapter as its turn comes.
    """
    spec, base_dir = load_spec(spec)
    inputs = token_inputs(model, batch=2, seq_len=8) if example_inputs is None else example_inputs
    tol = tolerance or default_tolerance(model)
    active = spec.active_adapters()
    if not active:
        raise SpecError("verify: the spec has no active adapter, so there is nothing to verify")
    report = VerifyReport([], tol)
    base = _outputs(_call(model, inputs))
    with_peft = peft and _peft_installed()
    if peft and not with_peft:
        report.notes.append("peft is not installed: no comparison with PEFT (pip install peft)")
    fresh = [n for n in active if isinstance(spec.adapters[n], FreshAdapter)] if perturb else []
    if fresh:
        report.notes.append(f"fresh adapters moved off their init before comparing: {', '.join(fresh)}")
    routed = spec.routed_adapters()
    groups = [(name, [name]) for name in active]
    if len(active) > 1 and not routed:
        groups.append(("all", active))
    total = len(groups) + bool(routed)
    for done, (label, names) in enumerate(groups, start=1):
        if progress is not None:
            progress(f"verify {label}", done, total)
        variant = spec.model_copy(update={"active": names, "merge": False, "routing": None})
        live, merged = (_outputs(o) for o in _live_and_merged(model, variant, base_dir, inputs, fresh))
        report.rows += _compare(label, "live vs base", live, base, None)
        if all(r.max_abs == 0 for r in report.rows[-len(live) :]):
            report.notes.append(f"{label}: the adapter leaves every output unchanged (an identity, e.g. at init)")
        report.rows += _compare(label, "merged vs live", merged, live, tol)
        if with_peft and label != "all":
            report.rows += _against_peft(model, spec, base_dir, label, inputs, live, merged, tol, report.notes)
    if routed:
        if progress is not None:
            progress("verify routing", total, total)
        report.rows += _against_routing(model, spec, base_dir, inputs, base, fresh, tol, with_peft, report.notes)
    return report


def _against_routing(
    model: nn.Module,
    spec: Spec,
    base_dir: Path | None,
    inputs: Inputs,
    base: dict[str, torch.Tensor],
    perturbed: list[str],
    tol: Tolerance,
    with_peft: bool,
    notes: list[str],
) -> list[Comparison]:
    """The routed graph, live, on the example batch routed n+1 ways (row r, shift s: pick ``(r + s) % (n+1) - 1``),
    so every row meets every routed adapter and the base model, mixed within a batch whenever it has two rows."""
    routed = spec.routed_adapters()
    always = [n for n in spec.active_adapters() if n not in routed]
    batch = batch_size(inputs)
    picks = [[(row + shift) % (len(routed) + 1) - 1 for row in range(batch)] for shift in range(len(routed) + 1)]
    graph = _live(model, spec.model_copy(update={"merge": False}), base_dir, inputs, perturbed)
    runs = [_outputs(_call(graph, inputs, adapter_index=torch.tensor(p))) for p in picks]

    def by_itself(names: list[str]) -> dict[str, torch.Tensor]:
        return _outputs(_call(_live(model, _alone(spec, names), base_dir, inputs, perturbed), inputs))

    alone = {-1: by_itself(always) if always else base} | {k: by_itself([*always, n]) for k, n in enumerate(routed)}
    batched = [name for name, ref in base.items() if ref.ndim and ref.shape[0] == batch]
    if len(batched) < len(base):
        notes.append(f"routing: outputs without the batch as dim 0 not compared per row ({len(base) - len(batched)})")
    actual = {n: torch.cat([run[n] for run in runs]) for n in batched if all(n in run for run in runs)}
    rows = _compare("routing", "routed vs alone", actual, _by_rows(alone, picks, batched), tol)
    adapters = [spec.adapters[n] for n in routed]
    if not with_peft or always or not all(isinstance(a, PeftAdapter) and a.scale == 1.0 for a in adapters):
        return rows
    try:
        reference = load_peft(model, _directory(adapters[0], base_dir), routed[0])
        for name, adapter in zip(routed[1:], adapters[1:], strict=True):
            reference.load_adapter(_directory(adapter, base_dir), adapter_name=name)
        names = [[routed[k] if k >= 0 else "__base__" for k in p] for p in picks]
        peft_runs = [_outputs(_call(reference, inputs, adapter_names=n)) for n in names]
        expected = {n: torch.cat([run[n] for run in peft_runs]) for n in batched}
    except Exception as e:  # PEFT refuses some mixed batches (DoRA, other tuners): the rows above still hold
        notes.append(f"routing: PEFT could not run adapter_names ({type(e).__name__}: {e})")
        return rows
    return rows + _compare("routing", "routed vs PEFT", actual, expected, tol)


def _alone(spec: Spec, names: list[str]) -> Spec:
    return spec.model_copy(update={"active": names, "merge": False, "routing": None})


def _by_rows(alone: dict[int, dict[str, torch.Tensor]], picks: list[list[int]], names: list[str]) -> dict[str, Any]:
    """What the routed runs should give: row r of run s is row r of adapter ``picks[s][r]`` alone."""
    return {n: torch.cat([torch.stack([alone[k][n][r] for r, k in enumerate(p)]) for p in picks]) for n in names}


def _against_peft(
    model: nn.Module,
    spec: Spec,
    base_dir: Path | None,
    name: str,
    inputs: Inputs,
    live: dict[str, torch.Tensor],
    merged: dict[str, torch.Tensor],
    tol: Tolerance,
    notes: list[str],
) -> list[Comparison]:
    adapter = spec.adapters[name]
    try:
        if isinstance(adapter, PeftAdapter):
            if adapter.scale != 1.0:
                notes.append(f"{name}: loaded with a scale, which PEFT's checkpoint does not carry: no PEFT reference")
                return []
            reference = load_peft(model, _directory(adapter, base_dir), name)
        elif isinstance(adapter, CombineAdapter):
            why = _not_a_peft_fold(spec, adapter)
            if why:
                notes.append(f"{name}: {why}: no PEFT reference")
                return []
            sources = {s: _directory(spec.adapters[s], base_dir) for s in adapter.combine}
            reference = peft_fold(model, sources, name, adapter)
        else:
            return []  # a fresh adapter has no PEFT counterpart until saved
        rows = _compare(name, "live vs PEFT", live, _outputs(_call(reference, inputs)), tol)
        unloaded = reference.merge_and_unload()
        return rows + _compare(name, "merged vs PEFT merged", merged, _outputs(_call(unloaded, inputs)), tol)
    except Exception as e:  # PEFT refusing is worth reporting, not a reason to stop verifying
        notes.append(f"{name}: PEFT could not build its reference ({type(e).__name__}: {e})")
        return []


def load_peft(model: nn.Module, directory: Path, name: str) -> nn.Module:
    """PEFT's own model of a checkpoint, on a copy of ``model``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), directory, adapter_name=name).eval()


def peft_fold(model: nn.Module, sources: Mapping[str, Path], name: str, combine: CombineAdapter) -> nn.Module:
    """PEFT's ``add_weighted_adapter`` of the checkpoints ``sources`` with a combine's fields, made active."""
    from peft import PeftModel

    (first, first_dir), *rest = sources.items()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), first_dir, adapter_name=first)
    for source, directory in rest:
        peft_model.load_adapter(directory, source)
    weights = [float(w) for w in combine.weight_values()]
    if peft_model.peft_config[first].peft_type == "IA3":
        peft_model.add_weighted_adapter(list(sources), weights, name)
    else:
        peft_model.add_weighted_adapter(
            list(sources),
            weights,
            name,
            combination_type=combine.method or "svd",
            svd_rank=combine.svd_rank,
            svd_clamp=combine.svd_clamp,
            svd_full_matrices=combine.svd_full_matrices,
            density=combine.density,
            majority_sign_method=combine.majority_sign,
        )
    peft_model.set_adapter(name)
    return peft_model.eval()


def _not_a_peft_fold(spec: Spec, combine: CombineAdapter) -> str | None:
    method = combine.method or "svd"
    if METHODS[method].random:  # DARE drops entries at random, so no run repeats another's
        return f"method {method} is random"
    if not METHODS[method].peft:
        return f"method {method} is not one of PEFT's"
    sources = [spec.adapters[s] for s in combine.combine]
    if any(not isinstance(s, PeftAdapter) for s in sources):
        return "a source is not a PEFT checkpoint"
    if any(s.scale != 1.0 for s in sources):
        return "a source is loaded with a scale, which PEFT's checkpoint does not carry"
    if any(not isinstance(w, int | float) for w in [*combine.weight_values(), combine.density or 0.0]):
        return "per-layer weights or density, which PEFT's add_weighted_adapter has no form for"
    if METHODS[method].needs_density and combine.density is None:
        return "no density"
    return None


def _directory(adapter: Any, base_dir: Path | None) -> Path:
    directory = Path(adapter.peft)
    local = base_dir / directory if base_dir is not None and not directory.is_absolute() else directory
    return hub.resolve(adapter.peft, local, "peft", revision=adapter.revision, subfolder=adapter.subfolder)


def _live_and_merged(
    model: nn.Module, spec: Spec, base_dir: Path | None, inputs: Inputs, perturbed: list[str]
) -> tuple[Any, Any]:
    """The outputs of the spec's live graph, and of that same graph with every active adapter merged."""
    live = _live(model, spec, base_dir, inputs, perturbed)
    with warnings.catch_warnings():  # torch's pytree deprecations while copying an exported graph, not ours
        warnings.simplefilter("ignore", FutureWarning)
        copied = copy.deepcopy(live)
    placed = {r.adapter for r in records(live)}  # an `expect: any` adapter may have placed nothing
    merged = run_passes(copied, [merge_pass(spec, [n for n in spec.active_adapters() if n in placed]), Cleanup()])
    return _call(live, inputs), _call(merged, inputs)


def _live(model: nn.Module, spec: Spec, base_dir: Path | None, inputs: Inputs, perturbed: Collection[str] = ()) -> Any:
    """The spec's graph as compile makes it, from an already loaded spec (``base_dir`` resolves its paths), with
    the adapters ``perturbed`` moved off their initial values."""
    return build_loaded(model, spec, base_dir, inputs, planned=lambda plan: _perturb(plan, set(perturbed))).gm


def _perturb(plan: Plan, names: set[str]) -> None:
    """Seeded noise on the named adapters' trainable tensors, as if trained. Each draw is keyed by where the tensor
    lives (adapter, module, role), so every graph built from the spec (one adapter alone, the routed graph stacking
    them) moves it alike, and a tensor shared by several sites stays one tensor."""
    for placement in plan.placements:
        if placement.adapter not in names:
            continue
        a = placement.site_adapter
        for role, tensor in a.tensors.items():
            if not tensor.is_floating_point() or role in a.frozen:
                continue
            where = role if role in a.shared else f"{a.site.module}.{role}"
            generator = torch.Generator().manual_seed(zlib.crc32(f"{placement.adapter}.{where}".encode()))
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            a.tensors[role] = tensor + (0.05 * noise).to(tensor.dtype)


def _call(module: nn.Module, inputs: Inputs, **extra: Any) -> Any:
    """Call like the model, with ``extra`` keyword inputs (``adapter_index``, PEFT's ``adapter_names``)."""
    args, kwargs = split_inputs(inputs)
    with torch.no_grad():
        return module(*args, **kwargs, **extra)


def _outputs(out: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) output, by a short path: ``logits``, ``[0]``, ``hidden_states[1]``."""
    if isinstance(out, torch.Tensor):
        return {prefix or "output": out.detach()}
    if isinstance(out, Mapping):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in out.items()]
    elif isinstance(out, tuple | list):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(out)]
    else:
        return {}  # caches and other objects: their tensors feed the outputs compared anyway
    return {k: v for key, value in items for k, v in _outputs(value, key).items()}


def _compare(
    adapter: str, check: str, actual: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tol: Tolerance | None
) -> list[Comparison]:
    rows = []
    for name, ref in reference.items():
        got = actual.get(name)
        if got is None or got.shape != ref.shape:
            rows.append(Comparison(adapter, check, name, math.inf, math.inf, False if tol else None))
            continue
        diff = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        scale = ref.double().abs().max().item() if ref.numel() else 0.0
        rel = diff / scale if scale else (0.0 if diff == 0 else math.inf)
        ok = None if tol is None else (math.isfinite(diff) and tol.allows(diff, scale))
        rows.append(Comparison(adapter, check, name, diff, rel, ok))
    return rows


def _finite(value: Any) -> Any:
    """JSON has no infinity: a missing or mis-shaped output is reported as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _peft_installed() -> bool:
    """peft is an optional dependency: without it, verify compares peftfx's graphs with each other only."""
    return importlib.util.find_spec("peft") is not None
