"""LoRA files as diffusion users have them: diffusers' and kohya's formats, read and written.

The oracle is diffusers' own ``load_lora_weights`` (PEFT layers injected into a copy of the model) on the same
file. Float32; the live graph runs PEFT's ops in PEFT's order, so the outputs are equal bit for bit.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from oracle import perturb
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from test_dropin import pipeline, tiny_unet, unet_inputs
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

import peftfx

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]


def trained_lora(model: nn.Module, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """PEFT's LoRA state dict (``<module>.lora_A.weight``) of a copy of ``model``, moved off its init."""
    trained = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    perturb(trained, seed=seed)
    return {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(trained).items()}


def loaded_by_diffusers(path, unet: nn.Module, text_encoder: nn.Module | None = None) -> StableDiffusionPipeline:
    pipe = pipeline(copy.deepcopy(unet), copy.deepcopy(text_encoder) if text_encoder is not None else None)
    pipe.load_lora_weights(path)
    return pipe


def tiny_text_encoder() -> CLIPTextModel:
    torch.manual_seed(5)
    config = CLIPTextConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=64,
        max_position_embeddings=16,
    )
    return CLIPTextModel(config).eval()


def test_diffusers_file_with_unet_and_text_encoder_parts(tmp_path):
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    te_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=trained_lora(unet, UNET_TARGETS, seed=1),
        text_encoder_lora_layers=trained_lora(text_encoder, te_targets, seed=2),
    )
    oracle = loaded_by_diffusers(tmp_path, unet, text_encoder)
    x = unet_inputs()
    ids = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(6))}
    with pytest.raises(peftfx.CheckpointError, match=r"holds LoRAs for text_encoder, unet; say which with `component`"):
        peftfx.compile(unet, {"adapters": {"a": {"peft": str(tmp_path)}}}, x)
    gm = peftfx.compile(unet, {"adapters": {"a": {"peft": str(tmp_path), "component": "unet"}}}, x)
    with torch.no_grad():
        reference = oracle.unet(**x).sample
        assert not torch.allclose(reference, unet(**x).sample, atol=1e-3)
        assert torch.equal(gm(**x).sample, reference)
        te = peftfx.compile(
            text_encoder, {"adapters": {"t": {"peft": str(tmp_path), "component": "text_encoder"}}}, ids
        )
        assert torch.equal(te(**ids).last_hidden_state, oracle.text_encoder(**ids).last_hidden_state)
    with pytest.raises(peftfx.CheckpointError, match=r"has no 'transformer' LoRA \(it has text_encoder, unet\)"):
        peftfx.compile(unet, {"adapters": {"a": {"peft": str(tmp_path), "component": "transformer"}}}, x)


def test_kohya_file_with_alphas(tmp_path):
    unet = tiny_unet()
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in trained_lora(unet, UNET_TARGETS, 3).items()})
    alphas = sorted(k for k in kohya if k.endswith(".alpha"))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    for i, key in enumerate(alphas):  # alphas other than the rank, and not all alike: alpha_pattern is exercised
        kohya[key] = torch.tensor(2.0 if i % 3 else 6.0)
    file = tmp_path / "style.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, file)
    x = unet_inputs()
    gm = peftfx.compile(unet, {"adapters": {"k": {"peft": str(file)}}}, x)
    with torch.no_grad():
        reference = loaded_by_diffusers(file, unet).unet(**x).sample
        assert torch.equal(gm(**x).sample, reference)
        merged = peftfx.compile(unet, {"adapters": {"k": {"peft": str(file)}}, "merge": True}, x)
        assert float((merged(**x).sample - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_save_back_in_diffusers_format(tmp_path):
    unet = tiny_unet()
    spec = {"adapters": {"s": {"type": "lora", "at": {"op": "linear", "module": "*.to_q"}, "with": {"r": 2}}}}
    gm = peftfx.compile(unet, spec, unet_inputs())
    perturb(gm)
    peftfx.save_adapter(gm, "s", tmp_path / "out", format="diffusers")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pytorch_lora_weights.safetensors"]
    x = unet_inputs()
    with torch.no_grad():
        assert torch.equal(loaded_by_diffusers(tmp_path / "out", unet).unet(**x).sample, gm(**x).sample)
    again = peftfx.compile(unet, {"adapters": {"s": {"peft": str(tmp_path / "out")}}}, x)
    with torch.no_grad():
        assert torch.equal(again(**x).sample, gm(**x).sample)
    fresh = peftfx.compile(unet, spec, x)
    peftfx.swap_adapter(fresh, "s", tmp_path / "out")  # a diffusers file swaps in like a PEFT checkpoint
    with torch.no_grad():
        assert torch.equal(fresh(**x).sample, gm(**x).sample)
    ia3 = peftfx.compile(unet, {"adapters": {"i": {"type": "ia3", "at": {"op": "linear", "module": "*.to_k"}}}}, x)
    with pytest.raises(peftfx.SpecError, match="'i' is ia3; the diffusers format holds LoRA factors only"):
        peftfx.save_adapter(ia3, "i", tmp_path / "ia3", format="diffusers")
    with pytest.raises(peftfx.SpecError, match="unknown format 'kohya'"):
        peftfx.save_adapter(gm, "s", tmp_path / "k", format="kohya")
    assert not (tmp_path / "ia3").exists() and not (tmp_path / "k").exists()
