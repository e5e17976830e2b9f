"""The ``peftfx`` command: exit codes, --format json, --output, and the model references it accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import tiny_llama
from oracle import Tolerance, assert_close, run
from typer.testing import CliRunner

from peftfx.cli import app

SPECS = Path(__file__).parent.parent / "specs"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("schema", "validate", "explain", "compile"):
        assert command in result.output


def test_schema_is_the_spec_json_schema(tmp_path):
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "adapters" in schema["properties"]
    assert invoke("schema", "--output", tmp_path / "s.json").exit_code == 0
    assert json.loads((tmp_path / "s.json").read_text()) == schema


def test_validate_ok_and_json():
    result = invoke("validate", SPECS / "fresh_attention_lora.yaml", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "valid": True,
        "adapters": ["style"],
        "active": ["style"],
        "merged": [],
        "routed": [],
    }


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_validate_reports_a_bad_spec_with_exit_2(tmp_path, fmt):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapters:\n  x:\n    type: lora\n    at: {op: linear, modul: q}\n")
    result = invoke("validate", bad, "--format", fmt)
    assert result.exit_code == 2
    assert "adapters.x.at.modul" in result.output
    if fmt == "json":
        assert json.loads(result.stdout)["valid"] is False


def test_explain_json_lists_every_site():
    result = invoke("explain", SPECS / "graph_context.yaml", "--model", "models:tiny_llama", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    matched = sorted(r["module"] for r in rows if r["matched"])
    assert matched == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.gate_proj", "self_attn.o_proj")]
    assert all(r["reason"] for r in rows if not r["matched"])


def test_compile_saves_an_exported_program(tmp_path):
    out = tmp_path / "model.pt2"
    result = invoke(
        "compile", SPECS / "fresh_dora_mlp.yaml", "--model", "models:tiny_llama", "--output", out, "-f", "json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["adapter_tensors"] == 6  # A, B, magnitude on gate_proj and up_proj of layer 1
    program = torch.export.load(out)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    got = program.module()(input_ids=ids)
    expected = run(tiny_llama(), {"input_ids": ids})  # a fresh DoRA is the identity at init
    assert_close(got.logits if hasattr(got, "logits") else got["logits"], expected, Tolerance(1e-5, 2e-6), "pt2")


def test_validate_checks_routing(tmp_path):
    lora = {"type": "lora", "at": {"op": "linear"}}
    spec = tmp_path / "routed.json"
    spec.write_text(json.dumps({"adapters": {"a": lora, "b": lora}, "routing": {"adapters": ["b"]}, "merge": True}))
    assert json.loads(invoke("validate", spec, "-f", "json").output)["routed"] == ["b"]
    spec.write_text(json.dumps({"adapters": {"a": lora}, "routing": {"adapters": ["a"]}, "merge": ["a"]}))
    result = invoke("validate", spec)
    assert result.exit_code == 2 and "routing.adapters[0]: 'a' is merged" in result.output


def test_compile_saves_a_routed_program_taking_adapter_index(tmp_path):
    lora = {"type": "lora", "at": {"module": "*.q_proj"}, "with": {"r": 2, "init": False}, "seed": 0}
    spec = tmp_path / "routed.yaml"
    spec.write_text(json.dumps({"adapters": {"a": lora}, "routing": {"adapters": ["a"]}}))
    out = tmp_path / "model.pt2"
    result = invoke("compile", spec, "--model", "models:tiny_llama", "--output", out)
    assert result.exit_code == 0, result.output
    module = torch.export.load(out).module()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    base = run(tiny_llama(), {"input_ids": ids})
    as_base, adapted = (module(input_ids=ids, adapter_index=torch.tensor([k]))["logits"] for k in (-1, 0))
    assert_close(as_base, base, Tolerance(1e-5, 2e-6), "the base model's row")
    assert not torch.allclose(adapted, base, atol=1e-3)


@pytest.mark.parametrize(
    ("model", "message"),
    [("no_such_module:factory", "cannot import"), ("/nonexistent/dir", "no config.json")],
)
def test_bad_model_reference_exits_2(model, message):
    result = invoke("compile", SPECS / "fresh_dora_mlp.yaml", "--model", model)
    assert result.exit_code == 2
    assert message in result.output


def test_a_transformers_directory_works(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    result = invoke("compile", SPECS / "fresh_attention_lora.yaml", "--model", tmp_path / "llama", "-f", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["adapter_tensors"] == 8  # on token inputs made from the config's vocabulary
