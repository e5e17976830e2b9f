"""The catalogue of bad inputs: each is a ``peftfx.PeftfxError`` (a ``ValueError``) naming its culprit — the spec
field path, the file (with line and column where it has them) or the tensor key — and the model is untouched.

Kind-specific checkpoint errors live in each ``tests/test_tuner_<kind>.py``; unrepresentable folds in
``tests/test_fold_spec.py``; what a failure leaves behind (nothing) in ``tests/test_reliability.py``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import peft
import pytest
import torch
from models import embed_net, id_inputs, mlp, mlp_inputs, tiny_llama, token_inputs
from oracle import adapter_parameters, assert_unchanged, peft_checkpoint, run, snapshot
from safetensors.torch import load_file, save_file
from torch import nn

import peftfx
from peftfx.spec import load_spec

KEY_A = "base_model.model.layers.1.lora_A.weight"
KEY_B = "base_model.model.layers.1.lora_B.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A valid PEFT LoRA checkpoint on ``layers.0`` and ``layers.1`` of the test MLP, and its PEFT model."""
    directory = tmp_path_factory.mktemp("good") / "ckpt"
    peft_model = peft_checkpoint(mlp(), peft.LoraConfig(r=2, target_modules=["layers.0", "layers.1"]), directory)
    return directory, peft_model


def variant(good, tmp_path: Path, tensors=None, config=None) -> Path:
    """A copy of the good checkpoint with its tensors and/or config edited in place by the given functions."""
    directory = tmp_path / "variant"
    shutil.copytree(good[0], directory)
    if tensors is not None:
        state = load_file(directory / "adapter_model.safetensors")
        tensors(state)
        save_file(state, directory / "adapter_model.safetensors")
    if config is not None:
        data = json.loads((directory / "adapter_config.json").read_text())
        config(data)
        (directory / "adapter_config.json").write_text(json.dumps(data))
    return directory


