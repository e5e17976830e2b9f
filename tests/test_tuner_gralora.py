"""GraLoRA against PEFT: Linear (MLP, Llama) and Conv1D (GPT-2), k and hybrid_r variants, float64, fresh and errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, peft_checkpoint, run, saved_peft

import peftfx


def gralora(**kw) -> peft.GraloraConfig:
    return peft.GraloraConfig(**{"r": 4, "alpha": 6, "gralora_k": 2, "target_modules": ["layers.0", "layers.1"], **kw})


@pytest.mark.parametrize(
    "config",
    [
        gralora(),
        gralora(r=8, gralora_k=4, hybrid_r=2),
        gralora(gralora_k=1, init_weights=False, gralora_dropout=0.1),
    ],
    ids=["k2", "k4-hybrid", "k1-random-init"],
)
def test_mlp(config, tmp_path):
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_llama(tmp_path):
    config = gralora(r=8, gralora_k=4, hybrid_r=1, target_modules=["q_proj", "k_proj", "down_proj"])
    check(tiny_llama(), config, token_inputs(), tmp_path)


def test_gpt2_conv1d(tmp_path):
    config = gralora(hybrid_r=2, target_modules=["c_attn", "c_fc", "mlp.c_proj"], fan_in_fan_out=True)
    check(tiny_gpt2(), config, token_inputs(), tmp_path)


def test_float64(tmp_path):
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    check(mlp(dtype=torch.float64), gralora(hybrid_r=2), mlp_inputs(dtype=torch.float64), tmp_path, tol=tol)


def test_scale_scales_the_update(tmp_path):
    model, inputs = mlp(), mlp_inputs()
    peft_model = peft_checkpoint(model, gralora(target_modules=["layers.1"], hybrid_r=1), tmp_path)
    spec = {"adapters": {"a": {"peft": str(tmp_path), "scale": 0.5}}}
    halfway = (run(peft_model, inputs) + run(model, inputs)) / 2  # the last layer: the update shows linearly
    for merge in (False, True):
        out = run(peftfx.compile(model, {**spec, "merge": merge}, inputs), inputs)
        torch.testing.assert_close(out, halfway, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "inputs", "at"),
    [
        (mlp, mlp_inputs, {"op": "linear"}),
        (tiny_gpt2, token_inputs, {"op": "linear", "module": "re:.*(c_attn|c_fc)"}),
    ],
    ids=["linear", "conv1d"],
)
def test_fresh_is_identity_and_saves(model, inputs, at, tmp_path):
    model, inputs = model(), inputs()
    spec = {"adapters": {"f": {"type": "gralora", "at": at, "with": {"r": 4, "alpha": 8, "hybrid_r": 2}}}}
    gm = peftfx.compile(model, spec, inputs)
    assert torch.equal(run(gm, inputs), run(model, inputs))
    trainable = [n for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad]
    assert {n.rsplit(".", 1)[1] for n in trainable} == {
        "gralora_A",
        "gralora_B",
        "gralora_A_general",
        "gralora_B_general",
    }
    assert len(trainable) == 4 * len({n.rsplit(".", 1)[0] for n in trainable})
    check_fresh_save(model, spec, inputs, tmp_path)


def test_fresh_random_init_saves(tmp_path):
    spec = {"adapters": {"f": {"type": "gralora", "at": {"op": "linear"}, "with": {"r": 4, "init": False}}}}
    model, inputs = mlp(), mlp_inputs()
    assert not torch.allclose(run(peftfx.compile(model, spec, inputs), inputs), run(model, inputs))
    check_fresh_save(model, spec, inputs, tmp_path)


def test_wrong_shape_names_the_key(tmp_path):
    saved_peft(mlp(), gralora(), tmp_path)
    edit_config(tmp_path, gralora_k=4)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.gralora_A.*shape"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())


def test_unknown_config_field_and_bad_k_are_refused(tmp_path):
    saved_peft(mlp(), gralora(), tmp_path)
    edit_config(tmp_path, use_magic=True)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: use_magic=True"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())
    spec = {"adapters": {"f": {"type": "gralora", "at": {"op": "linear"}, "with": {"r": 5, "gralora_k": 5}}}}
    with pytest.raises(peftfx.PeftfxError, match="gralora_k=5 to divide"):
        peftfx.compile(mlp(), spec, mlp_inputs())
    spec = {"adapters": {"f": {"type": "gralora", "at": {"op": "linear"}, "with": {"r": 3, "gralora_k": 2}}}}
    with pytest.raises(peftfx.PeftfxError, match="divisible by gralora_k"):
        peftfx.compile(mlp(), spec, mlp_inputs())
