"""A captured GraphModule as bytes: its graph, its module tree and the tensors the model does not lend.

``torch.export.save`` stores a whole ExportedProgram in a versioned JSON schema whose decoding costs most of an
export; a capture needs far less. Here the unlifted module ``ExportedProgram.module()`` gives is pickled as it is
used: nodes (op, name, target, arguments), the module tree with its parameters, buffers and constants, the input
checks (``_guards_fn``, as the guard expressions it was generated from) and, of node metadata, what the passes read:
the module stack and the static shapes of tensor values (as meta tensors). Tensors the model holds are stored by
name and bound on load, so a file holds no weights and a load shares the model's storage as a fresh capture does.

A file is code as much as a ``.pyc`` is (its guards are Python expressions, its targets callables): the capture
cache reads only files the user wrote. ``unlifted`` patches torch's guard-function factory for the length of one
``module()`` call, under the capture lock.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.export import _unlift
from torch.utils._pytree import TreeSpec, treespec_dumps, treespec_loads

from .gc_pause import gc_paused
from .rewrite import adopt
from .sites import MODULE_STACK

FORMAT = 1
"""Bumped when what is stored changes."""

_KEPT_META = (MODULE_STACK,)
_CALLABLE_KINDS = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)


class Unstorable(Exception):
    """Something in the module has no stored form (its capture is simply not cached)."""


def unlifted(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """``program.module()``, its input checks annotated with the guard expressions they were made from."""
    made: list[tuple[Any, ...]] = []
    convert = getattr(_unlift, "_convert_guards_code_to_fn", None)
    if convert is None:  # another torch: the checks' source is unknown, so the module is not stored
        return program.module()

    def recorded(*args: Any) -> nn.Module:
        fn = convert(*args)
        made.append(args)
        return fn

    with _patched(_unlift, "_convert_guards_code_to_fn", recorded):
        gm = program.module()
    guards = getattr(gm, "_guards_fn", None)
    if guards is not None and len(made) == 1:
        guards.peftfx_source = made[0]
    return gm


@contextmanager
def _patched(owner: Any, name: str, value: Any) -> Any:
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def dumps(gm: fx.GraphModule, lent: Mapping[int, str]) -> bytes:
    """``gm`` as bytes; a tensor whose ``id`` is in ``lent`` is stored as that name. Raises Unstorable."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, lent)
    try:
        pickler.dump((FORMAT, _module_record(gm)))
    except Exception as error:  # pickle's own errors, and any a value's reduction raises
        raise Unstorable(str(error)) from error
    return buffer.getvalue()


def loads(data: bytes, tensors: Callable[[str], torch.Tensor | None]) -> fx.GraphModule | None:
    """The GraphModule ``dumps`` stored, its code pending (``with_code``), lent tensors taken from ``tensors`` (by
    name: None when the model has none, and then no module). Raises on a file that is not one."""
    with gc_paused():  # thousands of new objects, none garbage: collections would walk the whole heap
        unpickler = _Unpickler(io.BytesIO(data), tensors)
        version, record = unpickler.load()
        if version != FORMAT or unpickler.missing:
            return None
        return _build(record)


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, lent: Mapping[int, str]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.lent = lent

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, fx.Node):
            return ("node", obj.name)
        if isinstance(obj, _CALLABLE_KINDS):
            return ("op", _op_name(obj))
        if isinstance(obj, torch.Tensor) and id(obj) in self.lent:
            return ("lent", self.lent[id(obj)], list(obj.shape), obj.dtype, isinstance(obj, nn.Parameter))
        if isinstance(obj, TreeSpec):  # pickled, a spec warns of a deprecation when it is rebuilt
            return ("treespec", treespec_dumps(obj))
        if isinstance(obj, (fx.GraphModule, _unlift.GuardsFn)):
            raise pickle.PicklingError(f"a {type(obj).__name__} outside the module tree")
        return None


def _op_name(op: Any) -> tuple[str, ...]:
    if isinstance(op, torch._ops.HigherOrderOperator):
        return ("higher_order", op.__name__)
    if isinstance(op, torch._ops.OpOverload):
        return (op.namespace, op._schema.name.split("::", 1)[1], op._overloadname)
    return (op._qualified_op_name.split("::", 1)[0], op._qualified_op_name.split("::", 1)[1])


