"""The site table: one entry per weight-owning op, the unit every selector and adapter works on.

A site is found from the op alone (aten call, functional call) plus ``nn_module_stack`` metadata, so the
same spec selects the same sites whichever tracer captured the model. A linear is recognised by what it
computes: ``aten.linear``, transformers' ``Conv1D`` addmm, and a matmul or mm of an input by a transposed
weight (``x @ W.T``, as Falcon's ``FalconLinear``).

Every parameter is also a site (op ``parameter``): the parameter as the graph reads it, wherever it is read
(an MoE's 3-D expert stack, a weight used by code that is no op peftfx knows). An adapter there rewrites the
parameter before its uses, as PEFT's ``target_parameters`` do. Selectors see parameter sites only when they
ask for them (``op: parameter`` or ``param:``), so a module selector never also picks its module's weights.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .rewrite import TAG, get_attr

aten = torch.ops.aten

PARAMETER = "parameter"  # the op name of parameter sites
MODULE_STACK = "nn_module_stack"  # the node meta torch.export fills with the modules a node ran in
_CLASSES = "peftfx.module_classes"  # gm.meta key of this module's cache: module path -> class name
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class OpSignature:
    """Where an op keeps its operands: positions of input, weight and bias, and its site kind."""

    kind: str
    input: int
    weight: int
    bias: int | None
    transposed: bool = False


_CONV_KINDS = {1: "conv1d", 2: "conv2d", 3: "conv3d"}

SIGNATURES: dict[Any, OpSignature] = {
    aten.linear.default: OpSignature("linear", 0, 1, 2),
    F.linear: OpSignature("linear", 0, 1, 2),
    aten.addmm.default: OpSignature("linear", 1, 2, 0, transposed=True),
    aten.embedding.default: OpSignature("embedding", 1, 0, None),
    aten.layer_norm.default: OpSignature("layer_norm", 0, 2, 3),
    F.layer_norm: OpSignature("layer_norm", 0, 2, 3),
    aten.rms_norm.default: OpSignature("rms_norm", 0, 2, None),
    F.rms_norm: OpSignature("rms_norm", 0, 2, None),
}
for _n, _kind in _CONV_KINDS.items():
    for _op in (getattr(aten, f"conv{_n}d").default, getattr(aten, f"conv{_n}d").padding, getattr(F, f"conv{_n}d")):
        SIGNATURES[_op] = OpSignature(_kind, 0, 1, 2)

# torch's RMSNorm is one op (above); Llama-style ones have none: they end in ``weight * normalized``, and that product
# is their site, whose input is the already normalized activation. Only such a product inside an ``*RMSNorm`` counts.
_RMS_NORM = OpSignature("rms_norm", 1, 0, None)
_MULS = frozenset({aten.mul.Tensor, operator.mul, torch.mul})


# ``x @ W.T`` (matmul or mm of the input by a transposed 2-D weight) computes what ``F.linear(x, W)`` does, and
# ``addmm(b, x, W.T)`` what ``F.linear(x, W, b)`` does (a decomposed nn.Linear).
_MATMULS = frozenset({aten.matmul.default, aten.mm.default, torch.matmul, torch.mm, operator.matmul})
_MATMUL = OpSignature("linear", 0, 1, None)
_ADDMM = OpSignature("linear", 1, 2, 0)


def signature_of(node: fx.Node) -> OpSignature | None:
    if node.target in _MATMULS and len(node.args) == 2 and _transposed_weight(node, 1) is not None:
        return _MATMUL
    if node.target in (aten.addmm.default, torch.addmm) and not node.kwargs and _transposed_weight(node, 2) is not None:
        return _ADDMM
    signature = SIGNATURES.get(node.target)
    if signature is None and node.target in _MULS and module_of(node)[1].endswith("RMSNorm") and len(node.args) == 2:
        weight = node.args[0]
        return _RMS_NORM if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
    return signature


def _transposed_weight(node: fx.Node, position: int) -> fx.Node | None:
    """The weight's get_attr when ``node``'s argument ``position`` is that weight transposed, else None."""
    view = node.args[position] if len(node.args) > position else None
    if not isinstance(view, fx.Node) or len(view.users) != 1 or not view.args:
        return None
    weight = view.args[0]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or not _swaps_two_dims(view):
        return None
    return weight


def _swaps_two_dims(view: fx.Node) -> bool:
    """Whether ``view`` is a 2-D transpose: ``t``, ``.T``, ``transpose(0, 1)``, ``permute(1, 0)``, any tracer."""
    if view.op == "call_function" and view.target is getattr:
        return view.args[1] in ("T", "mT")
    if view.op == "call_function" and isinstance(view.target, torch._ops.OpOverload):
        name = view.target._schema.name.split("::")[-1]
    elif view.op in ("call_function", "call_method"):
        name = view.target if view.op == "call_method" else getattr(view.target, "__name__", "")
    else:
        return False
    rest = view.args[1:]
    if name in ("t", "numpy_T"):
        return True
    if name == "transpose":
        return len(rest) == 2 and all(isinstance(d, int) for d in rest) and sorted(d % 2 for d in rest) == [0, 1]
    if name == "permute":
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], list | tuple) else list(rest)
        return all(isinstance(d, int) for d in dims) and [d % 2 for d in dims] == [1, 0]
    return False


@dataclass(frozen=True, eq=False)
class OpView:
    """Any graph node seen through the pattern language: its op name, module path and layer."""

    node: fx.Node
    op: str
    module: str
    module_type: str
    layer: int | None


@dataclass(frozen=True, eq=False)
class Site(OpView):
    """A weight-owning op. ``weight_shape`` is logical (``[out, in, *kernel]``; Conv1D is transposed back)."""

    weight: fx.Node = field(default=None)  # type: ignore[assignment]
    bias: fx.Node | None = None
    input: fx.Node = field(default=None)  # type: ignore[assignment]
    weight_shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    transposed: bool = False
    param: str | None = None  # a parameter site's attribute name on its module (``gate_up_proj``)

    @property
    def out_features(self) -> int:
        if self.op == PARAMETER:  # PEFT's ParamWrapper: [out, in], [experts, out, in] or, transposed, [e, in, out]
            return self.weight_shape[-1] if self.transposed or len(self.weight_shape) < 2 else self.weight_shape[-2]
        return self.weight_shape[1] if self.op == "embedding" else self.weight_shape[0]

    @property
    def in_features(self) -> int:
        if self.op == PARAMETER:
            return self.weight_shape[-2] if self.transposed else self.weight_shape[-1]
        return self.weight_shape[0] if self.op == "embedding" else self.weight_shape[1]

    @property
    def experts(self) -> int:
        """How many stacked matrices a parameter site holds (its first dim when 3-D), else 1."""
        return self.weight_shape[0] if self.op == PARAMETER and len(self.weight_shape) == 3 else 1

    @property
    def live_input(self) -> fx.Node | None:
        """The op's input now: an adapter inserted upstream may have replaced the captured ``input``.
        A parameter site has none: its adapter rewrites the parameter, not an activation."""
        if self.op == PARAMETER:
            return None
        return self.node.args[signature_of(self.node).input]

    @property
    def weight_readers(self) -> list[fx.Node]:
        """The nodes that read ``weight``'s get_attr for this site: what a merged weight is rebound for."""
        if self.op == PARAMETER:
            return list(self.weight.users)
        if self.weight in self.node.all_input_nodes:
            return [self.node]
        return [user for user in self.weight.users if self.node in user.users]  # through x @ W.T's transpose

    @property
    def conv_args(self) -> dict[str, Any]:
        """stride, padding, dilation and groups of a conv site, as the functional conv takes them."""
        names = ("stride", "padding", "dilation", "groups")
        given = dict(zip(names, self.node.args[3:], strict=False)) | {
            k: v for k, v in self.node.kwargs.items() if k in names
        }
        return {"stride": 1, "padding": 0, "dilation": 1, "groups": 1} | given

    def run(self, x: Any, weight: Any, bias: Any = None) -> Any:
        """The site's op on ``x`` with another ``weight`` (logical layout) and ``bias``: an adapter's ΔW or modulated
        weight applied as the base op applies its own (a conv with its stride, padding, dilation and groups; an
        embedding, which has no bias, looked up). Works on tensors and fx proxies alike."""
        if self.op == "embedding":
            return F.embedding(x, weight)
        if self.op == "linear":  # no bias argument where there is none: the graph reads as the kinds wrote it
            return F.linear(x, weight) if bias is None else F.linear(x, weight, bias)
        c = self.conv_args
        return getattr(F, self.op)(x, weight, bias, c["stride"], c["padding"], c["dilation"], c["groups"])

    def base_weight(self) -> torch.Tensor:
        """The weight tensor the site's op reads, in storage layout (transposed for Conv1D)."""
        return get_attr(self.weight.graph.owning_module, str(self.weight.target))

    def base_bias(self) -> torch.Tensor | None:
        return get_attr(self.weight.graph.owning_module, str(self.bias.target)) if self.bias is not None else None

    def logical(self, weight: Any) -> Any:
        """A weight of this site in logical layout ``[out, in, ...]`` from storage layout (Conv1D is transposed)."""
        return weight.t() if self.transposed and self.op != PARAMETER else weight

    def describe(self) -> str:
        shape = "x".join(map(str, self.weight_shape))
        return f"{self.op} {self.qualified_name} [{shape}]"

    @property
    def qualified_name(self) -> str:
        """The module path, and for a parameter site its attribute too (``...experts.gate_up_proj``)."""
        if self.param is None:
            return self.module
        return f"{self.module}.{self.param}" if self.module else self.param


