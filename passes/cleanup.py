"""cleanup: drop what rewriting left unused.

requires: nothing.
ensures:  no dead node peftfx created, no duplicate get_attr of one attribute, no adapter tensor that no node
          reads, no record of a merged adapter. Base nodes are never removed, so an empty spec changes nothing.
"""

from __future__ import annotations

from torch import fx

from ..errors import PassError
from ..ir import adapters, records, routing
from ..rewrite import TAG, del_attr
from .base import Pass


class Cleanup(Pass):
    name = "cleanup"
    ensures = "no dead peftfx node or unread adapter tensor; with no live adapter, no peftfx node but rebound weights"

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        graph = gm.graph
        for node in reversed(list(graph.nodes)):
            if TAG in node.meta and not node.users:
                graph.erase_node(node)
        seen: dict[str, fx.Node] = {}
        for node in list(graph.nodes):
            if node.op != "get_attr":
                continue
            first = seen.setdefault(str(node.target), node)
            if first is not node and TAG in node.meta:
                node.replace_all_uses_with(first)
                graph.erase_node(node)
        read = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
        if hasattr(gm, "peftfx"):
            for name, _ in list(gm.peftfx.named_parameters()):
                if f"peftfx.{name}" not in read:
                    del_attr(gm, f"peftfx.{name}")
            _drop_empty(gm, "peftfx")
        records(gm)[:] = [r for r in records(gm) if not r.merged]
        live = {r.adapter for r in records(gm)}
        for name in [name for name in adapters(gm) if name not in live]:
            del adapters(gm)[name]
        return gm

    def ensure(self, gm: fx.GraphModule) -> None:
        ours = [n for n in gm.graph.nodes if TAG in n.meta]
        dead = [n for n in ours if not n.users and not n.is_impure()]
        if dead:
            raise PassError(f"dead node {dead[0].name} is left")
        read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        if hasattr(gm, "peftfx"):
            unread = [name for name, _ in gm.peftfx.named_parameters() if f"peftfx.{name}" not in read]
            if unread:
                raise PassError(f"adapter tensor peftfx.{unread[0]} is read by no node")
        if any(r.merged for r in records(gm)):
            raise PassError("a record of a merged adapter is left")
        if not records(gm) and routing(gm) is None:  # fully merged: the base capture plus rebound weights only
            extra = [n for n in ours if "rebind" not in n.meta[TAG]]
            if extra or hasattr(gm, "peftfx"):
                where = f"node {extra[0].name}" if extra else "the module gm.peftfx"
                raise PassError(f"no adapter is live, yet {where} is left")


def _drop_empty(root: fx.GraphModule, name: str) -> None:
    module = getattr(root, name)
    for child in list(module._modules):
        _drop_empty(module, child)
    if not module._modules and not module._parameters and not module._buffers:
        delattr(root, name)
