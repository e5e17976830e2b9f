"""ONNX export of a peftfx graph: checked, named, reproducible and written atomically.

The graph goes through ``torch.onnx.export(dynamo=True)``. Adapters declared ``as_inputs`` become graph inputs
rather than initializers (the exporter renames initializers, and onnxruntime ignores initializer overrides
once it optimises): the graph is exported through a wrapper whose forward takes their tensors and calls the
graph with ``torch.func.functional_call``, so no graph surgery is needed. ONNX input names are stable: the
model's own input names (keyword names; ``input_<i>`` for the i-th positional input), then one
input per adapter tensor named as its attribute in the graph, ``peftfx.<adapter>.<module>.<role>``. With
``max_rank`` those inputs have fixed shapes whatever adapter is fed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from .atomic import check_destination, replaced_file
from .capture import TRACING, Inputs, split_inputs
from .errors import CaptureError, SpecError
from .guard import guard_onnx_index
from .inputs import batch_input, with_index
from .ir import adapters, kv_cache, records, routing
from .kv_cache import CACHE, SEQUENCE_AXES, onnx_names
from .rewrite import get_attr

Dynamic = bool | Mapping[str, Mapping[int, str]]


def adapter_inputs(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors ``export_onnx`` makes graph inputs, by input name: feed these to serve the graph's adapters."""
    info = adapters(gm)
    out: dict[str, torch.Tensor] = {}
    for record in records(gm):
        if info[record.adapter].as_inputs:
            for target in record.tensors.values():
                out.setdefault(target, get_attr(gm, target).detach())
    return out


def dynamic_shapes(example_inputs: Inputs, dynamic: Dynamic = True) -> dict[str, Any] | tuple[Any, ...]:
    """``torch.export`` dynamic shapes for ``example_inputs``, for ``peftfx.compile(dynamic_shapes=...)``.

    ``dynamic=True`` lets dim 0 of every tensor input vary (``batch``) and dim 1 of integer inputs of two or
    more dims (token ids, masks: ``sequence``); a mapping ``{input name: {dim: name}}`` says exactly which. A
    graph exported with dynamic dims must have been captured with the same ones.
    """
    names, values = _named(example_inputs)
    axes = _axes(names, values, dynamic)
    for name, dims_of in axes.items():
        for i in dims_of:
            size = values[names.index(name)].shape[i]
            if size < 2:
                raise SpecError(
                    f"dynamic.{name}: dim {i} has size {size} in the example inputs, and torch.export fixes dims of "
                    "size 0 or 1; give an example of size 2 or more there"
                )
    dims: dict[str, Dim] = {}
    specs = [{i: dims.setdefault(d, Dim(d)) for i, d in axes.get(name, {}).items()} or None for name in names]
    if isinstance(example_inputs, Mapping):
        return dict(zip(names, specs, strict=True))
    return tuple(specs)


