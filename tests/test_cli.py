"""The ``peftfx`` command: exit codes, --format json, --output, and the model references it accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from examples import SPECS as EXAMPLES
from examples import example
from models import tiny_llama, token_inputs
from oracle import Tolerance, assert_close, run
from safetensors.torch import save_file
from typer.testing import CliRunner

import peftfx
from peftfx.atomic import MARKER
from peftfx.cli import app

SPECS = Path(__file__).parent.parent / "specs"
COMMANDS = ("schema", "validate", "explain", "compile", "verify")
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_the_commands_and_exit_codes():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    assert "0 ok, 1 verification failed, 2 bad input" in " ".join(result.output.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_complete_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    options = {"--output"} if command == "schema" else {"--format"}
    if command in ("explain", "compile", "verify"):
        options |= {"--model", "--inputs", "--seq-len"}
    if command == "verify":
        options |= {"--rtol", "--atol", "float32: 1e-4", "--no-peft", "--no-perturb"}  # defaults survive rich markup
    for option in options:
        assert option in text, f"{command} --help does not document {option}"


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


@pytest.mark.parametrize("command", ["explain", "compile", "verify", "export"])
def test_a_sequence_length_below_one_exits_2(command):
    result = invoke(command, SPECS / "fresh_dora_mlp.yaml", "--seq-len", "0")
    assert result.exit_code == 2
    assert "--seq-len" in result.output and "Traceback" not in result.output


def test_a_transformers_directory_works(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    result = invoke("compile", SPECS / "fresh_attention_lora.yaml", "--model", tmp_path / "llama", "-f", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["adapter_tensors"] == 8  # on token inputs made from the config's vocabulary


# -- every command on every example spec, as a user runs them: the spec's own model, no --model ---------------


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_command_on_the_example_spec(path, tmp_path):
    spec = example(path, tmp_path).spec  # beside the PEFT checkpoints it names
    assert invoke("validate", spec).exit_code == 0
    explained = invoke("explain", spec, "-f", "json")
    assert explained.exit_code == 0, explained.output
    matched = [r for r in json.loads(explained.stdout) if r["matched"]]
    assert matched and any(r["params"] for r in matched)  # ranks, alphas, fold weights; IA3 says feedforward
    compiled = invoke("compile", spec, "-o", tmp_path / "out", "-f", "json")
    assert compiled.exit_code == 0, compiled.output
    summary = json.loads(compiled.stdout)
    for adapter in summary["adapters"]:
        assert adapter["sites"] == len({r["module"] for r in matched if r["adapter"] == adapter["name"]})
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"program.pt2", "graph.py", "summary.json", MARKER}
    verified = invoke("verify", spec, "-f", "json")
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.stdout)
    assert report["ok"] and any(r["check"] == "merged vs live" for r in report["rows"])


@pytest.mark.slow
def test_export_of_a_routed_spec_takes_adapter_index(tmp_path):
    """The spec's example inputs have no adapter_index; the exported file takes it after the model's inputs."""
    import onnx

    spec = example(SPECS / "routing.yaml", tmp_path).spec
    result = invoke("export", spec, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert [i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input] == ["input_ids", "adapter_index"]


def test_explain_shows_resolved_values_per_site():
    result = invoke("explain", SPECS / "fresh_attention_lora.yaml", "-f", "json")
    assert result.exit_code == 0, result.output
    params = {r["module"]: r["params"] for r in json.loads(result.stdout) if r["matched"]}
    assert params["model.layers.0.self_attn.q_proj"] == {"r": 4, "alpha": 16, "scaling": 4.0}
    assert params["model.layers.1.self_attn.v_proj"] == {"r": 8, "alpha": 32, "scaling": 4.0}
    text = invoke("explain", SPECS / "fresh_attention_lora.yaml").output
    assert "match r=8 alpha=32 scaling=4" in text


def test_explain_shows_fold_weights_and_density(tmp_path):
    spec = example(SPECS / "fold_ties_three.yaml", tmp_path).spec
    result = invoke("explain", spec, "-f", "json")
    assert result.exit_code == 0, result.output
    (params, *_) = [r["params"] for r in json.loads(result.stdout) if r["matched"]]
    assert params["weights"] == [1.0, 0.8, -0.5] and params["density"] == 0.5 and params["r"] == 4


def test_explain_reports_what_compile_would_refuse_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((SPECS / "fresh_attention_lora.yaml").read_text().replace("expect: 4 ", "expect: 6 "))
    result = invoke("explain", bad)
    assert result.exit_code == 2
    assert "no: module:" in result.stdout  # the table is still there, to show why
    assert "adapters.style.at: selector matched 4 sites, expected exactly 6" in result.stderr


def test_compile_output_directory_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    for _ in range(2):  # a second run replaces the first output
        result = invoke("compile", SPECS / "fresh_dora_mlp.yaml", "-o", out)
        assert result.exit_code == 0, result.output
    assert "mlp" in result.stdout and "dora" in result.stdout and "live" in result.stdout
    assert json.loads((out / "summary.json").read_text())["adapters"][0]["sites"] == 2
    assert "peftfx" in (out / "graph.py").read_text()  # the graph's code, adapter nodes included
    assert torch.export.load(out / "program.pt2") is not None
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "a temporary file was left behind"
    marker = json.loads((out / MARKER).read_text())  # what peftfx wrote, so it may replace it
    assert marker == {"written_by": "peftfx", "version": peftfx.__version__, "files": sorted(marker["files"])}
    assert set(marker["files"]) == {"program.pt2", "graph.py", "summary.json"}
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = invoke("compile", SPECS / "fresh_dora_mlp.yaml", "-o", other)
    assert result.exit_code == 2 and "is not a folder peftfx wrote" in result.output
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("flags", [[], ["--inplace"]])
def test_compile_table_counts_merged_parameters(tmp_path, flags):
    spec = example(SPECS / "peft_lora_merged.yaml", tmp_path).spec
    result = invoke("compile", spec, "-f", "json", *flags)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # r=4 LoRA on q, v (32->32, 32->16) and down (64->32) of 2 layers: A [4, in] + B [out, 4] each
    assert summary["adapters"] == [
        {"name": "default", "kind": "lora", "sites": 6, "parameters": 2 * 4 * (64 + 48 + 96), "merged": True}
    ]
    assert summary["adapter_tensors"] == 0


@pytest.mark.parametrize("command", ["explain", "compile", "verify"])
def test_a_bad_spec_exits_2_naming_the_field(command, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((SPECS / "lora_qv_layers.yaml").read_text().replace("hidden_size: 32", "hidden_size: big"))
    result = invoke(command, bad)
    assert result.exit_code == 2
    assert f"{bad}:" in result.output and "model.config.hidden_size: expected an integer" in result.output


def test_a_spec_without_a_model_needs_model(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("adapters: {}\n")
    result = invoke("compile", spec)
    assert result.exit_code == 2 and "give --model" in result.output


def test_verify_exits_1_past_the_tolerance():
    result = invoke("verify", SPECS / "dora_all_linear.yaml", "--rtol", "0", "--atol", "0")
    assert result.exit_code == 1
    assert "FAIL" in result.stdout and "FAILED" in result.stdout
    result = invoke("verify", SPECS / "dora_all_linear.yaml", "--rtol", "0", "--atol", "0", "-f", "json")
    assert result.exit_code == 1 and json.loads(result.stdout)["ok"] is False


def test_verify_reads_inputs_from_a_file(tmp_path):
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": ids}, str(tmp_path / "inputs.safetensors"))
    result = invoke("verify", SPECS / "fresh_dora_mlp.yaml", "--inputs", tmp_path / "inputs.safetensors", "-f", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"]
    result = invoke("verify", SPECS / "fresh_dora_mlp.yaml", "--inputs", tmp_path / "missing.safetensors")
    assert result.exit_code == 2 and "--inputs" in result.output


def test_a_real_subprocess(tmp_path):
    """The installed entry point, as CI calls it: JSON on stdout, exit codes, errors on stderr."""
    command = [sys.executable, "-m", "peftfx"]
    done = subprocess.run([*command, "verify", SPECS / "graph_context.yaml", "--format", "json"], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["ok"] is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapters:\n  x: {type: lora, at: {op: linear}, with: {rank: 4}}\n")
    done = subprocess.run([*command, "compile", bad, "--model", "peftfx.demo:tiny_llama"], capture_output=True)
    assert done.returncode == 2
    assert "adapters.x.with.rank: unknown field" in done.stderr.decode() and not done.stdout


def test_build_reports_progress_per_step_and_per_site():
    heard = []
    spec = SPECS / "fresh_attention_lora.yaml"
    built = peftfx.build(tiny_llama(), spec, token_inputs(), progress=lambda *a: heard.append(a))
    assert [w for w, _, total in heard if total is None] == ["capture", "plan", "rewrite"]
    assert [(w, d, t) for w, d, t in heard if t is not None] == [("plan style", i, 4) for i in range(1, 5)]
    assert built.seconds.keys() == {"capture", "plan", "rewrite"}


# -- bad input on the command line: one line, exit 2, nothing lost -------------------------------------------


def test_an_unknown_key_is_one_line_on_stderr(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapters:\n  x: {type: lora, at: {op: linear}, with: {rank: 4}}\n")
    result = invoke("validate", bad)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {bad}:2:44: adapters.x.with.rank: unknown field for lora "
        + ("(fields: r, alpha, rslora, dora, lora_bias, init)")
    ]


@pytest.fixture
def unbuildable(monkeypatch):
    """Any work at all (loading or building a model) fails the test: outputs are checked before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the output path was not checked before the work")

    monkeypatch.setattr("peftfx.cli._model", refuse)


