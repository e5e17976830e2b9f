"""LoHa against PEFT: Linear, Conv1d/2d (flattened and CP form, grouped/dilated), Llama; fresh adapters; errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import conv_inputs, conv_net, mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, replace_tensor, run, saved_peft
from torch import nn

import peftfx


class OddConv(nn.Module):
    """A grouped, dilated 3x3 conv, a 1x1 conv and a kernel-1 Conv1d: the corner cases of LoHa's conv paths."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2)
        self.point = nn.Conv2d(6, 5, 1)
        self.seq = nn.Conv1d(5, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.point(torch.relu(self.grouped(x)))
        return self.seq(x.flatten(2))


def odd_conv(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return OddConv().to(dtype).eval()


def odd_inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor]:
    return (torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0), dtype=dtype),)


CONV = ["conv1", "conv2", "head"]


@pytest.mark.parametrize(
    ("model", "inputs", "config"),
    [
        (mlp, mlp_inputs, peft.LoHaConfig(r=3, alpha=5, target_modules=["layers.0", "layers.1"])),
        (
            lambda: conv_net(1),
            lambda: conv_inputs(1),
            peft.LoHaConfig(r=2, alpha=4, target_modules=CONV, rank_pattern={"head": 3}, alpha_pattern={"conv2": 7}),
        ),
        (lambda: conv_net(2), lambda: conv_inputs(2), peft.LoHaConfig(r=2, target_modules=CONV)),
        (
            lambda: conv_net(1),
            lambda: conv_inputs(1),
            peft.LoHaConfig(r=2, target_modules=CONV, use_effective_conv2d=True),
        ),
        (
            lambda: conv_net(2),
            lambda: conv_inputs(2),
            peft.LoHaConfig(r=3, target_modules=CONV, use_effective_conv2d=True),
        ),
        (odd_conv, odd_inputs, peft.LoHaConfig(r=2, target_modules=["grouped", "point", "seq"])),
        (
            odd_conv,
            odd_inputs,
            peft.LoHaConfig(r=2, target_modules=["grouped", "point", "seq"], use_effective_conv2d=True),
        ),
        (
            tiny_llama,
            token_inputs,
            peft.LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2}),
        ),
    ],
    ids=[
        "mlp",
        "conv1d-patterns",
        "conv2d",
        "conv1d-cp",
        "conv2d-cp",
        "grouped-dilated",
        "grouped-dilated-cp",
        "llama",
    ],
)
def test_matches_peft(model, inputs, config, tmp_path):
    check(model(), config, inputs(), tmp_path)


def test_float64(tmp_path):
    # PEFT passes alpha/r as a float32 tensor even in float64, so alpha/r is chosen exact in float32 (5/2)
    config = peft.LoHaConfig(r=2, alpha=5, target_modules=["conv1", "conv2", "head"], use_effective_conv2d=True)
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    check(conv_net(2).double(), config, conv_inputs(2, dtype=torch.float64), tmp_path, tol=tol)


def test_scale_multiplies_delta(tmp_path):
    base, inputs = mlp(), mlp_inputs()
    config = peft.LoHaConfig(r=2, target_modules=["layers.1"])  # the last layer: the output is linear in its delta
    result = check(base, config, inputs, tmp_path, merge=False, save=False)
    spec = {"adapters": {"a": {"peft": str(tmp_path / "peft"), "scale": 0.5}}}
    half = run(peftfx.compile(base, spec, inputs), inputs)
    full, plain = run(result["unmerged"], inputs), run(base, inputs)
    torch.testing.assert_close(half, plain + 0.5 * (full - plain), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("effective", [False, True])
def test_fresh_identity_and_save(effective, tmp_path):
    base, inputs = conv_net(2), conv_inputs(2)
    spec = {
        "adapters": {
            "f": {
                "type": "loha",
                "at": {"op": ["linear", "conv2d"]},
                "with": {"r": 3, "alpha": 6, "use_effective_conv2d": effective},
                "seed": 1,
            }
        }
    }
    gm = peftfx.compile(base, spec, inputs)
    torch.testing.assert_close(run(gm, inputs), run(base, inputs), rtol=0, atol=0)  # w2_b = 0: identity at init
    trainable = [n for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad]
    assert len(trainable) == (2 * 6 + 4 if effective else 3 * 4)
    check_fresh_save(base, spec, inputs, tmp_path)


def test_fresh_rank_gradient_on_llama(tmp_path):
    spec = {
        "adapters": {
            "f": {
                "type": "loha",
                "at": {"op": "linear", "module": "re:.*(q_proj|v_proj)"},
                "with": {"r": {"gradient": [2, 6]}, "alpha": 4, "init_weights": False},
                "seed": 1,
            }
        }
    }
    check_fresh_save(tiny_llama(), spec, token_inputs(), tmp_path)


def _checkpoint(tmp_path, config=None):
    config = config or peft.LoHaConfig(r=2, target_modules=["layers.0"])
    return saved_peft(mlp(), config, tmp_path)


def test_misshaped_tensor(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    replace_tensor(ckpt, "base_model.model.layers.0.hada_w2_a", torch.zeros(16, 3))
    with pytest.raises(peftfx.PeftfxError, match=r"hada_w2_a.*shape \[16, 3\], expected \[16, 2\]"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())


def test_unsupported_config_field(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    edit_config(ckpt, weird_option=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config.json: weird_option=3"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())


def test_refuses_gpt2_conv1d():
    spec = {"adapters": {"f": {"type": "loha", "at": {"op": "linear", "module": "re:.*c_attn"}}}}
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        peftfx.compile(tiny_gpt2(), spec, token_inputs())
