"""HRA against PEFT: Linear (MLP, Llama) and Conv2d, plain and Gram-Schmidt, create, save, errors."""

from __future__ import annotations

import functools

import peft
import pytest
import torch
from models import conv_inputs, conv_net, mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import (
    Tolerance,
    adapter_parameters,
    check,
    check_fresh_save,
    edit_config,
    peft_checkpoint,
    replace_tensor,
    run,
)

import peftfx

MLP = functools.partial(mlp, sizes=(12, 16, 8))
LAYERS = ["layers.0", "layers.1"]

CASES = {
    "even-r": peft.HRAConfig(r=4, target_modules=LAYERS),
    "odd-r": peft.HRAConfig(r=3, target_modules=LAYERS),
    "gram-schmidt": peft.HRAConfig(r=5, apply_GS=True, target_modules=LAYERS),
    "random-init-bias": peft.HRAConfig(r=2, init_weights=False, bias="hra_only", target_modules=["layers.1"]),
}


@pytest.mark.parametrize("case", CASES)
def test_mlp(case, tmp_path):
    # float32, a handful of rank-one reflections: 1e-5 holds
    check(MLP(), CASES[case], mlp_inputs(), tmp_path)


@pytest.mark.parametrize("gs", [False, True], ids=["plain", "gram-schmidt"])
def test_mlp_float64(gs, tmp_path):
    config = peft.HRAConfig(r=4, apply_GS=gs, target_modules=LAYERS)
    check(MLP(dtype=torch.float64), config, mlp_inputs(dtype=torch.float64), tmp_path, tol=Tolerance(1e-10, 1e-12))


def test_llama(tmp_path):
    config = peft.HRAConfig(r=6, target_modules=["q_proj", "v_proj", "down_proj"])
    # float32 through two transformer layers: PEFT builds H as a matrix, peftfx reflects rows
    check(tiny_llama(), config, token_inputs(), tmp_path, tol=Tolerance(1e-5, 1e-5))


@pytest.mark.parametrize("gs", [False, True], ids=["plain", "gram-schmidt"])
def test_conv2d(gs, tmp_path):
    config = peft.HRAConfig(r=4, apply_GS=gs, target_modules=["conv1", "conv2", "head"])
    check(conv_net(2), config, conv_inputs(2), tmp_path)


def test_conv2d_float64(tmp_path):
    config = peft.HRAConfig(r=3, target_modules=["conv1", "conv2"])
    dtype = torch.float64
    check(conv_net(2, dtype=dtype), config, conv_inputs(2, dtype=dtype), tmp_path, tol=Tolerance(1e-10, 1e-12))


def test_fresh_identity_and_save(tmp_path):
    base, inputs = MLP(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "hra", "at": {"op": "linear"}, "with": {"r": 4}, "seed": 0}}}
    gm = peftfx.compile(base, spec, inputs)
    # columns come in equal pairs, whose reflections cancel: the base output up to rounding
    torch.testing.assert_close(run(gm, inputs), run(base, inputs), rtol=1e-6, atol=1e-6)
    params = dict(gm.named_parameters())
    assert [params[n].shape for n in adapter_parameters(gm)] == [(12, 4), (16, 4)]
    assert all(params[n].requires_grad for n in adapter_parameters(gm))
    check_fresh_save(base, spec, inputs, tmp_path)


def test_fresh_odd_gs_conv_save(tmp_path):
    base, inputs = conv_net(2), conv_inputs(2)
    spec = {"adapters": {"f": {"type": "hra", "at": {"op": "conv2d"}, "with": {"r": 3, "apply_GS": True}}}}
    gm = peftfx.compile(base, spec, inputs)
    assert not torch.allclose(run(gm, inputs), run(base, inputs))  # odd r: PEFT's init is not the identity
    check_fresh_save(base, spec, inputs, tmp_path)


def test_errors(tmp_path):
    peft_checkpoint(MLP(), CASES["even-r"], tmp_path / "c")
    key = "base_model.model.layers.1.hra_u"
    original = replace_tensor(tmp_path / "c", key, lambda t: t[:, :-1].contiguous())
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.1\.hra_u.*shape \[16, 3\]"):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())
    replace_tensor(tmp_path / "c", key, original)

    edit_config(tmp_path / "c", hra_magic=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: hra_magic=3 is not supported"):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())

    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        spec = {"adapters": {"a": {"type": "hra", "at": {"module": "re:.*c_attn"}}}}
        peftfx.compile(tiny_gpt2(), spec, token_inputs())
