"""export_onnx: onnxruntime gives the graph's numbers, a merged export is the base export's size, adapters declared
``as_inputs`` are graph inputs one file serves many adapters with, dims are dynamic where asked, files are
reproducible and written atomically; and ``peftfx export`` on the command line.

Tolerance: float32, rtol 1e-5 / atol 1e-6: onnxruntime fuses and reorders float32 ops (measured ~1e-7 on outputs
of size ~1).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from models import conv_inputs, conv_net, mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, assert_close, run
from typer.testing import CliRunner

import peftfx
from peftfx.cli import app

ort = pytest.importorskip("onnxruntime")

TOL = Tolerance(1e-5, 1e-6)


def lora(at: dict, r: int = 4, alpha: float = 8.0, seed: int = 0, rslora: bool = False, **fields) -> dict:
    with_ = {"r": r, "alpha": alpha, "rslora": rslora, "init": False}
    return {"type": "lora", "at": at, "with": with_, "seed": seed, **fields}


def named(inputs) -> dict[str, torch.Tensor]:
    """The model inputs under their ONNX names: keyword names, or input_<i> for positional ones."""
    return dict(inputs) if isinstance(inputs, dict) else {f"input_{i}": x for i, x in enumerate(inputs)}


def ort_run(path: Path, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])


def node_count(path: Path) -> int:
    return len(onnx.load(str(path)).graph.node)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("factory", "make_inputs", "at"),
    [
        (tiny_llama, token_inputs, {"module": ["q_proj", "v_proj"]}),
        (tiny_gpt2, token_inputs, {"module": ["c_attn", "c_fc"]}),
        (conv_net, conv_inputs, {"op": ["conv2d", "linear"]}),
    ],
    ids=["llama", "gpt2", "conv"],
)
def test_onnx_live_and_merged_match_the_graph(tmp_path, factory, make_inputs, at):
    model, inputs = factory(), make_inputs()
    base = peftfx.export_onnx(peftfx.compile(model, {}, inputs), inputs, tmp_path / "base.onnx")
    for merged in (False, True):
        gm = peftfx.compile(model, {"adapters": {"a": lora(at)}, "merge": merged}, inputs)
        path = peftfx.export_onnx(gm, inputs, tmp_path / f"{merged}.onnx")
        assert_close(ort_run(path, named(inputs)), run(gm, inputs), TOL, f"onnxruntime, merged={merged}")
        assert not torch.allclose(run(gm, inputs), run(model, inputs), atol=1e-4)
        if merged:
            assert node_count(path) == node_count(base), "a merged adapter costs no ONNX node"
        else:
            assert node_count(path) > node_count(base)


@pytest.mark.slow
def test_one_onnx_file_serves_two_adapters_as_inputs_with_dynamic_dims(tmp_path):
    """Two adapters of other ranks and alphas, padded to max_rank, fed to one session on a new batch and length."""
    model, inputs = tiny_llama(), token_inputs()
    at = {"module": ["q_proj", "v_proj"]}
    spec = {"adapters": {"a": lora(at, 2, 4.0, 0, max_rank=8, as_inputs=True)}}
    gm = peftfx.compile(model, spec, inputs, dynamic_shapes=peftfx.dynamic_shapes(inputs))
    path = peftfx.export_onnx(gm, inputs, tmp_path / "m.onnx", dynamic=True)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    declared = {i.name: i.shape for i in session.get_inputs()}
    tensors = peftfx.adapter_inputs(gm)
    assert list(declared) == ["input_ids", *tensors]
    assert declared["input_ids"] == ["batch", "sequence"]
    assert "peftfx.a.model__layers__0__self_attn__q_proj.lora_A" in declared
    assert declared["peftfx.a.model__layers__0__self_attn__q_proj.lora_A"] == [8, 32]  # static: max_rank
    assert declared["peftfx.a.model__layers__0__self_attn__q_proj.scaling"] == []

    other = {"input_ids": torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(5))}
    first = ort_run(path, {**other, **tensors})
    assert_close(first, run(gm, other), TOL, "onnxruntime, adapter a")
    b = {"adapters": {"b": lora(at, 6, 3.0, 1, rslora=True)}}
    peftfx.swap_adapter(gm, "a", b)
    second = ort_run(path, {**other, **peftfx.adapter_inputs(gm)})
    fresh = peftfx.compile(model, b, other)
    assert_close(second, run(fresh, other), TOL, "onnxruntime, adapter b")
    assert not torch.allclose(first, second, atol=1e-3)


def test_the_same_spec_and_model_give_byte_identical_files(tmp_path):
    spec = {"adapters": {"a": lora({"op": "linear"}, max_rank=8, as_inputs=True)}}
    paths = []
    for i in range(2):
        gm = peftfx.compile(mlp(), spec, mlp_inputs())
        paths.append(peftfx.export_onnx(gm, mlp_inputs(), tmp_path / f"{i}.onnx"))
    assert paths[0].read_bytes() == paths[1].read_bytes()


class _Dropout(torch.nn.Module):
    """A plain module captured by symbolic_trace: its dropout stays a module call, whose mode decides."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop = torch.nn.Linear(12, 8), torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lin(x))