def export_onnx(
    gm: fx.GraphModule,
    example_inputs: Inputs,
    path: str | Path,
    *,
    dynamic: Dynamic = False,
    external_data: bool | None = None,
) -> Path:
    """Export ``gm`` to the ONNX file ``path`` (written atomically) and return the path.

    ``external_data=True`` writes the weights to one file beside the graph, ``<name>.<digest>.data`` (ONNX's
    external data format), which the graph names; ``None`` does so when they would take the file past protobuf's
    2 GiB limit. The graph file appears only once its data file is whole, and a failure removes a data file it
    wrote; data files of an earlier export to ``path`` are removed once the new graph is in place.

    The model is checked with ``onnx.checker``; the same spec and model give byte-identical files, in any process
    or checkout (the exporter's per-node stack traces are dropped). ``dynamic`` is as for ``dynamic_shapes``; a
    dim asked dynamic that the capture fixed raises ``CaptureError``. The graph is exported in eval mode (no
    dropout), whatever its modules' modes, which are left as they were. A routed graph's file takes
    ``adapter_index`` after the model's inputs; ``example_inputs`` need not hold it, and its dim 0 is dynamic
    where the batch is (unless ``dynamic`` names it).
    """
    import onnx

    check_destination(path, "file", "export_onnx")
    args, kwargs = with_index(gm, example_inputs)
    kwargs, nested = _flatten_sequences(kwargs)
    if dynamic is False and kv_cache(gm) is not None:
        dynamic = dict(SEQUENCE_AXES)  # one file for the prompt and every step
    names, values = [f"input_{i}" for i in range(len(args))] + list(kwargs), [*args, *kwargs.values()]
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, torch.Tensor):
            raise SpecError(f"export_onnx: input {name!r} is a {type(value).__name__}; ONNX inputs are tensors")
    feeds = adapter_inputs(gm)
    module = _Flat(gm, len(args), list(kwargs), list(feeds), nested)
    axes = _routed_batch(gm, example_inputs, _axes(names, values, dynamic))
    shapes = None
    if axes:
        flat = dynamic_shapes(dict(zip(names, values, strict=True)), axes)
        shapes = ((*flat.values(), *[None] * len(feeds)),)
    with _eval_mode(module), TRACING:
        program = torch.onnx.export(
            module, (*values, *feeds.values()), dynamic_shapes=shapes, dynamo=True, verbose=False
        )
    graph_inputs = list(program.model.graph.inputs)
    if len(graph_inputs) != len(names) + len(feeds):
        raise RuntimeError(f"export_onnx: the exporter gave {len(graph_inputs)} inputs for {len(names) + len(feeds)}")
    renamed, outputs = _cache_names(gm, nested)
    for value, name in zip(graph_inputs, [*names, *feeds], strict=True):
        value.name = renamed.get(name, name)
    for value, name in zip(program.model.graph.outputs, outputs, strict=False):
        value.name = name
    for name, dims in axes.items():
        shape = program.model.graph.inputs[names.index(name)].shape
        for i in dims:
            if isinstance(shape[i], int):
                raise CaptureError(
                    f"export_onnx: dim {i} of input {name!r} was captured static ({shape[i]}); compile with "
                    "dynamic_shapes=peftfx.dynamic_shapes(example_inputs, dynamic) to export it dynamic"
                )
    routed = routing(gm)
    if routed is not None:
        key = batch_input(example_inputs)
        guard_onnx_index(program.model.graph, routed.adapters, f"input_{key}" if isinstance(key, int) else key)
    _drop_stack_traces(program.model)
    path = Path(path)
    if external_data or (external_data is None and _weight_bytes(program.model) > _PROTOBUF_LIMIT - _GRAPH_ROOM):
        _write_with_external_data(program.model, path)
    else:
        proto = program.model_proto
        onnx.checker.check_model(proto, full_check=True)
        with replaced_file(path) as tmp:
            tmp.write_bytes(proto.SerializeToString())
        _remove_stale_data(path, keep=None)
    return path


_PROTOBUF_LIMIT = 2**31  # protobuf cannot serialize a message of 2 GiB or more
_GRAPH_ROOM = 2**27  # beside the weights, the graph's own bytes (nodes, names, small constants): generously


def _weight_bytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _write_with_external_data(model: Any, path: Path) -> None:
    """The graph and its weights' file, each written whole in a folder beside ``path`` and then moved into place:
    the data file first, so the graph never names a missing or partial one. The data file is named by a digest of
    the weights, so the bytes are the same for the same weights, and an old graph never reads new data."""
    import onnx
    import onnx_ir as ir

    digest = hashlib.sha256()
    for name, value in model.graph.initializers.items():
        digest.update(name.encode())
        if value.const_value is not None:
            digest.update(value.const_value.tobytes())
    data = f"{path.name}.{digest.hexdigest()[:16]}.data"
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        ir.save(model, staging / path.name, external_data=data)
        onnx.checker.check_model(str(staging / path.name), full_check=True)
        target = path.parent / data
        existed = target.exists()
        with replaced_file(target) as tmp:
            os.replace(staging / data, tmp)
        try:
            with replaced_file(path) as tmp:
                os.replace(staging / path.name, tmp)
        except BaseException:
            if not existed:
                target.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_stale_data(path, keep=data)


def _remove_stale_data(path: Path, keep: str | None) -> None:
    """Data files an earlier export to ``path`` wrote (``<name>.<16 hex digits>.data``), other than ``keep``."""
    pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{16}\.data")
    for file in path.parent.iterdir():
        if file.name != keep and pattern.fullmatch(file.name):
            file.unlink(missing_ok=True)


