"""LoKr against PEFT: full and low-rank factors, decompose_both/factor, Conv1d/2d (flattened and CP), Llama."""

from __future__ import annotations

import peft
import pytest
import torch
from models import conv_inputs, conv_net, mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, replace_tensor, run, saved_peft
from torch import nn

import peftfx


class OddConv(nn.Module):
    """A grouped, dilated 3x3 conv, a 1x1 conv and a kernel-1 Conv1d: the corner cases of LoKr's conv paths."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2)
        self.point = nn.Conv2d(6, 8, 1)
        self.seq = nn.Conv1d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.point(torch.relu(self.grouped(x)))
        return self.seq(x.flatten(2))


def odd_conv() -> nn.Module:
    torch.manual_seed(0)
    return OddConv().eval()


def odd_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0)),)


def conv1():
    return conv_net(1)


def conv2():
    return conv_net(2)


def conv1_in():
    return conv_inputs(1)


def conv2_in():
    return conv_inputs(2)


CONV = ["conv1", "conv2", "head"]
ODD = ["grouped", "point", "seq"]
MLP = ["layers.0", "layers.1"]


@pytest.mark.parametrize(
    ("model", "inputs", "config"),
    [
        # r=8: every factor full (w1, w2); r=1: w2 = w2_a @ w2_b
        (mlp, mlp_inputs, peft.LoKrConfig(r=8, alpha=4, target_modules=MLP)),
        (mlp, mlp_inputs, peft.LoKrConfig(r=1, alpha=3, target_modules=MLP, decompose_both=True)),
        (mlp, mlp_inputs, peft.LoKrConfig(r=2, target_modules=MLP, decompose_factor=2, rank_pattern={"layers.1": 1})),
        (conv1, conv1_in, peft.LoKrConfig(r=8, target_modules=CONV)),  # full 3-D w2 on Conv1d
        (conv1, conv1_in, peft.LoKrConfig(r=1, target_modules=CONV, use_effective_conv2d=True)),
        (conv2, conv2_in, peft.LoKrConfig(r=8, alpha=5, target_modules=CONV)),
        (conv2, conv2_in, peft.LoKrConfig(r=1, target_modules=CONV, alpha_pattern={"conv2": 2})),
        (conv2, conv2_in, peft.LoKrConfig(r=1, target_modules=CONV, use_effective_conv2d=True, decompose_both=True)),
        (odd_conv, odd_inputs, peft.LoKrConfig(r=1, target_modules=ODD, use_effective_conv2d=True)),
        (odd_conv, odd_inputs, peft.LoKrConfig(r=4, target_modules=ODD)),
        (
            tiny_llama,
            token_inputs,
            peft.LoKrConfig(r=2, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 8}),
        ),
    ],
    ids=[
        "mlp-full",
        "mlp-decompose-both",
        "mlp-factor-pattern",
        "conv1d-full",
        "conv1d-cp",
        "conv2d-full",
        "conv2d-lowrank",
        "conv2d-cp-both",
        "odd-cp",
        "odd-full",
        "llama",
    ],
)
def test_matches_peft(model, inputs, config, tmp_path):
    check(model(), config, inputs(), tmp_path)


def test_float64(tmp_path):
    config = peft.LoKrConfig(r=1, alpha=3, target_modules=CONV, use_effective_conv2d=True, decompose_both=True)
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    check(conv_net(2).double(), config, conv_inputs(2, dtype=torch.float64), tmp_path, tol=tol)


def test_scale_multiplies_delta(tmp_path):
    base, inputs = mlp(), mlp_inputs()
    config = peft.LoKrConfig(r=2, target_modules=["layers.1"])  # the last layer: the output is linear in its delta
    result = check(base, config, inputs, tmp_path, merge=False, save=False)
    spec = {"adapters": {"a": {"peft": str(tmp_path / "peft"), "scale": 0.5}}}
    half = run(peftfx.compile(base, spec, inputs), inputs)
    full, plain = run(result["unmerged"], inputs), run(base, inputs)
    torch.testing.assert_close(half, plain + 0.5 * (full - plain), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "params",
    [
        {"r": 1, "use_effective_conv2d": True, "decompose_both": True},
        {"r": 8, "alpha": 4, "init_weights": "lycoris"},
        {"r": 1, "init_weights": "lycoris", "decompose_factor": 2},
    ],
    ids=["cp-both", "full-lycoris", "lowrank-lycoris-factor"],
)
def test_fresh_identity_and_save(params, tmp_path):
    base, inputs = conv_net(2), conv_inputs(2)
    spec = {"adapters": {"f": {"type": "lokr", "at": {"op": ["linear", "conv2d"]}, "with": params, "seed": 1}}}
    gm = peftfx.compile(base, spec, inputs)
    torch.testing.assert_close(run(gm, inputs), run(base, inputs), rtol=0, atol=0)  # one factor is 0 at init
    trainable = [n for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad]
    assert trainable
    check_fresh_save(base, spec, inputs, tmp_path)


def test_fresh_random_llama(tmp_path):
    spec = {
        "adapters": {
            "f": {
                "type": "lokr",
                "at": {"op": "linear", "module": "re:.*(q_proj|v_proj)"},
                "with": {"r": {"gradient": [1, 8]}, "alpha": 4, "init_weights": False},
                "seed": 1,
            }
        }
    }
    check_fresh_save(tiny_llama(), spec, token_inputs(), tmp_path)


def _checkpoint(tmp_path):
    return saved_peft(mlp(), peft.LoKrConfig(r=1, target_modules=["layers.0"]), tmp_path)


def test_misshaped_tensor(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    replace_tensor(ckpt, "base_model.model.layers.0.lokr_w2_b", torch.zeros(2, 4))
    with pytest.raises(peftfx.PeftfxError, match=r"lokr_w2_b.*shape \[2, 4\], expected \[1, 4\]"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())


def test_config_disagreeing_with_tensors(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    edit_config(ckpt, r=8)  # would make w2 a full matrix
    with pytest.raises(peftfx.PeftfxError, match="missing tensor 'lokr_w2'"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())


def test_unsupported_config_field(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    edit_config(ckpt, weird_option=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config.json: weird_option=3"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())


def test_refuses_gpt2_conv1d():
    spec = {"adapters": {"f": {"type": "lokr", "at": {"op": "linear", "module": "re:.*c_attn"}}}}
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        peftfx.compile(tiny_gpt2(), spec, token_inputs())
