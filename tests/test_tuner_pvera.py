"""PVeRA against PEFT (inference: the mean half, no sampling): live, merged, saved, fresh; sampling is refused."""

from __future__ import annotations

import functools
import json

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, assert_close, check, check_fresh_save, edit_config, peft_checkpoint, run

import peftfx

# float32 outputs of magnitude ~0.1-3: atol 2e-6 is a few ulps at 1.0; peftfx merges in float64 and rounds once.
TOL = Tolerance(1e-5, 2e-6)
TOL64 = Tolerance(1e-10, 1e-12)
mlp3 = functools.partial(mlp, sizes=(12, 16, 20, 8))


def pvera(targets, **kw) -> peft.PveraConfig:
    return peft.PveraConfig(target_modules=targets, r=kw.pop("r", 4), **kw)


CASES = {
    "mlp": (mlp3, mlp_inputs, pvera(["layers.0", "layers.1", "layers.2"])),
    "mlp-no-saved-projection": (
        mlp3,
        mlp_inputs,
        pvera(["layers.1", "layers.2"], projection_prng_key=5, save_projection=False),
    ),
    "llama": (
        functools.partial(tiny_llama, num_hidden_layers=1),
        lambda: token_inputs(),
        pvera(["v_proj", "up_proj"], r=3),
    ),
    "gpt2-conv1d": (tiny_gpt2, lambda: token_inputs(), pvera(["c_attn", "mlp.c_proj"], r=5)),
}


@pytest.mark.parametrize(("make", "inputs", "config"), CASES.values(), ids=CASES.keys())
def test_matches_peft(make, inputs, config, tmp_path):
    check(make(), config, inputs(), tmp_path, tol=TOL)


def test_matches_peft_float64(tmp_path):
    model = mlp3(dtype=torch.float64)
    check(model, pvera(["layers.0", "layers.2"], r=3), mlp_inputs(dtype=torch.float64), tmp_path, tol=TOL64)


def test_fresh_is_identity_trainable_and_saves(tmp_path):
    model, inputs = mlp3(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "pvera", "at": {"op": "linear"}, "with": {"r": 3, "projection_prng_key": 2}}}}
    gm = peftfx.compile(model, spec, inputs)
    assert_close(run(gm, inputs), run(model, inputs), Tolerance(0, 0), "identity at init")
    params = dict(gm.named_parameters())
    assert params["peftfx.f.A"].shape == (6, 20) and params["peftfx.f.B"].shape == (20, 3)
    peft_model = peft.get_peft_model(mlp3(), pvera(["layers.0", "layers.1", "layers.2"], r=3, projection_prng_key=2))
    assert torch.equal(params["peftfx.f.A"], peft_model.base_model.pvera_A["default"])
    assert torch.equal(params["peftfx.f.B"], peft_model.base_model.pvera_B["default"])
    check_fresh_save(model, spec, inputs, tmp_path)
    assert json.loads((tmp_path / "fresh" / "adapter_config.json").read_text())["peft_type"] == "PVERA"


def test_errors_name_the_file_and_key(tmp_path):
    model, inputs = mlp3(), mlp_inputs()
    ckpt = tmp_path / "peft"
    peft_checkpoint(model, pvera(["layers.0"]), ckpt)
    config = edit_config(ckpt, sample_at_inference=True)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: sample_at_inference"):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt)}}}, inputs)
    edit_config(ckpt, config, r=2)
    with pytest.raises(peftfx.PeftfxError, match=r"safetensors: 'base_model\.model\.layers\.0\.pvera_lambda_d'.*\[8\]"):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt)}}}, inputs)
