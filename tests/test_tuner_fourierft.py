"""FourierFT against PEFT: Linear (MLP, Llama) and Conv1D (GPT-2), unmerged, merged and saved back."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, perturb, run, saved_peft

import peftfx

# ifft2 sums out*in terms in float32: PEFT's and the merged ΔW differ from peftfx's float64 merge by ~1e-7 relative.
MERGED = Tolerance(rtol=1e-5, atol=1e-5)


def test_mlp_pattern(tmp_path):
    config = peft.FourierFTConfig(
        n_frequency=20, scaling=30.0, target_modules=["layers.0", "layers.1"], n_frequency_pattern={"layers.1": 7}
    )
    check(mlp(), config, mlp_inputs(), tmp_path, merged_tol=MERGED)


def test_llama_seed(tmp_path):
    config = peft.FourierFTConfig(n_frequency=50, random_loc_seed=3, target_modules=["q_proj", "v_proj", "down_proj"])
    check(tiny_llama(), config, token_inputs(), tmp_path, merged_tol=MERGED)


def test_gpt2_conv1d(tmp_path):
    config = peft.FourierFTConfig(n_frequency=40, scaling=10.0, target_modules=["c_attn", "mlp.c_proj"])
    check(tiny_gpt2(), config, token_inputs(), tmp_path, merged_tol=MERGED)


def test_float64(tmp_path):
    # PEFT takes the inverse FFT in float32 even for a float64 model; peftfx keeps float64, so the two agree
    # to float32 precision only.
    config = peft.FourierFTConfig(n_frequency=30, target_modules=["layers.0", "layers.1"])
    x = tuple(t.double() for t in mlp_inputs())
    check(mlp(dtype=torch.float64), config, x, tmp_path, tol=Tolerance(1e-5, 1e-5))


def test_fresh(tmp_path):
    spec = {
        "adapters": {
            "f": {
                "type": "fourierft",
                "at": {"op": "linear", "module": "re:.*(q_proj|v_proj)"},
                "with": {"n_frequency": {"gradient": [10, 30]}, "init_weights": True, "random_loc_seed": 5},
                "seed": 1,
            }
        }
    }
    base = tiny_llama()
    gm = peftfx.compile(base, spec, token_inputs())
    torch.testing.assert_close(run(gm, token_inputs()), run(base, token_inputs()), rtol=0, atol=0)
    trainable = [n for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad]
    assert len(trainable) == 4 and all(n.endswith(".spectrum") for n in trainable)
    check_fresh_save(base, spec, token_inputs(), tmp_path)


def test_fresh_gpt2_random_init(tmp_path):
    spec = {"adapters": {"f": {"type": "fourierft", "at": {"module": "re:.*c_attn"}, "with": {"n_frequency": 16}}}}
    check_fresh_save(tiny_gpt2(), spec, token_inputs(), tmp_path)


def test_errors(tmp_path):
    config = peft.FourierFTConfig(n_frequency=20, target_modules=["layers.0"])
    ckpt = tmp_path / "ckpt"
    saved_peft(mlp(), config, ckpt)
    spec = {"adapters": {"a": {"peft": str(ckpt)}}}
    bad = ckpt.parent / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(
        (ckpt / "adapter_config.json").read_text().replace('"n_frequency": 20', '"n_frequency": 21')
    )
    (bad / "adapter_model.safetensors").write_bytes((ckpt / "adapter_model.safetensors").read_bytes())
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model.safetensors.*layers\.0\.fourierft_spectrum.*\[21\]"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(bad)}}}, mlp_inputs())
    edit_config(ckpt, use_idwt=True)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config.json: use_idwt=True"):
        peftfx.compile(mlp(), spec, mlp_inputs())


def test_scale_multiplies_scaling(tmp_path):
    config = peft.FourierFTConfig(n_frequency=20, scaling=30.0, target_modules=["layers.0"])
    model = peft.get_peft_model(mlp(), config)
    perturb(model)
    model.save_pretrained(tmp_path / "a")
    gm = peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path / "a"), "scale": 0.5}}}, mlp_inputs())
    model.base_model.model.layers[0].fourierft_scaling["default"] = 15.0
    torch.testing.assert_close(run(gm, mlp_inputs()), run(model.eval(), mlp_inputs()), rtol=1e-5, atol=1e-6)
