"""From a validated spec to what the passes need: which adapter goes on which site, with which tensors."""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import fx

from . import hub, sizes
from .adapters import KINDS, PEFT_TYPES, AdapterKind, PeftSource, SiteAdapter
from .checkpoint import CONFIG, SHARED_PREFIX, Checkpoint, Layout, read_checkpoint
from .errors import CheckpointError, MatchError, SpecError
from .fold import Context, Task, fold_site
from .formats import is_lora_file, read_lora_file
from .ir import Override, Placement, heads
from .pattern import Matcher
from .peft_config import check_peft_config
from .peft_targeting import peft_selector
from .sites import PARAMETER, Site, find_sites, module_classes
from .spec import CombineAdapter, FreshAdapter, PeftAdapter, Selector, Spec
from .values import layer_span, resolve

_PROMPT = "learns virtual tokens or activations, not weights"
# PEFT tuners whose layers have no weight merge, with what they do instead.
NOT_MERGEABLE = {
    "PROMPT_TUNING": _PROMPT,
    "PREFIX_TUNING": _PROMPT,
    "P_TUNING": _PROMPT,
    "MULTITASK_PROMPT_TUNING": _PROMPT,
    "ADAPTION_PROMPT": _PROMPT,
    "CPT": _PROMPT,
    "CARTRIDGE": _PROMPT,
    "POLY": "routes between adapters per input",
    "XLORA": "mixes adapters per token with a learned classifier",
    "LILY": "shares adapters across layers through a router",
    "SHADOW": "runs a parallel network beside the base layers",
}


Progress = Callable[[str, int, int], None]  # (adapter, the site being placed from 1, sites in all)


@dataclass
class Target:
    """One active adapter before placement: its kind, its selector and where the selector came from."""

    name: str
    kind: AdapterKind
    selector: Selector
    field: str
    checkpoint: Checkpoint | None = None
    layout: Layout | None = None


