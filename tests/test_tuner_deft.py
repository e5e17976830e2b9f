"""DeFT against PEFT: relu/qr projectors, PaRa, alpha, Linear (MLP, Llama) and Conv1D (GPT-2), fresh and errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, assert_close, check, check_fresh_save, edit_config, run, saved_peft

import peftfx


def deft(**kw) -> peft.DeftConfig:
    return peft.DeftConfig(**{"r": 4, "target_modules": ["layers.0", "layers.1"], **kw})


@pytest.mark.parametrize(
    "config",
    [
        deft(),
        deft(decomposition_method="qr", alpha=8),
        deft(para=True),
        deft(r=12, init_weights=False, init_scale=3.0),  # r is capped at out_features (8 for layers.1)
    ],
    ids=["relu", "qr-alpha", "para", "capped-rank-random-init"],
)
def test_mlp(config, tmp_path):
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_llama(tmp_path):
    config = deft(decomposition_method="qr", target_modules=["q_proj", "v_proj", "down_proj"])
    check(tiny_llama(), config, token_inputs(), tmp_path)


def test_gpt2_conv1d(tmp_path):
    config = deft(alpha=2, target_modules=["c_attn", "c_fc", "mlp.c_proj"], fan_in_fan_out=True)
    check(tiny_gpt2(), config, token_inputs(), tmp_path)


@pytest.mark.parametrize("method", ["relu", "qr"])
def test_float64(method, tmp_path):
    # PEFT's DeFT computes in float32 even for a float64 model, so it is only float32-accurate ...
    model, inputs = mlp(dtype=torch.float64), mlp_inputs(dtype=torch.float64)
    result = check(model, deft(decomposition_method=method), inputs, tmp_path, tol=Tolerance(rtol=1e-5, atol=1e-6))
    # ... while here the live graph and the merge agree to float64 precision
    assert_close(run(result["unmerged"], inputs), run(result["merged"], inputs), Tolerance(1e-10, 1e-12), "merge")


@pytest.mark.parametrize(
    ("model", "inputs", "at", "with_"),
    [
        (mlp, mlp_inputs, {"op": "linear"}, {"r": 4}),
        (mlp, mlp_inputs, {"op": "linear"}, {"r": 4, "decomposition_method": "qr", "alpha": 2}),
        (tiny_gpt2, token_inputs, {"op": "linear", "module": "re:.*(c_attn|c_fc)"}, {"r": 3}),
    ],
    ids=["relu", "qr-alpha", "conv1d"],
)
def test_fresh_is_identity_and_saves(model, inputs, at, with_, tmp_path):
    model, inputs = model(), inputs()
    spec = {"adapters": {"f": {"type": "deft", "at": at, "with": with_, "seed": 0}}}
    gm = peftfx.compile(model, spec, inputs)
    # identity up to rounding: R is set so that the injection puts back what the projection removes
    assert_close(run(gm, inputs), run(model, inputs), Tolerance(1e-5, 1e-6), "identity at init")
    trainable = {n.rsplit(".", 1)[1] for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad}
    assert trainable == {"deft_P", "deft_R"}
    check_fresh_save(model, spec, inputs, tmp_path)


def test_fresh_para_saves(tmp_path):
    spec = {"adapters": {"f": {"type": "deft", "at": {"op": "linear"}, "with": {"r": 2, "para": True}}}}
    model, inputs = mlp(), mlp_inputs()
    assert not torch.allclose(run(peftfx.compile(model, spec, inputs), inputs), run(model, inputs))
    check_fresh_save(model, spec, inputs, tmp_path)


def test_wrong_shape_names_the_key(tmp_path):
    saved_peft(mlp(), deft(), tmp_path)
    edit_config(tmp_path, r=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.deft_P.*shape"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())


def test_unknown_config_field_and_scale_are_refused(tmp_path):
    saved_peft(mlp(), deft(), tmp_path)
    with pytest.raises(peftfx.PeftfxError, match="no scaling factor"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path), "scale": 0.5}}}, mlp_inputs())
    edit_config(tmp_path, use_magic=True)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: use_magic=True"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())