def fails(model, spec, inputs, error=peftfx.PeftfxError, match: str = "") -> str:
    """Compile must raise ``error`` (a PeftfxError and a ValueError) matching ``match``; the model is untouched."""
    before = snapshot(model)
    with pytest.raises(error) as info:
        peftfx.compile(model, spec, inputs)
    assert isinstance(info.value, peftfx.PeftfxError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert re.search(match, message), f"{match!r} not in {message!r}"
    assert "Value error" not in message  # pydantic's wording stays out of the user's message
    assert_unchanged(model, before)
    return message


def spec_fails(spec, match: str) -> str:
    """An invalid spec: refused by ``load_spec`` and by ``compile`` with the same message."""
    with pytest.raises(peftfx.SpecError, match=match) as info:
        load_spec(spec)
    fails(mlp(), spec, mlp_inputs(), peftfx.SpecError, match)
    return str(info.value)


def peft_spec(directory: Path, **kw) -> dict:
    return {"adapters": {"a": {"peft": str(directory), **kw}}}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_good_checkpoint_works(good):
    """The control for every variant below: unedited, it loads and matches PEFT."""
    model, x = mlp(), mlp_inputs()
    gm = peftfx.compile(model, peft_spec(good[0]), x)
    torch.testing.assert_close(run(gm, x), run(good[1], x), rtol=1e-5, atol=2e-6)


def test_error_classes():
    for cls in (peftfx.SpecError, peftfx.CaptureError, peftfx.CheckpointError, peftfx.MatchError, peftfx.MergeError):
        assert issubclass(cls, peftfx.PeftfxError) and issubclass(cls, ValueError)


# -- malformed YAML / JSON: file, line and column --------------------------------------------------------------


def test_malformed_yaml(tmp_path):
    path = write(tmp_path / "bad.yaml", "adapters:\n  a:\n    type: lora\n    at: {op: linear\n    with: {r: 2}\n")
    spec_fails(path, rf"{re.escape(str(path))}:5:9: invalid YAML: expected ',' or '}}'")


def test_malformed_json(tmp_path):
    path = write(tmp_path / "bad.json", '{\n "adapters": {\n  "a": {"type": "lora",\n   "at": {"op": "linear",, }}}}\n')
    spec_fails(path, rf"{re.escape(str(path))}:4:26: invalid JSON: Expecting property name")


def test_bad_spec_files(tmp_path):
    spec_fails(tmp_path / "missing.yaml", r"missing\.yaml: spec file not found")
    spec_fails(write(tmp_path / "spec.txt", "{}"), r"spec\.txt: a spec file must end in")
    spec_fails(write(tmp_path / "list.yaml", "- adapters\n"), r"list\.yaml: a spec is a mapping, not list")
    spec_fails(42, r"spec must be a path, a dict or a peftfx\.Spec, not int")
    assert load_spec(write(tmp_path / "empty.yaml", ""))[0] == peftfx.Spec()  # an empty YAML file is the empty spec


# -- unknown or misspelled keys: "did you mean" ----------------------------------------------------------------

FRESH = {"type": "lora", "at": {"op": "linear"}}


def at(**selector) -> dict:
    """A spec with one LoRA on what ``selector`` selects."""
    return {"adapters": {"a": {"type": "lora", "at": selector}}}


def kind(name: str, **params) -> dict:
    """A spec with one adapter of kind ``name`` on every linear, with these ``with`` fields."""
    return {"adapters": {"a": {"type": name, "at": {"op": "linear"}, "with": params}}}


@pytest.mark.parametrize(
    ("spec", "field", "hint"),
    [
        ({"adapterz": {}}, "adapterz", "did you mean 'adapters'?"),
        ({"adapters": {}, "merged": True}, "merged", "did you mean 'merge'?"),
        ({"adapters": {"a": {"peft": "x", "scal": 1}}}, "adapters.a.scal", "did you mean 'scale'?"),
        ({"adapters": {"a": {**FRESH, "wiht": {}}}}, "adapters.a.wiht", "did you mean 'with'?"),
        ({"adapters": {"a": {"type": "lora", "at": {"modul": "x"}}}}, "adapters.a.at.modul", "did you mean 'module'?"),
        (
            {"adapters": {"a": {"type": "lora", "at": {"weight": {"shap": [1]}}}}},
            "adapters.a.at.weight.shap",
            "'shape'",
        ),
        (
            {"adapters": {"a": {"type": "lora", "at": {"any_of": [{}, {"opp": "x"}]}}}},
            "adapters.a.at.any_of[1].opp",
            "'op'",
        ),
        (
            {"adapters": {"a": {"type": "lora", "at": {"exclude": {"layer": 1}}}}},
            "adapters.a.at.exclude.layer",
            "'layers'",
        ),
        ({"adapters": {"a": {**FRESH, "with": {"rank": 4}}}}, "adapters.a.with.rank", "fields: r, alpha"),
        ({"adapters": {"a": {**FRESH, "with": {"alpah": 4}}}}, "adapters.a.with.alpah", "did you mean 'alpha'?"),
        (
            {"adapters": {"a": {**FRESH, "with": {"r": {"cases": [{"whn": {}, "value": 1}]}}}}},
            "adapters.a.with.r.cases[0].whn",
            "did you mean 'when'?",
        ),
        (
            {"adapters": {"a": {"peft": "x"}, "m": {"combine": ["a"], "wieghts": [1]}}},
            "adapters.m.wieghts",
            "'weights'",
        ),
        (
            {"adapters": {"a": {"peft": "x"}, "m": {"combine": ["a"], "ratio": 1}}},
            "adapters.m.ratio",
            "combine, weights, method",
        ),
    ],
)
def test_unknown_keys(spec, field, hint):
    message = spec_fails(spec, rf"{re.escape(field)}: unknown field")
    assert hint in message


@pytest.mark.parametrize(
    ("adapter", "field", "message"),
    [
        ({"type": "lorra", "at": {}}, "type", r"unknown adapter kind 'lorra' \(did you mean 'lora'\?\)"),
        ({"type": "zzzzzz", "at": {}}, "type", r"unknown adapter kind 'zzzzzz' \(known: adalora, .*lora"),
        ({"combine": ["x"], "method": "tie"}, "method", r"unknown fold method 'tie' \(did you mean 'ties'\?\)"),
    ],
)
def test_unknown_names(adapter, field, message):
    spec_fails({"adapters": {"x": {"peft": "x"}, "a": adapter}}, rf"adapters\.a\.{field}: {message}")


def test_unknown_key_in_yaml_names_file_line_and_column(tmp_path):
    path = write(tmp_path / "spec.yaml", "adapters:\n  a:\n    type: lora\n    at:\n      op: linear\n      modul: x\n")
    spec_fails(path, rf"{re.escape(str(path))}:6:7: adapters\.a\.at\.modul: unknown field \(did you mean 'module'")


def test_unknown_key_in_json_names_file_line_and_column(tmp_path):
    spec = {"adapters": {"a": {"type": "lora", "at": {"bogus": 1}}}}
    path = write(tmp_path / "spec.json", json.dumps(spec, indent=1))
    spec_fails(path, rf"{re.escape(str(path))}:6:5: adapters\.a\.at\.bogus: unknown field")


# -- wrong types and values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"adapters": ["a"]}, r"adapters: Input should be a valid dictionary"),
        ({"merge": {"a": 1}}, r"merge: fits none of its allowed forms"),
        ({"active": "a"}, r"active: Input should be a valid list"),
        ({"capture": "jit"}, r"capture: Input should be 'auto', 'export' or 'symbolic_trace'"),
        ({"adapters": {"a": {"r": 4}}}, r"adapters\.a: an adapter needs `peft: <dir>`.*`type: <kind>`"),
        ({"adapters": {"a": {"peft": 3}}}, r"adapters\.a\.peft: Input should be a valid string"),
        ({"adapters": {"a": {"peft": "x", "scale": float("nan")}}}, r"adapters\.a\.scale: .*finite number"),
        ({"adapters": {"a": {"peft": "x", "allow_pickle": "maybe"}}}, r"adapters\.a\.allow_pickle: .*boolean"),
        ({"adapters": {"a": {"type": 3, "at": {}}}}, r"adapters\.a\.type: Input should be a valid string"),
        ({"adapters": {"a": {"type": "lora", "at": {"op": 3}}}}, r"adapters\.a\.at\.op: "),
        ({"adapters": {"a": {"type": "lora", "at": {"module": "re:("}}}}, r"adapters\.a\.at\.module: invalid regex"),
        ({"adapters": {"a": {"type": "lora", "at": {"layers": "one-two"}}}}, r"adapters\.a\.at\.layers: .*'lo-hi'"),
        ({"adapters": {"a": {"type": "lora", "at": {"expect": "lots"}}}}, r"adapters\.a\.at\.expect: "),
        (at(weight={"divisible_by": 0}), r"adapters\.a\.at\.weight\.divisible_by: divisors must be positive"),
        (at(weight={"divisible_by": [2, 0]}), r"adapters\.a\.at\.weight\.divisible_by: divisors must be positive"),
        ({"adapters": {"a": {**FRESH, "seed": "x"}}}, r"adapters\.a\.seed: Input should be a valid integer"),
        ({"adapters": {"a": {**FRESH, "with": {"r": "four"}}}}, r"adapters\.a\.with\.r: .*valid integer"),
        ({"adapters": {"a": {**FRESH, "with": {"r": 0}}}}, r"adapters\.a\.with\.r: .*greater than 0"),
        # random inits with a negative bound or std (a fuzz find: torch's uniform_ raised a RuntimeError)
        (
            kind("unilora", init_theta_d_bound=-1e-58),
            r"adapters\.a\.with\.init_theta_d_bound: .*greater than or equal to 0",
        ),
        (kind("vblora", init_logits_std=-1), r"adapters\.a\.with\.init_logits_std: .*greater than or equal to 0"),
        (kind("vblora", init_vector_bank_bound=-1), r"adapters\.a\.with\.init_vector_bank_bound: .*greater than or"),
        (kind("deft", init_scale=-1), r"adapters\.a\.with\.init_scale: .*greater than or equal to 0"),
        ({"adapters": {"a": {**FRESH, "with": {"r": {"gradient": []}}}}}, r"adapters\.a\.with\.r\.gradient: "),
        ({"adapters": {"a": {"combine": "a"}}}, r"adapters\.a\.combine: Input should be a valid list"),
    ],
)
def test_wrong_types_and_values(spec, match):
    spec_fails(spec, match)


# -- checkpoints -----------------------------------------------------------------------------------------------


def test_missing_checkpoint_dir(tmp_path):
    missing = tmp_path / "nowhere"
    fails(
        mlp(), peft_spec(missing), mlp_inputs(), peftfx.CheckpointError, rf"adapters\.a\.peft: .*{missing}.* not found"
    )


