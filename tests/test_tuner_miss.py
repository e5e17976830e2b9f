"""MiSS against PEFT: default, mini and bat modes, padded inputs, Llama, float64, fresh adapters and errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, peft_checkpoint, run, saved_peft

import peftfx


def miss(**kw) -> peft.MissConfig:
    return peft.MissConfig(**{"r": 4, "target_modules": ["layers.0", "layers.1"], **kw})


@pytest.mark.parametrize(
    "config",
    [
        miss(),
        miss(r=5),  # in_features 12 and 16 are not multiples of 5: the input is zero-padded
        miss(init_weights="mini", mini_r=4),
        miss(init_weights="bat"),
        miss(init_weights=False, miss_dropout=0.1),
    ],
    ids=["default", "padded", "mini", "bat", "random-init"],
)
def test_mlp(config, tmp_path):
    check(mlp(), config, mlp_inputs(), tmp_path)


@pytest.mark.parametrize("init", [True, "bat"], ids=["default", "bat"])
def test_llama(init, tmp_path):
    config = miss(target_modules=["q_proj", "k_proj", "down_proj"], init_weights=init)
    check(tiny_llama(), config, token_inputs(), tmp_path)


@pytest.mark.parametrize("init", [True, "bat"], ids=["default", "bat"])
def test_float64(init, tmp_path):
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    inputs = mlp_inputs(dtype=torch.float64)
    check(mlp(dtype=torch.float64), miss(init_weights=init), inputs, tmp_path, tol=tol)


@pytest.mark.parametrize("init", [True, "bat", "mini"])
def test_fresh_is_identity_and_saves(init, tmp_path):
    model, inputs = mlp(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "miss", "at": {"op": "linear"}, "with": {"r": 4, "init": init, "mini_r": 2}}}}
    gm = peftfx.compile(model, spec, inputs)
    assert torch.equal(run(gm, inputs), run(model, inputs))
    trainable = [n for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad]
    assert len(trainable) == 2
    check_fresh_save(model, spec, inputs, tmp_path)


def test_fresh_random_init_is_not_identity(tmp_path):
    model, inputs = mlp(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "miss", "at": {"op": "linear"}, "with": {"r": 4, "init": False}, "seed": 0}}}
    assert not torch.allclose(run(peftfx.compile(model, spec, inputs), inputs), run(model, inputs))
    check_fresh_save(model, spec, inputs, tmp_path)


def test_wrong_shape_names_the_key(tmp_path):
    peft_model = peft.get_peft_model(mlp(), miss())
    peft_model.save_pretrained(tmp_path)
    edit_config(tmp_path, init_weights="bat")
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.miss_block.*shape"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())


def test_unknown_config_field_is_refused(tmp_path):
    saved_peft(mlp(), miss(), tmp_path)
    edit_config(tmp_path, use_magic=True)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: use_magic=True"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())


def test_conv1d_and_bad_blocks_are_refused():
    spec = {"adapters": {"f": {"type": "miss", "at": {"op": "linear", "module": "re:.*c_attn"}, "with": {"r": 4}}}}
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        peftfx.compile(tiny_gpt2(), spec, token_inputs())
    spec = {"adapters": {"f": {"type": "miss", "at": {"op": "linear"}, "with": {"r": 5, "init": "bat"}}}}
    with pytest.raises(peftfx.PeftfxError, match="bat needs r=5"):
        peftfx.compile(mlp(), spec, mlp_inputs())


@pytest.mark.parametrize("init", [True, "bat"], ids=["default", "bat"])
def test_scale_scales_the_update(init, tmp_path):
    model, inputs = mlp(), mlp_inputs()
    peft_model = peft_checkpoint(model, miss(target_modules=["layers.1"], init_weights=init), tmp_path)
    spec = {"adapters": {"a": {"peft": str(tmp_path), "scale": 0.5}}}
    halfway = (run(peft_model, inputs) + run(model, inputs)) / 2  # the last layer: the update shows linearly
    torch.testing.assert_close(run(peftfx.compile(model, spec, inputs), inputs), halfway, rtol=1e-5, atol=1e-6)
    merged = peftfx.compile(model, {**spec, "merge": True}, inputs)
    torch.testing.assert_close(run(merged, inputs), halfway, rtol=1e-5, atol=1e-6)
