"""Super-Tuning against PEFT: top/bottom sparse support, Supra LoRA, unsaved positions, MLP and Llama, fresh, errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, peft_checkpoint, run, saved_peft

import peftfx


def supertuning(**kw) -> peft.SupertuningConfig:
    return peft.SupertuningConfig(**{"sparsity": 0.8, "target_modules": ["layers.0", "layers.1"], **kw})


@pytest.mark.parametrize(
    "config",
    [
        supertuning(),
        supertuning(select_top=False, r=2),
        supertuning(r=3, lora_alpha=5, init_weights=False),
        supertuning(save_precomputed_indices=False),
    ],
    ids=["super", "bottom-supra", "supra-alpha-random-init", "unsaved-positions"],
)
def test_mlp(config, tmp_path):
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_llama(tmp_path):
    config = supertuning(sparsity=0.9, r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    check(tiny_llama(), config, token_inputs(), tmp_path)


def test_float64(tmp_path):
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    check(mlp(dtype=torch.float64), supertuning(r=2), mlp_inputs(dtype=torch.float64), tmp_path, tol=tol)


def test_scale_scales_the_update(tmp_path):
    model, inputs = mlp(), mlp_inputs()
    peft_model = peft_checkpoint(model, supertuning(r=2, target_modules=["layers.1"]), tmp_path)
    spec = {"adapters": {"a": {"peft": str(tmp_path), "scale": 0.5}}}
    halfway = (run(peft_model, inputs) + run(model, inputs)) / 2  # the last layer: the update shows linearly
    for merge in (False, True):
        out = run(peftfx.compile(model, {**spec, "merge": merge}, inputs), inputs)
        torch.testing.assert_close(out, halfway, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_", [{"sparsity": 0.9}, {"sparsity": 0.7, "r": 2, "select_top": False}])
def test_fresh_is_identity_and_saves(with_, tmp_path):
    model, inputs = mlp(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "supertuning", "at": {"op": "linear"}, "with": with_}}}
    gm = peftfx.compile(model, spec, inputs)
    assert torch.equal(run(gm, inputs), run(model, inputs))
    trainable = {n.rsplit(".", 1)[1] for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad}
    assert trainable == ({"values", "lora_A", "lora_B"} if "r" in with_ else {"values"})
    # PEFT picks the same positions from the same weight
    indices = gm.get_parameter("peftfx.f.layers__0.indices")
    peft_model = peft.get_peft_model(mlp(), peft.SupertuningConfig(target_modules=["layers.0"], **with_))
    assert torch.equal(indices, peft_model.base_model.model.layers[0].supertuning_indices["default"])
    check_fresh_save(model, spec, inputs, tmp_path)


def test_fresh_random_init_saves(tmp_path):
    spec = {
        "adapters": {"f": {"type": "supertuning", "at": {"op": "linear"}, "with": {"sparsity": 0.5, "init": False}}}
    }
    model, inputs = mlp(), mlp_inputs()
    assert not torch.allclose(run(peftfx.compile(model, spec, inputs), inputs), run(model, inputs))
    check_fresh_save(model, spec, inputs, tmp_path)


def test_wrong_shape_names_the_key(tmp_path):
    saved_peft(mlp(), supertuning(), tmp_path)
    edit_config(tmp_path, sparsity=0.5)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.supertuning_values.*shape"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())


def test_unknown_config_field_and_conv1d_are_refused(tmp_path):
    saved_peft(mlp(), supertuning(), tmp_path)
    edit_config(tmp_path, use_magic=True)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: use_magic=True"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())
    spec = {"adapters": {"f": {"type": "supertuning", "at": {"op": "linear", "module": "re:.*c_fc"}}}}
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        peftfx.compile(tiny_gpt2(), spec, token_inputs())