def test_missing_checkpoint_files(good, tmp_path):
    directory = variant(good, tmp_path)
    (directory / "adapter_model.safetensors").unlink()
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"adapter_model\.safetensors not found")
    (directory / "adapter_config.json").unlink()
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"adapter_config\.json not found")


def test_malformed_adapter_config(good, tmp_path):
    directory = variant(good, tmp_path)
    config = directory / "adapter_config.json"
    (directory / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"safetensors.*not a readable")
    config.write_text('{\n  "r": 2,\n}\n')
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, rf"{config}:3: invalid JSON")
    for text in ('{"r": 2}', "[1, 2]"):
        config.write_text(text)
        fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, rf"{config}: .*no peft_type")


def test_unsupported_config_field_is_refused(good, tmp_path):
    directory = variant(good, tmp_path, config=lambda c: c.__setitem__("init_lora_weights", "pissa"))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"adapter_config\.json: init_lora_weig")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lora_alpha", "16", r"lora_alpha: input should be a valid number \(got '16'\)"),
        ("lora_alpha", None, r"lora_alpha: input should be a valid number \(got None\)"),
        ("target_modules", 5, r"target_modules: input should be a valid string \(got 5\)"),
        ("rank_pattern", ["layers.0"], r"rank_pattern: input should be a valid dictionary"),
        ("layers_to_transform", "x", r"layers_to_transform: input should be a valid integer \(got 'x'\)"),
        ("r", "4", r"r: input should be a valid integer \(got '4'\)"),
        ("rank_pattern", {"layers.0": 2.5}, r"rank_pattern\.layers\.0: input should be a valid integer"),
    ],
)
def test_adapter_config_field_of_the_wrong_type(good, tmp_path, field, value, match):
    directory = variant(good, tmp_path, config=lambda c: c.__setitem__(field, value))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"adapter_config\.json: " + match)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_adapter_config_number_that_is_not_finite(good, tmp_path, value):
    """json reads NaN and Infinity; a NaN alpha would make every live output NaN."""
    directory = variant(good, tmp_path, config=lambda c: c.__setitem__("lora_alpha", value))
    match = r"adapter_config\.json: lora_alpha: input should be a finite number"
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, match)
    directory = variant(good, tmp_path / "extra", config=lambda c: c.__setitem__("lora_dropout", value))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"lora_dropout: .*finite number")


def test_adapter_config_rank_below_one(good, tmp_path):
    def rank_zero(t):
        for key in list(t):
            t[key] = torch.randn(0, t[key].shape[1]) if "lora_A" in key else torch.randn(t[key].shape[0], 0)

    directory = variant(good, tmp_path, tensors=rank_zero, config=lambda c: c.__setitem__("r", 0))
    match = r"adapter_config\.json: r: input should be greater than or equal to 1 \(got 0\)"
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, match)


def test_adapter_config_that_is_not_utf8(good, tmp_path):
    directory = variant(good, tmp_path)
    (directory / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "r": 2, "x": "\xff\xfe"}')
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"adapter_config\.json: not UTF-8")


def test_saving_a_kind_peft_has_no_format_for(tmp_path):
    """A dense `delta` adapter has no PEFT checkpoint type: a SpecError, not a NotImplementedError."""
    gm = peftfx.compile(mlp(), {"adapters": {"d": {"type": "delta", "at": {"module": "layers.0"}}}}, mlp_inputs())
    with pytest.raises(peftfx.SpecError, match=r"save_adapter: PEFT has no format for a delta adapter"):
        peftfx.save_adapter(gm, "d", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_unknown_peft_type(good, tmp_path):
    """Tuners PEFT itself cannot merge (prompt tuning, ...) have their own message: ``tests/test_not_mergeable.py``."""
    directory = variant(good, tmp_path, config=lambda c: c.__setitem__("peft_type", "NOPE"))
    fails(
        mlp(),
        peft_spec(directory),
        mlp_inputs(),
        peftfx.CheckpointError,
        r"adapter_config\.json: peft_type 'NOPE' is not supported \(supported: .*LORA",
    )


def test_missing_tensor_names_the_key(good, tmp_path):
    directory = variant(good, tmp_path, tensors=lambda t: t.pop(KEY_B))
    fails(
        mlp(),
        peft_spec(directory),
        mlp_inputs(),
        peftfx.CheckpointError,
        rf"safetensors: missing tensor 'lora_B.weight' \(key '{KEY_B}'\)",
    )


def test_module_without_any_tensor(good, tmp_path):
    directory = variant(good, tmp_path, tensors=lambda t: (t.pop(KEY_A), t.pop(KEY_B)))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"targets layers\.1, but the file holds")


@pytest.mark.parametrize(
    ("key", "shape", "match"),
    [
        (KEY_B, (8, 3), rf"'{KEY_B}' has shape \[8, 3\], expected \[8, 2\]"),  # B's rank is not A's
        (KEY_A, (2, 15), rf"'{KEY_A}' has shape \[2, 15\], expected \[2, 16\] for linear layers\.1"),  # in_features
        (KEY_B, (5, 2), rf"'{KEY_B}' has shape \[5, 2\], expected \[8, 2\]"),  # out_features
        (KEY_A, (2, 16, 1), rf"'{KEY_A}' has shape \[2, 16, 1\], expected \[2, 16\]"),
    ],
)
def test_misshaped_tensor_names_the_key_and_shapes(good, tmp_path, key, shape, match):
    directory = variant(good, tmp_path, tensors=lambda t: t.__setitem__(key, torch.randn(shape)))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, rf"safetensors: {match}")


def test_rank_disagreeing_with_config(good, tmp_path):
    def edit(t):
        t[KEY_A], t[KEY_B] = torch.randn(3, 16), torch.randn(8, 3)

    directory = variant(good, tmp_path, tensors=edit)
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, rf"'{KEY_A}' has rank 3, .* r=2")


