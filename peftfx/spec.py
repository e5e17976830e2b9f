"""The spec: what to do, as validated data. YAML, JSON, a dict or a ``Spec`` all end up here.

Unknown keys are errors (a typo must never be silently ignored), and every error names the field path and,
for YAML files, the line.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from torch import nn

from .adapters import KINDS
from .errors import SpecError
from .fold import FOLD_FIELDS, METHODS, unread_field
from .ir import attr_key
from .model_ref import ModelRef
from .sizes import Seed

Scalar = bool | int | float | str


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)


class WeightPredicate(Strict):
    """Predicates on a site's weight, in its logical layout ``[out, in, *kernel]``."""

    shape: list[int | None] | None = Field(None, description="exact shape; null is a wildcard")
    ndim: int | None = None
    dtype: str | list[str] | None = Field(None, description="torch dtype name(s), e.g. float32")
    divisible_by: int | list[int | None] | None = Field(
        None, description="every dim (an int) or dim by dim (a list, null to skip) divisible by this"
    )
    in_features: int | None = None
    out_features: int | None = None

    @field_validator("divisible_by")
    @classmethod
    def _check_divisors(cls, value: Any) -> Any:
        if any(k is not None and k <= 0 for k in (value if isinstance(value, list) else [value])):
            raise ValueError(f"divisors must be positive, got {value}")
        return value


