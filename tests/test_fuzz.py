"""A spec fuzzer: random well-formed and ill-formed specs never raise anything but ``peftfx.PeftfxError``.

Specs are built from the spec's own vocabulary (every adapter kind and its ``with`` fields, selectors, values,
folds): well-formed ones, near misses (values the spec must refuse), and well-formed ones broken afterwards (a key
misspelt, dropped or added, a value swapped for junk). Thousands go through ``load_spec`` (dicts, and YAML text,
some of it mangled); two hundred go all the way through ``compile`` on a tiny MLP, live and merged. The examples
are derandomized, so CI draws the same ones every run.
"""

from __future__ import annotations

import copy
import json
import re
import time
import typing

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import mlp, mlp_inputs
from oracle import adapter_parameters, assert_unchanged, run, snapshot

import peftfx
from peftfx.adapters import KINDS
from peftfx.fold import METHODS
from peftfx.spec import load_spec

FAST = settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
FILES = settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
HOSTILE = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
FEW = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
COMPILE = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

SITE_OPS = ["linear", "conv1d", "conv2d", "conv3d", "embedding", "layer_norm", "rms_norm"]
NAMES = ["a", "b", "c", "mix"]
# names the spec must refuse: not identifier-like, reserved, or two that collide once made attribute names
HOSTILE_NAMES = ["a-b", "a_b", "a.b", "a__b", "", "training", "forward", "routing", "1x", "é", "x" * 70]

JUNK = [
    None,
    True,
    False,
    0,
    -1,
    7,
    2**63,
    2**70,
    -(2**64),
    10**30,
    0.5,
    -1e308,
    float("nan"),
    float("inf"),
    "",
    "x",
    "linear",
    [],
    [1],
    [[]],
    {},
    {"x": 1},
    {"gradient": []},
    {"cases": []},
    {"value": {}},
]
junk = st.sampled_from(JUNK) | st.integers(-3, 40) | st.text(max_size=4)


def pick(good: list, bad: list, valid: bool) -> st.SearchStrategy:
    """One of ``good``; while fuzzing ill-formed specs, one of ``bad`` too (values the spec must refuse)."""
    return st.sampled_from(good if valid else good + bad)


WEIGHTS = [
    {"shape": [None, 12]},
    {"shape": []},
    {"ndim": 2},
    {"dtype": ["float32", "nope"]},
    {"divisible_by": 4},
    {"divisible_by": [None, 4]},
    {"in_features": 16, "out_features": 8},
]


def selectors(depth: int, valid: bool) -> st.SearchStrategy[dict]:
    ops = pick(SITE_OPS, ["lnear", "silu"], valid)
    leaf = {
        "op": ops | st.lists(ops, max_size=2),
        "module": pick(["layers.0", "layers.*", "re:layers\\.\\d+", "re:(?P<layer>\\d)", "*"], ["re:(", "re:"], valid)
        | st.lists(pick(["layers.0", "layers.1", "0", "nope"], [""], valid), max_size=2),
        "module_type": pick(["Linear", "Conv1D", "Embedding"], [""], valid),
        "layers": st.integers(0, 3)
        | pick(["0-1", "1-0", "0-9", " 1-1 "], ["x-y", "1-", "-1"], valid)
        | st.lists(st.integers(0, 2), max_size=3),
        "weight": pick(WEIGHTS, [{"divisible_by": 0}, {"divisible_by": [None, -4]}, {"shape": "x"}], valid),
        "expect": st.integers(0, 3) | pick([">=1", "<=1", "1-2", "2-1", "any", " 2 "], ["lots", ">=", "-1"], valid),
    }
    if depth > 0:
        inner = selectors(depth - 1, valid)
        leaf |= {
            "exclude": inner,
            "feeds": inner,
            "fed_by": inner,
            "not": inner,
            "any_of": st.lists(inner, max_size=2),
            "all_of": st.lists(inner, max_size=1),
        }
    return st.fixed_dictionaries({}, optional=leaf)


SELECTORS = {(valid, depth): selectors(depth, valid) for valid in (True, False) for depth in (0, 1)}


def values(scalar: st.SearchStrategy, valid: bool) -> st.SearchStrategy:
    """A parameter value: a scalar, a gradient or cases."""
    least = 1 if valid else 0
    gradient = st.fixed_dictionaries({"gradient": st.lists(st.floats(-2, 16), min_size=least, max_size=3)})
    case = st.fixed_dictionaries({"value": scalar | gradient}, optional={"when": SELECTORS[valid, 0]})
    cases = st.lists(case, min_size=least, max_size=3)
    return scalar | gradient | st.fixed_dictionaries({"cases": cases})


