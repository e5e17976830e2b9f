"""What the insert pass leaves behind so later passes can find, merge or export an adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..adapters import KINDS, SiteAdapter
from ..rewrite import TAG, get_attr
from ..sites import site_of


@dataclass
class Record:
    """One adapter inserted at one site node. Only names and numbers: the graph stays the source of truth."""

    adapter: str
    kind: str
    hyper: dict[str, Any]
    site_node: str
    module: str  # where PEFT keeps its tensors: the site's module, or the SiteAdapter's peft_module
    input: str  # the output node the adapter consumed (the site, or the adapter before it)
    output: str  # the adapter's own output node
    tensors: dict[str, str]  # role -> attribute target
    peft_keys: dict[str, str]  # role -> PEFT key suffix
    shared: list[str]  # roles whose tensor is adapter-wide
    raw_weight: str  # the weight attribute the live adapter reads
    raw_bias: str | None  # the bias attribute it reads
    merged: bool = False
    nodes: list[str] = field(default_factory=list)

    @property
    def tag(self) -> dict[str, str]:
        return {"adapter": self.adapter, "node": self.site_node}

    def site_adapter(self, gm: fx.GraphModule, nodes: dict[str, fx.Node]) -> SiteAdapter:
        site = site_of(gm, nodes[self.site_node])
        tensors = {role: get_attr(gm, target) for role, target in self.tensors.items()}
        peft_module = self.module if self.module != site.module else None
        return SiteAdapter(
            KINDS[self.kind],
            site,
            self.hyper,
            tensors,
            dict(self.peft_keys),
            frozenset(self.shared),
            peft_module=peft_module,
        )


@dataclass
class AdapterInfo:
    """Adapter-wide facts: its kind, the PEFT config it was loaded from (None if fresh), base overrides, export."""

    kind: str
    config: dict[str, Any] | None = None
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT key -> tensor
    as_inputs: bool = False  # export_onnx makes its tensors graph inputs


def records(gm: fx.GraphModule) -> list[Record]:
    return gm.meta.setdefault("peftfx", {}).setdefault("records", [])


def adapters(gm: fx.GraphModule) -> dict[str, AdapterInfo]:
    return gm.meta.setdefault("peftfx", {}).setdefault("adapters", {})


def nodes_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {node.name: node for node in gm.graph.nodes}


def is_tagged(node: fx.Node) -> bool:
    return TAG in node.meta