class Selector(Strict):
    """A set of predicates over sites; every key present must hold."""

    op: str | list[str] | None = Field(None, description="op kind(s): linear, conv2d, embedding, layer_norm, ...")
    module: str | list[str] | None = Field(
        None,
        description="module path: a glob ('*.q_proj'), a regex ('re:...', full match, may name a group 'layer'), "
        "or a list of exact names / dotted suffixes (PEFT's list rule)",
    )
    module_type: str | list[str] | None = Field(
        None, description="class name of the owning module: Linear, Conv1D, Embedding, ..."
    )
    param: str | list[str] | None = Field(
        None,
        description="a parameter site's dotted name (module path + attribute), as `module` matches paths; "
        "selects parameter sites (op: parameter)",
    )
    layers: int | str | list[int | str] | None = Field(
        None, description="layer indices: 3, [0, 3], '0-3' (inclusive range), or a list mixing both"
    )
    exclude: Selector | None = Field(None, description="sites matching this are never selected")
    weight: WeightPredicate | None = None
    feeds: Selector | None = Field(None, description="some consumer (through views, casts, dropout) matches")
    fed_by: Selector | None = Field(None, description="some producer (through views, casts, dropout) matches")
    any_of: list[Selector] | None = None
    all_of: list[Selector] | None = None
    not_: Selector | None = Field(None, alias="not")
    expect: int | str | None = Field(
        None, description="how many sites must match: 4, '>=1' (the default), '<=8', '2-4' or 'any'"
    )

    @field_validator("module", "param")
    @classmethod
    def _check_module(cls, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("re:"):
            try:
                re.compile(value[3:])
            except re.error as e:
                raise ValueError(f"invalid regex {value[3:]!r}: {e}") from None
        return value

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, str) and not re.fullmatch(r"\d+-\d+", item.strip()):
                raise ValueError(f"layer range {item!r} must look like 'lo-hi'")
        return value

    @field_validator("expect")
    @classmethod
    def _check_expect(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.fullmatch(r"any|(>=|<=)\d+|\d+-\d+|\d+", value.strip()):
            raise ValueError(f"expect {value!r} must be N, '>=N', '<=N', 'N-M' or 'any'")
        return value


class Gradient(Strict):
    """A value interpolated linearly across the selected layers, first layer to last."""

    gradient: list[float] = Field(min_length=1)


class Case(Strict):
    when: Selector | None = None
    value: Scalar | Gradient


class Cases(Strict):
    """The value of the first case whose ``when`` matches the site; a case without ``when`` is the default."""

    cases: list[Case] = Field(min_length=1)


ParamValue = Scalar | Gradient | Cases


class Deployable(Strict):
    """Fields that shape a live adapter for shipping: fixed tensor shapes for hotswap, tensors as ONNX inputs."""

    max_rank: int | None = Field(
        None,
        gt=0,
        description="pad the rank to this (zero rows of A, zero columns of B: exact) and hold the scaling as a "
        "tensor, so swap_adapter can load any adapter up to this rank without changing a shape (LoRA family)",
    )
    as_inputs: bool = Field(
        False, description="export_onnx makes this adapter's tensors graph inputs, so one ONNX file serves many"
    )


class PeftAdapter(Deployable):
    """An adapter read from a PEFT checkpoint directory."""

    peft: str = Field(
        description="directory holding adapter_config.json and adapter_model.safetensors, or a diffusers/kohya "
        "LoRA file (pytorch_lora_weights.safetensors, or its folder)"
    )
    component: str | None = Field(
        None, description="the part of a diffusers/kohya LoRA file to read (unet, transformer, text_encoder, ...)"
    )
    subfolder: str | None = Field(None, description="the checkpoint's folder inside `peft` (a hub repo or a folder)")
    revision: str | None = Field(None, description="the hub revision (branch, tag or commit) when `peft` is a hub id")
    scale: float | Gradient | Cases = Field(1.0, description="multiplies the adapter's scaling, like PEFT's set_scale")
    allow_pickle: bool = Field(
        False, description="also read adapter_model.bin (a pickle: only for checkpoints you trust)"
    )
    allow_nonfinite: bool = Field(False, description="let merge fold tensors holding NaN or inf into the weights")


class FreshAdapter(Deployable):
    """A new adapter, initialised as PEFT does, on the sites ``at`` selects."""

    type: str = Field(description="adapter kind: lora, dora, ...")
    at: Selector
    with_: dict[str, ParamValue] = Field(default_factory=dict, alias="with")
    seed: Seed | None = Field(None, description="seed for the random initialisation")

    @model_validator(mode="after")
    def _check_kind(self) -> FreshAdapter:
        kind = KINDS.get(self.type)
        if kind is None:
            raise ValueError(f"type: unknown adapter kind {self.type!r}{suggest(self.type, KINDS, 'known')}")
        fields = kind.Params.model_fields
        for key in self.with_:
            if key not in fields:
                raise ValueError(f"with.{key}: unknown field for {self.type}{suggest(key, fields, 'fields')}")
        scalars = {k: v for k, v in self.with_.items() if not isinstance(v, Gradient | Cases)}
        try:
            kind.Params.model_validate(scalars)
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"with.{'.'.join(map(str, err['loc']))}: {_message(err)}") from None
        return self


