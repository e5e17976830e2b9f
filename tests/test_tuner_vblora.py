"""VB-LoRA against PEFT: Linear (MLP, Llama) and Conv1D (GPT-2), logits or top-k checkpoints; fresh; errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, replace_tensor, saved_peft

import peftfx


@pytest.mark.parametrize("topk_only", [False, True], ids=["logits", "topk"])
def test_mlp(topk_only, tmp_path):
    config = peft.VBLoRAConfig(
        r=3,
        num_vectors=10,
        vector_length=4,
        topk=3,
        save_only_topk_weights=topk_only,
        target_modules=["layers.0", "layers.1"],
    )
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_llama(tmp_path):
    config = peft.VBLoRAConfig(r=2, num_vectors=16, vector_length=8, target_modules=["q_proj", "k_proj", "down_proj"])
    check(tiny_llama(), config, token_inputs(), tmp_path)


def test_gpt2_conv1d(tmp_path):
    config = peft.VBLoRAConfig(r=2, num_vectors=12, vector_length=16, target_modules=["c_attn", "c_fc"])
    check(tiny_gpt2(), config, token_inputs(), tmp_path)


def test_float64(tmp_path):
    config = peft.VBLoRAConfig(r=2, num_vectors=6, vector_length=4, target_modules=["layers.0", "layers.1"])
    x = tuple(t.double() for t in mlp_inputs())
    check(mlp(dtype=torch.float64), config, x, tmp_path, tol=Tolerance(1e-10, 1e-12))


def test_fresh(tmp_path):
    spec = {
        "adapters": {
            "f": {
                "type": "vblora",
                "at": {"op": "linear", "module": "re:.*(q_proj|v_proj)"},
                "with": {"r": 2, "num_vectors": 8, "vector_length": 8},
                "seed": 0,
            }
        }
    }
    gm = peftfx.compile(tiny_llama(), spec, token_inputs())
    trainable = {n: tuple(p.shape) for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad}
    assert trainable.pop("peftfx.f.vblora_vector_bank", None) is None  # the bank is stored under its role name
    assert trainable.pop("peftfx.f.bank") == (8, 8)
    # per layer: q_proj 32->32 (A [2, 4, 8], B [4, 2, 8]), v_proj 32->16 (A [2, 4, 8], B [2, 2, 8])
    assert sorted(trainable.values()) == [(2, 2, 8)] * 2 + [(2, 4, 8)] * 4 + [(4, 2, 8)] * 2
    check_fresh_save(tiny_llama(), spec, token_inputs(), tmp_path)


def test_fresh_gpt2(tmp_path):
    spec = {
        "adapters": {
            "f": {"type": "vblora", "at": {"module": "re:.*c_proj"}, "with": {"num_vectors": 4, "vector_length": 16}}
        }
    }
    check_fresh_save(tiny_gpt2(), spec, token_inputs(), tmp_path)


def test_errors(tmp_path):
    ckpt = tmp_path / "ckpt"
    config = peft.VBLoRAConfig(r=2, num_vectors=6, vector_length=4, target_modules=["layers.0"])
    saved_peft(mlp(), config, ckpt)
    spec = {"adapters": {"a": {"peft": str(ckpt)}}}
    with pytest.raises(peftfx.PeftfxError, match="no scaling factor"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt), "scale": 0.5}}}, mlp_inputs())
    replace_tensor(ckpt, "base_model.vblora_vector_bank", lambda t: t[:5].contiguous())
    with pytest.raises(
        peftfx.PeftfxError, match=r"adapter_model.safetensors: 'base_model.vblora_vector_bank' has shape"
    ):
        peftfx.compile(mlp(), spec, mlp_inputs())
    replace_tensor(ckpt, "base_model.vblora_vector_bank", None)
    with pytest.raises(peftfx.PeftfxError, match=r"missing the shared tensor 'base_model\.vblora_vector_bank'"):
        peftfx.compile(mlp(), spec, mlp_inputs())
    fresh = {"adapters": {"f": {"type": "vblora", "at": {"op": "linear"}, "with": {"vector_length": 5}}}}
    with pytest.raises(peftfx.PeftfxError, match="vector_length=5 must divide"):
        peftfx.compile(mlp(), fresh, mlp_inputs())