def test_unexpected_and_stray_tensors(good, tmp_path):
    """PEFT loads with ``strict=False``: it ignores unexpected keys and leaves missing ones at their init (warning).
    A tensor that fits nothing means the checkpoint is not what the config says, so peftfx refuses both."""
    extra = "base_model.model.layers.1.lora_C.weight"
    directory = variant(good, tmp_path, tensors=lambda t: t.__setitem__(extra, torch.randn(2)))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, rf"unexpected tensor '{extra}'")
    shutil.rmtree(directory)
    stray = "base_model.model.layers.2.lora_A.weight"  # a real module the config does not target
    directory = variant(good, tmp_path, tensors=lambda t: t.__setitem__(stray, torch.randn(2, 16)))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, rf"tensor '{stray}' is for layers\.2")
    shutil.rmtree(directory)
    outside = "base_model.model.nowhere.lora_A.weight"  # no such module at all
    directory = variant(good, tmp_path, tensors=lambda t: t.__setitem__(outside, torch.randn(2, 16)))
    fails(
        mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, rf"'{outside}' is for nowhere, which is not"
    )
    shutil.rmtree(directory)
    foreign = "model.layers.1.lora_A.weight"  # not under PEFT's prefix
    directory = variant(good, tmp_path, tensors=lambda t: t.__setitem__(foreign, torch.randn(2, 16)))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, rf"'{foreign}' does not start with")


def test_checkpoint_targeting_nothing(good, tmp_path):
    directory = variant(good, tmp_path, config=lambda c: c.__setitem__("target_modules", ["nothing"]))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.MatchError, r"adapters\.a \(target_modules of .*matched 0")


# -- NaN / inf: refused by merge unless allowed ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_refused_on_merge_unless_allowed(good, tmp_path, bad):
    def edit(t):
        t[KEY_B][3, 1] = bad

    directory = variant(good, tmp_path, tensors=edit)
    message = fails(
        mlp(),
        {**peft_spec(directory), "merge": True},
        mlp_inputs(),
        peftfx.MergeError,
        r"merge: adapter 'a' at layers\.1: tensor lora_B holds NaN or inf",
    )
    assert "allow_nonfinite: true" in message  # the message names the opt-in
    # kept live, the same checkpoint compiles (as in PEFT): the NaN shows in the outputs, no weight is corrupted
    gm = peftfx.compile(mlp(), peft_spec(directory), mlp_inputs())
    assert not torch.isfinite(run(gm, mlp_inputs())).all()
    # opted in, merge folds it: exactly the rows the bad entry reaches turn non-finite, the rest merge as usual
    model = mlp()
    before = snapshot(model)
    merged = peftfx.compile(model, {**peft_spec(directory, allow_nonfinite=True), "merge": True}, mlp_inputs())
    assert adapter_parameters(merged) == []
    weight = merged.state_dict()["layers.1.weight"]
    assert not torch.isfinite(weight[3]).any() and torch.isfinite(weight[torch.arange(8) != 3]).all()
    assert_unchanged(model, before)


def test_merge_that_overflows_is_refused(good, tmp_path):
    def edit(t):
        t[KEY_A], t[KEY_B] = torch.full((2, 16), 1e30), torch.full((8, 2), 1e30)

    directory = variant(good, tmp_path, tensors=edit)
    merge = {**peft_spec(directory), "merge": True}
    fails(mlp(), merge, mlp_inputs(), peftfx.MergeError, r"adapter 'a' at layers\.1: the merged weight is not finite")


def test_non_finite_source_of_a_fold_is_refused(good, tmp_path):
    """No fold method can combine a NaN (an SVD of one does not even converge), kept live or merged."""
    directory = variant(good, tmp_path, tensors=lambda t: t[KEY_B].__setitem__((3, 1), float("nan")))
    for method in ("svd", "linear"):
        spec = {"adapters": {"x": {"peft": str(good[0])}, "y": {"peft": str(directory)}}}
        spec["adapters"]["mix"] = {"combine": ["x", "y"], "method": method}
        match = r"adapters\.mix\.combine\[1\]: tensor lora_B at layers\.1 holds NaN or inf"
        fails(mlp(), spec, mlp_inputs(), peftfx.MergeError, match)


# -- pickle checkpoints ----------------------------------------------------------------------------------------


def test_pickle_checkpoint_refused_unless_allowed(tmp_path):
    model, x = mlp(), mlp_inputs()
    directory = tmp_path / "bin"
    peft_model = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["layers.0"])).eval()
    with torch.no_grad():
        peft_model.base_model.model.layers[0].lora_B["default"].weight.normal_()
    peft_model.save_pretrained(directory, safe_serialization=False)
    assert (directory / "adapter_model.bin").is_file() and not (directory / "adapter_model.safetensors").exists()

    message = fails(model, peft_spec(directory), x, peftfx.CheckpointError, r"adapter_model\.bin: pickle")
    assert "allow_pickle: true" in message  # the message names the opt-in
    fails(model, peft_spec(directory, allow_pickle=False), x, peftfx.CheckpointError, r"adapter_model\.bin")

    gm = peftfx.compile(model, peft_spec(directory, allow_pickle=True), x)
    expected = run(peft_model, x)
    assert not torch.allclose(expected, run(model, x), atol=1e-3)
    torch.testing.assert_close(run(gm, x), expected, rtol=1e-5, atol=2e-6)
    (directory / "adapter_model.bin").write_bytes(b"garbage")
    fails(model, peft_spec(directory, allow_pickle=True), x, peftfx.CheckpointError, r"adapter_model\.bin: cannot read")


def test_opt_ins_are_spec_fields():
    properties = peftfx.spec_schema()["$defs"]["PeftAdapter"]["properties"]
    assert properties["allow_pickle"]["default"] is False and "pickle" in properties["allow_pickle"]["description"]
    assert properties["allow_nonfinite"]["default"] is False and "NaN" in properties["allow_nonfinite"]["description"]


# -- combine ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mix", "match"),
    [
        ({"combine": ["a", "chta"]}, r"adapters\.mix\.combine\[1\]: no adapter named 'chta' \(did you mean 'chat'\?\)"),
        ({"combine": ["a", "zzz"]}, r"adapters\.mix\.combine\[1\]: no adapter named 'zzz' \(have: a, chat\)"),
        ({"combine": ["a"], "weights": [1.0, 2.0]}, r"adapters\.mix\.weights: 2 weights for 1 combined adapters"),
        ({"combine": ["a", "chat"], "weights": [1.0]}, r"adapters\.mix\.weights: 1 weights for 2 combined adapters"),
        ({"combine": ["a"], "method": "nope"}, r"adapters\.mix\.method: unknown fold method 'nope' \(known: "),
        ({"combine": ["a"], "method": "ties"}, r"adapters\.mix\.density: method ties needs a density"),
        (
            {"combine": ["a"], "method": "ties", "density": 1.5},
            r"adapters\.mix\.density: must be in \[0, 1\], got 1\.5",
        ),
        ({"combine": ["a"], "method": "ties", "density": -0.1}, r"adapters\.mix\.density: must be in \[0, 1\]"),
        ({"combine": ["a", "a"]}, r"adapters\.mix\.combine\[1\]: 'a' is listed twice"),
        ({"combine": ["a", "mix"]}, r"adapters\.mix\.combine: .*cycle"),
        ({"combine": ["a"], "majority_sign": "vote"}, r"adapters\.mix\.majority_sign: Input should be 'total' or"),
    ],
)
def test_combine_errors(mix, match):
    spec_fails({"adapters": {"a": {"peft": "somewhere"}, "chat": {"peft": "else"}, "mix": mix}}, match)