class CombineAdapter(Deployable):
    """Several adapters folded into one (PEFT's ``add_weighted_adapter`` and more; see ``peftfx.fold``)."""

    combine: list[str] = Field(min_length=1, description="the adapters to fold, by name")
    weights: list[float | Gradient | Cases] | None = Field(
        None, description="one weight per combined adapter, may be negative (default: 1 each)"
    )
    method: str | None = Field(
        None, description="fold method: linear, cat, svd, ties, ..., task_arithmetic (default: svd; IA3: linear)"
    )
    density: float | Gradient | Cases | None = Field(None, description="fraction kept by ties/dare/magnitude_prune")
    majority_sign: Literal["total", "frequency"] = Field("total", description="TIES sign election")
    svd_rank: int | None = Field(None, gt=0, description="rank of an SVD result (default: the largest source rank)")
    svd_clamp: float | None = Field(None, ge=0, le=1, description="quantile to clamp the SVD factors at")
    svd_full_matrices: bool = Field(True, description="PEFT's flag; it only changes a result with svd_clamp")
    seed: Seed | None = Field(None, description="seed for DARE's random drop (default: torch's global RNG)")

    @model_validator(mode="after")
    def _check_method(self) -> CombineAdapter:
        if self.weights is not None and len(self.weights) != len(self.combine):
            raise ValueError(f"weights: {len(self.weights)} weights for {len(self.combine)} combined adapters")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method: unknown fold method {self.method!r}{suggest(self.method, METHODS, 'known')}")
        if self.method is not None and METHODS[self.method].needs_density and self.density is None:
            raise ValueError(f"density: method {self.method} needs a density (the fraction of entries kept)")
        unread = None if self.method is None else unread_field(METHODS[self.method].reads, self.fold_fields())
        if unread is not None:
            raise ValueError(f"{unread}: method {self.method} does not read {unread}; remove it")
        if isinstance(self.density, (int, float)) and not 0 <= self.density <= 1:
            raise ValueError(f"density: must be in [0, 1], got {self.density}")
        for i, name in enumerate(self.combine):
            if name in self.combine[:i]:
                raise ValueError(f"combine[{i}]: {name!r} is listed twice")
        return self

    def fold_fields(self) -> set[str]:
        """The method parameters the spec sets to other than their defaults (each must be one its method reads)."""
        fields = type(self).model_fields
        return {f for f in FOLD_FIELDS if getattr(self, f) != fields[f].default}

    def weight_values(self) -> list[float | Gradient | Cases]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.combine)