@dataclass
class Plan:
    matcher: Matcher
    targets: list[Target]
    placements: list[Placement] = field(default_factory=list)
    overrides: list[Override] = field(default_factory=list)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # adapter -> the PEFT config it came from
    resolved: dict[str, Target] = field(default_factory=dict)  # every adapter resolved so far, combine sources too
    fold_values: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (fold, node) -> weights, density
    progress: Progress | None = None

    def placed(self, adapter: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(adapter, done, total)


def targets(gm: fx.GraphModule, spec: Spec, base_dir: Path | None) -> Plan:
    """Resolve every active adapter's kind and selector, without choosing sites yet."""
    plan = Plan(Matcher(gm, find_sites(gm, parameters=True)), [])
    plan.targets = [_target(plan, gm, spec, name, base_dir) for name in spec.active_adapters()]
    return plan


def make_plan(gm: fx.GraphModule, spec: Spec, base_dir: Path | None, progress: Progress | None = None) -> Plan:
    """``progress(adapter, done, total)`` hears of every site placed: folding a large model takes a while."""
    plan = targets(gm, spec, base_dir)
    plan.progress = progress
    for target in plan.targets:
        start = len(plan.placements)
        place(plan, spec, target)
        max_rank = spec.adapters[target.name].max_rank
        if max_rank is not None:  # only the active result is padded: a fold reads its sources as they are
            plan.placements[start:] = [_padded(p, max_rank) for p in plan.placements[start:]]
    return plan


def _padded(placement: Placement, max_rank: int) -> Placement:
    a = placement.site_adapter
    try:
        with sizes.bounded(sizes.limit(math.prod(a.site.weight_shape))):
            return Placement(placement.adapter, a.kind.pad(a, max_rank))
    except SpecError as e:
        raise SpecError(f"adapters.{placement.adapter}.max_rank: {e}") from None
    except sizes.TooLarge as e:
        raise SpecError(f"adapters.{placement.adapter}.max_rank: {max_rank}: {_too_large(e, a.site)}") from None


def _too_large(e: sizes.TooLarge, site: Site) -> str:
    shape = "x".join(map(str, e.shape))
    return (
        f"asks for a {shape} tensor at {site.describe()} ({e.numel:.3g} numbers), past the limit of {e.limit:,} "
        f"({sizes.TIMES_WEIGHT}x the site's weight, at least {sizes.FLOOR:,}); min(in, out) there is "
        f"{min(site.in_features, site.out_features)}"
    )


def _size_field(params: BaseModel, given: Iterable[str], shape: list[int]) -> str:
    """``.with.<field>: <value>`` for the int field whose value is a dim of the refused shape (given ones first)."""
    given = set(given)
    for key, value in sorted(params.model_dump().items(), key=lambda kv: kv[0] not in given):
        if isinstance(value, int) and not isinstance(value, bool) and value in shape and value > 1:
            return f".with.{key}: {value}"
    return ""


def _target(plan: Plan, gm: fx.GraphModule, spec: Spec, name: str, base_dir: Path | None) -> Target:
    if name not in plan.resolved:
        adapter = spec.adapters[name]
        if isinstance(adapter, PeftAdapter):
            plan.resolved[name] = _peft_target(gm, name, adapter, base_dir)
        elif isinstance(adapter, CombineAdapter):  # the union of its sources' sites
            sources = [_target(plan, gm, spec, source, base_dir) for source in adapter.combine]
            selector = Selector(any_of=[s.selector for s in sources])
            plan.resolved[name] = Target(name, KINDS["lora"], selector, f"adapters.{name}.combine")
        else:
            plan.resolved[name] = _fresh_target(name, adapter)
    return plan.resolved[name]


def place(plan: Plan, spec: Spec, target: Target) -> None:
    """Choose ``target``'s sites and build its adapter at each of them."""
    adapter = spec.adapters[target.name]
    if isinstance(adapter, CombineAdapter):
        _place_combine(plan, spec, target, adapter)
        return
    if isinstance(adapter, PeftAdapter):
        # PEFT's targets may name only modules seen through their weights (nn.MultiheadAttention): counted after
        sites = plan.matcher.select(target.selector.model_copy(update={"expect": "any"}), target.field)
        _place_peft(plan, target, adapter, sites)
    else:
        _place_fresh(plan, target, adapter, plan.matcher.select(target.selector, target.field))


def _place_combine(plan: Plan, spec: Spec, target: Target, adapter: CombineAdapter) -> None:
    """Fold the sources site by site: only one site's deltas exist at a time."""
    name = target.name
    per_source: list[dict[fx.Node, SiteAdapter]] = []
    for i, source in enumerate(adapter.combine):
        scratch = Plan(plan.matcher, [], resolved=plan.resolved)
        place(scratch, spec, plan.resolved[source])
        if scratch.overrides:
            o = scratch.overrides[0]
            raise SpecError(
                f"adapters.{name}.combine[{i}]: {source!r} replaces base tensors ({o.key} in {o.file}: "
                "modules_to_save or trained biases), which a fold cannot combine"
            )
        by_node: dict[fx.Node, SiteAdapter] = {}
        for placement in scratch.placements:
            if placement.site_adapter.site.node in by_node:
                raise SpecError(f"adapters.{name}.combine[{i}]: {source!r} is itself several adapters at one site")
            by_node[placement.site_adapter.site.node] = placement.site_adapter
        per_source.append(by_node)
    order = {site.node: k for k, site in enumerate(plan.matcher.sites)}
    nodes = sorted({node for by_node in per_source for node in by_node}, key=lambda n: order.get(n, len(order)))
    sites = [next(s[n] for s in per_source if n in s).site for n in nodes]
    span = layer_span(sites, functools.partial(plan.matcher.layer, target.selector))
    low_ranks = [[a.kind.low_rank(a) for a in by_node.values()] for by_node in per_source]
    lora_ranks = [max(lr.rank for lr in lrs) for lrs in low_ranks if lrs and None not in lrs]
    first = next(iter(low_ranks[0]), None)
    first_rslora = bool(first is not None and first.rslora)
    weights = adapter.weight_values()
    for done, (node, site) in enumerate(zip(nodes, sites, strict=True), start=1):
        plan.placed(name, done, len(nodes))
        tasks = []
        for i, by_node in enumerate(per_source):
            if node in by_node:
                weight = resolve(weights[i], site, span, plan.matcher, f"adapters.{name}.weights[{i}]")
                tasks.append(Task(by_node[node], float(weight), f"adapters.{name}.combine[{i}]"))
        density = adapter.density
        if density is not None:
            density = float(resolve(density, site, span, plan.matcher, f"adapters.{name}.density"))
            if not 0 <= density <= 1:
                raise SpecError(f"adapters.{name}.density: must be in [0, 1], got {density} at {site.describe()}")
        generator = None
        if adapter.seed is not None:  # one stream per site: stable whatever else the spec selects
            generator = torch.Generator().manual_seed(zlib.crc32(f"{adapter.seed}:{site.module}".encode()))
        plan.fold_values[name, node.name] = {
            "weights": [t.weight for t in tasks],
            **({"density": density} if density is not None else {}),
        }
        ctx = Context(
            method=adapter.method,
            field=f"adapters.{name}",
            density=density,
            majority_sign=adapter.majority_sign,
            svd_rank=adapter.svd_rank,
            svd_clamp=adapter.svd_clamp,
            svd_full_matrices=adapter.svd_full_matrices,
            source_ranks=lora_ranks,
            first_rslora=first_rslora,
            generator=generator,
            single=len(adapter.combine) == 1,
            ia3=all(a.kind.folds_by_vector for by_node in per_source for a in by_node.values()),
            given=frozenset(adapter.fold_fields()),
        )
        plan.placements.append(Placement(name, fold_site(site, tasks, ctx)))


def _fresh_target(name: str, adapter: FreshAdapter) -> Target:
    return Target(name, KINDS[adapter.type], adapter.at, f"adapters.{name}.at")


def _peft_target(gm: fx.GraphModule, name: str, adapter: PeftAdapter, base_dir: Path | None) -> Target:
    directory = Path(adapter.peft)
    if base_dir is not None and not directory.is_absolute():
        directory = base_dir / directory
    field = f"adapters.{name}.peft"
    directory = hub.resolve(adapter.peft, directory, field, revision=adapter.revision, subfolder=adapter.subfolder)
    if not (directory / CONFIG).is_file() and is_lora_file(directory):
        ckpt = read_lora_file(directory, adapter.component, field, hasattr(gm, "text_model"))
    else:
        ckpt = read_checkpoint(directory, allow_pickle=adapter.allow_pickle, field=field)
    peft_type = str(ckpt.config["peft_type"])
    kind = PEFT_TYPES.get(peft_type)
    if kind is None:
        config_file = ckpt.directory / "adapter_config.json"
        if peft_type in NOT_MERGEABLE:
            raise CheckpointError(
                f"{config_file}: peft_type {peft_type!r} {NOT_MERGEABLE[peft_type]}; PEFT itself cannot merge it into "
                "weights, so it has no place in a peftfx graph"
            )
        supported = ", ".join(sorted(PEFT_TYPES))
        raise CheckpointError(f"{config_file}: peft_type {peft_type!r} is not supported (supported: {supported})")
    config_file = str(ckpt.directory / "adapter_config.json")
    check_peft_config(ckpt.config, config_file)
    kind.check_peft_config(ckpt.config, config_file)
    selector = peft_selector(ckpt.config, sorted(kind.ops), heads(gm), config_file)
    field_ = f"adapters.{name} (target_modules of {config_file})"
    return Target(name, kind, selector, field_, ckpt, ckpt.split(kind.peft_prefix))


def _place_peft(plan: Plan, target: Target, adapter: PeftAdapter, sites: list[Site]) -> None:
    ckpt, layout = target.checkpoint, target.layout
    assert ckpt is not None and layout is not None
    plan.configs[target.name] = ckpt.config
    nesting = _nesting(plan.matcher.gm, sites)
    # (PEFT's module path, site): a module called at several sites is one module in the checkpoint, at each site
    keyed = [(site.module + nesting.get(site.node, ""), site) for site in sites]
    keyed += _unselected(plan, set(layout.modules) - {module for module, _ in keyed}).items()
    if not keyed:
        plan.matcher.select(target.selector, target.field)  # raises: the selector matches nothing
    by_module = {site.module: site for site in plan.matcher.sites if site.op != PARAMETER}
    for module in sorted(set(layout.modules) - {module for module, _ in keyed}):
        key = ckpt.key(module, next(iter(layout.modules[module])))
        if module in by_module:
            reason = plan.matcher.test(target.selector, by_module[module]).reason
            raise CheckpointError(
                f"{ckpt.file}: tensor {key!r} is for {module}, which adapter_config.json does not target ({reason})"
            )
        raise CheckpointError(
            f"{ckpt.file}: tensor {key!r} is for {module}, which is not a weight-owning op of the captured model"
        )
    span = layer_span(sites, functools.partial(plan.matcher.layer, target.selector))
    prepared = target.kind.prepare_peft([site for _, site in keyed], ckpt.config, str(ckpt.directory / CONFIG))
    for done, (module, site) in enumerate(keyed, start=1):
        plan.placed(target.name, done, len(keyed))
        if module not in layout.modules:
            raise CheckpointError(
                f"{ckpt.file}: adapter_config.json targets {site.qualified_name}, but the file holds "
                f"no tensors for it (none named {ckpt.key(module, target.kind.peft_prefix + '*')!r})"
            )
        if site.op not in target.kind.ops:
            raise CheckpointError(
                f"{ckpt.file}: {target.kind.name} cannot adapt {site.describe()}, the only way the graph reads "
                f"{module}'s weight (supports {', '.join(sorted(target.kind.ops))})"
            )
        problem = target.kind.site_problem(site)
        if problem is not None:
            raise CheckpointError(f"{ckpt.file}: {problem}")
        scale = resolve(adapter.scale, site, span, plan.matcher, f"adapters.{target.name}.scale")
        if float(scale) != 1.0 and not target.kind.scalable:
            raise CheckpointError(
                f"{ckpt.file}: {target.kind.name} has no scaling factor, so `scale: {scale}` cannot be applied "
                f"({site.describe()})"
            )
        tensors = layout.modules[module]
        keys = {r: ckpt.key(module, r) for r in tensors}
        source = PeftSource(ckpt.config, tensors, keys, ckpt.file, layout.shared, prepared)
        site_adapter = target.kind.from_peft(site, source, float(scale))
        _check_dtypes(site_adapter, source, ckpt)
        if module != site.module:
            site_adapter = dataclasses.replace(site_adapter, peft_module=module)
        if module.endswith(_MHA_OUT) and module_classes(plan.matcher.gm).get(module.removesuffix(_MHA_OUT)) == _MHA:
            # PEFT's nn.MultiheadAttention layer adds its out_proj's delta twice, live (it merges around the call)
            # and merged (the weight it sets already holds the delta its out_proj's merge adds again): its numbers
            hyper = {**site_adapter.hyper, "scaling": 2 * site_adapter.hyper["scaling"]}
            site_adapter = dataclasses.replace(site_adapter, hyper=hyper)
        plan.placements.append(Placement(target.name, site_adapter))
    for attr, (key, tensor) in layout.overrides.items():
        plan.overrides.append(Override(target.name, attr, tensor, key, ckpt.file))


# The parameter through which PEFT's layer for a module class adapts it when no op reads that weight as a site.
_MHA, _MHA_OUT = "MultiheadAttention", ".base_layer.out_proj"
_MODULE_WEIGHT = {_MHA: "in_proj_weight"}


def _unselected(plan: Plan, modules: set[str]) -> dict[str, Site]:
    """Sites for checkpoint modules the selector cannot see as module sites, as PEFT's layers for them act.

    A module whose weight is read by no op site (Mamba's ``dt_proj.weight @ x``; nn.MultiheadAttention's
    ``in_proj_weight``, split before its linears) is adapted through that parameter. PEFT's wrapper of
    nn.MultiheadAttention keeps its out_proj's tensors at ``<attn>.base_layer.out_proj``: the out_proj's site.
    """
    by_module = {site.module: site for site in plan.matcher.sites if site.op != PARAMETER}
    params = {site.qualified_name: site for site in plan.matcher.sites if site.op == PARAMETER}
    found = {}
    for module in modules:
        unwrapped = module.replace(".base_layer", "")
        if unwrapped != module and unwrapped in by_module:
            found[module] = by_module[unwrapped]
            continue
        if module in by_module:
            continue
        cls = module_classes(plan.matcher.gm).get(module, "")
        weight = params.get(f"{module}.{_MODULE_WEIGHT.get(cls, 'weight')}")
        if weight is not None:
            found[module] = weight
    return found


def _nesting(gm: fx.GraphModule, sites: list[Site]) -> dict[fx.Node, str]:
    """Where PEFT keeps each parameter site's tensors below its module: PEFT wraps one parameter per ParamWrapper
    and nests the wrappers in the order the module registers its parameters, so of ``k`` adapted parameters of one
    module the ``j``-th (from 0) sits ``k - 1 - j`` ``base_layer.`` levels down."""
    by_owner: dict[str, list[Site]] = {}
    for site in sites:
        if site.op == PARAMETER:
            by_owner.setdefault(site.module, []).append(site)
    nesting = {}
    for owner, group in by_owner.items():
        order = list((gm.get_submodule(owner) if owner else gm)._parameters)
        group.sort(key=lambda s: order.index(str(s.param)))
        for j, site in enumerate(group):
            nesting[site.node] = ".base_layer" * (len(group) - 1 - j)
    return nesting


def _nested(a: SiteAdapter, nesting: str) -> SiteAdapter:
    """``a`` kept where PEFT nests it (``.base_layer`` levels below its module), so it saves back where it was read."""
    return dataclasses.replace(a, peft_module=a.site.module + nesting) if nesting else a


def _check_dtypes(a: SiteAdapter, source: PeftSource, ckpt: Checkpoint) -> None:
    """A float tensor read from an integer or complex one is not a cast but a different number: refuse it.

    Float to float is cast to the adapter's dtype, as PEFT's ``load_state_dict`` does (float64 files into a
    float32 model, float16 ones into float32 adapters of a half-precision model).
    """
    for role, tensor in a.tensors.items():
        suffix = a.peft_keys.get(role)
        stored = (source.shared if role in a.shared else source.tensors).get(suffix) if suffix else None
        if stored is not None and tensor.is_floating_point() and not stored.is_floating_point():
            key = f"{SHARED_PREFIX}{suffix}" if role in a.shared else source.keys.get(suffix, suffix)
            raise CheckpointError(f"{ckpt.file}: {key!r} is {stored.dtype}, but {a.kind.name} needs a float tensor")


def _place_fresh(plan: Plan, target: Target, adapter: FreshAdapter, sites: list[Site]) -> None:
    kind = target.kind
    wrong = [site for site in sites if site.op not in kind.ops]
    if wrong:
        raise MatchError(
            f"{target.field}: {kind.name} cannot adapt {wrong[0].describe()} "
            f"({len(wrong)} such sites; {kind.name} supports {', '.join(sorted(kind.ops))})"
        )
    generator = torch.Generator().manual_seed(adapter.seed) if adapter.seed is not None else None
    span = layer_span(sites, functools.partial(plan.matcher.layer, target.selector))
    params = [_fresh_params(plan, target, adapter, site, span) for site in sites]
    where = f"adapters.{target.name}"
    problem = next((p for p in map(kind.site_problem, sites) if p is not None), None)
    if problem is not None:
        raise SpecError(f"{where}: {problem}")
    largest = max(sites, key=lambda site: math.prod(site.weight_shape), default=None)
    try:
        with sizes.bounded(sizes.limit(math.prod(largest.weight_shape) if largest is not None else 0)):
            prepared = kind.prepare(sites, params)  # adapter-wide tensors (VeRA's shared projections) are bounded too
    except SpecError as e:
        raise SpecError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    except sizes.TooLarge as e:
        field = _size_field(params[0], adapter.with_, e.shape)
        raise SpecError(f"{where}{field}: {_too_large(e, largest)}") from None
    nesting = _nesting(plan.matcher.gm, sites)
    for done, (site, site_params) in enumerate(zip(sites, params, strict=True), start=1):
        plan.placed(target.name, done, len(sites))
        try:
            with sizes.bounded(sizes.limit(math.prod(site.weight_shape))):
                created = kind.create(site, site_params, generator, prepared)
        except SpecError as e:
            raise SpecError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        except sizes.TooLarge as e:
            field = _size_field(site_params, adapter.with_, e.shape)
            raise SpecError(f"{where}{field}: {_too_large(e, site)}") from None
        plan.placements.append(Placement(target.name, _nested(created, nesting.get(site.node, ""))))


def _fresh_params(plan: Plan, target: Target, adapter: FreshAdapter, site: Site, span: Any) -> BaseModel:
    """The kind's parameters at ``site``: per-layer values resolved, validated as the kind declares them."""
    kind = target.kind
    values: dict[str, Any] = {}
    for key, value in adapter.with_.items():
        values[key] = resolve(value, site, span, plan.matcher, f"adapters.{target.name}.with.{key}")
        if kind.Params.model_fields[key].annotation in (int, "int") and isinstance(values[key], float):
            values[key] = round(values[key])  # a gradient over an integer field, e.g. the rank
    try:
        return kind.Params.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        where, message = ".".join(map(str, err["loc"])), err["msg"].removeprefix("Value error, ")
        raise SpecError(f"adapters.{target.name}.with.{where}: {message} (at {site.describe()})") from None