def op_name(node: fx.Node, root: torch.nn.Module | None = None) -> str:
    """A short, tracer-independent name for what a node computes (``linear``, ``silu``, ``view`` ...)."""
    if node.op == "call_function":
        signature = SIGNATURES.get(node.target)
        if signature is not None:
            return signature.kind
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.name.split("::")[-1]
        return getattr(node.target, "__name__", str(node.target)).lstrip("_")
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module" and root is not None:
        return _snake(type(root.get_submodule(str(node.target))).__name__)
    return node.op


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def module_of(node: fx.Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module that owns a node, from ``nn_module_stack``."""
    stack = node.meta.get(MODULE_STACK)
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else cls.__name__
        return str(path), cls_name
    if node.op == "call_module":
        return str(node.target), ""
    return "", ""


def layer_of(path: str) -> int | None:
    match = LAYER_PATTERN.search(path)
    return int(match.group(1)) if match else None


def view_of(node: fx.Node, root: torch.nn.Module | None = None) -> OpView:
    path, cls = module_of(node)
    return OpView(node, op_name(node, root), path, cls, layer_of(path))


def find_sites(gm: fx.GraphModule, parameters: bool = False) -> list[Site]:
    """Every weight-owning op whose weight is a graph constant, in graph order; with ``parameters``, then
    every floating-point parameter the graph reads, once each, in graph order."""
    ops = (node for node in gm.graph.nodes if node.op == "call_function")
    sites = [site for node in ops if (site := _site(gm, node)) is not None]
    if parameters:
        sites += [site for node in gm.graph.find_nodes(op="get_attr") if (site := _parameter_site(gm, node))]
    return sites


def site_of(gm: fx.GraphModule, node: fx.Node) -> Site:
    site = _site(gm, node)
    if site is None:
        raise KeyError(f"{node.name} is not a site")
    return site


def _site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    if node.op == "get_attr":
        return _parameter_site(gm, node)
    if node.op != "call_function" or node.meta.get(TAG):
        return None
    signature = signature_of(node)
    if signature is None:
        return None
    args = node.args
    weight = args[signature.weight] if len(args) > signature.weight else None
    by_value = signature in (_MATMUL, _ADDMM)  # recognised by what they compute
    if by_value:
        weight = _transposed_weight(node, signature.weight)
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    tensor = get_attr(gm, str(weight.target))
    if by_value and tensor.ndim != 2:
        return None
    if signature.transposed and (tensor.ndim != 2 or module_of(node)[1] not in ("Conv1D", "")):
        return None  # an addmm that is not transformers' Conv1D (or a lowered one) is not a site
    bias = args[signature.bias] if signature.bias is not None and len(args) > signature.bias else None
    path, cls = module_of(node)
    owner = str(weight.target).rpartition(".")[0]
    if not path:
        path = str(weight.target).removesuffix(".weight")
    elif owner.startswith(path + ".") or by_value:
        # a parent's code reading a child's weight (nn.MultiheadAttention's out_proj): the site is the weight's owner
        path, cls = owner, module_classes(gm).get(owner, "")
    shape = tuple(tensor.shape[::-1]) if signature.transposed else tuple(tensor.shape)
    return Site(
        node=node,
        op=signature.kind,
        module=path,
        module_type=cls,
        layer=layer_of(path),
        weight=weight,
        bias=bias if isinstance(bias, fx.Node) else None,
        input=args[signature.input],
        weight_shape=shape,
        dtype=tensor.dtype,
        transposed=signature.transposed,
    )


def _parameter_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    """The site of a parameter read by ``node`` (a get_attr): the first get_attr of each float parameter."""
    if node.meta.get(TAG) or node.op != "get_attr":
        return None
    owner, _, name = str(node.target).rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    tensor = module._parameters.get(name)
    if tensor is None or not tensor.is_floating_point() or tensor.ndim == 0:
        return None
    first = next(n for n in gm.graph.find_nodes(op="get_attr", target=node.target) if not n.meta.get(TAG))
    if first is not node:
        return None
    return Site(
        node=node,
        op=PARAMETER,
        module=owner,
        module_type=module_classes(gm).get(owner, ""),
        layer=layer_of(owner),
        weight=node,
        input=None,  # type: ignore[arg-type]
        weight_shape=tuple(tensor.shape),
        dtype=tensor.dtype,
        transposed=tensor.ndim == 3 and getattr(module, "is_transposed", False) is True,
        param=name,
    )


def module_classes(gm: fx.GraphModule) -> dict[str, str]:
    """Module path -> class name, from every node's module stack (the capture's own modules are plain ones)."""
    if _CLASSES not in gm.meta:
        classes: dict[str, str] = {}
        for node in gm.graph.nodes:
            for path, cls in (node.meta.get(MODULE_STACK) or {}).values():
                classes.setdefault(str(path), cls.rsplit(".", 1)[-1] if isinstance(cls, str) else cls.__name__)
        gm.meta[_CLASSES] = classes
    return gm.meta[_CLASSES]


LOOK_THROUGH = frozenset(
    {
        "view",
        "reshape",
        "_unsafe_view",
        "transpose",
        "t",
        "permute",
        "contiguous",
        "clone",
        "to",
        "_to_copy",
        "type_as",
        "float",
        "half",
        "bfloat16",
        "dropout",
        "native_dropout",
        "alias",
        "unsqueeze",
        "squeeze",
        "expand",
        "flatten",
        "unflatten",
        "split",
        "split_with_sizes",
        "chunk",
        "getitem",
        "detach",
        "view_as",
    }
)


def consumers(node: fx.Node, root: torch.nn.Module | None = None) -> Iterator[fx.Node]:
    """Nodes that use ``node``'s value, looking through views, casts and dropout."""
    yield from _walk(node, lambda n: n.users, root)


def producers(node: fx.Node, root: torch.nn.Module | None = None) -> Iterator[fx.Node]:
    """Nodes whose value flows into ``node``, looking through views, casts and dropout."""
    yield from _walk(node, lambda n: [a for a in n.all_input_nodes if a.op != "get_attr"], root)


def _walk(start: fx.Node, step: Callable[[fx.Node], Any], root: torch.nn.Module | None) -> Iterator[fx.Node]:
    seen = {start}
    frontier = list(step(start))
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if op_name(node, root) in LOOK_THROUGH or node.target is operator.getitem:
            frontier.extend(step(node))
        else:
            yield node
