"""The spec: YAML, JSON, dict and ``peftfx.Spec`` are one thing; unknown keys and bad files are named errors."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import yaml
from models import conv_inputs, conv_net, mlp, mlp_inputs, tiny_llama, token_inputs
from oracle import adapter_parameters, assert_unchanged, peft_checkpoint, run, snapshot

import peftfx
from peftfx.spec import FreshAdapter, PeftAdapter, load_spec

# Two non-identity fresh adapters (init: false makes B random), on different layers of the float64 MLP.
TWO = {
    "adapters": {
        "a": {"type": "lora", "at": {"op": "linear", "module": "layers.0"}, "with": {"r": 2, "init": False}, "seed": 1},
        "b": {"type": "lora", "at": {"op": "linear", "module": "layers.1"}, "with": {"r": 3, "init": False}, "seed": 2},
    }
}


def _model():
    return mlp(dtype=torch.float64), mlp_inputs(dtype=torch.float64)


def _write(path, text):
    path.write_text(text)
    return path


# -- one spec, four forms --------------------------------------------------------------------------------------


def test_yaml_json_dict_and_spec_agree(tmp_path):
    model, x = _model()
    as_yaml = _write(tmp_path / "s.yaml", yaml.safe_dump(TWO))
    as_yml = _write(tmp_path / "s.yml", yaml.safe_dump(TWO))
    as_json = _write(tmp_path / "s.json", json.dumps(TWO))
    spec_obj = peftfx.Spec.model_validate(TWO)
    assert load_spec(as_yaml)[0] == load_spec(as_json)[0] == load_spec(TWO)[0] == spec_obj

    outputs = [run(peftfx.compile(model, form, x), x) for form in (TWO, spec_obj, as_yaml, str(as_yml), as_json)]
    assert not torch.allclose(outputs[0], run(model, x)), "the adapters must change the output"
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


def test_spec_parts_are_typed(tmp_path):
    text = """
adapters:
  ckpt: {peft: some/dir, scale: 0.5}
  fresh:
    type: dora
    at: {op: [linear, conv2d], not: {module: head}}
    with: {r: {gradient: [2, 8]}, alpha: {cases: [{when: {layers: [0]}, value: 4}, {value: 8}]}}
