"""HiRA against PEFT: Linear, Conv1D (GPT-2), Conv1d/2d/3d, Embedding, Llama; fresh adapters; errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import (
    conv_inputs,
    conv_net,
    embed_net,
    id_inputs,
    mlp,
    mlp_inputs,
    tiny_gpt2,
    tiny_llama,
    token_inputs,
)
from oracle import Tolerance, check, check_fresh_save, edit_config, replace_tensor, run, saved_peft

import peftfx

CONV = ["conv1", "conv2", "head"]


@pytest.mark.parametrize(
    ("model", "inputs", "config"),
    [
        (mlp, mlp_inputs, peft.HiraConfig(r=3, target_modules=["layers.0", "layers.1"])),
        # PEFT 0.21 never applies rank_pattern to a HiRA layer: every layer gets r
        (mlp, mlp_inputs, peft.HiraConfig(r=2, target_modules=["layers.0"], rank_pattern={"layers.0": 4})),
        (lambda: conv_net(1), lambda: conv_inputs(1), peft.HiraConfig(r=2, target_modules=CONV)),
        (lambda: conv_net(2), lambda: conv_inputs(2), peft.HiraConfig(r=2, target_modules=CONV)),
        (lambda: conv_net(3), lambda: conv_inputs(3), peft.HiraConfig(r=2, target_modules=["conv1", "conv2"])),
        (embed_net, id_inputs, peft.HiraConfig(r=2, target_modules=["emb", "out"])),
        (tiny_gpt2, token_inputs, peft.HiraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
        (tiny_llama, token_inputs, peft.HiraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"])),
    ],
    ids=["mlp", "mlp-rank-pattern-ignored", "conv1d", "conv2d", "conv3d", "embedding", "gpt2-conv1d", "llama"],
)
def test_matches_peft(model, inputs, config, tmp_path):
    check(model(), config, inputs(), tmp_path)


def test_float64(tmp_path):
    config = peft.HiraConfig(r=3, target_modules=CONV)
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    check(conv_net(2).double(), config, conv_inputs(2, dtype=torch.float64), tmp_path, tol=tol)


def test_scale_refused(tmp_path):
    saved_peft(mlp(), peft.HiraConfig(r=2, target_modules=["layers.0"]), tmp_path / "c")
    spec = {"adapters": {"a": {"peft": str(tmp_path / "c"), "scale": 0.5}}}
    with pytest.raises(peftfx.PeftfxError, match="no scaling factor"):
        peftfx.compile(mlp(), spec, mlp_inputs())


@pytest.mark.parametrize(
    ("model", "inputs", "at"),
    [
        (lambda: conv_net(2), lambda: conv_inputs(2), {"op": ["linear", "conv2d"]}),
        (tiny_gpt2, token_inputs, {"module": "re:.*(c_attn|wte)"}),
    ],
    ids=["conv", "gpt2-embedding"],
)
def test_fresh_identity_and_save(model, inputs, at, tmp_path):
    base, x = model(), inputs()
    spec = {"adapters": {"f": {"type": "hira", "at": at, "with": {"r": 3}, "seed": 1}}}
    gm = peftfx.compile(base, spec, x)
    torch.testing.assert_close(run(gm, x), run(base, x), rtol=0, atol=0)  # B = 0 (embeddings: A = 0) at init
    assert [n for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad]
    check_fresh_save(base, spec, x, tmp_path)


def _checkpoint(tmp_path):
    return saved_peft(mlp(), peft.HiraConfig(r=2, target_modules=["layers.0"]), tmp_path)


def test_misshaped_tensor(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    replace_tensor(ckpt, "base_model.model.layers.0.hira_B", torch.zeros(16, 3))
    with pytest.raises(peftfx.PeftfxError, match=r"layers.0.hira_B.*shape \[16, 3\], expected \[16, 2\]"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())


def test_unsupported_config_field(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    edit_config(ckpt, weird_option=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config.json: weird_option=3"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())


@pytest.mark.parametrize("merge", [["l"], ["l", "h"]], ids=["lora-only", "both"])
def test_partial_merge_after_lora(merge):
    # HiRA modulates the base weight: with a LoRA folded in before it, it must still modulate the raw weight
    base, x = mlp(), mlp_inputs()
    adapters = {
        "l": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2, "init": False}, "seed": 0},
        "h": {"type": "hira", "at": {"op": "linear"}, "with": {"r": 2, "init_weights": False}, "seed": 1},
    }
    live = run(peftfx.compile(base, {"adapters": adapters}, x), x)
    merged = run(peftfx.compile(base, {"adapters": adapters, "merge": merge}, x), x)
    torch.testing.assert_close(merged, live, rtol=1e-5, atol=1e-6)