def test_per_layer_density_outside_the_unit_interval(good):
    density = {"cases": [{"when": {"layers": 1}, "value": 2.0}, {"value": 0.5}]}
    spec = {"adapters": {"x": {"peft": str(good[0])}, "y": {"peft": str(good[0])}}}
    spec["adapters"]["mix"] = {"combine": ["x", "y"], "method": "ties", "density": density}
    fails(mlp(), spec, mlp_inputs(), peftfx.SpecError, r"adapters\.mix\.density: must be in \[0, 1\], got 2\.0 at lin")


# -- selectors and ops -----------------------------------------------------------------------------------------


def test_selector_matching_nothing_names_the_field_path():
    spec = {
        "adapters": {
            "ok": {"type": "lora", "at": {"op": "linear"}},
            "bad": {"type": "lora", "at": {"op": "linear", "module": "*.q_proj"}},
        }
    }
    message = fails(mlp(), spec, mlp_inputs(), peftfx.MatchError, r"^adapters\.bad\.at: selector matched 0 sites")
    assert "does not match glob '*.q_proj'" in message
    typo = {"adapters": {"a": {"type": "lora", "at": {"op": "lnear"}}}}
    fails(mlp(), typo, mlp_inputs(), peftfx.MatchError, r"adapters\.a\.at: .*'lnear' is no site op \(did you mean 'lin")
    exact = {"adapters": {"a": {"type": "lora", "at": {"op": "linear", "expect": 3}}}}
    fails(
        mlp(), exact, mlp_inputs(), peftfx.MatchError, r"adapters\.a\.at: selector matched 2 sites, expected exactly 3"
    )


def test_adapter_on_an_unsupported_op():
    spec = {"adapters": {"a": {"type": "lora", "at": {"op": ["linear", "layer_norm"]}}}}
    fails(
        embed_net(),
        spec,
        id_inputs(),
        peftfx.MatchError,
        r"adapters\.a\.at: lora cannot adapt layer_norm norm \[8\] .*supports conv1d, conv2d, .*linear",
    )
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)).eval()
    spec = {"adapters": {"a": {"type": "lora", "at": {"op": "conv2d"}, "with": {"r": 3}}}}
    fails(grouped, spec, (torch.randn(1, 4, 5, 5),), peftfx.SpecError, r"adapters\.a: rank 3 is not divisible by the 2")
    spec = {"adapters": {"a": {"type": "dora", "at": {"op": "conv2d"}}}}
    fails(
        grouped, spec, (torch.randn(1, 4, 5, 5),), peftfx.SpecError, r"adapters\.a: DoRA on a grouped conv \(conv2d 0"
    )


def test_bad_fresh_parameters_name_the_field():
    spec = {"adapters": {"a": {"type": "dora", "at": {"op": "linear"}, "with": {"lora_bias": True}}}}
    fails(mlp(), spec, mlp_inputs(), peftfx.SpecError, r"adapters\.a: .*lora_bias is not supported with DoRA")
    gradient = {"adapters": {"a": {**FRESH, "with": {"r": {"gradient": [4, -4]}}}}}
    fails(mlp(), gradient, mlp_inputs(), peftfx.SpecError, r"adapters\.a\.with\.r: .*greater than 0 \(at linear lay")
    no_default = {"adapters": {"a": {**FRESH, "with": {"r": {"cases": [{"when": {"layers": 0}, "value": 2}]}}}}}
    fails(mlp(), no_default, mlp_inputs(), peftfx.SpecError, r"adapters\.a\.with\.r: no case matches linear layers\.1")
    activation = {"adapters": {"a": {"type": "peanut", "at": {"op": "linear"}, "with": {"act_fn": "nope"}}}}
    fails(mlp(), activation, mlp_inputs(), peftfx.SpecError, r"adapters\.a\.with\.act_fn: unknown activation 'nope'")


def test_merge_and_active_name_adapters_that_exist():
    two = {"adapters": {"a": FRESH, "b": FRESH}}
    fails(mlp(), {**two, "merge": ["a", "c"]}, mlp_inputs(), peftfx.SpecError, r"merge\[1\]: 'c' is not an active")
    fails(mlp(), {**two, "active": ["z"]}, mlp_inputs(), peftfx.SpecError, r"active\[0\]: no adapter named 'z'")
    fails(mlp(), {**two, "active": ["aa"]}, mlp_inputs(), peftfx.SpecError, r"active\[0\]: .* \(did you mean 'a'\?\)")
    only_a = {**two, "active": ["a"], "merge": ["b"]}
    fails(mlp(), only_a, mlp_inputs(), peftfx.SpecError, r"merge\[0\]: 'b' is not an active adapter")


# -- dtypes: adapter versus base -------------------------------------------------------------------------------


def test_integer_tensor_where_a_float_is_expected(good, tmp_path):
    directory = variant(good, tmp_path, tensors=lambda t: t.__setitem__(KEY_A, torch.ones(2, 16, dtype=torch.int64)))
    match = rf"safetensors: '{KEY_A}' is torch\.int64, but lora needs a float tensor"
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, match)


