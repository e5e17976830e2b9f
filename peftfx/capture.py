"""Capture a model to a GraphModule whose weight-owning ops are plain functional calls.

Two tracers, one result shape. ``torch.export`` (non-strict) handles transformers models and anything with
data-dependent Python; ``torch.fx.symbolic_trace`` keeps plain modules shape-generic and needs no inputs.
After symbolic tracing, the leaf modules that own weights (Linear, ConvNd, Embedding, LayerNorm,
transformers' Conv1D) are lowered to the same aten calls export produces, so the site normaliser and every
pass see one IR whichever tracer ran. The captured module never shares a Parameter object with the user's
model: weights are re-wrapped (same storage, no copy) and frozen, so training adapters in the graph cannot
touch the model, and passes replace tensors rather than write into them. The capture is the model as it ran;
the first pass (``passes/causal.py``) hands a causal mask computed from shapes alone back to SDPA.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from . import capture_cache
from .capture_hints import export_failure
from .errors import CaptureError
from .graph_file import code_pending, unlifted, with_code
from .ir import ModelHeads, set_heads
from .rewrite import get_attr
from .sites import MODULE_STACK

Inputs = tuple[Any, ...] | Mapping[str, Any]
Method = Literal["auto", "export", "symbolic_trace"]

aten = torch.ops.aten


TRACING = threading.RLock()
"""Held while tracing or exporting: torch.export's fake and proxy modes and fx's patches are process-wide, so two
traces at once corrupt each other (and could leave a model's parameters fake)."""


def capture(
    model: nn.Module,
    example_inputs: Inputs | None = None,
    *,
    method: Method = "auto",
    dynamic_shapes: Any = None,
    cache: bool | None = None,
) -> fx.GraphModule:
    """Trace ``model`` without mutating it. ``auto`` exports transformers models and traces the rest.

    ``dynamic_shapes`` goes to ``torch.export``; ``"auto"`` lets every dim of every tensor input vary. The trace
    runs on a copy of the module tree (``isolated``), one at a time, so other threads may call the model meanwhile.
    An earlier ``torch.export`` of the same model code, structure and inputs is reused from the capture cache
    (``capture_cache``); ``cache=False`` (or ``$PEFTFX_CACHE=0``) always exports.
    """
    return with_code(capture_graph(model, example_inputs, method=method, dynamic_shapes=dynamic_shapes, cache=cache))


def capture_graph(
    model: nn.Module,
    example_inputs: Inputs | None = None,
    *,
    method: Method = "auto",
    dynamic_shapes: Any = None,
    cache: bool | None = None,
) -> fx.GraphModule:
    """``capture``, but a graph read from the capture cache may come without its Python code yet: for a caller
    that rewrites the graph first and then generates its code once (``recompile``), as ``compile`` does."""
    if example_inputs is not None and not isinstance(example_inputs, tuple | list | Mapping | torch.Tensor):
        raise CaptureError(
            "example_inputs must be a tuple of positional arguments, a dict of keyword arguments or a tensor, "
            f"not {type(example_inputs).__name__}"
        )
    with TRACING:
        return _capture(isolated(model), example_inputs, method, dynamic_shapes, cache)


def isolated(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree sharing its tensors and attribute values but none of its attribute
    tables: a trace swaps parameters for fake ones and flips flags (``config.use_cache``) on the copy alone."""
    config = getattr(model, "config", None)
    config_copy = copy.copy(config) if config is not None else None
    copies: dict[int, nn.Module] = {}

    def copy_of(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            clone = copies[id(module)] = object.__new__(type(module))  # no class-specific __copy__ (GraphModule)
            state = {k: config_copy if v is config and v is not None else v for k, v in vars(module).items()}
            state["_parameters"], state["_buffers"] = dict(module._parameters), dict(module._buffers)
            state["_modules"] = {k: None if m is None else copy_of(m) for k, m in module._modules.items()}
            clone.__dict__ = state
        return copies[id(module)]

    return copy_of(model)


def _capture(
    model: nn.Module, example_inputs: Inputs | None, method: Method, dynamic_shapes: Any, cache: bool | None
) -> fx.GraphModule:
    name = type(model).__name__
    trace_error: Exception | None = None
    if method == "symbolic_trace" or (method == "auto" and not _is_transformers_model(model)):
        try:
            return _finish(_symbolic_trace(model), model)
        except Exception as error:
            if method == "symbolic_trace" or example_inputs is None:
                hint = "; pass example_inputs so peftfx can capture it with torch.export" if method == "auto" else ""
                raise CaptureError(f"torch.fx.symbolic_trace cannot trace {name}: {error}{hint}") from error
            trace_error = error
    if example_inputs is None:
        raise CaptureError(f"capturing {name} with torch.export needs example_inputs")
    return _finish(_export(model, example_inputs, dynamic_shapes, cache, trace_error), model)


def split_inputs(example_inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def _is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__[1:])


@contextlib.contextmanager
def _cache_off(model: nn.Module) -> Iterator[None]:
    """transformers decoders return a DynamicCache by default, which export rejects; trace without it."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _export(
    model: nn.Module,
    example_inputs: Inputs,
    dynamic_shapes: Any,
    cache: bool | None = None,
    trace_error: Exception | None = None,
) -> fx.GraphModule:
    args, kwargs = split_inputs(example_inputs)
    if dynamic_shapes == "auto":
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
        dynamic_shapes = {name: tree_map(_all_dims_auto, value) for name, value in bound.items()}

    def export() -> fx.GraphModule:
        with _lazy_code():
            try:
                with _cache_off(model), _no_stack_traces():
                    program = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
            except Exception as error:
                message = export_failure(type(model).__name__, error, dynamic_shapes is not None, trace_error)
                raise CaptureError(message) from error
            gm = unlifted(program)
        _trim_call_overhead(gm, has_module_inputs=any(isinstance(x, nn.Module) for x in tree_leaves((args, kwargs))))
        return code_pending(gm)

    return capture_cache.captured(model, args, kwargs, dynamic_shapes, export, cache=cache)


def _lazy_code() -> contextlib.AbstractContextManager[None]:
    """torch.export and its unlifting regenerate the Python code of the graphs they build after every step (a
    dozen times, 0.03 s each for a 16-layer Llama); fx's lazy graph modules, which torch.compile uses, generate it
    once, when it is needed. A private switch: without it, the code is generated each time as before."""
    try:
        from torch.fx._lazy_graph_module import _use_lazy_graph_module
    except ImportError:
        return contextlib.nullcontext()
    return _use_lazy_graph_module(True)


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Recording a Python stack per traced op is a tenth of an export's time, and nothing here reads it."""
    config = torch.fx.config
    if not hasattr(config, "do_not_emit_stack_traces"):
        yield
        return
    before, config.do_not_emit_stack_traces = config.do_not_emit_stack_traces, True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def _trim_call_overhead(gm: fx.GraphModule, *, has_module_inputs: bool) -> None:
    """Drop what ``ep.module()`` checks on every call beyond what the model itself would.

    Its dtype asserts (one per ``.to``) re-check what the trace fixed, and its hooks re-flatten the inputs to
    match their structure (``forward``'s signature and the shape guards, which stay, check what matters) and
    toggle nn.Module inputs, when there are any. Together they made a call of a tiny model a quarter slower.
    The graph is left to recompile.
    """
    for node in gm.graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default):
        gm.graph.erase_node(node)
    if not has_module_inputs:
        gm._forward_pre_hooks.clear()
        gm._forward_hooks.clear()
        gm._forward_hooks_always_called.clear()