def test_a_graph_in_training_mode_exports_in_eval_mode_without_a_warning(tmp_path):
    model, inputs = _Dropout().train(), mlp_inputs()
    gm = peftfx.compile(model, {"adapters": {"a": lora({"op": "linear"})}}, inputs)
    assert gm.training and gm.drop.training  # a training-mode ONNX file would drop outputs at random
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Exporting a model while it is in training mode")
        path = peftfx.export_onnx(gm, inputs, tmp_path / "m.onnx")
    assert gm.training and gm.drop.training, "the caller's modes are restored"
    gm.eval()
    assert_close(ort_run(path, named(inputs)), run(gm, inputs), TOL, "onnxruntime vs the graph in eval mode")


def test_writes_are_atomic(tmp_path, monkeypatch):
    gm = peftfx.compile(mlp(), {"adapters": {"a": lora({"op": "linear"})}}, mlp_inputs())
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        peftfx.export_onnx(gm, mlp_inputs(), path)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.onnx"]
    monkeypatch.undo()
    peftfx.export_onnx(gm, mlp_inputs(), path)
    assert os.listdir(tmp_path) == ["m.onnx"]
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


@pytest.mark.slow
def test_a_dim_captured_static_cannot_be_exported_dynamic(tmp_path):
    model, inputs = tiny_gpt2(), token_inputs()
    gm = peftfx.compile(model, {}, inputs)
    with pytest.raises(peftfx.CaptureError, match="dim 0 of input 'input_ids' was captured static"):
        peftfx.export_onnx(gm, inputs, tmp_path / "m.onnx", dynamic=True)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    ("inputs", "dynamic", "message"),
    [
        ({"input_ids": torch.zeros(2, 6, dtype=torch.long)}, {"ids": {0: "batch"}}, "dynamic: no input named 'ids'"),
        ({"input_ids": torch.zeros(2, 6, dtype=torch.long)}, {"input_ids": {2: "x"}}, "input 'input_ids' has no dim 2"),
        ({"input_ids": torch.zeros(1, 6, dtype=torch.long)}, True, "dynamic.input_ids: dim 0 has size 1"),
    ],
)
def test_dynamic_errors_name_the_input(inputs, dynamic, message):
    with pytest.raises(peftfx.SpecError, match=message):
        peftfx.dynamic_shapes(inputs, dynamic)


def test_dynamic_true_is_batch_and_token_sequence():
    shapes = peftfx.dynamic_shapes({"input_ids": torch.zeros(2, 6, dtype=torch.long), "x": torch.zeros(2, 3, 4)})
    assert {k: {i: d.__name__ for i, d in v.items()} for k, v in shapes.items()} == {
        "input_ids": {0: "batch", 1: "sequence"},
        "x": {0: "batch"},
    }


def conv_model():
    """A ``--model`` factory for the command line test."""
    return conv_net(), conv_inputs()


