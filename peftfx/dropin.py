"""The compiled graph as a drop-in for the module it was captured from.

Libraries that hold a model (diffusers pipelines, transformers pipelines and Trainer) read its ``config``,
``dtype``, ``device`` and the like, and call it with every keyword of its signature at the default value
(``timestep_cond=None``, ``return_dict=False``, ...). A captured graph knows only the inputs of the example call.
``DropIn`` is that graph (a ``GraphModule``: passes, ``save_adapter``, ``swap_adapter``, exports and
``torch.compile`` take it as any other) plus:

- the model's attributes, read from a weightless copy of it: its instance attributes (config, generation
  config, ...), class attributes, properties and methods (bound to the graph); ``dtype`` and ``device`` are the
  graph's own tensors'.
- keyword normalisation: the caller's arguments are bound to the model's signature; a keyword the capture
  did not see is dropped when it is ``None`` or the default, and refused otherwise; a keyword it did see must
  equal the captured value where that value is not a tensor (``torch.export`` fixed it). ``return_dict=False``
  turns a captured model output into its tuple.
- a runtime LoRA scale: a model whose forward takes diffusers' LoRA scale from a keyword
  (``cross_attention_kwargs={"scale": s}``) gets it as the 0-d tensor input ``lora_scale`` of the graph, which
  multiplies every live LoRA's scaling, as PEFT's ``scale_layer`` does; a graph that cannot honour a scale (a
  merged adapter, another kind) refuses any but 1.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from .capture import Inputs, split_inputs
from .errors import PeftfxError
from .ir import SCALE_INPUT
from .rewrite import adopt

RETURN_DICT = "return_dict"


class _TensorLeaf:
    """Marks a tensor leaf of the captured call (any tensor may take its place); one object, copied or pickled."""

    def __reduce__(self) -> str:
        return "_TENSOR"

    def __deepcopy__(self, memo: dict[int, Any]) -> _TensorLeaf:
        return self


_TENSOR = _TensorLeaf()


@dataclass
class Origin:
    """What the graph keeps of the model it replaces: a weightless copy, its signature and the captured call."""

    shell: nn.Module
    parameters: list[str]  # the model's forward parameters that take one value each, in order
    positional: int  # how many of them can be passed by position
    defaults: dict[str, Any]
    var_keyword: bool  # the forward takes **kwargs
    captured: dict[str, Any]  # the example call by name; tensor leaves replaced by a marker
    by_position: list[str]  # the names the example passed by position (the graph is called the same way)
    scale_keyword: str | None  # the keyword diffusers reads the LoRA scale from
    scale_refusal: str | None = None  # why a scale other than 1 cannot be honoured
    graph_inputs: dict[str, bool] = field(default_factory=dict)  # the graph's inputs: whether each is required


class DropIn(fx.GraphModule):
    """A GraphModule that stands in for its model: its attributes, its keywords, its LoRA scale."""

    _origin: Origin

    @property
    def dtype(self) -> torch.dtype:
        return next((t.dtype for t in self._tensors() if t.is_floating_point()), torch.get_default_dtype())

    @property
    def device(self) -> torch.device:
        return next((t.device for t in self._tensors()), torch.device("cpu"))

    def _tensors(self) -> Any:
        yield from self.parameters()
        yield from self.buffers()

    def recompile(self) -> Any:
        code = super().recompile()
        if "_origin" in self.__dict__:
            self._origin.graph_inputs = _graph_inputs(self)
        return code

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            origin = self.__dict__.get("_origin")
            if origin is None or name.startswith("__"):
                raise
        return _delegate(self, origin.shell, name)

    def __deepcopy__(self, memo: dict[int, Any]) -> DropIn:
        res = super().__deepcopy__(memo)
        res._origin = copy.deepcopy(self._origin, memo)
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, args = super().__reduce__()
        return (_restore, (rebuild, args, self._origin))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        origin = self._origin
        graph_kwargs, return_dict, scale = _normalise(origin, args, kwargs)
        if origin.scale_refusal is not None and scale is not None and not _is_one(scale):
            raise PeftfxError(
                f"{origin.scale_keyword}: scale {_show(scale)} cannot be honoured by this graph: {origin.scale_refusal}"
            )
        if SCALE_INPUT in origin.graph_inputs and SCALE_INPUT not in graph_kwargs:
            graph_kwargs[SCALE_INPUT] = scale if isinstance(scale, torch.Tensor) else torch.tensor(_float(scale))
        args = [graph_kwargs.pop(name) for name in origin.by_position if name in graph_kwargs]
        out = super().__call__(*args, **graph_kwargs)
        if return_dict is False and hasattr(out, "to_tuple"):
            return out.to_tuple()
        if return_dict is True and isinstance(out, tuple):
            raise PeftfxError(
                "return_dict=True: the graph was captured with return_dict=False and returns a tuple; capture "
                "without it to get the model's output class"
            )
        return out


def as_dropin(
    gm: fx.GraphModule, model: nn.Module, example_inputs: Inputs | None, scale_refusal: str | None = None
) -> DropIn:
    """``gm`` (captured from ``model`` with ``example_inputs``) as a drop-in for ``model``; ``gm`` is consumed.

    ``scale_refusal`` says why the graph cannot honour a LoRA scale other than 1 (merged or other adapters).
    """
    origin = _origin(model, example_inputs)
    origin.scale_refusal = scale_refusal
    out = DropIn(nn.Module(), fx.Graph(), type(model).__name__)
    adopt(out, gm)
    out.meta = gm.meta
    for name in ("_in_spec", "_out_spec", "range_constraints", "validate_inputs"):
        if name in gm.__dict__:
            setattr(out, name, gm.__dict__[name])
    out.train(gm.training)
    for hooks in _HOOKS:  # export's own, kept when the model takes modules as inputs
        getattr(out, hooks).update(getattr(gm, hooks))
    out._origin = origin
    out.graph = gm.graph  # its code, generated once
    return out


_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def lora_scale_keyword(model: nn.Module) -> str | None:
    """The keyword whose ``"scale"`` diffusers applies to the model's PEFT layers (its ``apply_lora_scale``).

    A forward diffusers decorated was defined after diffusers was imported: where it was not, there is none (and
    importing diffusers, half a second, is not paid by compiles of other models)."""
    peft_utils = sys.modules.get("diffusers.utils.peft_utils")
    apply_lora_scale = getattr(peft_utils, "apply_lora_scale", None)
    if apply_lora_scale is None:
        return None
    forward = getattr(type(model), "forward", None)
    code = getattr(forward, "__code__", None)
    if code is None or code is not apply_lora_scale("")(_probe).__code__ or forward.__closure__ is None:
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in forward.__closure__), strict=True))
    return cells.get("kwargs_name")


def _probe(self: Any) -> None:
    """Decorated by diffusers' ``apply_lora_scale`` only to compare its wrapper's code with a model's forward."""