def _adapter_tag(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return {PeftAdapter: "peft", CombineAdapter: "combine"}.get(type(value), "fresh")
    if isinstance(value, dict):
        if "peft" in value:
            return "peft"
        if "combine" in value:
            return "combine"
        if "type" in value:
            return "fresh"
    return None


Adapter = Annotated[
    Annotated[PeftAdapter, Tag("peft")]
    | Annotated[FreshAdapter, Tag("fresh")]
    | Annotated[CombineAdapter, Tag("combine")],
    Discriminator(
        _adapter_tag,
        custom_error_type="adapter_form",
        custom_error_message="an adapter needs `peft: <dir>`, `type: <kind>` or `combine: [<names>]`",
    ),
]


class Routing(Strict):
    """Per-sample adapters in one graph: the graph takes ``adapter_index``, an int64 tensor of shape [batch]."""

    adapters: list[str] = Field(
        min_length=1,
        description="live adapters a sample can pick: adapter_index[i] is a position in this list, -1 the base "
        "model; a routed adapter runs only for the samples that pick it",
    )

    @model_validator(mode="after")
    def _check_unique(self) -> Routing:
        for i, name in enumerate(self.adapters):
            if name in self.adapters[:i]:
                raise ValueError(f"adapters[{i}]: {name!r} is listed twice")
        return self


ADAPTER_NAME = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
"""An adapter's name becomes an attribute name (``peftfx.<name>.<module>.<role>``, ``-`` as ``_``), so it is
identifier-like: a letter, then letters, digits, ``_`` or ``-``; and never one of nn.Module's own attributes."""


class Spec(Strict):
    """What peftfx.compile does to a model."""

    adapters: dict[str, Adapter] = Field(
        default_factory=dict, json_schema_extra={"propertyNames": {"pattern": f"^{ADAPTER_NAME}$"}}
    )
    active: list[str] | None = Field(
        None, description="adapters that run in the graph, in order (default: all not consumed by a combine)"
    )
    merge: bool | list[str] = Field(
        False, description="true (every active adapter but the routed ones), or the adapters to fold into the weights"
    )
    capture: Literal["auto", "export", "symbolic_trace"] = "auto"
    routing: Routing | None = Field(
        None, description="adapters chosen per sample through the graph input adapter_index (see Routing)"
    )
    model: ModelRef | None = Field(None, description="the base model the CLI loads (`--model` overrides it)")

    @field_validator("adapters", mode="before")
    @classmethod
    def _check_names(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        taken: dict[str, str] = {}
        for name in value:
            if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME, name):
                raise ValueError(
                    f"adapter name {name!r} is not allowed: a letter, then up to 63 letters, digits, '_' or '-'"
                )
            key = attr_key(name)
            if hasattr(nn.Module(), key):
                raise ValueError(f"adapter name {name!r} is reserved (an attribute of every torch module); rename it")
            if key in taken:
                raise ValueError(
                    f"adapter names {taken[key]!r} and {name!r} are the same attribute name ({key!r}); rename one"
                )
            taken[key] = name
        return value

    @model_validator(mode="after")
    def _check_combines(self) -> Spec:
        for name, adapter in self.adapters.items():
            if not isinstance(adapter, CombineAdapter):
                continue
            for i, source in enumerate(adapter.combine):
                if source not in self.adapters:
                    have = suggest(source, (n for n in self.adapters if n != name), "have")
                    raise ValueError(f"adapters.{name}.combine[{i}]: no adapter named {source!r}{have}")
        for name in self.adapters:
            self._combine_order(name, [])
        return self

    def _combine_order(self, name: str, stack: list[str]) -> None:
        if name in stack:
            cycle = " -> ".join([*stack[stack.index(name) :], name])
            raise ValueError(f"adapters.{stack[-1]}.combine: adapters combine each other in a cycle ({cycle})")
        adapter = self.adapters[name]
        if isinstance(adapter, CombineAdapter):
            for source in adapter.combine:
                self._combine_order(source, [*stack, name])

    def consumed(self) -> set[str]:
        """Adapters some combine folds."""
        return {s for a in self.adapters.values() if isinstance(a, CombineAdapter) for s in a.combine}

    def active_adapters(self) -> list[str]:
        if self.active is None:
            consumed = self.consumed()
            names = [n for n in self.adapters if n not in consumed]
        else:
            names = list(self.active)
        for i, name in enumerate(names):
            if name not in self.adapters:
                raise SpecError(f"active[{i}]: no adapter named {name!r}{suggest(name, self.adapters, 'have')}")
        return names

    def routed_adapters(self) -> list[str]:
        """The routed adapters, checked: each must be active and stay live."""
        if self.routing is None:
            return []
        active, merged = self.active_adapters(), self.merged_adapters()
        if "routing" in active and "routing" not in self.routing.adapters:
            raise SpecError(
                "adapters.routing: with `routing:` set, the name is taken by the routing tensors "
                "(peftfx.routing.<module>); give this always-on adapter another name"
            )
        for i, name in enumerate(self.routing.adapters):
            if name not in active:
                raise SpecError(f"routing.adapters[{i}]: {name!r} is not an active adapter (active: {_names(active)})")
            if name in merged:
                raise SpecError(f"routing.adapters[{i}]: {name!r} is merged; a routed adapter must stay live")
        return list(self.routing.adapters)

    def merged_adapters(self) -> list[str]:
        active = self.active_adapters()
        if self.merge is True:  # every active adapter but the routed ones, which are live by definition
            routed = self.routing.adapters if self.routing is not None else []
            return [name for name in active if name not in routed]
        if self.merge is False:
            return []
        for i, name in enumerate(self.merge):
            if name not in active:
                raise SpecError(f"merge[{i}]: {name!r} is not an active adapter{suggest(name, active, 'active')}")
        return list(self.merge)


def _names(names: Any) -> str:
    return ", ".join(names) or "none"


def suggest(word: str, options: typing.Iterable[str], listed: str = "allowed") -> str:
    """`` (did you mean 'x'?)`` for the closest option, else the options listed: a typo should be one edit away."""
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" ({listed}: {_names(options)})"


def spec_schema() -> dict[str, Any]:
    """The JSON Schema of a spec, for editors and validators."""
    return Spec.model_json_schema(by_alias=True)


def load_spec(spec: Spec | dict[str, Any] | str | Path) -> tuple[Spec, Path | None]:
    """Validate a spec; return it and the directory relative paths inside it are resolved against."""
    if isinstance(spec, Spec):
        return spec, None
    if isinstance(spec, dict):
        return _validate(spec, None, None), None
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise SpecError(f"{path}: spec file not found")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise SpecError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
        data = _parse(text, path)
        return _validate(data, path, text), path.parent
    raise SpecError(f"spec must be a path, a dict or a peftfx.Spec, not {type(spec).__name__}")


MAX_DEPTH = 64
"""How deep a spec may nest (a sensible one nests under 20): deeper, parsers and validators recurse past Python's
stack, and nothing a spec can say needs it."""


def _parse(text: str, path: Path) -> Any:
    if path.suffix == ".json":
        _check_json(text, path)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
    if path.suffix not in (".yaml", ".yml"):
        raise SpecError(f"{path}: a spec file must end in .yaml, .yml or .json")
    try:
        loader = _SpecLoader(text, path)  # the reader refuses control characters at once
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
        raise SpecError(f"{path}{where}: invalid YAML: {problem}") from e
    return {} if data is None else data


class _SpecLoader(yaml.SafeLoader):
    """Safe YAML, stricter. No anchors or aliases: nine lines of aliases expand to 10^9 nodes (a spec has nothing
    to share that a value written out cannot say). At most ``MAX_DEPTH`` deep. No key twice in one mapping: YAML
    keeps the last silently, so a copied adapter would replace the first."""

    def __init__(self, text: str, path: Path) -> None:
        super().__init__(text)
        self.path, self.depth = path, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        where = f"{self.path}:{event.start_mark.line + 1}:{event.start_mark.column + 1}"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise SpecError(f"{where}: YAML anchors and aliases (&name, *name) are not allowed in a spec")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise SpecError(f"{where}: nested more than {MAX_DEPTH} deep")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                first = seen[key].start_mark
                raise SpecError(
                    f"{self.path}:{key_node.start_mark.line + 1}: key {key!r} appears twice in one mapping "
                    f"(first at {self.path}:{first.line + 1}); YAML would keep the last silently"
                )
            if isinstance(key, typing.Hashable):
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:]')


