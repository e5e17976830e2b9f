"""UniLoRA against PEFT (save_indices checkpoints): Linear (MLP, Llama) and Conv1D (GPT-2); fresh; errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, saved_peft

import peftfx


def test_mlp(tmp_path):
    config = peft.UniLoraConfig(r=2, theta_d_length=10, save_indices=True, target_modules=["layers.0", "layers.1"])
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_llama(tmp_path):
    config = peft.UniLoraConfig(
        r=3, theta_d_length=64, proj_seed=5, save_indices=True, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    check(tiny_llama(), config, token_inputs(), tmp_path)


def test_gpt2_conv1d(tmp_path):
    config = peft.UniLoraConfig(r=2, theta_d_length=32, save_indices=True, target_modules=["c_attn", "c_fc"])
    check(tiny_gpt2(), config, token_inputs(), tmp_path)


def test_float64(tmp_path):
    config = peft.UniLoraConfig(r=2, theta_d_length=10, save_indices=True, target_modules=["layers.0", "layers.1"])
    x = tuple(t.double() for t in mlp_inputs())
    check(mlp(dtype=torch.float64), config, x, tmp_path, tol=Tolerance(1e-10, 1e-12))


def test_fresh(tmp_path):
    spec = {
        "adapters": {
            "f": {
                "type": "unilora",
                "at": {"op": "linear", "module": "re:.*(q_proj|v_proj)"},
                "with": {"r": 2, "theta_d_length": 16},
                "seed": 0,
            }
        }
    }
    gm = peftfx.compile(tiny_llama(), spec, token_inputs())
    params = dict(gm.named_parameters())
    assert tuple(params["peftfx.f.theta"].shape) == (16,)
    assert all(not p.requires_grad and p.dtype == torch.int64 for n, p in params.items() if ".indices_" in n)
    check_fresh_save(tiny_llama(), spec, token_inputs(), tmp_path)


def test_fresh_gpt2(tmp_path):
    spec = {"adapters": {"f": {"type": "unilora", "at": {"module": "re:.*c_proj"}, "with": {"theta_d_length": 8}}}}
    check_fresh_save(tiny_gpt2(), spec, token_inputs(), tmp_path)


def test_errors(tmp_path):
    ckpt = tmp_path / "ckpt"
    config = peft.UniLoraConfig(r=2, theta_d_length=10, save_indices=True, target_modules=["layers.0"])
    saved_peft(mlp(), config, ckpt)
    spec = {"adapters": {"a": {"peft": str(ckpt)}}}
    with pytest.raises(peftfx.PeftfxError, match="no scaling factor"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt), "scale": 2.0}}}, mlp_inputs())
    cfg = edit_config(ckpt, r=3)
    with pytest.raises(
        peftfx.PeftfxError, match=r"layers\.0\.unilora_indices_A' has shape \[2, 12\], expected \[3, 12\]"
    ):
        peftfx.compile(mlp(), spec, mlp_inputs())
    edit_config(ckpt, cfg, save_indices=False)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config.json: save_indices=false"):
        peftfx.compile(mlp(), spec, mlp_inputs())