@pytest.mark.parametrize("stored", [torch.float64, torch.float16, torch.bfloat16])
def test_float_checkpoint_of_another_dtype_is_cast_as_peft_does(good, tmp_path, stored):
    """PEFT's load_state_dict copies a checkpoint into the adapter's own dtype (the base's, half precisions
    upcast to float32); peftfx casts the same way, so both read the same numbers from a float64/16 file."""
    directory = variant(good, tmp_path, tensors=lambda t: t.update({k: v.to(stored) for k, v in t.items()}))
    model, x = mlp(), mlp_inputs()
    gm = peftfx.compile(model, peft_spec(directory), x)
    tensors = dict(gm.named_parameters())
    stored_b = load_file(directory / "adapter_model.safetensors")[KEY_B]
    assert torch.equal(tensors["peftfx.a.layers__1.lora_B"], stored_b.to(torch.float32))
    peft_model = peft.PeftModel.from_pretrained(mlp(), directory).eval()
    assert peft_model.base_model.model.layers[1].lora_B["default"].weight.dtype == torch.float32
    torch.testing.assert_close(run(gm, x), run(peft_model, x), rtol=1e-6, atol=1e-6)  # same float32 math


def test_half_precision_model_keeps_float32_adapters(good):
    """PEFT's autocast_adapter_dtype: adapters of a float16/bfloat16 base are float32, its output in the base dtype."""
    model, x = mlp(dtype=torch.bfloat16), mlp_inputs(dtype=torch.bfloat16)
    gm = peftfx.compile(model, peft_spec(good[0]), x)
    assert {p.dtype for n, p in gm.named_parameters() if n.startswith("peftfx.")} == {torch.float32}
    assert run(gm, x).dtype == torch.bfloat16
    peft_model = peft.PeftModel.from_pretrained(mlp(dtype=torch.bfloat16), good[0]).eval()
    torch.testing.assert_close(run(gm, x), run(peft_model, x), rtol=0, atol=0)  # the same casts in the same order


# -- capture ---------------------------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.sum() > 0 else x


class ShapeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.shape[0] > 1 else x


def test_bad_capture_inputs():
    fails(mlp(), {"capture": "export"}, None, peftfx.CaptureError, r"MLP with torch\.export needs example_inputs")
    fails(mlp(), {"capture": "export"}, (torch.randn(3, 5),), peftfx.CaptureError, r"torch\.export could not capture")
    fails(tiny_llama(), {}, None, peftfx.CaptureError, r"LlamaForCausalLM with torch\.export needs example_inputs")
    llama_bad = {"input_idz": token_inputs()["input_ids"]}
    fails(tiny_llama(), {}, llama_bad, peftfx.CaptureError, r"could not capture LlamaForCausalLM")


class OutOfMemory(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise MemoryError  # as an allocation that fails during the trace: no message at all


def test_a_capture_failing_without_a_message_names_the_error():
    fails(OutOfMemory(), {"capture": "export"}, (torch.randn(2),), peftfx.CaptureError, r"OutOfMemory: MemoryError")


def test_untraceable_model():
    fails(DataDependent(), {}, None, peftfx.CaptureError, r"symbolic_trace cannot trace DataDependent.*example_inputs")
    spec = {"capture": "symbolic_trace"}
    fails(DataDependent(), spec, (torch.randn(2, 3),), peftfx.CaptureError, r"symbolic_trace cannot trace")
    # auto: export is the tracer that matters once inputs are given, so its error leads, with the line it stopped at
    message = fails(DataDependent(), {}, (torch.randn(2, 3),), peftfx.CaptureError, r"^torch\.export could not")
    assert re.search(
        r"stopped at \S*test_bad_input\.py:\d+ in forward: return self\.lin\(x\) if x\.sum\(\) > 0", message
    )
    assert "try: " in message and "capture: symbolic_trace" in message and "wrapper" in message
    assert message.rstrip().endswith(")") and "capture: auto tried symbolic_trace first" in message
    fails(ShapeDependent(), {}, "abc", peftfx.CaptureError, r"example_inputs must be a tuple .* not str")
    # with inputs, auto falls back to export, which can capture a shape-dependent branch
    lora = {"adapters": {"a": {"type": "lora", "at": {"op": "linear"}}}}
    gm = peftfx.compile(ShapeDependent(), lora, (torch.ones(2, 3),))
    assert any(n.startswith("peftfx.a.") for n, _ in gm.named_parameters())


# -- stacking --------------------------------------------------------------------------------------------------


def test_an_adapter_that_recomputes_its_site_refuses_to_drop_an_earlier_one():
    """(IA)³ on a feed-forward input re-runs the linear from its input: after a LoRA on the same site it would
    silently drop the LoRA, so it is refused; in the other order the LoRA adds to the scaled output, which works."""
    model, inputs = mlp(), mlp_inputs()
    lora = {"type": "lora", "at": {"module": "layers.0"}, "with": {"init": False}, "seed": 0}
    ia3 = {"type": "ia3", "at": {"module": "layers.0"}, "with": {"feedforward": True, "init": False}, "seed": 1}
    spec = {"adapters": {"l": lora, "i": ia3}}
    fails(model, spec, inputs, peftfx.PeftfxError, r"adapters\.i: ia3 .* silently drop 'l'")
    live = peftfx.compile(model, {**spec, "active": ["i", "l"]}, inputs)
    alone = peftfx.compile(model, {"adapters": {"i": ia3}}, inputs)
    assert not torch.allclose(live(*inputs), alone(*inputs))


# A routed graph's adapter_index, and the tensors an ONNX file takes: runtime inputs are user input too.
BAD_INDEX = {  # each: the index given a batch of 3 on a graph routing two adapters, and what the error must say
    "above the routing": (
        torch.tensor([0, 2, 1]),
        r"adapter_index: every value must be -1 \(the base model\) or 0\.\.1",
    ),
    "below -1": (torch.tensor([0, -2, 1]), r"adapter_index: every value must be -1 \(the base model\) or 0\.\.1"),
    "one for the batch": (torch.tensor([1]), r"adapter_index: one value per sample"),
    "float": (torch.tensor([0.0, 1.0, 1.0]), r"adapter_index: expected an int64 tensor of shape \[batch\]"),
    "2-d": (torch.tensor([[0, 1, 1]]), r"adapter_index: expected an int64 tensor of shape \[batch\]"),
}


@pytest.fixture(scope="module")
def routed():
    """Two fresh LoRAs (moved off their identity init) routed per sample on the test MLP."""
    fresh = {n: {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2}, "seed": i} for i, n in enumerate("ab")}
    gm = peftfx.compile(mlp(), {"adapters": fresh, "routing": {"adapters": ["a", "b"]}}, mlp_inputs())
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if "routing" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return gm


@pytest.mark.parametrize("case", BAD_INDEX)
def test_routed_graph_refuses_a_bad_adapter_index(routed, case):
    index, match = BAD_INDEX[case]
    with pytest.raises(peftfx.InputError, match=match):
        routed(*mlp_inputs(), adapter_index=index)


