"""PEANuT against PEFT: depth 0 and residual stacks, activations, MLP and Llama, float64, fresh adapters and errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, peft_checkpoint, run, saved_peft

import peftfx


def peanut(**kw) -> peft.PeanutConfig:
    return peft.PeanutConfig(**{"r": 4, "target_modules": ["layers.0", "layers.1"], **kw})


@pytest.mark.parametrize(
    "config",
    [
        peanut(),
        peanut(depth=2, act_fn="gelu", scaling=0.5),
        peanut(depth=1, act_fn="tanh", init_weights=False),
    ],
    ids=["depth0", "depth2-gelu", "depth1-tanh-random-init"],
)
def test_mlp(config, tmp_path):
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_llama(tmp_path):
    config = peanut(depth=1, act_fn="silu", target_modules=["q_proj", "v_proj", "down_proj"])
    check(tiny_llama(), config, token_inputs(), tmp_path)


def test_float64(tmp_path):
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    check(mlp(dtype=torch.float64), peanut(depth=2), mlp_inputs(dtype=torch.float64), tmp_path, tol=tol)


def test_scale_scales_the_update(tmp_path):
    model, inputs = mlp(), mlp_inputs()
    peft_model = peft_checkpoint(model, peanut(depth=1, target_modules=["layers.1"]), tmp_path)
    spec = {"adapters": {"a": {"peft": str(tmp_path), "scale": 0.5}}}
    halfway = (run(peft_model, inputs) + run(model, inputs)) / 2  # the last layer: the update shows linearly
    for merge in (False, True):
        out = run(peftfx.compile(model, {**spec, "merge": merge}, inputs), inputs)
        torch.testing.assert_close(out, halfway, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth", [0, 2])
def test_fresh_is_identity_and_saves(depth, tmp_path):
    model, inputs = mlp(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "peanut", "at": {"op": "linear"}, "with": {"r": 4, "depth": depth}}}}
    gm = peftfx.compile(model, spec, inputs)
    assert torch.equal(run(gm, inputs), run(model, inputs))
    trainable = [n for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad]
    assert len(trainable) == 2 * (2 + 2 * depth)
    check_fresh_save(model, spec, inputs, tmp_path)


def test_fresh_random_init_saves(tmp_path):
    spec = {"adapters": {"f": {"type": "peanut", "at": {"op": "linear"}, "with": {"r": 3, "init": False}}}}
    model, inputs = mlp(), mlp_inputs()
    assert not torch.allclose(run(peftfx.compile(model, spec, inputs), inputs), run(model, inputs))
    check_fresh_save(model, spec, inputs, tmp_path)


def test_wrong_shape_and_depth_name_the_key(tmp_path):
    saved_peft(mlp(), peanut(depth=1), tmp_path)
    config = edit_config(tmp_path, r=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.peanut_A\.weight.*shape"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())
    edit_config(tmp_path, config, depth=0)
    with pytest.raises(peftfx.PeftfxError, match=r"unexpected tensor .*peanut_(en|de)coders\.0\.weight"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())


def test_unknown_config_field_and_conv1d_are_refused(tmp_path):
    saved_peft(mlp(), peanut(), tmp_path)
    edit_config(tmp_path, use_magic=True)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: use_magic=True"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())
    spec = {"adapters": {"f": {"type": "peanut", "at": {"op": "linear", "module": "re:.*c_fc"}}}}
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        peftfx.compile(tiny_gpt2(), spec, token_inputs())
