"""DeLoRA against PEFT: MLP and Llama, rank/lambda patterns, float64, fresh adapters (w_norm frozen) and errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, peft_checkpoint, run, saved_peft

import peftfx


def delora(**kw) -> peft.DeloraConfig:
    return peft.DeloraConfig(**{"r": 4, "target_modules": ["layers.0", "layers.1"], **kw})


@pytest.mark.parametrize(
    "config",
    [
        delora(),
        delora(init_weights=False, delora_lambda=3, module_dropout=0.2),
        delora(rank_pattern={"layers.1": 2}, lambda_pattern={"layers.0": 7}),
    ],
    ids=["default", "random-init", "patterns"],
)
def test_mlp(config, tmp_path):
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_llama(tmp_path):
    config = delora(target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2})
    check(tiny_llama(), config, token_inputs(), tmp_path)


def test_float64(tmp_path):
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    check(mlp(dtype=torch.float64), delora(), mlp_inputs(dtype=torch.float64), tmp_path, tol=tol)


def test_scale_scales_the_update(tmp_path):
    model, inputs = mlp(), mlp_inputs()
    peft_model = peft_checkpoint(model, delora(target_modules=["layers.1"]), tmp_path)
    spec = {"adapters": {"a": {"peft": str(tmp_path), "scale": 0.5}}}
    halfway = (run(peft_model, inputs) + run(model, inputs)) / 2  # the last layer: the update shows linearly
    for merge in (False, True):
        out = run(peftfx.compile(model, {**spec, "merge": merge}, inputs), inputs)
        torch.testing.assert_close(out, halfway, rtol=1e-5, atol=1e-6)


def test_fresh_is_identity_and_saves(tmp_path):
    model, inputs = mlp(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "delora", "at": {"op": "linear"}, "with": {"r": {"gradient": [2, 4]}}}}}
    gm = peftfx.compile(model, spec, inputs)
    assert torch.equal(run(gm, inputs), run(model, inputs))
    w_norm = gm.get_parameter("peftfx.f.layers__0.delora_w_norm")
    torch.testing.assert_close(w_norm, model.layers[0].weight.norm(dim=0))
    gm(*inputs).sum().backward()
    assert gm.get_parameter("peftfx.f.layers__0.delora_B").grad.abs().sum() > 0
    assert w_norm.grad is None  # a frozen buffer in PEFT: detached here
    check_fresh_save(model, spec, inputs, tmp_path)


def test_fresh_random_init_saves(tmp_path):
    spec = {"adapters": {"f": {"type": "delora", "at": {"op": "linear"}, "with": {"init": False, "delora_lambda": 2}}}}
    model, inputs = mlp(), mlp_inputs()
    assert not torch.allclose(run(peftfx.compile(model, spec, inputs), inputs), run(model, inputs))
    check_fresh_save(model, spec, inputs, tmp_path)


def test_wrong_shape_names_the_key(tmp_path):
    saved_peft(mlp(), delora(), tmp_path)
    edit_config(tmp_path, r=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.delora_A.*shape"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())


def test_unknown_config_field_and_conv1d_are_refused(tmp_path):
    saved_peft(mlp(), delora(), tmp_path)
    edit_config(tmp_path, use_magic=True)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: use_magic=True"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())
    spec = {"adapters": {"f": {"type": "delora", "at": {"op": "linear", "module": "re:.*c_fc"}}}}
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        peftfx.compile(tiny_gpt2(), spec, token_inputs())
