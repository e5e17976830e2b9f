"""Checks of a graph's own runtime inputs: a routed graph's ``adapter_index`` and the tensors fed to an ONNX file.

A compiled graph's inputs are user input as much as a spec is, and the failures they cause otherwise are silent:
an ``adapter_index`` of -2 or ``n`` picks the base model's zero row, one of length 1 is broadcast over the whole
batch. Each check lives where it costs next to nothing and survives the graph's journey:

- eagerly, ``routing_index`` checks ``adapter_index`` in Python (dtype, shape, values) and raises ``InputError``;
- under ``torch.compile`` and ``torch.export`` the dtype and shape checks become guards and ``torch._check``
  asserts on sizes, the values a ``torch._assert_async`` op: no graph break, and the routing stays an input;
- the ONNX exporter drops assert ops, so ``guard_onnx_index`` adds its own: each failed check is an out-of-range
  ``Gather`` whose node name is the message (onnxruntime quotes it when it refuses the index);
- an ONNX input's dtype is declared in the file, but onnxruntime's refusal does not name the input:
  ``check_onnx_inputs`` checks the feeds in Python first, naming the input and what it must be.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import InputError

INDEX = "adapter_index"


def routing_index(index: Any, adapters: Sequence[str], *inputs: Any) -> Any:
    """``index`` checked against the routing and the batch, with -1 (the base model) made row ``n`` of the stacks.

    The batch is dim 0 of the first tensor input with a dim (``inputs.batch_input``'s rule), here read from the
    graph's other inputs at run time.
    """
    if isinstance(index, torch.fx.Proxy):  # the graph traced again (symbolic_trace): the check stays one call
        return index.tracer.create_proxy("call_function", routing_index, (index, tuple(adapters), *inputs), {})
    n = len(adapters)
    allowed = f"-1 (the base model) or 0..{n - 1} (routing: {', '.join(adapters)})"
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.ndim != 1:
        got = f"{index.dtype} tensor of shape {list(index.shape)}" if isinstance(index, torch.Tensor) else repr(index)
        raise InputError(f"{INDEX}: expected an int64 tensor of shape [batch], one of {allowed} per sample; got {got}")
    batch = None
    for x in inputs:  # a loop, not a generator: torch.compile traces no generators
        if isinstance(x, torch.Tensor) and x.ndim:
            batch = x
            break
    compiling = torch.compiler.is_compiling() or isinstance(index, torch._subclasses.FakeTensor)
    if batch is not None:
        length = f"{INDEX}: one value per sample: expected length {batch.shape[0]} (the batch), got {index.shape[0]}"
        if compiling:
            torch._check(index.shape[0] == batch.shape[0], lambda: length)
        elif index.shape[0] != batch.shape[0]:
            raise InputError(length)
    if compiling:
        torch._assert_async(((index >= -1) & (index < n)).all(), f"{INDEX}: every value must be {allowed}")
    else:
        bad = index[(index < -1) | (index >= n)]
        if bad.numel():
            raise InputError(f"{INDEX}: every value must be {allowed}; got {sorted(set(bad.tolist()))}")
    return torch.where(index < 0, n, index)


def guard_onnx_index(graph: Any, adapters: Sequence[str], batch: str) -> None:
    """Make the ONNX graph (``onnx_ir``) refuse an ``adapter_index`` outside -1..n-1 or of another length than
    input ``batch``'s dim 0: every reader of the input reads it plus two zeros, each gathered at an index that is
    out of range (an onnxruntime error quoting the node's name, the message) when its check fails."""
    import onnx_ir as ir

    inputs = {v.name: v for v in graph.inputs}
    index, reference = inputs[INDEX], inputs[batch]
    readers = list(index.uses())
    tape = ir.tape.Tape()

    def const(value: Any) -> ir.Value:
        return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(value, dtype=np.int64))})

    def failure(failed: ir.Value, message: str) -> ir.Value:
        """0, gathered at index ``failed`` (0 or a count of failures) from a table of one zero."""
        return tape.op("Gather", [const([0]), failed], name=message)

    def count(flags: ir.Value) -> ir.Value:
        return tape.op("Cast", [tape.op("Not", [flags])], attributes={"to": ir.DataType.INT64})

    n = len(adapters)
    in_range = tape.op("And", [tape.op("GreaterOrEqual", [index, const(-1)]), tape.op("Less", [index, const(n)])])
    out_of_range = tape.op("ReduceSum", [count(in_range)], attributes={"keepdims": 0})
    allowed = f"-1 (the base model) or 0..{n - 1} (routing: {', '.join(adapters)})"
    values = failure(out_of_range, f"{INDEX}: every value must be {allowed}")
    dim0 = {"start": 0, "end": 1}
    same = tape.op(
        "Equal", [tape.op("Shape", [index], attributes=dim0), tape.op("Shape", [reference], attributes=dim0)]
    )
    length = failure(count(same), f"{INDEX}: one value per sample: its length must be dim 0 of {batch}")
    checked = tape.op("Add", [tape.op("Add", [index, values]), length])
    position = graph.node(0) if len(graph) else None
    if position is None:
        graph.extend(tape.nodes)
    else:
        graph.insert_before(position, tape.nodes)
    for node, i in readers:
        node.replace_input_with(i, checked)


def check_onnx_inputs(model: Any, feeds: Mapping[str, Any]) -> None:
    """Refuse ``feeds`` for the ONNX ``model`` (a file's path, its weights not read, or an ``onnxruntime``
    session) that onnxruntime would refuse without naming the input, or run with wrong results: a missing or unknown
    name, another dtype or rank, a fixed dim of another size, two sizes for one named dim (such as ``batch``)."""
    declared = _declared(model)
    for name in feeds:
        if name not in declared:
            raise InputError(f"{name}: not an input of this model (inputs: {', '.join(declared)})")
    sizes: dict[str, tuple[str, int]] = {}
    for name, (kind, dims) in declared.items():
        if name not in feeds:
            raise InputError(f"{name}: missing (the model's inputs: {', '.join(declared)})")
        value = np.asarray(feeds[name])
        expected = f"{kind} of shape {[d if d is not None else '?' for d in dims]}"
        if value.dtype != _numpy_dtype(kind) or value.ndim != len(dims):
            raise InputError(f"{name}: expected {expected}, got {value.dtype} of shape {list(value.shape)}")
        for dim, (size, got) in enumerate(zip(dims, value.shape, strict=True)):
            if isinstance(size, int) and size != got:
                raise InputError(f"{name}: expected {expected}, got shape {list(value.shape)} (dim {dim})")
            if isinstance(size, str):
                first, seen = sizes.setdefault(size, (name, got))
                if seen != got:
                    raise InputError(
                        f"{name}: dim {dim} is {size!r}, which is {seen} in {first}; got {got} (shape "
                        f"{list(value.shape)})"
                    )


def _declared(model: Any) -> dict[str, tuple[str, list[int | str | None]]]:
    """Each graph input's ONNX element type (``float``, ``int64``, ...) and dims (a size, a dim name or None)."""
    if hasattr(model, "get_inputs"):  # an onnxruntime session: types read ``tensor(float)``
        return {i.name: (i.type[len("tensor(") : -1], list(i.shape)) for i in model.get_inputs()}
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    out = {}
    for value in graph.input:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in tensor.shape.dim]
        out[value.name] = (onnx.TensorProto.DataType.Name(tensor.elem_type).lower(), dims)
    return out


def _numpy_dtype(kind: str) -> np.dtype:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, kind.upper())))