def _all_dims_auto(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {dim: torch.export.Dim.AUTO for dim in range(value.ndim)}
    return None


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    _lower_leaf_modules(model, graph)
    # Rebuild the module tree from what the graph uses, so no module object is shared with the model.
    owned: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            owned[node.target] = get_attr(model, node.target)
        elif node.op == "call_module":
            owned[node.target] = copy.deepcopy(model.get_submodule(node.target))
    return fx.GraphModule(owned, graph, type(model).__name__).train(model.training)


class _LeafTracer(fx.Tracer):
    """Keeps transformers' Conv1D a leaf so it can be lowered like an nn.Linear.

    fx patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process while it traces: a module called
    from another thread meanwhile runs as it would without the patch, not into this trace.
    """

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__name__ == "Conv1D" or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _lower_leaf_modules(model: nn.Module, graph: fx.Graph) -> None:
    """Replace weight-owning call_module nodes with the aten call export would produce."""
    for node in list(graph.nodes):
        if node.op != "call_module" or node.kwargs or len(node.args) != 1:
            continue
        module = model.get_submodule(node.target)
        lowering = _LOWERINGS.get(type(module).__name__)
        if lowering is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        with graph.inserting_before(node):
            lowered = lowering(graph, module, node.args[0], _AttrGetter(graph, node.target))
        if lowered is None:
            continue
        site, output = lowered
        site.meta[MODULE_STACK] = {node.target: (node.target, _qualified_class(module))}
        node.replace_all_uses_with(output)
        graph.erase_node(node)
    graph.lint()


class _AttrGetter:
    def __init__(self, graph: fx.Graph, owner: str) -> None:
        self.graph, self.owner = graph, owner

    def __call__(self, name: str) -> fx.Node:
        return self.graph.get_attr(f"{self.owner}.{name}")


def _qualified_class(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


Lowered = tuple[fx.Node, fx.Node] | None


def _lower_linear(graph: fx.Graph, m: nn.Linear, x: fx.Node, param: Any) -> Lowered:
    bias = param("bias") if m.bias is not None else None
    site = graph.call_function(aten.linear.default, (x, param("weight"), bias))
    return site, site


def _lower_conv1d_transformers(graph: fx.Graph, m: nn.Module, x: fx.Node, param: Any) -> Lowered:
    """transformers' Conv1D is ``addmm(b, x2d, W)`` with ``W`` stored [in, out]; export lowers it the same way."""
    lead = graph.call_function(operator.getitem, (graph.call_function(getattr, (x, "shape")), slice(None, -1)))
    flat = graph.call_method("flatten", (x, 0, -2))
    site = graph.call_function(aten.addmm.default, (param("bias"), flat, param("weight")))
    return site, graph.call_method("unflatten", (site, 0, lead))


def _lower_conv(graph: fx.Graph, m: nn.Module, x: fx.Node, param: Any) -> Lowered:
    padding: Any = m.padding if isinstance(m.padding, str) else list(m.padding)
    if m.padding_mode != "zeros":
        x = graph.call_function(F.pad, (x, m._reversed_padding_repeated_twice), {"mode": m.padding_mode})
        padding = [0] * len(m.kernel_size)
    op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[len(m.kernel_size)]
    overload = op.padding if isinstance(padding, str) else op.default
    bias = param("bias") if m.bias is not None else None
    site = graph.call_function(
        overload, (x, param("weight"), bias, list(m.stride), padding, list(m.dilation), m.groups)
    )
    return site, site


def _lower_embedding(graph: fx.Graph, m: nn.Embedding, x: fx.Node, param: Any) -> Lowered:
    if m.max_norm is not None:
        return None  # renormalises its weight in place on every call: not a pure op
    padding_idx = -1 if m.padding_idx is None else m.padding_idx
    site = graph.call_function(aten.embedding.default, (param("weight"), x, padding_idx, m.scale_grad_by_freq))
    return site, site


def _lower_layer_norm(graph: fx.Graph, m: nn.LayerNorm, x: fx.Node, param: Any) -> Lowered:
    bias = param("bias") if m.bias is not None else None
    site = graph.call_function(aten.layer_norm.default, (x, list(m.normalized_shape), param("weight"), bias, m.eps))
    return site, site


def _lower_rms_norm(graph: fx.Graph, m: nn.RMSNorm, x: fx.Node, param: Any) -> Lowered:
    site = graph.call_function(aten.rms_norm.default, (x, list(m.normalized_shape), param("weight"), m.eps))
    return site, site


_LOWERINGS = {
    "Linear": _lower_linear,
    "Conv1D": _lower_conv1d_transformers,
    "Conv1d": _lower_conv,
    "Conv2d": _lower_conv,
    "Conv3d": _lower_conv,
    "Embedding": _lower_embedding,
    "LayerNorm": _lower_layer_norm,
    "RMSNorm": _lower_rms_norm,
}


def _finish(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Detach the capture from the model's tensors: parameters are re-wrapped (storage shared, frozen),
    buffers copied (a graph may update them, e.g. batch-norm statistics). Aliases stay aliases."""
    fresh: dict[int, torch.Tensor] = {}
    for module in gm.modules():
        for slots, remake in ((module._parameters, _frozen), (module._buffers, torch.Tensor.clone)):
            for name, tensor in slots.items():
                if tensor is not None:
                    slots[name] = fresh.setdefault(id(tensor), remake(tensor))
    output_embeddings = _path_of(model, getattr(model, "get_output_embeddings", lambda: None)())
    classifier = next((n for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)), None)
    set_heads(gm, ModelHeads(output_embeddings, classifier))
    for name, module in model.named_modules():  # fused MoE experts stored [experts, in, out], as PEFT reads it
        if getattr(module, "is_transposed", False) is True and _has_module(gm, name):
            gm.get_submodule(name).is_transposed = True
    return gm


def _has_module(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach(), requires_grad=False)


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)