@pytest.mark.parametrize("command", ["compile", "export"])
def test_an_output_under_a_file_or_onto_a_file_exits_2_before_any_work(tmp_path, unbuildable, command):
    file = tmp_path / "file"
    file.write_text("mine")
    targets = [(file / "out.onnx", "is a file, so nothing can be written under it")]
    targets += [(file, "is a file, not a folder")] if command == "compile" else [(tmp_path, "is a folder")]
    for target, message in targets:
        result = invoke(command, SPECS / "fresh_dora_mlp.yaml", "-o", target)
        assert result.exit_code == 2, result.output
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr and "Traceback" not in result.output
    assert file.read_text() == "mine"


def test_compile_replaces_only_a_folder_it_signed(tmp_path, unbuildable):
    """A folder holding another tool's summary.json beside the user's weights was taken for an earlier output and
    replaced (exit 0, the weights gone). Only a folder whose marker lists all it holds may be replaced."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    (other / "model_weights.bin").write_bytes(b"the user's weights")
    result = invoke("compile", SPECS / "fresh_dora_mlp.yaml", "-o", other)
    assert (
        result.exit_code == 2 and f"--output {other}: {other} exists and is not a folder peftfx wrote" in result.stderr
    )
    assert (other / "model_weights.bin").read_bytes() == b"the user's weights"
    (other / MARKER).write_text(json.dumps({"written_by": "peftfx", "files": ["summary.json"]}))
    result = invoke("compile", SPECS / "fresh_dora_mlp.yaml", "-o", other)
    assert result.exit_code == 2 and "it also holds model_weights.bin" in result.stderr


def test_no_factory_refuses_code_a_spec_names(tmp_path, monkeypatch):
    """A spec's `model.factory` imports and runs code: `--no-factory` refuses it before the import."""
    ran = tmp_path / "ran"
    (tmp_path / "spec_factory.py").write_text(f"import pathlib\npathlib.Path({str(ran)!r}).touch()\ndef make():\n  0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {factory: 'spec_factory:make'}\n")
    for args in (["--no-factory"], ["--model", "spec_factory:make", "--no-factory"]):
        result = invoke("compile", spec, *args)
        assert result.exit_code == 2 and "spec_factory:make would import and run code" in result.stderr
        assert not ran.exists()
    result = invoke("compile", spec)  # allowed by default: it ran (and returned no model)
    assert result.exit_code == 2 and "returned NoneType, not an nn.Module" in result.stderr and ran.exists()
