"""BEFT against PEFT: MLP, BERT (biased) and Llama (bias-free: live only), float64, fresh adapters and errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_bert, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, peft_checkpoint, run, saved_peft

import peftfx


def beft(**kw) -> peft.BeftConfig:
    return peft.BeftConfig(**{"target_modules": ["layers.0", "layers.1"], **kw})


@pytest.mark.parametrize("config", [beft(), beft(init_weights=False)], ids=["default", "random-init"])
def test_mlp(config, tmp_path):
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_bert(tmp_path):
    check(tiny_bert(), beft(target_modules=["query", "value", "output.dense"]), token_inputs(), tmp_path)


def test_llama_without_bias_runs_live_but_does_not_merge(tmp_path):
    model, inputs = tiny_llama(), token_inputs()
    check(model, beft(target_modules=["q_proj", "down_proj"]), inputs, tmp_path, merge=False)
    spec = {"adapters": {"a": {"peft": str(tmp_path / "peft")}}, "merge": True}
    with pytest.raises(peftfx.PeftfxError, match="no bias"):
        peftfx.compile(model, spec, inputs)


def test_float64(tmp_path):
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    check(mlp(dtype=torch.float64), beft(), mlp_inputs(dtype=torch.float64), tmp_path, tol=tol)


def test_scale_scales_the_update(tmp_path):
    model, inputs = mlp(), mlp_inputs()
    peft_model = peft_checkpoint(model, beft(target_modules=["layers.1"]), tmp_path)
    spec = {"adapters": {"a": {"peft": str(tmp_path), "scale": 0.5}}}
    halfway = (run(peft_model, inputs) + run(model, inputs)) / 2  # the last layer: the update shows linearly
    for merge in (False, True):
        out = run(peftfx.compile(model, {**spec, "merge": merge}, inputs), inputs)
        torch.testing.assert_close(out, halfway, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", [True, False])
def test_fresh_saves(init, tmp_path):
    model, inputs = mlp(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "beft", "at": {"op": "linear"}, "with": {"init": init}, "seed": 0}}}
    gm = peftfx.compile(model, spec, inputs)
    assert torch.equal(run(gm, inputs), run(model, inputs)) == init
    trainable = [n for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad]
    assert trainable == ["peftfx.f.layers__0.beft_bias", "peftfx.f.layers__1.beft_bias"]
    check_fresh_save(model, spec, inputs, tmp_path)


def test_wrong_shape_names_the_key(tmp_path):
    saved_peft(mlp(), beft(), tmp_path)
    wrong = mlp(sizes=(12, 10, 8))  # layers.0 has 10 outputs here, the file's offset 16
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.beft_bias.*shape"):
        peftfx.compile(wrong, {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())


def test_unknown_config_field_and_conv1d_are_refused(tmp_path):
    saved_peft(mlp(), beft(), tmp_path)
    edit_config(tmp_path, use_magic=True)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: use_magic=True"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())
    spec = {"adapters": {"f": {"type": "beft", "at": {"op": "linear", "module": "re:.*c_fc"}}}}
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        peftfx.compile(tiny_gpt2(), spec, token_inputs())
