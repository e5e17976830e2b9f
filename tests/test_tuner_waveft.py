"""WaveFT against PEFT: Linear (MLP, Llama) and Conv1D (GPT-2), Daubechies filters and use_idwt=False."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, perturb, run, saved_peft
from peft.tuners.waveft.wavelet import _WAVELET_COEFFS

import peftfx
from peftfx.adapters.waveft import _lowpass


@pytest.mark.parametrize("family", ["db1", "db2"])  # db3: test_float64, db4: test_gpt2_conv1d
def test_mlp_families(family, tmp_path):
    config = peft.WaveFTConfig(
        n_frequency=25,
        wavelet_family=family,
        n_frequency_pattern={"layers.1": 9},
        target_modules=["layers.0", "layers.1"],
    )
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_mlp_no_idwt_proportional(tmp_path):
    config = peft.WaveFTConfig(
        n_frequency=20, use_idwt=False, proportional_parameters=True, target_modules=["layers.0", "layers.1"]
    )
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_llama(tmp_path):
    config = peft.WaveFTConfig(n_frequency=60, wavelet_family="db2", scaling=3.0, target_modules=["q_proj", "o_proj"])
    check(tiny_llama(), config, token_inputs(), tmp_path)


def test_gpt2_conv1d(tmp_path):
    config = peft.WaveFTConfig(n_frequency=50, wavelet_family="db4", target_modules=["c_attn", "mlp.c_proj"])
    check(tiny_gpt2(), config, token_inputs(), tmp_path)


def test_float64(tmp_path):
    # PEFT's db3 table is rounded at ~4e-12; the rest is float64 throughout.
    config = peft.WaveFTConfig(n_frequency=30, wavelet_family="db3", target_modules=["layers.0", "layers.1"])
    x = tuple(t.double() for t in mlp_inputs())
    check(mlp(dtype=torch.float64), config, x, tmp_path, tol=Tolerance(1e-10, 1e-10))


def test_daubechies_filters_match_peft():
    for order in range(1, 11):
        ours = torch.tensor(_lowpass(order), dtype=torch.float64)
        torch.testing.assert_close(
            ours, torch.tensor(_WAVELET_COEFFS[f"db{order}"], dtype=torch.float64), rtol=0, atol=1e-11
        )


def test_fresh(tmp_path):
    spec = {
        "adapters": {
            "f": {
                "type": "waveft",
                "at": {"op": "linear", "module": "re:.*(q_proj|v_proj)"},
                "with": {"n_frequency": {"gradient": [20, 40]}, "wavelet_family": "db2"},
            }
        }
    }
    base = tiny_llama()
    gm = peftfx.compile(base, spec, token_inputs())
    torch.testing.assert_close(run(gm, token_inputs()), run(base, token_inputs()), rtol=0, atol=0)
    sizes = sorted(p.numel() for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad)
    assert sizes == [20, 20, 40, 40]
    check_fresh_save(base, spec, token_inputs(), tmp_path)


def test_fresh_gpt2_no_idwt(tmp_path):
    spec = {
        "adapters": {
            "f": {"type": "waveft", "at": {"module": "re:.*c_fc"}, "with": {"n_frequency": 16, "use_idwt": False}}
        }
    }
    check_fresh_save(tiny_gpt2(), spec, token_inputs(), tmp_path)


def test_errors(tmp_path):
    ckpt = tmp_path / "ckpt"
    saved_peft(mlp(), peft.WaveFTConfig(n_frequency=10, target_modules=["layers.0"]), ckpt)
    spec = {"adapters": {"a": {"peft": str(ckpt)}}}
    cfg = edit_config(ckpt, n_frequency=11)
    with pytest.raises(peftfx.PeftfxError, match=r"layers\.0\.waveft_spectrum.*\[10\], expected \[11\]"):
        peftfx.compile(mlp(), spec, mlp_inputs())
    edit_config(ckpt, cfg, wavelet_family="sym4")
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config.json: wavelet_family='sym4' is not supported"):
        peftfx.compile(mlp(), spec, mlp_inputs())
    fresh = {"adapters": {"f": {"type": "waveft", "at": {"op": "linear"}, "with": {"wavelet_family": "coif1"}}}}
    with pytest.raises(peftfx.PeftfxError, match="wavelet_family"):
        peftfx.compile(mlp(), fresh, mlp_inputs())


def test_scale_multiplies_scaling(tmp_path):
    model = peft.get_peft_model(
        mlp(), peft.WaveFTConfig(n_frequency=20, wavelet_family="db2", target_modules=["layers.0"])
    )
    perturb(model)
    model.save_pretrained(tmp_path / "a")
    gm = peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path / "a"), "scale": 0.5}}}, mlp_inputs())
    model.base_model.model.layers[0].waveft_scaling["default"] = 12.5
    torch.testing.assert_close(run(gm, mlp_inputs()), run(model.eval(), mlp_inputs()), rtol=1e-5, atol=1e-6)
