"""TinyLoRA against PEFT: frozen SVD pair, seeded projections, shared v per group; live, merged, saved, fresh."""

from __future__ import annotations

import functools
import json

import peft
import pytest
import torch
from models import embed_net, id_inputs, mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, assert_close, check, check_fresh_save, edit_config, peft_checkpoint, run

import peftfx

# float32 outputs of magnitude ~0.1-3: atol 2e-6 is a few ulps at 1.0; peftfx merges B R A in float64 and rounds
# once where PEFT multiplies three float32 matrices. float64 agrees to rounding.
TOL = Tolerance(1e-5, 2e-6)
TOL64 = Tolerance(1e-10, 1e-12)
llama = functools.partial(tiny_llama, num_hidden_layers=1)
mlp3 = functools.partial(mlp, sizes=(12, 16, 20, 8))


def tiny(targets, **kw) -> peft.TinyLoraConfig:
    return peft.TinyLoraConfig(target_modules=targets, r=kw.pop("r", 3), u=kw.pop("u", 5), **kw)


CASES = {
    "mlp": (mlp3, mlp_inputs, tiny(["layers.0", "layers.1", "layers.2"])),
    # 4 targets, weight_tying 0.5: two groups of two sites share a v; P is regenerated from the seed
    "mlp-tied-no-saved-projection": (
        functools.partial(mlp, sizes=(12, 16, 20, 16, 8)),
        mlp_inputs,
        tiny(
            ["layers.0", "layers.1", "layers.2", "layers.3"], weight_tying=0.5, save_projection=False, projection_seed=9
        ),
    ),
    "embed-and-linear": (embed_net, id_inputs, tiny(["emb", "out"], r=2)),
    "llama": (llama, lambda: token_inputs(), tiny(["q_proj", "v_proj", "down_proj", "embed_tokens"], r=4, u=7)),
    "gpt2-conv1d": (tiny_gpt2, lambda: token_inputs(), tiny(["c_attn", "c_fc"], weight_tying=1.0)),
}


@pytest.mark.parametrize(("make", "inputs", "config"), CASES.values(), ids=CASES.keys())
def test_matches_peft(make, inputs, config, tmp_path):
    check(make(), config, inputs(), tmp_path, tol=TOL)


def test_matches_peft_float64(tmp_path):
    model = mlp3(dtype=torch.float64)
    check(model, tiny(["layers.0", "layers.2"], weight_tying=1.0), mlp_inputs(dtype=torch.float64), tmp_path, tol=TOL64)


def test_fresh_is_identity_trainable_and_saves(tmp_path):
    model, inputs = llama(), token_inputs()
    at = {"op": ["linear", "embedding"], "module": "re:.*(q_proj|k_proj|embed_tokens)"}
    spec = {"adapters": {"f": {"type": "tinylora", "at": at, "with": {"r": 3, "u": 4, "projection_seed": 1}}}}
    gm = peftfx.compile(model, spec, inputs)
    assert_close(run(gm, inputs), run(model, inputs), Tolerance(0, 0), "identity at init")
    params = dict(gm.named_parameters())
    assert sorted(n for n in params if n.startswith("peftfx.f.v_")) == ["peftfx.f.v_0", "peftfx.f.v_1", "peftfx.f.v_2"]
    check_fresh_save(model, spec, inputs, tmp_path)
    config = json.loads((tmp_path / "fresh" / "adapter_config.json").read_text())
    assert config["u"] == 4 and config["weight_tying"] == 0.0


def test_fresh_tensors_are_peft_init():
    """A, B (the SVD split) and P (seed + site index) are exactly what PEFT makes for the same targets."""
    model, inputs = mlp3(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "tinylora", "at": {"op": "linear"}, "with": {"r": 3, "u": 5}}}}
    gm = peftfx.compile(model, spec, inputs)
    peft_model = peft.get_peft_model(mlp3(), tiny(["layers.0", "layers.1", "layers.2"]))
    params = dict(gm.named_parameters())
    for i in range(3):
        layer = peft_model.base_model.model.layers[i]
        for role in ("A", "B", "P"):
            expected = getattr(layer, f"tinylora_{role}")["default"]
            assert torch.equal(params[f"peftfx.f.layers__{i}.{role}"], expected), (i, role)


def test_errors_name_the_file_and_key(tmp_path):
    model, inputs = mlp3(), mlp_inputs()
    ckpt = tmp_path / "peft"
    peft_checkpoint(model, tiny(["layers.0"]), ckpt)
    config = edit_config(ckpt, u=6)
    with pytest.raises(
        peftfx.PeftfxError, match=r"safetensors: 'base_model\.model\.layers\.0\.tinylora_P'.*\[5, 3, 3\]"
    ):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt)}}}, inputs)
    edit_config(ckpt, config, some_new_field=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: some_new_field=3"):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt)}}}, inputs)
