"""Small graph-editing tools the passes share: attributes, proxy-built subgraphs, weight rebinding, new inputs."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.fx.proxy import GraphAppendingTracer, Proxy
from torch.utils._pytree import tree_structure, tree_unflatten

from .errors import SpecError

# node.meta key on every node peftfx inserted: {"adapter": name, "node": the site node's name} for an adapter's
# nodes (routing's: adapter "routing"), {"rebind": hint} for the get_attr of a weight that took a new name
TAG = "peftfx"


def get_attr(gm: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def adopt(gm: fx.GraphModule, root: nn.Module) -> None:
    """Give ``gm`` the module tree of ``root`` whole, shared. Built empty and given its graph after, a GraphModule
    skips its constructor's copying of each tensor the graph names, one ``setattr`` at a time."""
    gm._parameters, gm._buffers = root._parameters, root._buffers
    gm._non_persistent_buffers_set = root._non_persistent_buffers_set
    gm._modules = root._modules
    for name, value in vars(root).items():
        if isinstance(value, torch.Tensor):
            gm.__dict__[name] = value
    gm.training = root.training


def set_attr(gm: nn.Module, target: str, value: torch.Tensor | nn.Module) -> None:
    """Set ``gm.<target>``, creating empty container modules along the way."""
    *path, name = target.split(".")
    module = gm
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(value, (nn.Parameter, nn.Module)):
        setattr(module, name, value)
    elif name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module.register_buffer(name, value)


def weight_device(gm: nn.Module, weight: fx.Node) -> torch.device:
    """Where a site's weight lives: adapter tensors are registered there (CUDA, meta), whatever made them."""
    return get_attr(gm, str(weight.target)).device


def del_attr(gm: nn.Module, target: str) -> None:
    owner, _, name = target.rpartition(".")
    delattr(gm.get_submodule(owner) if owner else gm, name)


def fresh_target(gm: nn.Module, base: str) -> str:
    target, i = base, 1
    while _exists(gm, target):
        i += 1
        target = f"{base}_{i}"
    return target


def _exists(gm: nn.Module, target: str) -> bool:
    try:
        get_attr(gm, target)
        return True
    except AttributeError:
        return False


class _TaggingTracer(GraphAppendingTracer):
    def __init__(self, graph: fx.Graph, tag: dict[str, str]) -> None:
        super().__init__(graph)
        self.tag = tag
        self.created: list[fx.Node] = []

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[TAG] = dict(self.tag)
        self.created.append(node)
        return node


def build_after(
    anchor: fx.Node, fn: Callable[..., Any], inputs: Iterable[fx.Node | Any], tag: dict[str, str]
) -> tuple[fx.Node, list[fx.Node]]:
    """Run ``fn`` on proxies of ``inputs``, recording its ops right after ``anchor``, in order."""
    graph = anchor.graph
    tracer = _TaggingTracer(graph, tag)
    with graph.inserting_before(anchor.next):
        proxies = [Proxy(x, tracer) if isinstance(x, fx.Node) else x for x in inputs]
        out = fn(*proxies)
    return out.node, tracer.created


def tagged_get_attr(graph: fx.Graph, target: str, tag: dict[str, str]) -> fx.Node:
    node = graph.get_attr(target)
    node.meta[TAG] = dict(tag)
    return node


def attr_users(gm: fx.GraphModule, value: Any) -> list[fx.Node]:
    """Every node that reads ``value`` through any get_attr (aliases, such as tied weights, included)."""
    return [user for node in _getters(gm).get(id(value), (None, []))[1] for user in node.users]


