"""The spec: YAML, JSON, dict and ``peftfx.Spec`` are one thing; unknown keys and bad files are named errors."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import yaml
from models import conv_inputs, conv_net, mlp, mlp_inputs, tiny_llama, token_inputs
from oracle import adapter_parameters, assert_unchanged, peft_checkpoint, run, snapshot
from peftfx.passes import Causal, run_passes

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
    plain = run_passes(peftfx.capture(model, x), [Causal()])  # the capture as it ran, causal masks handed back
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