def test_routed_graph_traced_again_keeps_its_check(routed):
    traced = torch.fx.symbolic_trace(routed)
    index, match = BAD_INDEX["above the routing"]
    with pytest.raises(peftfx.InputError, match=match):
        traced(*mlp_inputs(), adapter_index=index)


def test_routed_graph_under_torch_compile_refuses_a_bad_adapter_index(routed):
    """The checks are ops and guards of the compiled graph: good routings never recompile, bad ones still fail."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(routed, backend=counter)
    x = mlp_inputs()[0]
    for good_index in ([0, -1, 1], [1, 1, 1], [-1, -1, -1]):
        index = torch.tensor(good_index)
        torch.testing.assert_close(compiled(x, adapter_index=index), routed(x, adapter_index=index))
    assert counter.frame_count == 1
    for index, match in BAD_INDEX.values():
        with pytest.raises((RuntimeError, peftfx.InputError), match=match):
            compiled(x, adapter_index=index)
    torch._dynamo.reset()


def test_onnx_file_refuses_a_bad_adapter_index(routed, tmp_path):
    """In onnxruntime: the graph's own checks (values, length against the batch), then ``check_onnx_inputs`` for
    what onnxruntime refuses without naming the input (the dtype)."""
    import onnxruntime as ort

    path = peftfx.export_onnx(routed, mlp_inputs(), tmp_path / "routed.onnx", dynamic=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = mlp_inputs()[0].numpy()
    good = session.run(None, {"input_0": x, "adapter_index": torch.tensor([0, -1, 1]).numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(good), routed(*mlp_inputs(), adapter_index=torch.tensor([0, -1, 1])))
    for case in ("above the routing", "below -1", "one for the batch"):
        index, match = BAD_INDEX[case]
        with pytest.raises(Exception, match=match):
            session.run(None, {"input_0": x, "adapter_index": index.numpy()})
    with pytest.raises(peftfx.InputError, match=r"adapter_index: dim 0 is 'batch', which is 3 in input_0; got 1"):
        peftfx.check_onnx_inputs(session, {"input_0": x, "adapter_index": BAD_INDEX["one for the batch"][0].numpy()})
    for case in ("float", "2-d"):
        with pytest.raises(peftfx.InputError, match=r"adapter_index: expected int64 of shape \['batch'\], got"):
            peftfx.check_onnx_inputs(path, {"input_0": x, "adapter_index": BAD_INDEX[case][0].numpy()})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An ONNX file serving a LoRA (max_rank 8) as inputs, and good feeds for it."""
    spec = {"adapters": {"a": {"type": "lora", "at": {"module": "layers.0"}, "max_rank": 8, "as_inputs": True}}}
    gm = peftfx.compile(mlp(), spec, mlp_inputs())
    path = peftfx.export_onnx(gm, mlp_inputs(), tmp_path_factory.mktemp("served") / "m.onnx")
    feeds = {"input_0": mlp_inputs()[0].numpy(), **{k: v.numpy() for k, v in peftfx.adapter_inputs(gm).items()}}
    peftfx.check_onnx_inputs(path, feeds)
    return path, feeds


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t[:4], r": expected float of shape \[8, 12\], got shape \[4, 12\] \(dim 0\)"),
        (lambda t: t.double(), r": expected float of shape \[8, 12\], got float64"),
        (lambda t: t[0], r": expected float of shape \[8, 12\], got float32 of shape \[12\]"),
    ],
    ids=["shape", "dtype", "rank"],
)
def test_onnx_adapter_tensor_fed_with_a_wrong_shape_or_dtype(served, edit, match):
    """Adapter tensors declared ``as_inputs`` have static shapes in the file; a wrong one is named, not broadcast."""
    path, feeds = served
    a = "peftfx.a.layers__0.lora_A"
    with pytest.raises(peftfx.InputError, match=re.escape(a) + match):
        peftfx.check_onnx_inputs(path, {**feeds, a: edit(torch.from_numpy(feeds[a])).numpy()})


def test_onnx_scaling_fed_with_a_shape(served):
    path, feeds = served
    scaling = "peftfx.a.layers__0.scaling"
    with pytest.raises(peftfx.InputError, match=re.escape(scaling) + r": expected float of shape \[\], got"):
        peftfx.check_onnx_inputs(path, {**feeds, scaling: feeds[scaling].reshape(1)})


# -- hostile spec files: bombs, depth, duplicate keys, encodings, key types ------------------------------------


def test_yaml_anchors_and_aliases_are_refused(tmp_path):
    """Nine lines of aliases expand to 10^9 selectors (all memory gone): refused at the first anchor, at once."""
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    path = write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n")
    spec_fails(path, rf"{re.escape(str(path))}:1:4: YAML anchors and aliases .* are not allowed")
    alias = write(tmp_path / "alias.yaml", "adapters:\n  a: {type: lora, at: {op: linear}}\n  b: *a\n")
    spec_fails(alias, rf"{re.escape(str(alias))}:3:6: YAML anchors and aliases")


def test_nesting_is_bounded(tmp_path):
    """50k-deep JSON and 20k-deep YAML overflowed Python's stack (a raw RecursionError); a dict may even hold itself."""
    deep_json = write(tmp_path / "deep.json", '{"adapters": ' + "[" * 50_000 + "]" * 50_000 + "}")
    spec_fails(deep_json, rf"{re.escape(str(deep_json))}:1:\d+: nested more than 64 deep")
    deep_yaml = write(tmp_path / "deep.yaml", "adapters: " + "[" * 20_000 + "]" * 20_000 + "\n")
    spec_fails(deep_yaml, rf"{re.escape(str(deep_yaml))}:1:\d+: nested more than 64 deep")
    selector: dict = {"op": "linear"}
    selector["not"] = selector
    spec_fails({"adapters": {"a": {"type": "lora", "at": selector}}}, r"adapters\.a\.at\.\.\.: nested more than 64")


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_a_key_twice_is_refused_naming_both_lines(tmp_path, suffix):
    """YAML and JSON readers keep the last of two equal keys silently: a copied adapter replaced the first."""
    adapters = ['"a": {"type": "lora", "at": {"op": "linear"}}', '"a": {"type": "dora", "at": {"op": "linear"}}']
    path = write(tmp_path / f"spec.{suffix}", '{"adapters": {\n  ' + ",\n  ".join(adapters) + "\n}}\n")
    spec_fails(path, rf"{re.escape(str(path))}:3(:3)?: key 'a' appears twice .*first at {re.escape(str(path))}:2")
    nested = write(tmp_path / f"nested.{suffix}", '{"adapters": {"a": {"type": "lora", "at": {"op": 1, "op": 2}}}}')
    spec_fails(nested, r"nested\.\w+:1(:\d+)?: key 'op' appears twice")