def test_command_line_export(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("adapters:\n  a: {type: lora, at: {op: conv2d}, with: {r: 2, init: false}, seed: 0}\n")
    runner = CliRunner()
    out = tmp_path / "out" / "m.onnx"
    result = runner.invoke(app, ["export", str(spec), "--model", "test_export:conv_model", "-o", str(out), "--dynamic"])
    assert result.exit_code == 0, result.output
    gm = peftfx.compile(conv_net(), spec, conv_inputs())
    batch = torch.randn(5, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    assert_close(ort_run(out, {"input_0": batch}), run(gm, (batch,)), TOL, "onnxruntime, from the command line")
    spec.write_text("adapters:\n  a: {type: lora, at: {op: conv2d}, max_rank: 1, with: {r: 2}}\n")
    result = runner.invoke(app, ["export", str(spec), "--model", "test_export:conv_model", "-o", str(out)])
    assert result.exit_code == 2 and "adapters.a.max_rank" in result.output


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_external_data_runs_in_onnxruntime_and_is_reproducible(tmp_path):
    """``external_data=True``: the weights in one file beside the graph, named by their digest; the same graph gives
    the same bytes; a later export without it removes the data file it no longer needs."""
    gm = peftfx.compile(mlp(), {"adapters": {"a": lora({"op": "linear"})}}, mlp_inputs())
    whole = peftfx.export_onnx(gm, mlp_inputs(), tmp_path / "whole" / "m.onnx")
    paths = [peftfx.export_onnx(gm, mlp_inputs(), tmp_path / d / "m.onnx", external_data=True) for d in "ab"]
    (data,) = [name for name in _files(paths[0].parent) if name != "m.onnx"]
    assert _files(paths[0].parent) == _files(paths[1].parent) == ["m.onnx", data] and data.endswith(".data")
    for name in ("m.onnx", data):
        assert (paths[0].parent / name).read_bytes() == (paths[1].parent / name).read_bytes()
    weights = onnx.load(str(paths[0]), load_external_data=False).graph.initializer
    assert all(len(w.raw_data) <= 256 for w in weights), "tensors past onnx_ir's 256-byte threshold are outside"
    outside = [int(e.value) for w in weights for e in w.external_data if e.key == "length"]
    assert outside and sum(outside) == (paths[0].parent / data).stat().st_size
    assert paths[0].stat().st_size < whole.stat().st_size
    assert_close(ort_run(paths[0], named(mlp_inputs())), run(gm, mlp_inputs()), TOL, "onnxruntime, external data")
    peftfx.export_onnx(gm, mlp_inputs(), paths[0])
    assert _files(paths[0].parent) == ["m.onnx"]


def test_external_data_is_automatic_past_the_protobuf_limit(tmp_path, monkeypatch):
    """Measured here against a lowered limit: a real >2 GiB export is bench/bench_onnx_large.py's."""
    gm = peftfx.compile(mlp(), {}, mlp_inputs())
    monkeypatch.setattr("peftfx.export._PROTOBUF_LIMIT", 1024)
    monkeypatch.setattr("peftfx.export._GRAPH_ROOM", 0)
    path = peftfx.export_onnx(gm, mlp_inputs(), tmp_path / "m.onnx")
    assert len(_files(tmp_path)) == 2
    assert_close(ort_run(path, named(mlp_inputs())), run(gm, mlp_inputs()), TOL, "onnxruntime, automatic")
    peftfx.export_onnx(gm, mlp_inputs(), path, external_data=False)
    assert _files(tmp_path) == ["m.onnx"]


def test_external_data_appears_with_its_graph_or_not_at_all(tmp_path, monkeypatch):
    """A failure when the graph is moved into place leaves the earlier export whole and no new data file."""
    gm = peftfx.compile(mlp(), {"adapters": {"a": lora({"op": "linear"})}}, mlp_inputs())
    path = peftfx.export_onnx(
        peftfx.compile(mlp(), {}, mlp_inputs()), mlp_inputs(), tmp_path / "m.onnx", external_data=True
    )
    before = {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)}
    real = os.replace

    def fail_on_the_graph(src, dst):
        if Path(dst).name == "m.onnx":
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_graph)
    with pytest.raises(OSError, match="disk full"):
        peftfx.export_onnx(gm, mlp_inputs(), path, external_data=True)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)} == before
    base = peftfx.compile(mlp(), {}, mlp_inputs())
    assert_close(ort_run(path, named(mlp_inputs())), run(base, mlp_inputs()), TOL, "the earlier export")