merge: [fresh]
active: [fresh, ckpt]
"""
    spec, base_dir = load_spec(_write(tmp_path / "s.yaml", text))
    assert base_dir == tmp_path
    assert isinstance(spec.adapters["ckpt"], PeftAdapter) and spec.adapters["ckpt"].scale == 0.5
    fresh = spec.adapters["fresh"]
    assert isinstance(fresh, FreshAdapter)
    assert fresh.at.op == ["linear", "conv2d"] and fresh.at.not_.module == "head"
    assert fresh.with_["r"].gradient == [2.0, 8.0]
    assert fresh.with_["alpha"].cases[0].when.layers == [0] and fresh.with_["alpha"].cases[1].value == 8
    assert spec.active_adapters() == ["fresh", "ckpt"]
    assert spec.merged_adapters() == ["fresh"]


def test_relative_checkpoint_paths_resolve_against_the_spec_file(tmp_path):
    model, x = _model()
    peft_model = peft_checkpoint(model, peft.LoraConfig(r=2, target_modules=["layers.0"]), tmp_path / "ckpt")
    (tmp_path / "sub").mkdir()
    spec_file = _write(tmp_path / "sub" / "spec.yaml", "adapters:\n  a: {peft: ../ckpt}\n")
    gm = peftfx.compile(model, spec_file, x)
    torch.testing.assert_close(run(gm, x), run(peft_model, x), rtol=1e-10, atol=1e-12)
    # the same relative path in a dict is relative to the working directory, so it is not found
    with pytest.raises(peftfx.PeftfxError, match=r"adapters\.a\.peft"):
        peftfx.compile(model, {"adapters": {"a": {"peft": "../ckpt"}}}, x)


# -- unknown keys ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"adapterz": {}}, "adapterz"),
        ({"adapters": {}, "merged": True}, "merged"),
        ({"adapters": {"a": {"peft": "x", "scal": 1}}}, "adapters.a.scal"),
        ({"adapters": {"a": {"type": "lora", "at": {"op": "linear", "modul": "x"}}}}, "adapters.a.at.modul"),
        ({"adapters": {"a": {"type": "lora", "at": {"weight": {"shap": [1]}}}}}, "adapters.a.at.weight.shap"),
        (
            {"adapters": {"a": {"type": "lora", "at": {"any_of": [{"op": "linear"}, {"opp": "x"}]}}}},
            "adapters.a.at.any_of[1].opp",
        ),
        ({"adapters": {"a": {"type": "lora", "at": {"exclude": {"layer": 1}}}}}, "adapters.a.at.exclude.layer"),
        ({"adapters": {"a": {"type": "lora", "at": {}, "with": {"rank": 4}}}}, "adapters.a.with.rank"),
        (
            {"adapters": {"a": {"type": "lora", "at": {}, "with": {"r": {"cases": [{"whn": {}, "value": 1}]}}}}},
            "adapters.a.with.r.cases[0].whn",
        ),
    ],
)
def test_unknown_keys_are_rejected_by_field_path(spec, field):
    with pytest.raises(peftfx.SpecError) as info:
        load_spec(spec)
    assert f"{field}: unknown field" in str(info.value)
    model, x = _model()
    with pytest.raises(peftfx.PeftfxError, match=field.replace(".", r"\.").replace("[", r"\[")):
        peftfx.compile(model, spec, x)


def test_unknown_key_in_yaml_names_file_and_line(tmp_path):
    text = "adapters:\n  a:\n    type: lora\n    at:\n      op: linear\n      modul: x\n"
    path = _write(tmp_path / "spec.yaml", text)
    with pytest.raises(peftfx.SpecError, match=rf"{path}:6: adapters\.a\.at\.modul: unknown field"):
        load_spec(path)


def test_unknown_key_in_json_names_file(tmp_path):
    path = _write(tmp_path / "spec.json", json.dumps({"adapters": {"a": {"type": "lora", "at": {"bogus": 1}}}}))
    with pytest.raises(peftfx.SpecError, match=rf"{path}: adapters\.a\.at\.bogus: unknown field"):
        load_spec(path)


def test_bad_values_name_the_field():
    with pytest.raises(peftfx.SpecError, match=r"adapters\.a\.type: unknown adapter kind 'lorax'"):
        load_spec({"adapters": {"a": {"type": "lorax", "at": {}}}})
    with pytest.raises(peftfx.SpecError, match=r"adapters\.a\.with\.r: .*greater than 0"):
        load_spec({"adapters": {"a": {"type": "lora", "at": {}, "with": {"r": 0}}}})
    with pytest.raises(peftfx.SpecError, match=r"adapters\.a\.at\.layers"):
        load_spec({"adapters": {"a": {"type": "lora", "at": {"layers": "one-two"}}}})
    with pytest.raises(peftfx.SpecError, match=r"adapters\.a\.at\.expect"):
        load_spec({"adapters": {"a": {"type": "lora", "at": {"expect": "lots"}}}})
    with pytest.raises(peftfx.SpecError, match=r"adapters\.a: an adapter needs `peft: <dir>`.*`type: <kind>`"):
        load_spec({"adapters": {"a": {"r": 4}}})
    with pytest.raises(peftfx.SpecError, match=r"capture"):
        load_spec({"capture": "jit"})


# -- malformed files -------------------------------------------------------------------------------------------


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.yaml", "adapters:\n  a:\n    type: lora\n    at: {op: linear\n    with: {r: 2}\n")
    with pytest.raises(peftfx.SpecError, match=rf"{path}:5:\d+: invalid YAML") as info:
        load_spec(path)
    assert isinstance(info.value, ValueError)
    with pytest.raises(peftfx.SpecError, match=rf"{path}:5"):
        peftfx.compile(mlp(), path, mlp_inputs())


def test_malformed_json_names_file_and_line(tmp_path):
    text = '{\n "adapters": {\n  "a": {"type": "lora",\n   "at": {"op": "linear",, }}}}\n'
    path = _write(tmp_path / "bad.json", text)
    with pytest.raises(peftfx.SpecError, match=rf"{path}:4:\d+: invalid JSON"):
        load_spec(path)


def test_bad_spec_files(tmp_path):
    with pytest.raises(peftfx.SpecError, match=r"missing\.yaml: spec file not found"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(peftfx.SpecError, match=r"spec\.txt: a spec file must end in"):
        load_spec(_write(tmp_path / "spec.txt", "{}"))
    with pytest.raises(peftfx.SpecError, match=r"list\.yaml: a spec is a mapping, not list"):
        load_spec(_write(tmp_path / "list.yaml", "- adapters\n"))
    with pytest.raises(peftfx.SpecError, match=r"spec must be a path, a dict or a peftfx\.Spec, not int"):
        load_spec(42)
    # an empty YAML file is the empty spec
    assert load_spec(_write(tmp_path / "empty.yaml", ""))[0] == peftfx.Spec()


# -- JSON Schema -------------------------------------------------------------------------------------------------


def test_json_schema_export():
    schema = peftfx.spec_schema()
    json.dumps(schema)  # plain JSON
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"adapters", "active", "merge", "capture", "routing", "model"}
    assert schema["$defs"]["ModelRef"]["additionalProperties"] is False
    defs = schema["$defs"]
    selector = defs["Selector"]
    assert selector["additionalProperties"] is False
    # the user-facing names, aliases included (``not``, ``with``), not the Python attribute names
    keys = {"op", "module", "layers", "exclude", "weight", "feeds", "fed_by", "any_of", "all_of", "not", "expect"}
    assert keys <= set(selector["properties"])
    assert "not_" not in selector["properties"]
    assert {"type", "at", "with", "seed"} <= set(defs["FreshAdapter"]["properties"])
    assert {"peft", "scale", "allow_pickle"} <= set(defs["PeftAdapter"]["properties"])
    assert defs["Gradient"]["required"] == ["gradient"]
    assert all(d.get("additionalProperties") is False for d in defs.values())
    assert schema == peftfx.Spec.model_json_schema(by_alias=True)


# -- merge: true vs a list of names ----------------------------------------------------------------------------


def test_merge_true_vs_list():
    model, x = _model()
    before = snapshot(model)
    base_nodes = len(peftfx.compile(model, {}, x).graph.nodes)
    live = peftfx.compile(model, TWO, x)
    expected = run(live, x)
    assert {n.split(".")[1] for n in adapter_parameters(live)} == {"a", "b"}

    only_a = peftfx.compile(model, {**TWO, "merge": ["a"]}, x)
    assert {n.split(".")[1] for n in adapter_parameters(only_a)} == {"b"}
    torch.testing.assert_close(run(only_a, x), expected, rtol=1e-10, atol=1e-12)

    both = peftfx.compile(model, {**TWO, "merge": True}, x)
    assert adapter_parameters(both) == []
    assert len(both.graph.nodes) == base_nodes
    torch.testing.assert_close(run(both, x), expected, rtol=1e-10, atol=1e-12)

    listed = peftfx.compile(model, {**TWO, "merge": ["b", "a"]}, x)
    assert adapter_parameters(listed) == []
    torch.testing.assert_close(run(listed, x), expected, rtol=1e-10, atol=1e-12)

    none = peftfx.compile(model, {**TWO, "merge": []}, x)
    assert len(adapter_parameters(none)) == len(adapter_parameters(live))
    assert_unchanged(model, before)


def test_merge_and_active_name_adapters_that_exist():
    model, x = _model()
    with pytest.raises(peftfx.SpecError, match=r"merge\[1\]: 'c' is not an active adapter"):
        peftfx.compile(model, {**TWO, "merge": ["a", "c"]}, x)
    with pytest.raises(peftfx.SpecError, match=r"active\[0\]: no adapter named 'z'"):
        peftfx.compile(model, {**TWO, "active": ["z"]}, x)
    with pytest.raises(peftfx.SpecError, match=r"merge\[0\]: 'b' is not an active adapter"):
        peftfx.compile(model, {**TWO, "active": ["a"], "merge": ["b"]}, x)


def test_inactive_adapter_is_left_out():
    model, x = _model()
    only_b = peftfx.compile(model, {**TWO, "active": ["b"]}, x)
    assert {n.split(".")[1] for n in adapter_parameters(only_b)} == {"b"}
    b_alone = peftfx.compile(model, {"adapters": {"b": TWO["adapters"]["b"]}}, x)
    assert torch.equal(run(only_b, x), run(b_alone, x))
    assert not torch.equal(run(only_b, x), run(peftfx.compile(model, TWO, x), x))


# -- the empty spec --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: (mlp(), mlp_inputs()),
        lambda: (conv_net(2), conv_inputs(2)),
        lambda: (tiny_llama(), token_inputs()),
    ],
    ids=["mlp", "conv2d", "llama"],
)
def test_empty_spec_returns_the_model_unchanged(make, tmp_path):
    model, x = make()
    before = snapshot(model)
    plain = peftfx.capture(model, x)
    expected = run(model, x)
    forms = [{}] if isinstance(x, dict) else [{}, peftfx.Spec(), _write(tmp_path / "empty.yaml", "{}\n")]
    for spec in forms:  # (one form for Llama: every export costs seconds)
        gm = peftfx.compile(model, spec, x)
        assert isinstance(gm, torch.fx.GraphModule)
        assert torch.equal(run(gm, x), expected)
        assert len(gm.graph.nodes) == len(plain.graph.nodes)
        assert [n.target for n in gm.graph.nodes] == [n.target for n in plain.graph.nodes]
        assert adapter_parameters(gm) == []
        assert not any(p.requires_grad for p in gm.parameters())
    assert_unchanged(model, before)