def _origin(model: nn.Module, example_inputs: Inputs | None) -> Origin:
    signature = inspect.signature(model.forward)
    parameters, positional, defaults, var_keyword = [], 0, {}, False
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_keyword = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        parameters.append(p.name)
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
        if p.default is not p.empty:
            defaults[p.name] = p.default
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        defaults["use_cache"] = False  # capture traces transformers models without their cache
    captured: dict[str, Any] = {}
    by_position: list[str] = []
    if example_inputs is not None:
        args, kwargs = split_inputs(example_inputs)
        by_position = parameters[: len(args)]
        captured = {**dict(zip(parameters, args, strict=False)), **kwargs}
        keyword = lora_scale_keyword(model)
        if isinstance(captured.get(keyword), Mapping):  # the scale is an input of the graph, not a constant
            captured[keyword] = {k: v for k, v in captured[keyword].items() if k != "scale"} or None
        captured = {name: _markers(value) for name, value in captured.items()}
    return Origin(
        _shell(model), parameters, positional, defaults, var_keyword, captured, by_position, lora_scale_keyword(model)
    )


def _markers(value: Any) -> Any:
    leaves, spec = tree_flatten(value)
    return spec, [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]


def _shell(model: nn.Module) -> nn.Module:
    """An instance of the model's class with its non-tensor state (deep-copied) and no parameters, buffers,
    submodules or hooks: what its properties and class attributes need, without its weights."""
    shell = type(model).__new__(type(model))
    nn.Module.__init__(shell)
    for key, value in model.__dict__.items():
        if key in shell.__dict__ or isinstance(value, torch.Tensor | nn.Module):
            continue
        try:
            shell.__dict__[key] = copy.deepcopy(value)
        except Exception:  # an object that cannot be copied (a lock, a handle): shared, as the model shares it
            shell.__dict__[key] = value
    shell.training = model.training
    return shell