class AttrIndex:
    """The get_attr nodes of every attribute, found once for a pass that rebinds many weights.

    A walk per weight made merging quadratic in the model's depth. The index stays exact as long as the pass
    adds no get_attr of an indexed tensor (``rebind`` only adds ones of new tensors, which it does not index).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.getters = _getters(gm)

    def users(self, value: Any) -> list[fx.Node]:
        held, nodes = self.getters.get(id(value), (None, []))
        if held is not value:
            return attr_users(self.gm, value)
        still = [n for n in nodes if not n._erased and get_attr(self.gm, str(n.target)) is value]
        return [user for node in still for user in node.users]


def _getters(gm: fx.GraphModule) -> dict[int, tuple[Any, list[fx.Node]]]:
    """id -> (the attribute, its get_attr nodes); every parameter and buffer named in one walk of the modules."""
    named = dict(itertools.chain(gm.named_parameters(remove_duplicate=False), gm.named_buffers(remove_duplicate=False)))
    getters: dict[int, tuple[Any, list[fx.Node]]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        value = named[node.target] if node.target in named else get_attr(gm, str(node.target))
        getters.setdefault(id(value), (value, []))[1].append(node)
    return getters


def rebind(
    gm: fx.GraphModule,
    readers: list[fx.Node],
    old: fx.Node,
    tensor: torch.Tensor,
    hint: str,
    index: AttrIndex | None = None,
) -> fx.Node | None:
    """Make ``readers`` read ``tensor`` where they read the get_attr ``old``, leaving every other reader as is.

    When ``readers`` are the tensor's only readers the attribute is replaced under its own name (so a merged
    graph has the base graph's names and node count); otherwise, e.g. for a tied weight, the new tensor gets
    a name of its own, and its get_attr node is returned. The old tensor is never written to: it may be the
    user's storage. ``index`` spares a pass that rebinds many weights a walk of the graph for each.
    """
    current = get_attr(gm, str(old.target))
    users = index.users(current) if index is not None else attr_users(gm, current)
    if set(users) <= set(readers):
        set_attr(gm, str(old.target), nn.Parameter(tensor, requires_grad=False))
        return None
    target = fresh_target(gm, f"{old.target}_{hint}")
    set_attr(gm, target, nn.Parameter(tensor, requires_grad=False))
    with gm.graph.inserting_before(old.next):
        new = tagged_get_attr(gm.graph, target, {"rebind": hint})
    for reader in readers:
        reader.replace_input_with(old, new)
    if not old.users:
        gm.graph.erase_node(old)
    return new


def take_name_back(gm: fx.GraphModule, new: fx.Node, old: fx.Node) -> None:
    """Once nothing reads ``old`` any more, let ``new``'s tensor have ``old``'s name and node."""
    if old._erased or old.users:
        return
    set_attr(gm, str(old.target), nn.Parameter(get_attr(gm, str(new.target)), requires_grad=False))
    del_attr(gm, str(new.target))
    new.replace_all_uses_with(old)
    gm.graph.erase_node(new)


def add_input(gm: fx.GraphModule, name: str, default: Any = inspect.Parameter.empty) -> fx.Node:
    """Give ``gm`` a keyword input ``name`` after its others, and return its placeholder.

    ``default`` is its value when not passed, in a plain graph (needed after inputs with defaults, e.g. a
    symbolic trace's). A ``torch.export`` capture's forward is generated from a pytree spec of
    ``(args, kwargs)`` (the codegen's and ``gm._in_spec``, which export's input check reads): the new key is
    appended to both, so the graph is called as ``gm(..., name=tensor)`` eagerly, under ``torch.compile`` and
    when exported again (ONNX).
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if any(n.target == name for n in placeholders):
        raise SpecError(f"the model already has an input named {name!r}")
    where = graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(next(iter(graph.nodes)))
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    pytree = info is not None and info.in_spec is not None
    with where:  # a pytree forward has no defaults: its inputs are unflattened from one spec
        node = graph.placeholder(name, default_value=inspect.Parameter.empty if pytree else default)
    if pytree:
        args, kwargs = tree_unflatten([object() for _ in range(info.in_spec.num_leaves)], info.in_spec)
        spec = tree_structure((args, {**kwargs, name: object()}))
        codegen.pytree_info = info._replace(orig_args=[*info.orig_args, name], in_spec=spec)
        if hasattr(gm, "_in_spec"):
            gm._in_spec = spec
    gm.recompile()
    return node


def drop_input(gm: fx.GraphModule, name: str, *, recompile: bool = True) -> None:
    """Remove the keyword input ``name`` that nothing reads any more (``add_input`` undone)."""
    node = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == name), None)
    if node is None or node.users:
        return
    gm.graph.erase_node(node)
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        args, kwargs = tree_unflatten([object() for _ in range(info.in_spec.num_leaves)], info.in_spec)
        spec = tree_structure((args, {k: v for k, v in kwargs.items() if k != name}))
        codegen.pytree_info = info._replace(orig_args=[a for a in info.orig_args if a != name], in_spec=spec)
        if hasattr(gm, "_in_spec"):
            gm._in_spec = spec
    if recompile:
        gm.recompile()
