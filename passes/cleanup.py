"""cleanup: drop what rewriting left unused.

requires: nothing.
ensures:  no dead node peftfx created, no duplicate get_attr of one attribute, no adapter tensor that no node
          reads, no record of a merged adapter. Base nodes are never removed, so an empty spec changes nothing.
"""

from __future__ import annotations

from torch import fx

from ..ir import adapters, records
from ..rewrite import TAG, del_attr
from .base import Pass


class Cleanup(Pass):
    name = "cleanup"
    ensures = "no dead peftfx node or unread adapter tensor"

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


def _drop_empty(root: fx.GraphModule, name: str) -> None:
    module = getattr(root, name)
    for child in list(module._modules):
        _drop_empty(module, child)
    if not module._modules and not module._parameters and not module._buffers:
        delattr(root, name)
