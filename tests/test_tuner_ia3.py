"""(IA)³ against PEFT: output and feed-forward (input) scaling on Linear, Conv1D, Conv2d/3d, live, merged, saved."""

from __future__ import annotations

import functools
import json

import peft
import pytest
import torch
from models import conv_inputs, conv_net, mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, assert_close, check, check_fresh_save, edit_config, peft_checkpoint, run
from torch import nn

import peftfx

# float32 outputs are of magnitude ~0.1-3: atol 2e-6 is a few ulps at 1.0. peftfx merges in float64 and rounds
# once where PEFT multiplies in float32, and Conv1D's recomputed addmm may sum in another order: last bits move.
TOL = Tolerance(1e-5, 2e-6)
TOL64 = Tolerance(1e-10, 1e-12)


class GroupedConvNet(nn.Module):
    """A grouped conv (groups=2) between two plain ones: feed-forward scaling must expand per group to merge."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 6, 3, groups=2, bias=True, dilation=2)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(torch.relu(self.conv1(x)))
        return self.head(x.flatten(2).mean(-1))


def ia3(targets, ff=(), **kw) -> peft.IA3Config:
    return peft.IA3Config(target_modules=list(targets), feedforward_modules=list(ff), **kw)


CASES = {
    "mlp-output": (functools.partial(mlp, sizes=(12, 16, 16, 8)), mlp_inputs, ia3(["layers.0", "layers.2"])),
    "mlp-feedforward": (
        functools.partial(mlp, sizes=(12, 16, 16, 8)),
        mlp_inputs,
        ia3(["layers.0", "layers.1", "layers.2"], ff=["layers.1", "layers.2"]),
    ),
    "conv2d": (
        functools.partial(conv_net, 2),
        functools.partial(conv_inputs, 2),
        ia3(["conv1", "conv2", "head"], ff=["conv2"]),
    ),
    "conv3d": (
        functools.partial(conv_net, 3),
        functools.partial(conv_inputs, 3),
        ia3(["conv1", "conv2"], ff=["conv1"]),
    ),
    "grouped-conv": (GroupedConvNet, functools.partial(conv_inputs, 2), ia3(["grouped", "conv1"], ff=["grouped"])),
    "llama": (tiny_llama, lambda: token_inputs(), ia3(["k_proj", "v_proj", "down_proj"], ff=["down_proj"])),
    # PEFT's list rule is a bare suffix with no dot boundary: "s.1" marks layers.1 feed-forward (not layers.0)
    "mlp-ff-suffix": (
        functools.partial(mlp, sizes=(12, 16, 16, 8)),
        mlp_inputs,
        peft.IA3Config(target_modules=r"layers\.[01]", feedforward_modules=["s.1"]),
    ),
    # a string is a regex matched whole
    "mlp-ff-regex": (
        functools.partial(mlp, sizes=(12, 16, 16, 8)),
        mlp_inputs,
        peft.IA3Config(target_modules=["layers.0", "layers.2"], feedforward_modules=r"layers\.[02]"),
    ),
    "gpt2-conv1d": (tiny_gpt2, lambda: token_inputs(), ia3(["c_attn", "mlp.c_proj", "c_fc"], ff=["mlp.c_proj"])),
}


@pytest.mark.parametrize(("make", "inputs", "config"), CASES.values(), ids=CASES.keys())
def test_matches_peft(make, inputs, config, tmp_path):
    torch.manual_seed(0)
    check(make().eval(), config, inputs(), tmp_path, tol=TOL)


@pytest.mark.parametrize(
    ("make", "inputs", "config"),
    [
        (functools.partial(mlp, sizes=(12, 16, 8)), mlp_inputs, ia3(["layers.0", "layers.1"], ff=["layers.1"])),
        (GroupedConvNet, functools.partial(conv_inputs, 2), ia3(["grouped", "conv1"], ff=["grouped"])),
    ],
    ids=["mlp", "grouped-conv"],
)
def test_matches_peft_float64(make, inputs, config, tmp_path):
    torch.manual_seed(0)
    x = inputs()
    x = tuple(t.double() for t in x) if isinstance(x, tuple) else x
    check(make().double().eval(), config, x, tmp_path, tol=TOL64)


def test_fresh_is_identity_trainable_and_saves(tmp_path):
    model, inputs = tiny_llama(), token_inputs()
    at = {"op": "linear", "module": "re:.*(k_proj|down_proj)"}
    spec = {"adapters": {"f": {"type": "ia3", "at": at, "with": {"feedforward": False}}}}
    gm = peftfx.compile(model, spec, inputs)
    assert_close(run(gm, inputs), run(model, inputs), Tolerance(0, 0), "identity at init")
    params = [n for n, p in gm.named_parameters() if n.startswith("peftfx.f.") and p.requires_grad]
    assert len(params) == 4
    check_fresh_save(model, spec, inputs, tmp_path)


def test_fresh_mixed_feedforward_saves(tmp_path):
    model, inputs = mlp(sizes=(12, 16, 16, 8)), mlp_inputs()
    spec = {
        "adapters": {
            "f": {"type": "ia3", "at": {"op": "linear", "module": "re:layers\\.[01]"}, "with": {"feedforward": True}},
        }
    }
    gm = peftfx.compile(model, spec, inputs)
    assert_close(run(gm, inputs), run(model, inputs), Tolerance(0, 0), "identity at init")
    check_fresh_save(model, spec, inputs, tmp_path)
    config = json.loads((tmp_path / "fresh" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["layers.0", "layers.1"]
    assert config["feedforward_modules"] == r"(layers\.0|layers\.1)"


def test_errors_name_the_file_and_key(tmp_path):
    model, inputs = mlp(sizes=(12, 16, 8)), mlp_inputs()
    ckpt = tmp_path / "peft"
    peft_checkpoint(model, ia3(["layers.0"]), ckpt)
    # the checkpoint says output scaling (16, 1); claiming layers.0 is feed-forward expects (1, 12)
    config = edit_config(ckpt, feedforward_modules=["layers.0"])
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.ia3_l.*shape \[16, 1\]"):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt)}}}, inputs)
    edit_config(ckpt, config, some_new_field=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: some_new_field=3"):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt)}}}, inputs)
    edit_config(ckpt, config)
    with pytest.raises(peftfx.PeftfxError, match="no scaling factor"):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt), "scale": 0.5}}}, inputs)