def scalar_for(annotation: typing.Any, default: typing.Any, valid: bool) -> st.SearchStrategy:
    """Mostly the field's default or a small value of its type; anything at all when fuzzing ill-formed specs."""
    plausible: st.SearchStrategy
    args = typing.get_args(annotation)
    if annotation is bool:
        plausible = st.booleans()
    elif annotation is int:
        plausible = st.integers(-1, 12)
    elif annotation is float:
        plausible = st.floats(-2, 16)
    elif typing.get_origin(annotation) is typing.Literal:
        plausible = st.sampled_from(args)
    elif args:
        plausible = st.one_of(*(scalar_for(a, default, valid) for a in args if a is not type(None)))
    else:
        plausible = st.integers(0, 20) | st.text(max_size=5)
    options = [plausible] if valid else [plausible, junk]
    if isinstance(default, bool | int | float | str):
        options.insert(0, st.just(default))
    return st.one_of(*options)


def fresh_adapters(valid: bool) -> st.SearchStrategy[dict]:
    """One strategy per kind: its ``with`` fields drawn from their annotations."""
    per_kind = []
    for kind in sorted(KINDS):
        fields = KINDS[kind].Params.model_fields
        with_ = {key: values(scalar_for(info.annotation, info.default, valid), valid) for key, info in fields.items()}
        optional = {"with": st.fixed_dictionaries({}, optional=with_), "seed": st.integers(0, 2**31)}
        per_kind.append(st.fixed_dictionaries({"type": st.just(kind), "at": SELECTORS[valid, 1]}, optional=optional))
    return st.one_of(per_kind)


def combine_adapters(valid: bool) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"combine": st.lists(st.sampled_from(NAMES), min_size=1, max_size=3)},
        optional={
            "weights": st.lists(values(st.floats(-2, 2), valid), max_size=3),
            "method": pick(list(METHODS), ["tie", ""], valid),
            "density": values(st.floats(0, 1) if valid else st.floats(-0.5, 1.5), valid),
            "majority_sign": pick(["total", "frequency"], ["vote"], valid),
            "svd_rank": st.integers(1 if valid else -1, 6),
            "svd_clamp": st.floats(0, 1) if valid else st.floats(-0.5, 1.5),
            "svd_full_matrices": st.booleans(),
            "seed": st.integers(0, 9),
        },
    )


def peft_adapters(valid: bool) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"peft": st.sampled_from(["missing/dir", ""])},
        optional={
            "scale": values(st.floats(-2, 2), valid),
            "allow_pickle": st.booleans(),
            "allow_nonfinite": st.booleans(),
        },
    )


@st.composite
def specs(draw, valid: bool = True, checkpoints: bool = True) -> dict:
    """A spec in the spec's own vocabulary. ``valid``: every value one the spec accepts (compile may still refuse
    the whole: a selector matching nothing, a rank too large for a site); ``checkpoints=False`` leaves out PEFT
    adapters, whose made-up directories compile refuses at once."""
    fresh, combine, peft = FORMS[valid]
    forms = [fresh, combine, peft] if checkpoints else [fresh, combine]
    adapters = draw(
        st.dictionaries(st.sampled_from(NAMES if valid else NAMES + HOSTILE_NAMES), st.one_of(forms), max_size=3)
    )
    spec: dict = {"adapters": adapters}
    names = st.sampled_from(sorted(adapters) if valid and adapters else NAMES)
    if draw(st.booleans()):
        spec["merge"] = draw(st.booleans() | st.lists(names, max_size=2, unique=True))
    if draw(st.integers(0, 3)) == 0:
        spec["active"] = draw(st.lists(names, max_size=3, unique=True))
    if draw(st.integers(0, 3)) == 0:
        spec["capture"] = draw(pick(["auto", "symbolic_trace", "export"], ["jit"], valid))
    return spec


FORMS = {valid: (fresh_adapters(valid), combine_adapters(valid), peft_adapters(valid)) for valid in (True, False)}
WELL_FORMED, NEAR_MISS = specs(valid=True), specs(valid=False)
COMPILABLE = specs(valid=True, checkpoints=False)