class _Ref:
    """A node named in a stored argument, resolved once the node exists."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: Callable[[str], torch.Tensor | None]) -> None:
        super().__init__(file)
        self.tensors = tensors
        self.missing = False

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0]
        if kind == "node":
            return _Ref(pid[1])
        if kind == "op":
            return _op(pid[1])
        if kind == "treespec":
            return treespec_loads(pid[1])
        if kind == "lent":
            _, name, shape, dtype, is_parameter = pid
            tensor = self.tensors(name)
            if (
                tensor is None
                or list(tensor.shape) != shape
                or tensor.dtype != dtype
                or isinstance(tensor, nn.Parameter) != is_parameter
            ):
                self.missing = True
                return None
            return tensor
        raise pickle.UnpicklingError(f"unknown reference {kind!r}")


def _op(name: tuple[str, ...]) -> Any:
    if name[0] == "higher_order":
        return getattr(torch.ops.higher_order, name[1])
    packet = getattr(getattr(torch.ops, name[0]), name[1])
    return getattr(packet, name[2]) if len(name) == 3 else packet


def _module_record(module: nn.Module) -> dict[str, Any]:
    """A module of the tree: its class, tensors, plain attributes a forward may read, children; a GraphModule's
    graph; a guards function's source."""
    record: dict[str, Any] = {
        "parameters": dict(module._parameters),
        "buffers": dict(module._buffers),
        "non_persistent": set(module._non_persistent_buffers_set),
        "training": module.training,
        "children": {name: None if m is None else _module_record(m) for name, m in module._modules.items()},
        "tensors": {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)},
    }
    if isinstance(module, _unlift.GuardsFn):
        source = getattr(module, "peftfx_source", None)
        if source is None:
            raise Unstorable("input checks of unknown source")
        record["guards"] = source
    elif isinstance(module, fx.GraphModule):
        record["graph"] = _graph_record(module.graph)
        record["stateful"] = isinstance(module, _unlift._StatefulGraphModule)
        record["attributes"] = {
            k: getattr(module, k)
            for k in ("_in_spec", "_out_spec", "range_constraints", "validate_inputs")
            if hasattr(module, k)
        }
        record["meta"] = dict(module.meta)
        if module._forward_pre_hooks or module._forward_hooks:
            raise Unstorable("a GraphModule with hooks")
    elif type(module) is not nn.Module:
        raise Unstorable(f"a module of class {type(module).__name__}")
    return record


def _graph_record(graph: fx.Graph) -> dict[str, Any]:
    nodes = []
    for node in graph.nodes:
        meta = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
        shape = _static_shape(node.meta.get("val"))
        if shape is not None:
            meta["val"] = shape
        nodes.append((node.name, node.op, node.target, node.args, node.kwargs, node.type, meta))
    codegen = graph._codegen
    info = codegen.pytree_info if isinstance(codegen, fx.graph._PyTreeCodeGen) else None
    return {"nodes": nodes, "pytree_info": info}


def _static_shape(value: Any) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype] | None:
    if not isinstance(value, torch.Tensor) or value.is_sparse:
        return None
    shape, stride = value.shape, value.stride()
    if not all(isinstance(d, int) for d in (*shape, *stride)):
        return None
    return tuple(shape), tuple(stride), value.dtype


_CODE_PENDING = "_peftfx_code_pending"


def code_pending(gm: fx.GraphModule) -> fx.GraphModule:
    """Mark ``gm``'s Python code as out of date with its graph, to be generated by ``with_code`` before a call (a
    compile rewrites the graph first: code generated before would be thrown away)."""
    gm.__dict__[_CODE_PENDING] = True
    return gm


def with_code(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with its Python code, generated now if it was left pending (``code_pending``)."""
    if gm.__dict__.pop(_CODE_PENDING, False):
        gm.recompile()
    return gm


def _build(record: dict[str, Any], *, top: bool = True) -> fx.GraphModule:
    """The stored GraphModule. The top one's Python code is left pending (``code_pending``): generating code a
    compile would throw away is a tenth of its time."""
    root = _tree(record)
    attributes = record["attributes"]
    if record["stateful"]:
        gm = _unlift._StatefulGraphModule._create(nn.Module(), fx.Graph(), attributes["range_constraints"])
    else:
        gm = fx.GraphModule(nn.Module(), fx.Graph())
    adopt(gm, root)
    for name, value in attributes.items():
        setattr(gm, name, value)
    gm.meta.update(record["meta"])
    graph = _graph(record["graph"])
    if top:
        gm._graph, graph.owning_module = graph, gm  # the graph setter, less its code generation
        code_pending(gm)
    else:  # a subgraph the top one's code calls
        gm.graph = graph
    return gm


def _tree(record: dict[str, Any]) -> nn.Module:
    """The stored module tree as plain modules; GraphModules and guards made whole."""
    children = {
        name: None if child is None else (_build(child, top=False) if "graph" in child else _tree(child))
        for name, child in record["children"].items()
    }
    if "guards" in record:
        module = _unlift._convert_guards_code_to_fn(*record["guards"])
        module.peftfx_source = record["guards"]
    else:
        module = nn.Module()
    module._parameters.update(record["parameters"])
    module._buffers.update(record["buffers"])
    module._non_persistent_buffers_set.update(record["non_persistent"])
    module._modules.update(children)
    module.__dict__.update(record["tensors"])
    module.training = record["training"]
    return module


def _graph(record: dict[str, Any]) -> fx.Graph:
    graph = fx.Graph()
    if record["pytree_info"] is not None:
        graph.set_codegen(fx.graph._PyTreeCodeGen(record["pytree_info"]))
    made: dict[str, fx.Node] = {}

    def resolve(value: Any) -> Any:
        return made[value.name] if isinstance(value, _Ref) else value

    for name, op, target, args, kwargs, type_, meta in record["nodes"]:
        args = fx.node.map_aggregate(args, resolve)
        kwargs = fx.node.map_aggregate(kwargs, resolve)
        node = graph.create_node(op, target, args, kwargs, name=name, type_expr=type_)
        if node.name != name:
            raise pickle.UnpicklingError(f"node {name!r} came back as {node.name!r}")
        val = meta.pop("val", None)
        node.meta.update(meta)
        if val is not None:
            shape, stride, dtype = val
            node.meta["val"] = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        made[name] = node
    return graph