def _delegate(gm: DropIn, shell: nn.Module, name: str) -> Any:
    try:
        static = inspect.getattr_static(shell, name)
    except AttributeError:
        raise AttributeError(f"{type(shell).__name__} graph has no attribute {name!r}") from None
    if inspect.isfunction(static):  # a method: bound to the graph, whose tensors and call it has
        return static.__get__(gm, type(gm))
    return getattr(shell, name)


def _graph_inputs(gm: fx.GraphModule) -> dict[str, bool]:
    return {p.name: p.default is p.empty for p in inspect.signature(gm.forward).parameters.values()}


def _normalise(origin: Origin, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """The graph's keyword arguments for a call of the model, the ``return_dict`` asked for and the LoRA scale."""
    if len(args) > origin.positional:
        raise PeftfxError(f"the model takes {origin.positional} positional arguments, got {len(args)}")
    bound = dict(zip(origin.parameters, args, strict=False))
    for name, value in kwargs.items():
        if name in bound:
            raise PeftfxError(f"argument {name!r} given twice (by position and keyword)")
        if not origin.var_keyword and name not in origin.parameters and name not in origin.graph_inputs:
            raise PeftfxError(f"the model takes no argument {name!r} (it takes {', '.join(origin.parameters)})")
        bound[name] = value
    return_dict = bound.pop(RETURN_DICT, None)  # the graph gets the captured value; its output is converted
    scale = None
    if origin.scale_keyword is not None and isinstance(bound.get(origin.scale_keyword), Mapping):
        options = dict(bound[origin.scale_keyword])
        scale = options.pop("scale", None)
        bound[origin.scale_keyword] = options or None
    graph: dict[str, Any] = {}
    for name, value in bound.items():
        if name in origin.captured:
            _check_captured(name, value, origin.captured[name])
            graph[name] = value
        elif name in origin.graph_inputs:  # an input a pass added (adapter_index)
            graph[name] = value
        elif value is not None and not _is_default(origin, name, value):
            raise PeftfxError(
                f"argument {name!r} ({_show(value)}) was not in the captured call, so the graph cannot take it; "
                f"capture with it in example_inputs (captured: {', '.join(origin.captured) or 'nothing'})"
            )
    for name in origin.captured:
        if name not in graph and name in origin.graph_inputs:
            spec, leaves = origin.captured[name]
            if _TENSOR in leaves:
                raise PeftfxError(f"argument {name!r} was a tensor in the captured call; the graph needs it")
            graph[name] = spec.unflatten(leaves)
    for name, required in origin.graph_inputs.items():
        if required and name not in graph and name != SCALE_INPUT:
            raise PeftfxError(f"the graph needs input {name!r} (the model's call lacks it)")
    return graph, return_dict, scale


def _check_captured(name: str, value: Any, captured: tuple[Any, list[Any]]) -> None:
    spec, leaves = captured
    if isinstance(value, torch.Tensor) and spec.is_leaf() and leaves[0] is _TENSOR:
        return  # the common case, without a flatten per call
    mine, my_spec = tree_flatten(value)
    same = my_spec == spec and all(
        (c is _TENSOR) == isinstance(v, torch.Tensor) and (c is _TENSOR or _equal(c, v))
        for c, v in zip(leaves, mine, strict=True)
    )
    if not same:
        shown = _show(spec.unflatten(["<tensor>" if c is _TENSOR else c for c in leaves]))
        if shown == _show(value):
            shown += " (another object)"
        raise PeftfxError(
            f"argument {name!r} is {_show(value)}, but the graph was captured with {shown}; capture with this value"
        )


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return a is b


def _is_default(origin: Origin, name: str, value: Any) -> bool:
    """The signature's default or, for options transformers reads from the config when not given, the config's."""
    if name in origin.defaults:
        return _equal(origin.defaults[name], value)
    config = getattr(origin.shell, "config", None)
    return name not in origin.parameters and hasattr(config, name) and _equal(getattr(config, name), value)


def _float(scale: Any) -> float:
    return 1.0 if scale is None else float(scale)


def _is_one(scale: Any) -> bool:
    return bool(scale == 1) if not isinstance(scale, torch.Tensor) else bool((scale == 1).all())


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _restore(rebuild: Any, args: tuple[Any, ...], origin: Origin) -> DropIn:
    gm = rebuild(*args)
    out = DropIn(gm, gm.graph, gm.__class__.__name__)
    out.meta = gm.meta
    out._origin = origin
    origin.graph_inputs = _graph_inputs(out)
    return out
