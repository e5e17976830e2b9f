"""save_adapter for the LoRA family: loaded or fresh, trained in the graph, PEFT reloads the same outputs."""

from __future__ import annotations

import peft
import pytest
import torch
from models import MLP, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import check, check_fresh_save

import peftfx


@pytest.mark.parametrize(
    "config",
    [
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, rank_pattern={"k_proj": 2}),
    ],
    ids=["lora", "dora"],
)
def test_llama_round_trip(config, tmp_path):
    check(tiny_llama(), config, token_inputs(), tmp_path, merge=False)


def test_gpt2_conv1d_round_trip(tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_rslora=True)
    check(tiny_gpt2(), config, token_inputs(), tmp_path, merge=False)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fresh_with_rank_gradient(kind, tmp_path):
    spec = {
        "adapters": {
            "f": {
                "type": kind,
                "at": {"op": "linear", "module": "re:.*(q_proj|v_proj)"},
                "with": {"r": {"gradient": [2, 6]}, "alpha": 4, "init": False},
                "seed": 1,
            }
        }
    }
    check_fresh_save(tiny_llama(), spec, token_inputs(), tmp_path)


def test_fresh_mlp_with_lora_bias(tmp_path):
    spec = {"adapters": {"f": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 3, "lora_bias": True}}}}
    check_fresh_save(MLP(), spec, mlp_inputs(), tmp_path)


def test_save_refuses_a_merged_or_unknown_adapter(tmp_path):
    spec = {"adapters": {"f": {"type": "lora", "at": {"op": "linear"}}}, "merge": True}
    gm = peftfx.compile(MLP(), spec, mlp_inputs())
    with pytest.raises(peftfx.PeftfxError, match="no live adapter 'f'"):
        peftfx.save_adapter(gm, "f", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_refuses_a_scaled_adapter(tmp_path):
    base = MLP()
    peft_model = peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["layers.0"]))
    peft_model.base_model.model.load_state_dict(base.state_dict(), strict=False)
    peft_model.save_pretrained(tmp_path / "ckpt")
    gm = peftfx.compile(base, {"adapters": {"a": {"peft": str(tmp_path / "ckpt"), "scale": 0.5}}}, mlp_inputs())
    with pytest.raises(peftfx.PeftfxError, match="scale"):
        peftfx.save_adapter(gm, "a", tmp_path / "out")
    assert torch.isfinite(gm(*mlp_inputs())).all()