def _paths(data: typing.Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a nested dict/list, to pick one to break."""
    out = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += _paths(value, (*prefix, i))
    return out


@st.composite
def ill_formed(draw, base: st.SearchStrategy[dict]) -> typing.Any:
    """A well-formed spec with one to three things broken."""
    spec = copy.deepcopy(draw(base))  # strategies may hand out shared objects (sampled_from): never edit those
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(spec)))
        if not path:
            continue
        parent = spec
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        action = draw(st.sampled_from(["drop", "replace", "rename", "add"]))
        if action == "drop":
            del parent[last]
        elif action == "replace":
            parent[last] = copy.deepcopy(draw(junk))
        elif isinstance(parent, dict) and action == "rename":
            parent[str(last)[:-1] or "x"] = parent.pop(last)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = copy.deepcopy(draw(junk))
    return spec


def refuses_cleanly(call: typing.Callable[[], typing.Any]) -> None:
    """Anything but a PeftfxError escaping is a bug; a PeftfxError must say something."""
    try:
        call()
    except peftfx.PeftfxError as error:
        assert str(error).strip()


@FAST
@given(spec=WELL_FORMED | NEAR_MISS | ill_formed(WELL_FORMED) | junk)
def test_load_spec_only_raises_peftfx_errors(spec):
    refuses_cleanly(lambda: load_spec(spec))


@FILES
@given(
    spec=WELL_FORMED | NEAR_MISS | ill_formed(WELL_FORMED),
    cut=st.integers(0, 400),
    mangle=st.sampled_from(["", ":", "{", "\t", "- [", "'", "&a", "*b", "!!python/object:os.system"]),
)
def test_spec_files_only_raise_peftfx_errors(tmp_path_factory, spec, cut, mangle):
    text = yaml.safe_dump(spec, sort_keys=False)
    text = text[:cut] + mangle + text[cut:]  # a mangled file: unbalanced brackets, tabs, stray colons
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text)
    refuses_cleanly(lambda: load_spec(path))


@st.composite
def hostile_files(draw) -> tuple[str, bytes]:
    """A spec file (YAML or JSON) attacked one to three times: a line twice (a key twice in one mapping, as often as
    not), an anchor and an alias, nesting thousands deep, bytes that are not UTF-8, an integer of hundreds of digits."""
    spec = draw(WELL_FORMED | NEAR_MISS)
    suffix = draw(st.sampled_from([".yaml", ".json"]))
    text = json.dumps(spec, indent=1) if suffix == ".json" else yaml.safe_dump(spec, sort_keys=False)
    for _ in range(draw(st.integers(1, 3))):
        lines = text.splitlines(keepends=True) or [""]
        i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines)))
        attack = draw(st.sampled_from(["duplicate", "alias", "deep", "huge"]))
        if attack == "duplicate":
            lines.insert(j, lines[i])
        elif attack == "alias":
            lines[i] = lines[i].replace(": ", ": &x ", 1)
            lines.insert(j, lines[i].split(":")[0] + ": *x\n")
        elif attack == "deep":
            depth = draw(st.integers(10, 5000))
            opening, closing = draw(st.sampled_from([("[", "]"), ('{"k": ', "}"), ("{k: ", "}")]))
            lines.insert(j, f'"deep{j}": ' + opening * depth + "1" + closing * depth + ",\n")
        else:
            huge = str(draw(st.sampled_from([1, -1])) * 10 ** draw(st.integers(19, 400)))
            lines[i] = re.sub(r"\d+", huge, lines[i], count=1)
        text = "".join(lines)
    data = text.encode()
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return suffix, data


@HOSTILE
@given(file=hostile_files())
def test_hostile_spec_files_only_raise_peftfx_errors_in_bounded_time(tmp_path_factory, file):
    suffix, data = file
    path = tmp_path_factory.getbasetemp() / f"hostile{suffix}"
    path.write_bytes(data)
    start = time.perf_counter()
    refuses_cleanly(lambda: load_spec(path))
    assert time.perf_counter() - start < 5  # an alias bomb took 21 s to exhaust 3 GiB


INT_FIELDS = [
    (kind, field)
    for kind in sorted(KINDS)
    for field, info in KINDS[kind].Params.model_fields.items()
    if info.annotation is int
]


@FEW
@given(target=st.sampled_from(INT_FIELDS), value=st.sampled_from([10**9, 2**63, 2**64 + 1, 10**30, -(2**64)]))
def test_huge_sizes_compile_or_are_refused_in_bounded_time(target, value):
    """Every int field of every kind, huge: a rank of 10^9 asked the allocator for 48 GB, a seed of 2^64 overflowed,
    a depth or a number of Neumann terms of 10^9 looped for ever."""
    kind, field = target
    model, x = MODEL
    before = snapshot(model)
    start = time.perf_counter()
    refuses_cleanly(
        lambda: peftfx.compile(model, {"adapters": {"a": {**FRESH_LINEAR, "type": kind, "with": {field: value}}}}, x)
    )
    assert time.perf_counter() - start < 10
    assert_unchanged(model, before)


FRESH_LINEAR = {"at": {"op": "linear"}}


@pytest.mark.slow
@COMPILE
@given(spec=COMPILABLE | specs(valid=False, checkpoints=False) | ill_formed(COMPILABLE))
def test_compile_only_raises_peftfx_errors(spec):
    """Through capture, plan, insert, merge and cleanup on a real (tiny) model; the model is never touched."""
    model, x = MODEL
    before = snapshot(model)
    if isinstance(spec, dict) and spec.get("capture") == "export":
        spec["capture"] = "symbolic_trace"  # same graph, a fraction of the time
    refuses_cleanly(lambda: peftfx.compile(model, spec, x))
    assert_unchanged(model, before)


torch.manual_seed(0)
MODEL = (mlp(), mlp_inputs())


# -- what the fuzzer found ---------------------------------------------------------------------------------------
# (`divisible_by: 0` crashed the matcher with a ZeroDivisionError: now a row of tests/test_bad_input.py)


def test_merging_an_adapter_that_matched_nothing_it_may_is_no_error():
    """`expect: any` may select no site; merging it then merges nothing."""
    spec = {"adapters": {"a": {"type": "lora", "at": {"module": "nope", "expect": "any"}}}, "merge": True}
    gm = peftfx.compile(mlp(), spec, mlp_inputs())
    assert adapter_parameters(gm) == [] and torch.equal(run(gm, mlp_inputs()), run(mlp(), mlp_inputs()))
