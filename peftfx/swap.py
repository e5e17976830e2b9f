"""Hotswap: another adapter's weights copied into a live adapter's tensors, so a compiled graph keeps serving.

A swap changes values only, never a shape or a constant of the graph, which is all ``torch.compile`` guards
on: the compiled graph does not recompile. Declare ``max_rank`` on an adapter to let ranks, alphas and rsLoRA
vary (its ranks are zero-padded and its scaling is a tensor); without it only an adapter with the same
hyper-parameters fits. Never compile a swappable graph with Inductor's ``freezing=True``: it folds parameters
into constants and silently keeps serving the old adapter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import fx

from .adapters import SiteAdapter
from .errors import SpecError
from .ir import Record, adapters, nodes_by_name, records, routing
from .plan import make_plan
from .rewrite import get_attr
from .spec import PeftAdapter, Spec, load_spec

Source = str | Path | dict[str, Any] | Spec


def swap_adapter(gm: fx.GraphModule, name: str, source: Source) -> None:
    """Replace the weights of live adapter ``name`` of ``gm`` in place with those of ``source``.

    ``source`` is a PEFT checkpoint directory, or a spec (file, dict or ``Spec``) with exactly one active
    adapter, e.g. a ``combine`` fold of checkpoints or a fresh adapter; its sites must be exactly ``name``'s.
    Everything is checked before anything is written: a source that does not fit (other sites, another tuner
    kind, a rank above ``max_rank``, a hyper-parameter the graph holds as a constant) raises ``SpecError`` and
    leaves the graph as it was.
    """
    mine = [r for r in records(gm) if r.adapter == name]
    routed = routing(gm)
    if not mine and routed is not None and name in routed.adapters:
        raise SpecError(f"swap_adapter: {name!r} is routed; its tensors are rows of the routing stacks, not swappable")
    if not mine:
        live = ", ".join(sorted({r.adapter for r in records(gm)})) or "none"
        raise SpecError(f"swap_adapter: no live adapter {name!r} in this graph (live: {live}; merged ones are gone)")
    if adapters(gm)[name].overrides:
        key = next(iter(adapters(gm)[name].overrides))
        raise SpecError(
            f"swap_adapter: {name!r} replaced base tensors when compiled ({key}: modules_to_save or a trained "
            "bias), which another adapter's weights would be served beside; compile with the new adapter instead"
        )
    spec, base_dir, label = _source_spec(source)
    active = spec.active_adapters()
    if len(active) != 1:
        raise SpecError(f"swap_adapter: {label} must have exactly one active adapter, it has {len(active)}")
    if spec.merged_adapters():
        raise SpecError(f"swap_adapter: {label} merges its adapter; a swap loads a live one")
    plan = make_plan(gm, spec, base_dir)
    if plan.overrides:
        o = plan.overrides[0]
        raise SpecError(f"swap_adapter: {label} replaces base tensor {o.target!r} ({o.key}), which a swap cannot")
    incoming = {}
    for placement in plan.placements:
        node = placement.site_adapter.site.node.name
        if node in incoming:
            raise SpecError(f"swap_adapter: {label} places several adapters at {placement.site_adapter.site.module}")
        incoming[node] = placement.site_adapter
    nodes = nodes_by_name(gm)
    fitted = []
    for record in mine:
        new = incoming.pop(record.site_node, None)
        if new is None:
            raise SpecError(
                f"swap_adapter: {label} does not adapt {record.module}, which {name!r} adapts; a swap must cover "
                "exactly the same sites"
            )
        fitted.append((record, _fit(record.site_adapter(gm, nodes), new, record, label)))
    if incoming:
        extra = next(iter(incoming.values())).site.module
        raise SpecError(f"swap_adapter: {label} adapts {extra}, which {name!r} does not: a swap cannot add sites")
    with torch.no_grad():
        for record, new in fitted:
            for role, target in record.tensors.items():
                get_attr(gm, target).copy_(new.tensors[role])
            record.hyper, record.peft_keys = dict(new.hyper), dict(new.peft_keys)
    adapters(gm)[name].config = dict(plan.configs[active[0]]) if active[0] in plan.configs else None


def _source_spec(source: Source) -> tuple[Spec, Path | None, str]:
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return Spec(adapters={"swap": PeftAdapter(peft=str(source))}), None, str(source)
    spec, base_dir = load_spec(source)
    label = str(source) if isinstance(source, (str, Path)) else "the source spec"
    return spec, base_dir, label


def _fit(old: SiteAdapter, new: SiteAdapter, record: Record, label: str) -> SiteAdapter:
    """``new`` in the shapes, dtypes and constants of ``old``, or a SpecError saying what does not fit."""
    where = f"swap_adapter: {label} at {record.module}"
    if type(new.kind).forward is not type(old.kind).forward:
        kinds = f"{new.kind.name} adapter, {record.adapter!r} a {old.kind.name}"
        raise SpecError(f"{where} is a {kinds}: a swap cannot change the tuner kind")
    if "max_rank" in old.hyper:
        try:
            new = new.kind.pad(new, old.hyper["max_rank"])
        except SpecError as e:
            raise SpecError(f"{where}: {e}, declared for {record.adapter!r}") from None
    runtime = old.kind.runtime_hyper(old)
    for key in sorted((set(old.hyper) | set(new.hyper)) - runtime):
        if old.hyper.get(key) != new.hyper.get(key):
            hint = "" if runtime else f"; declare max_rank on {record.adapter!r} to make rank and scaling swappable"
            raise SpecError(
                f"{where}: {key}={new.hyper.get(key)!r}, but the graph holds {key}={old.hyper.get(key)!r} as a "
                f"constant{hint}"
            )
    if set(new.tensors) != set(old.tensors):
        raise SpecError(f"{where}: tensors {sorted(new.tensors)}, the graph has {sorted(old.tensors)}")
    tensors = {}
    for role, tensor in new.tensors.items():
        if tensor.shape != old.tensors[role].shape:
            raise SpecError(
                f"{where}: {role} has shape {list(tensor.shape)}, the graph's {list(old.tensors[role].shape)}"
            )
        tensors[role] = tensor.to(old.tensors[role].dtype)
    return dataclasses.replace(new, tensors=tensors)