def _check_json(text: str, path: Path) -> None:
    """What ``json.loads`` lets through: nesting past ``MAX_DEPTH`` (its recursion overflows Python's stack) and a
    key twice in one object (it keeps the last silently). One pass over the tokens, before parsing."""
    objects: list[dict[str, int] | None] = []  # per open bracket: an object's keys and where, None for an array
    last: tuple[Any, int] | None = None
    for token in _JSON_TOKEN.finditer(text):
        value = token.group()
        if value in "{[":
            objects.append({} if value == "{" else None)
            if len(objects) > MAX_DEPTH:
                raise SpecError(f"{path}:{_line_col(text, token.start())}: nested more than {MAX_DEPTH} deep")
        elif value in "}]":
            if objects:
                objects.pop()
        elif value == ":":
            keys = objects[-1] if objects else None
            if last is not None and keys is not None:
                key, at = last
                if key in keys:
                    raise SpecError(
                        f"{path}:{_line_col(text, at)}: key {key!r} appears twice in one object (first at "
                        f"{path}:{_line_col(text, keys[key])}); JSON readers keep the last silently"
                    )
                keys[key] = at
        else:
            last = (value[1:-1], token.start())


def _line_col(text: str, at: int) -> str:
    return f"{text.count(chr(10), 0, at) + 1}:{at - text.rfind(chr(10), 0, at)}"


def _check_tree(data: Any, path: Path | None) -> None:
    """Keys are strings and nesting is bounded, for dicts too (a dict spec may even contain itself)."""
    stack: list[tuple[Any, list[Any]]] = [(data, [])]
    while stack:
        node, at = stack.pop()
        where = f"{path}: " if path else ""
        if len(at) > MAX_DEPTH:
            raise SpecError(f"{where}{_field_path(at[:3])}...: nested more than {MAX_DEPTH} deep")
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    field = _field_path(at) or "spec"
                    raise SpecError(f"{where}{field}: key {key!r} is not a string ({type(key).__name__}); quote it")
                stack.append((value, [*at, key]))
        elif isinstance(node, list | tuple):
            stack.extend((value, [*at, i]) for i, value in enumerate(node))