def _flatten_sequences(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """Keyword inputs that are tuples of tensors (a KV cache) as one input per tensor, ``<name>.<i>``."""
    flat: dict[str, Any] = {}
    nested: dict[str, int] = {}
    for name, value in kwargs.items():
        if isinstance(value, tuple | list) and value and all(isinstance(v, torch.Tensor) for v in value):
            nested[name] = len(value)
            flat.update({f"{name}.{i}": v for i, v in enumerate(value)})
        else:
            flat[name] = value
    return flat, nested


def _cache_names(gm: fx.GraphModule, nested: Mapping[str, int]) -> tuple[dict[str, str], list[str]]:
    """A KV-cache graph's inputs and outputs under Optimum's names (``kv_cache``); no renaming for other graphs."""
    if kv_cache(gm) is None or CACHE not in nested:
        return {}, []
    past, present = onnx_names(nested[CACHE])
    return {f"{CACHE}.{i}": name for i, name in enumerate(past)}, ["logits", *present]


class _Flat(nn.Module):
    """``gm`` called with its inputs and the adapter tensors as one flat list of tensors."""

    def __init__(
        self,
        gm: fx.GraphModule,
        n_args: int,
        kwargs: Sequence[str],
        tensors: Sequence[str],
        nested: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.gm, self.n_args, self.kwargs, self.tensors = gm, n_args, list(kwargs), list(tensors)
        self.nested = dict(nested or {})

    def forward(self, *flat: torch.Tensor) -> Any:
        n, k = self.n_args, len(self.kwargs)
        kwargs = dict(zip(self.kwargs, flat[n : n + k], strict=True))
        for name, count in self.nested.items():
            kwargs[name] = tuple(kwargs.pop(f"{name}.{i}") for i in range(count))
        tensors = dict(zip(self.tensors, flat[n + k :], strict=True))
        return torch.func.functional_call(self.gm, tensors, flat[:n], kwargs)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every module of ``module`` in eval mode for the export, each one's mode restored after.

    A served model is an eval model. A graph from ``symbolic_trace`` still calls its dropout (and batch norm)
    modules, which would export as their training ops (measured: an ONNX ``Dropout`` zeroing outputs at random);
    a ``torch.export`` graph has them fixed already, but the exporter warns of training mode all the same.
    ``training`` is set directly: an exported program's module refuses ``train()`` and ``eval()``.
    """
    modes = {m: m.training for m in module.modules()}
    try:
        for m in modes:
            m.training = False
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _named(example_inputs: Inputs) -> tuple[list[str], list[Any]]:
    args, kwargs = split_inputs(example_inputs)
    return [f"input_{i}" for i in range(len(args))] + list(kwargs), [*args, *kwargs.values()]


def _axes(names: list[str], values: list[Any], dynamic: Dynamic) -> dict[str, dict[int, str]]:
    if dynamic is False:
        return {}
    if dynamic is True:
        axes = {}
        for name, value in zip(names, values, strict=True):
            if isinstance(value, torch.Tensor) and value.ndim >= 1:
                axes[name] = {0: "batch"}
                if value.ndim >= 2 and not value.is_floating_point():
                    axes[name][1] = "sequence"
        return axes
    for name, dims in dynamic.items():
        if name not in names:
            raise SpecError(f"dynamic: no input named {name!r} (inputs: {', '.join(names)})")
        value = values[names.index(name)]
        for i in dims:
            if not isinstance(value, torch.Tensor) or not 0 <= i < value.ndim:
                raise SpecError(f"dynamic.{name}: input {name!r} has no dim {i}")
    return {name: dict(dims) for name, dims in dynamic.items()}


def _routed_batch(gm: fx.GraphModule, inputs: Inputs, axes: dict[str, dict[int, str]]) -> dict[str, dict[int, str]]:
    """``axes`` with a routed graph's ``adapter_index`` sharing the batch dim, when a mapping left it unnamed."""
    routed = routing(gm)
    if routed is None or routed.input in axes:
        return axes
    key = batch_input(inputs)
    batch = axes.get(f"input_{key}" if isinstance(key, int) else key, {}).get(0)
    return axes if batch is None else {**axes, routed.input: {0: batch}}


def _drop_stack_traces(model: Any) -> None:
    """The exporter records each node's Python stack trace: absolute paths and a per-process counter of generated
    code (``<eval_with_key>.N``), so the same graph would give different bytes in another process or checkout."""
    for graph in (model.graph, *model.functions.values()):
        for node in graph.all_nodes():
            node.metadata_props.pop(_STACK_TRACE, None)


_STACK_TRACE = "pkg.torch.onnx.stack_trace"