def test_a_spec_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("adapters: {}\n# café\n".encode("latin-1"))
    spec_fails(path, rf"{re.escape(str(path))}:2: not UTF-8 text \(byte 0xe9 at offset 18\)")


def test_keys_that_are_not_strings_name_the_path(tmp_path):
    spec_fails({None: 1}, r"^spec: key None is not a string \(NoneType\)")
    spec_fails({"adapters": {"a": {**FRESH, "with": {4: 1}}}}, r"^adapters\.a\.with: key 4 is not a string \(int\)")
    path = write(tmp_path / "intkey.yaml", "adapters:\n  1: {type: lora, at: {}}\n")
    spec_fails(path, rf"{re.escape(str(path))}: adapters: key 1 is not a string \(int\); quote it")


def test_example_inputs_of_a_wrong_type():
    fails(mlp(), {}, 5, peftfx.CaptureError, r"example_inputs must be a tuple .*, not int")


# -- adapter names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["a.b"], r"adapter name 'a\.b' is not allowed: a letter, then"),
        ([""], r"adapter name '' is not allowed"),
        (["1a"], r"adapter name '1a' is not allowed"),
        (["a b"], r"adapter name 'a b' is not allowed"),
        (["x" * 65], r"adapter name 'x{65}' is not allowed"),
        (["training"], r"adapter name 'training' is reserved"),
        (["forward"], r"adapter name 'forward' is reserved"),
        (["a-b", "a_b"], r"adapter names 'a-b' and 'a_b' are the same attribute name \('a_b'\)"),
    ],
)
def test_adapter_names(names, match):
    """Names become attribute names (``peftfx.<name>.<module>.<role>``): ``a.b`` and ``a__b`` both became
    ``peftfx.a__b.*``, one set of tensors for two adapters; ``training`` and ``forward`` gave a PassError."""
    spec_fails({"adapters": dict.fromkeys(names, FRESH)}, rf"^adapters: {match}")


def test_allowed_names_are_in_the_schema():
    pattern = peftfx.spec_schema()["properties"]["adapters"]["propertyNames"]["pattern"]
    assert re.fullmatch(pattern, "style-v2_b") and not re.fullmatch(pattern, "a.b")
    gm = peftfx.compile(mlp(), {"adapters": {"style-v2": FRESH, "a__b": FRESH}}, mlp_inputs())
    assert {n.split(".")[1] for n, _ in gm.named_parameters() if n.startswith("peftfx.")} == {"style_v2", "a__b"}


# -- sizes and seeds -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        # 10^9 x 12 float32: 48 GB asked of the allocator; 10^30 overflowed torch's int64
        (kind("lora", r=10**9), r"adapters\.a\.with\.r: 1000000000: asks for a 1000000000x12 tensor at linear lay"),
        (kind("lora", r=10**30), r"adapters\.a\.with\.r: 10{30}: asks for a 10{30}x12 tensor .*past the limit of"),
        (kind("loha", r=10**9), r"adapters\.a\.with\.r: 1000000000: asks for a 16x1000000000 tensor"),
        (kind("vera", r=10**9), r"adapters\.a\.with\.r: 1000000000: asks for"),
        ({"adapters": {"a": {**FRESH, "max_rank": 10**10}}}, r"adapters\.a\.max_rank: 10000000000: asks for a "),
    ],
)
def test_sizes_past_the_limit_are_refused_before_allocating(spec, match):
    message = fails(mlp(), spec, mlp_inputs(), peftfx.SpecError, match)
    assert "min(in, out) there is 12" in message


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"adapters": {"a": {**FRESH, "seed": 2**70}}}, r"adapters\.a\.seed: Input should be less than 1844674407\d+"),
        ({"adapters": {"a": {"combine": ["a"], "seed": -(2**64)}}}, r"adapters\.a\.seed: Input should be greater"),
        (kind("randlora", projection_prng_key=2**64), r"adapters\.a\.with\.projection_prng_key: Input should be less"),
        (kind("fourierft", random_loc_seed=2**70), r"adapters\.a\.with\.random_loc_seed: Input should be less"),
        (
            {"model": {"config": {"model_type": "llama"}, "inputs": {"batch": 10**6, "seq_len": 10**6}}},
            r"model\.inputs: batch x seq_len = 1,000,000,000,000 token ids, past the limit of 16,777,216",
        ),
    ],
)
def test_seeds_are_64_bits_and_inputs_bounded(spec, match):
    spec_fails(spec, match)


# -- outputs ---------------------------------------------------------------------------------------------------


def test_outputs_onto_a_file_or_a_folder_not_theirs(tmp_path):
    gm = peftfx.compile(mlp(), {"adapters": {"a": FRESH}}, mlp_inputs())
    file = write(tmp_path / "file", "mine")
    with pytest.raises(peftfx.PeftfxError, match=rf"export_onnx: {re.escape(str(file))} is a file, so nothing"):
        peftfx.export_onnx(gm, mlp_inputs(), file / "m.onnx")  # refused before the export, not after
    with pytest.raises(peftfx.PeftfxError, match=rf"export_onnx: {re.escape(str(tmp_path))} is a folder"):
        peftfx.export_onnx(gm, mlp_inputs(), tmp_path)
    with pytest.raises(peftfx.PeftfxError, match=rf"save_adapter: {re.escape(str(file))} is a file, not a folder"):
        peftfx.save_adapter(gm, "a", file)
    with pytest.raises(peftfx.PeftfxError, match=rf"save_adapter: {re.escape(str(file))} is a file, so nothing"):
        peftfx.save_adapter(gm, "a", file / "under")
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "model_weights.bin", "mine")
    with pytest.raises(peftfx.PeftfxError, match=r"folder is not an adapter folder \(no adapter_config\.json\)"):
        peftfx.save_adapter(gm, "a", folder)
    assert file.read_text() == "mine" and [p.name for p in folder.iterdir()] == ["model_weights.bin"]