def _validate(data: Any, path: Path | None, text: str | None) -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"{path or 'spec'}: a spec is a mapping, not {type(data).__name__}")
    _check_tree(data, path)
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        by_field: dict[str, list[str]] = {}
        marks: dict[str, str | None] = {}
        for err in e.errors():
            loc = [part for i, part in enumerate(err["loc"]) if not _is_union_member(err["loc"], i)]
            field, message = _field_path(loc), _message(err)
            inner = re.match(r"([\w.\[\]]+): (.*)", message) if err["type"] == "value_error" else None
            if inner:  # a validator that names the sub-field itself
                field, message = (f"{field}.{inner[1]}" if field else inner[1]), inner[2]
            by_field.setdefault(field, []).append(message)
            marks[field] = _mark(text, [*loc, *(_split_path(inner[1]) if inner else [])]) if text else None
        out = []
        for field, messages in by_field.items():
            where = f"{path}:{marks[field]}: " if marks[field] else (f"{path}: " if path else "")
            unique = list(dict.fromkeys(messages))
            message = unique[0] if len(unique) == 1 else "fits none of its allowed forms (" + "; ".join(unique) + ")"
            out.append(f"{where}{field}: {message}")
        raise SpecError("; ".join(out)) from None  # one line: the CLI prints it as it is


def _is_union_member(loc: tuple[Any, ...], i: int) -> bool:
    """pydantic puts the tried member's name in an error's location: Gradient, float, ... and an adapter's form."""
    part = loc[i]
    if i == 2 and loc[0] == "adapters":
        return part in _FORMS
    return isinstance(part, str) and (part[:1].isupper() or part in ("float", "int", "bool", "str") or "[" in part)


def _message(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field" + suggest(str(err["loc"][-1]), _fields_at(err["loc"][:-1]))
    return str(err["msg"]).removeprefix("Value error, ")


_FORMS: dict[str, type[BaseModel]] = {"peft": PeftAdapter, "fresh": FreshAdapter, "combine": CombineAdapter}


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the spec model at ``loc`` (a pydantic error location, union tags included) accepts."""
    annotation: Any = Spec
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    return [f.alias or name for m in models[:1] for name, f in m.model_fields.items()]


def _members(annotation: Any) -> list[Any]:
    """The types a (possibly optional, union or Annotated) annotation stands for."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _step(annotation: Any, part: Any) -> Any:
    members = _members(annotation)
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    for model in models:
        if part == model.__name__ or _FORMS.get(part) is model:
            return model
    for model in models:
        for name, info in model.model_fields.items():
            if part in (name, info.alias):
                return info.annotation
    for member in members:
        origin, args = typing.get_origin(member), typing.get_args(member)
        if origin is dict and isinstance(part, str):
            return args[1]
        if origin is list and isinstance(part, int):
            return args[0]
    return None


def _field_path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not re.fullmatch(r"[A-Za-z_][\w-]*", str(part)) and not out.endswith("adapters"):
            out += f"[{part!r}]"
        else:
            out += ("." if out else "") + str(part).removesuffix("_")
    return out


def _split_path(path: str) -> list[str | int]:
    """``adapters.mix.combine[1]`` -> ``['adapters', 'mix', 'combine', 1]``."""
    return [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]


def _mark(text: str, loc: list[Any]) -> str | None:
    """``line:column`` (1-based) of the deepest node along ``loc`` (the key itself for unknown keys).

    JSON is read as YAML here, so JSON files get a line and column too.
    """
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    mark = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part).removesuffix("_") or (part == "not_" and key.value == "not"):
                    mark, node = key.start_mark, value
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
        else:
            break
    return f"{mark.line + 1}:{mark.column + 1}" if mark else None
