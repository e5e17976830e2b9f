"""SDPA's own causal flag in place of a causal mask that a capture computed from shapes alone.

``torch.export`` records the boolean mask transformers builds for causal attention, and SDPA given a mask runs
its masked kernels, slower than the causal ones the eager model runs when it has no padding mask (and, on GPUs,
not flash attention). Where the mask depends on no graph input (a static capture without ``attention_mask``) it
is a constant: it is evaluated once, and where it is exactly SDPA's causal lower triangle the call becomes
``is_causal=True`` and the mask's nodes go. Anything else (padding masks, dynamic shapes) is left as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .rewrite import get_attr

SDPA = torch.ops.aten.scaled_dot_product_attention.default
_MASK, _IS_CAUSAL = (3, "attn_mask"), (5, "is_causal")


def restore_is_causal(gm: fx.GraphModule) -> int:
    """Rewrite ``gm``'s SDPA calls whose mask is the constant causal triangle; return how many. No recompile."""
    graph = gm.graph
    constants: dict[fx.Node, torch.Tensor | None] = {}
    rewritten, masks = 0, set[fx.Node]()
    for node in graph.find_nodes(op="call_function", target=SDPA):
        mask = _get(node, _MASK)
        if not isinstance(mask, fx.Node) or _get(node, _IS_CAUSAL):
            continue
        if mask not in constants:
            constants[mask] = _constant(gm, mask)
        if _is_causal_triangle(constants[mask], node):
            _set(node, _MASK, None)
            _set(node, _IS_CAUSAL, True)
            rewritten += 1
            masks.add(mask)
    dropped = _ancestors(masks)
    for node in reversed(list(graph.nodes)):
        if node in dropped and not node.users:
            graph.erase_node(node)
    return rewritten


def _is_causal_triangle(mask: torch.Tensor | None, sdpa: fx.Node) -> bool:
    query, key = (getattr(n, "meta", {}).get("val") for n in sdpa.args[:2])
    if mask is None or mask.is_meta or mask.dtype != torch.bool or query is None or key is None:
        return False  # a meta capture's mask has no values to compare: it stays
    rows, cols = query.shape[-2], key.shape[-2]
    if not isinstance(rows, int) or not isinstance(cols, int) or mask.shape[-2:] != (rows, cols):
        return False
    return torch.equal(mask, torch.ones(rows, cols, dtype=torch.bool).tril().expand_as(mask))


def _constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The value of ``node`` when it is computed from constants only (no input, no module call), else None."""
    needed = _ancestors({node})
    if any(n.op not in ("call_function", "get_attr") for n in needed):
        return None
    values: dict[fx.Node, Any] = {}
    try:
        for n in gm.graph.nodes:
            if n not in needed:
                continue
            if n.op == "get_attr":
                values[n] = get_attr(gm, str(n.target))
            else:
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
                values[n] = n.target(*args, **kwargs)
    except Exception:  # an op that does not run outside its graph (a higher-order op, say): keep the mask
        return None
    value = values[node]
    return value if isinstance(value, torch.Tensor) else None


def _ancestors(nodes: set[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _get(node: fx.Node, where: tuple[int, str]) -> Any:
    index, name = where
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _set(node: fx.Node, where: tuple[int, str], value: Any) -> None:
    index, name = where
    if len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)
