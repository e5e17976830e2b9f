"""Every user error is a ``peftfx.PeftfxError`` (a ``ValueError``) naming its culprit, and leaves nothing behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import peft
import pytest
import torch
from models import embed_net, id_inputs, mlp, mlp_inputs, tiny_llama, token_inputs
from oracle import assert_unchanged, peft_checkpoint, run, snapshot
from safetensors.torch import load_file, save_file
from torch import nn

import peftfx

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
    assert_unchanged(model, before)
    return message


def peft_spec(directory: Path, **kw) -> dict:
    return {"adapters": {"a": {"peft": str(directory), **kw}}}


def test_the_good_checkpoint_works(good):
    """The control for every variant below: unedited, it loads and matches PEFT."""
    model, x = mlp(), mlp_inputs()
    gm = peftfx.compile(model, peft_spec(good[0]), x)
    torch.testing.assert_close(run(gm, x), run(good[1], x), rtol=1e-5, atol=2e-6)


def test_error_classes():
    for cls in (peftfx.SpecError, peftfx.CaptureError, peftfx.CheckpointError, peftfx.MatchError, peftfx.MergeError):
        assert issubclass(cls, peftfx.PeftfxError) and issubclass(cls, ValueError)


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


def test_unreadable_checkpoint_files(good, tmp_path):
    directory = variant(good, tmp_path)
    (directory / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"safetensors.*not a readable")
    (directory / "adapter_config.json").write_text('{\n  "r": 2,\n}\n')
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"adapter_config\.json:3: invalid JSON")
    (directory / "adapter_config.json").write_text('{"r": 2}')
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"adapter_config\.json: .*no peft_type")


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


def test_misshaped_tensor_names_the_key_and_shapes(good, tmp_path):
    directory = variant(good, tmp_path, tensors=lambda t: t.__setitem__(KEY_B, torch.randn(5, 2)))
    fails(
        mlp(),
        peft_spec(directory),
        mlp_inputs(),
        peftfx.CheckpointError,
        rf"safetensors: '{KEY_B}' has shape \[5, 2\], expected \[8, 2\]",
    )


def test_rank_disagreeing_with_config(good, tmp_path):
    def edit(t):
        t[KEY_A], t[KEY_B] = torch.randn(3, 16), torch.randn(8, 3)

    directory = variant(good, tmp_path, tensors=edit)
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, rf"'{KEY_A}' has rank 3, .* r=2")


def test_unexpected_and_stray_tensors(good, tmp_path):
    extra = "base_model.model.layers.1.lora_C.weight"
    directory = variant(good, tmp_path, tensors=lambda t: t.__setitem__(extra, torch.randn(2)))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, rf"unexpected tensor '{extra}'")
    shutil.rmtree(directory)
    stray = "base_model.model.layers.2.lora_A.weight"  # a real module the config does not target
    directory = variant(good, tmp_path, tensors=lambda t: t.__setitem__(stray, torch.randn(2, 16)))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, rf"tensor '{stray}' is for layers\.2")


def test_unknown_peft_type(good, tmp_path):
    directory = variant(good, tmp_path, config=lambda c: c.__setitem__("peft_type", "NOPE"))
    fails(
        mlp(),
        peft_spec(directory),
        mlp_inputs(),
        peftfx.CheckpointError,
        r"adapter_config\.json: peft_type 'NOPE' is not supported \(supported: .*LORA",
    )


def test_unsupported_config_field_is_refused(good, tmp_path):
    directory = variant(good, tmp_path, config=lambda c: c.__setitem__("init_lora_weights", "pissa"))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.CheckpointError, r"adapter_config\.json: init_lora_weig")


def test_checkpoint_targeting_nothing(good, tmp_path):
    directory = variant(good, tmp_path, config=lambda c: c.__setitem__("target_modules", ["nothing"]))
    fails(mlp(), peft_spec(directory), mlp_inputs(), peftfx.MatchError, r"adapters\.a \(target_modules of .*matched 0")


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


def test_pickle_opt_in_is_a_spec_field():
    schema = peftfx.spec_schema()["$defs"]["PeftAdapter"]["properties"]["allow_pickle"]
    assert schema["default"] is False and "pickle" in schema["description"]


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


def test_adapter_on_an_unsupported_op():
    spec = {"adapters": {"a": {"type": "lora", "at": {"op": ["linear", "layer_norm"]}}}}
    fails(
        embed_net(),
        spec,
        id_inputs(),
        peftfx.MatchError,
        r"adapters\.a\.at: lora cannot adapt layer_norm norm \[8\] .*supports conv1d, conv2d, .*linear",
    )


def test_lora_on_a_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)).eval()
    spec = {"adapters": {"a": {"type": "lora", "at": {"op": "conv2d"}}}}
    fails(model, spec, (torch.randn(1, 4, 5, 5),), peftfx.SpecError, r"grouped conv \(conv2d 0 \[4x2x3x3\]\)")


def test_grouped_conv_error_names_the_field():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)).eval()
    spec = {"adapters": {"a": {"type": "lora", "at": {"op": "conv2d"}}}}
    fails(model, spec, (torch.randn(1, 4, 5, 5),), peftfx.SpecError, r"adapters\.a")


def test_bad_fresh_parameters_name_the_field():
    spec = {"adapters": {"a": {"type": "dora", "at": {"op": "linear"}, "with": {"lora_bias": True}}}}
    fails(mlp(), spec, mlp_inputs(), peftfx.SpecError, r"lora_bias is not supported with DoRA")


# -- merge -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_refused_on_merge(good, tmp_path, bad):
    def edit(t):
        t[KEY_B][3, 1] = bad

    directory = variant(good, tmp_path, tensors=edit)
    fails(
        mlp(),
        {**peft_spec(directory), "merge": True},
        mlp_inputs(),
        peftfx.MergeError,
        r"merge: adapter 'a' at layers\.1: tensor lora_B holds NaN or inf",
    )
    # kept live, the same checkpoint compiles: the NaN shows in the outputs, the weights are not corrupted
    gm = peftfx.compile(mlp(), peft_spec(directory), mlp_inputs())
    assert not torch.isfinite(run(gm, mlp_inputs())).all()


def test_merge_that_overflows_is_refused(good, tmp_path):
    def edit(t):
        t[KEY_A], t[KEY_B] = torch.full((2, 16), 1e30), torch.full((8, 2), 1e30)

    directory = variant(good, tmp_path, tensors=edit)
    merge = {**peft_spec(directory), "merge": True}
    fails(mlp(), merge, mlp_inputs(), peftfx.MergeError, r"adapter 'a' at layers\.1: the merged weight is not finite")


# -- capture ---------------------------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.sum() > 0 else x


def test_bad_capture_inputs():
    fails(mlp(), {"capture": "export"}, None, peftfx.CaptureError, r"MLP with torch\.export needs example_inputs")
    fails(mlp(), {"capture": "export"}, (torch.randn(3, 5),), peftfx.CaptureError, r"torch\.export could not capture")
    fails(tiny_llama(), {}, None, peftfx.CaptureError, r"LlamaForCausalLM with torch\.export needs example_inputs")
    llama_bad = {"input_idz": token_inputs()["input_ids"]}
    fails(tiny_llama(), {}, llama_bad, peftfx.CaptureError, r"could not capture LlamaForCausalLM")


class ShapeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.shape[0] > 1 else x


def test_untraceable_model():
    fails(DataDependent(), {}, None, peftfx.CaptureError, r"symbolic_trace cannot trace DataDependent.*example_inputs")
    spec = {"capture": "symbolic_trace"}
    fails(DataDependent(), spec, (torch.randn(2, 3),), peftfx.CaptureError, r"symbolic_trace cannot trace")
    message = fails(DataDependent(), {}, (torch.randn(2, 3),), peftfx.CaptureError, r"neither tracer can capture")
    assert "symbolic_trace:" in message and "torch.export could not capture DataDependent" in message
    fails(ShapeDependent(), {}, "abc", peftfx.CaptureError, r"neither tracer can capture ShapeDependent")
    # with inputs, auto falls back to export, which can capture a shape-dependent branch
    lora = {"adapters": {"a": {"type": "lora", "at": {"op": "linear"}}}}
    gm = peftfx.compile(ShapeDependent(), lora, (torch.ones(2, 3),))
    assert any(n.startswith("peftfx.a.") for n, _ in gm.named_parameters())


# -- nothing half-done -----------------------------------------------------------------------------------------


def test_a_late_failure_leaves_the_model_untouched(good, tmp_path):
    """The first adapter is fine, the second is broken: the model is exactly as before, nothing leaks into it."""
    directory = variant(good, tmp_path, tensors=lambda t: t.__setitem__(KEY_B, torch.randn(5, 2)))
    model, x = mlp(), mlp_inputs()
    spec = {
        "adapters": {
            "first": {"type": "dora", "at": {"op": "linear"}, "with": {"init": False}},
            "second": {"peft": str(directory)},
        },
        "merge": True,
    }
    fails(model, spec, x, peftfx.CheckpointError, rf"'{KEY_B}' has shape")
    assert not any("peftfx" in name for name, _ in model.named_modules())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_failed_save_writes_nothing(tmp_path):
    """An adapter PEFT's format cannot hold (DoRA on some sites, plain LoRA on others) is refused before writing."""
    dora = {"cases": [{"when": {"layers": 0}, "value": True}, {"value": False}]}
    spec = {"adapters": {"m": {"type": "lora", "at": {"op": "linear"}, "with": {"dora": dora}}}}
    gm = peftfx.compile(mlp(sizes=(4, 4, 4)), spec, mlp_inputs(4))
    out = tmp_path / "out"
    with pytest.raises(peftfx.PeftfxError, match="cannot mix DoRA and plain LoRA"):
        peftfx.save_adapter(gm, "m", out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left either


def test_an_adapter_that_recomputes_its_site_refuses_to_drop_an_earlier_one():
    """(IA)³ on a feed-forward input re-runs the linear from its input: after a LoRA on the same site it would
    silently drop the LoRA, so it is refused; in the other order the LoRA adds to the scaled output, which works."""
    model, inputs = mlp(), mlp_inputs()
    lora = {"type": "lora", "at": {"module": "layers.0"}, "with": {"init": False}, "seed": 0}
    ia3 = {"type": "ia3", "at": {"module": "layers.0"}, "with": {"feedforward": True, "init": False}, "seed": 1}
    spec = {"adapters": {"l": lora, "i": ia3}}
    with pytest.raises(peftfx.PeftfxError, match=r"adapters\.i: ia3 .* silently drop 'l'"):
        peftfx.compile(model, spec, inputs)
    live = peftfx.compile(model, {**spec, "active": ["i", "l"]}, inputs)
    alone = peftfx.compile(model, {"adapters": {"i": ia3}}, inputs)
    assert not torch.allclose(live(*inputs), alone(*inputs))
