"""The IR between the planner and the passes, and what the passes leave on a graph.

The planner writes ``Placement``s and ``Override``s; the route and insert passes turn them into nodes and leave
``Record``s, ``AdapterInfo`` and ``Routing`` in ``gm.meta["peftfx"]``, which merge, cleanup, save, swap, export and
verify read. Everything reads and writes that dict through the accessors here, so its layout lives in one place.
Only names and numbers are kept: the graph stays the source of truth for tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .adapters import KINDS, SiteAdapter
from .rewrite import get_attr
from .sites import site_of

META = "peftfx"  # the key of gm.meta this module owns
ROUTING_INPUT = "adapter_index"  # the int64 [batch] input of a routed graph: which adapter each sample takes
SCALE_INPUT = "lora_scale"  # a 0-d tensor input multiplying every live LoRA's scaling (diffusers' LoRA scale)


@dataclass(frozen=True)
class Placement:
    """One adapter on one site, as the planner built it."""

    adapter: str
    site_adapter: SiteAdapter


@dataclass(frozen=True)
class Override:
    """A base tensor an adapter replaces (PEFT's modules_to_save copies, trained biases)."""

    adapter: str
    target: str
    tensor: torch.Tensor
    key: str
    file: str


@dataclass
class Record:
    """One adapter inserted at one site node."""

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


@dataclass(frozen=True)
class Routing:
    """A routed graph: the keyword input that picks each sample's adapter, and the adapters by position."""

    input: str
    adapters: list[str]


@dataclass(frozen=True)
class ModelHeads:
    """Paths of the captured model's output heads, which PEFT's ``all-linear`` leaves out."""

    output_embeddings: str | None = None
    classifier: str | None = None


@dataclass(frozen=True)
class KVCache:
    """A graph captured as one generation step over a static KV cache (``kv_cache``): what ``generate`` reads."""

    max_cache_len: int
    batch: int
    shapes: list[tuple[int, ...]]  # each cache tensor's, key then value, layer by layer
    dtype: torch.dtype
    vocab_size: int | None = None
    eos_token_id: int | list[int] | None = None  # the model's generation config
    pad_token_id: int | None = None


def _meta(gm: fx.GraphModule) -> dict[str, Any]:
    return gm.meta.setdefault(META, {})


def records(gm: fx.GraphModule) -> list[Record]:
    return _meta(gm).setdefault("records", [])


def adapters(gm: fx.GraphModule) -> dict[str, AdapterInfo]:
    return _meta(gm).setdefault("adapters", {})


def routing(gm: fx.GraphModule) -> Routing | None:
    return _meta(gm).get("routing")


def set_routing(gm: fx.GraphModule, value: Routing) -> None:
    _meta(gm)["routing"] = value


def heads(gm: fx.GraphModule) -> ModelHeads:
    return _meta(gm).get("heads", ModelHeads())


def set_heads(gm: fx.GraphModule, value: ModelHeads) -> None:
    _meta(gm)["heads"] = value


def kv_cache(gm: Any) -> KVCache | None:
    """The cache a graph steps over, None for other graphs; also through a ``torch.compile`` wrapper."""
    meta = getattr(getattr(gm, "_orig_mod", gm), "meta", None)
    return meta.get(META, {}).get("kv_cache") if isinstance(meta, dict) else None


def set_kv_cache(gm: fx.GraphModule, value: KVCache) -> None:
    _meta(gm)["kv_cache"] = value


def nodes_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {node.name: node for node in gm.graph.nodes}


def attr_key(name: str) -> str:
    """A module path or adapter name as one attribute name: adapter tensors live at ``peftfx.<adapter>.<site>``."""
    return re.sub(r"\W", "_", name.replace(".", "__"))
