"""insert: add each adapter's subgraph after its site.

requires: placements whose sites are base ops of this graph.
ensures:  every consumer of a site's output reads the last adapter's output instead; adapters at one site
          chain in placement order; adapter tensors are parameters (trainable unless integer or frozen) under
          ``peftfx.<adapter>.<site>``, adapter-wide (shared) ones once under ``peftfx.<adapter>``; a ``Record``
          per placement in ``ir.records`` and, per adapter, its PEFT config and overrides in
          ``ir.adapters`` (what ``save_adapter`` writes back); base-weight overrides (PEFT's
          modules_to_save and trained biases) are rebound for the nodes of the module that owns them. With
          ``runtime_scale``, a 0-d tensor keyword input ``lora_scale`` multiplies the scaling of every adapter
          whose kind reads one (LoRA, DoRA), as PEFT's ``scale_layer``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..adapters import SiteAdapter
from ..errors import CheckpointError, PassError, SpecError
from ..ir import SCALE_INPUT, AdapterInfo, Override, Placement, Record, adapters, attr_key, nodes_by_name, records
from ..rewrite import TAG, add_input, build_after, get_attr, rebind, set_attr, tagged_get_attr, weight_device
from ..sites import PARAMETER, module_of
from .base import Pass


class Insert(Pass):
    name = "insert"
    requires = "placements on base sites"
    ensures = "adapter subgraphs after their sites, with records"

    def __init__(
        self,
        placements: Sequence[Placement],
        overrides: Sequence[Override] = (),
        configs: Mapping[str, Mapping[str, Any]] | None = None,
        as_inputs: Collection[str] = (),
        runtime_scale: bool = False,
    ) -> None:
        self.placements = placements
        self.overrides = overrides
        self.configs = configs or {}
        self.runtime_scale = runtime_scale
        self.as_inputs = frozenset(as_inputs)  # adapters whose tensors export_onnx makes graph inputs

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        info = adapters(gm)
        for placement in self.placements:
            entry = info.setdefault(placement.adapter, AdapterInfo(placement.site_adapter.kind.name))
            entry.config = dict(self.configs.get(placement.adapter) or {}) or None
            entry.as_inputs = placement.adapter in self.as_inputs
        for override in self.overrides:
            _apply_override(gm, override)
            info.setdefault(override.adapter, AdapterInfo("")).overrides[override.key] = override.tensor
        scale = None
        if self.runtime_scale and any(p.site_adapter.kind.runtime_scale for p in self.placements):
            scale = add_input(gm, SCALE_INPUT, 1.0)
        outputs: dict[fx.Node, fx.Node] = {}
        for placement in self.placements:
            a = placement.site_adapter
            y = outputs.get(a.site.node, a.site.node)
            outputs[a.site.node] = _insert(gm, placement.adapter, a, y, scale if a.kind.runtime_scale else None)
        return gm

    def ensure(self, gm: fx.GraphModule) -> None:
        nodes = nodes_by_name(gm)
        placed = {(r.adapter, r.site_node): r for r in records(gm)}
        for p in self.placements:
            record = placed.get((p.adapter, p.site_adapter.site.node.name))
            if record is None:
                raise PassError(f"{p.adapter!r} at {p.site_adapter.site.module} has no record")
            if record.output not in nodes or not nodes[record.output].users:
                raise PassError(f"nothing reads the output of {p.adapter!r} at {record.module}")
            for target in record.tensors.values():
                try:
                    get_attr(gm, target)
                except AttributeError:
                    raise PassError(f"{p.adapter!r} at {record.module}: no tensor {target}") from None


def _insert(gm: fx.GraphModule, adapter: str, a: SiteAdapter, y: fx.Node, scale: fx.Node | None = None) -> fx.Node:
    site = a.site
    if site.op == PARAMETER:  # every read of the parameter reads the adapted one: one get_attr (the first) for all
        for other in gm.graph.find_nodes(op="get_attr", target=site.weight.target):
            if other is not site.weight and TAG not in other.meta:
                other.replace_all_uses_with(site.weight)
                gm.graph.erase_node(other)
    tag = {"adapter": adapter, "node": site.node.name}
    prefix = f"peftfx.{attr_key(adapter)}"
    targets = {}
    device = weight_device(gm, site.weight)
    for role, tensor in a.tensors.items():
        targets[role] = f"{prefix}.{role}" if role in a.shared else f"{prefix}.{attr_key(site.qualified_name)}.{role}"
        try:
            get_attr(gm, targets[role])  # shared roles, and a module called at several sites, reuse one tensor
        except AttributeError:
            # integer roles (index sets such as SHiRA's) and frozen roles are stored, saved, never trained
            trainable = tensor.is_floating_point() and role not in a.frozen
            set_attr(gm, targets[role], nn.Parameter(tensor.to(device), requires_grad=trainable))
    cursor = y
    attrs = []
    for target in targets.values():
        with gm.graph.inserting_after(cursor):
            cursor = tagged_get_attr(gm.graph, target, tag)
        attrs.append(cursor)
    roles = list(targets)

    def forward(x, y_, w, b, s, *tensors):
        t = dict(zip(roles, tensors, strict=True))
        if s is not None:
            t[SCALE_INPUT] = s
        return a.kind.forward(a, x, y_, w, b, t)

    out, created = build_after(cursor, forward, [site.live_input, y, site.weight, site.bias, scale, *attrs], tag)
    created_set = set(created)
    if y is not site.node and not created_set & set(y.users):
        earlier = y.meta.get(TAG, {}).get("adapter", "an earlier adapter")
        raise SpecError(
            f"adapters.{adapter}: {a.kind.name} recomputes {site.describe()} from its input, so it would silently drop "
            f"{earlier!r} placed before it on the same site; put {adapter!r} first (`active` order) or on other sites"
        )
    y.replace_all_uses_with(out, delete_user_cb=lambda user: user not in created_set)
    records(gm).append(
        Record(
            adapter=adapter,
            kind=a.kind.name,
            hyper=dict(a.hyper),
            site_node=site.node.name,
            module=a.peft_module or site.module,
            input=y.name,
            output=out.name,
            tensors=targets,
            peft_keys=dict(a.peft_keys),
            shared=sorted(a.shared),
            raw_weight=str(site.weight.target),
            raw_bias=str(site.bias.target) if site.bias is not None else None,
            nodes=[n.name for n in (*attrs, *created)],
        )
    )
    return out


def _apply_override(gm: fx.GraphModule, o: Override) -> None:
    module = o.target.rpartition(".")[0]
    try:
        current = get_attr(gm, o.target)
    except AttributeError:
        raise CheckpointError(
            f"{o.file}: tensor {o.key!r} is for {o.target!r}, which the model does not have"
        ) from None
    if tuple(current.shape) != tuple(o.tensor.shape):
        raise CheckpointError(
            f"{o.file}: tensor {o.key!r} has shape {list(o.tensor.shape)}, the model's {o.target!r} has "
            f"{list(current.shape)}"
        )
    tensor = o.tensor.to(current.dtype)
    getters = [n for n in gm.graph.nodes if n.op == "get_attr" and get_attr(gm, str(n.target)) is current]
    readers = {n: [u for u in n.users if _within(module_of(u)[0], module)] for n in getters}
    if not any(readers.values()):  # read through a functional call in a parent module: replace it everywhere
        readers = {n: list(n.users) for n in getters}
    if not any(readers.values()):
        if torch.equal(current, tensor):
            return
        raise CheckpointError(f"{o.file}: tensor {o.key!r} replaces {o.target!r}, which the graph never reads")
    for old, users in readers.items():
        if users:
            rebind(gm, users, old, tensor, attr_key(o.adapter))


def _within(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")
