"""GLoRA against PEFT: every path form on an MLP (with and without bias), Llama; fresh adapters; errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, replace_tensor, run, saved_peft

import peftfx

MLP = ["layers.0", "layers.1"]


def glora(**kw) -> peft.GloraConfig:
    return peft.GloraConfig(**{"r": 2, **kw})


@pytest.mark.parametrize(
    ("model", "inputs", "config"),
    [
        (mlp, mlp_inputs, glora(target_modules=MLP)),
        (mlp, mlp_inputs, glora(target_modules=MLP, config_A_B="vector", config_C="vector", config_D_E="vector")),
        (mlp, mlp_inputs, glora(target_modules=MLP, config_A_B="constant", config_C="none", config_D_E="none")),
        (mlp, mlp_inputs, glora(target_modules=MLP, config_A_B="none", config_C="lora", config_D_E="vector")),
        (lambda: mlp(bias=False), mlp_inputs, glora(target_modules=MLP, config_A_B="vector")),
        (tiny_llama, token_inputs, glora(r=3, target_modules=["q_proj", "v_proj", "down_proj"])),
    ],
    ids=["mlp-default", "mlp-vectors", "mlp-constant-none", "mlp-none-lora-vector", "mlp-no-bias", "llama"],
)
def test_matches_peft(model, inputs, config, tmp_path):
    check(model(), config, inputs(), tmp_path)


def test_float64(tmp_path):
    config = glora(r=3, target_modules=MLP, config_D_E="vector")
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    check(mlp(dtype=torch.float64), config, mlp_inputs(dtype=torch.float64), tmp_path, tol=tol)


@pytest.mark.parametrize(
    "params",
    [{"r": 3}, {"r": 2, "config_A_B": "vector", "config_C": "none", "config_D_E": "vector"}],
    ids=["default", "vectors"],
)
def test_fresh_identity_and_save(params, tmp_path):
    base, x = mlp(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "glora", "at": {"op": "linear"}, "with": params, "seed": 1}}}
    gm = peftfx.compile(base, spec, x)
    torch.testing.assert_close(run(gm, x), run(base, x), rtol=0, atol=0)  # every path starts at zero
    assert [n for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad]
    check_fresh_save(base, spec, x, tmp_path)


def test_fresh_llama_save(tmp_path):
    spec = {"adapters": {"f": {"type": "glora", "at": {"module": "re:.*(q_proj|up_proj)"}, "with": {"r": 2}}}}
    check_fresh_save(tiny_llama(), spec, token_inputs(), tmp_path)


def _checkpoint(tmp_path, **kw):
    return saved_peft(mlp(), glora(target_modules=["layers.0"], **kw), tmp_path)


def test_misshaped_tensor(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    replace_tensor(ckpt, "base_model.model.layers.0.glora_A.Xu", torch.zeros(3, 12))
    with pytest.raises(peftfx.PeftfxError, match=r"layers.0.glora_A.Xu.*shape \[3, 12\], expected \[2, 12\]"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())


def test_nonzero_absent_path(tmp_path):
    ckpt = _checkpoint(tmp_path / "c", config_C="none")
    replace_tensor(ckpt, "base_model.model.layers.0.glora_C.zeros", torch.ones(12, 1))
    with pytest.raises(peftfx.PeftfxError, match=r"glora_C.zeros' is an absent path"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())


def test_unsupported_config_field(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    edit_config(ckpt, weird_option=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config.json: weird_option=3"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())


def test_refuses_gpt2_conv1d():
    spec = {"adapters": {"f": {"type": "glora", "at": {"op": "linear", "module": "re:.*c_attn"}}}}
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        peftfx.compile(tiny_gpt2(), spec, token_inputs())


@pytest.mark.parametrize("merge", [["l"], ["l", "g"]], ids=["lora-only", "both"])
def test_partial_merge_after_lora(merge):
    # GLoRA reads the base weight: with a LoRA folded in before it, its deltas must still come from the raw weight
    base, x = mlp(), mlp_inputs()
    adapters = {
        "l": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2, "init": False}, "seed": 0},
        "g": {"type": "glora", "at": {"op": "linear"}, "with": {"r": 2, "init_weights": False}, "seed": 1},
    }
    live = run(peftfx.compile(base, {"adapters": adapters}, x), x)
    merged = run(peftfx.compile(base, {"adapters": adapters, "merge": merge}, x), x)
    torch.testing.assert_close(merged, live, rtol=1e-5, atol=1e-6)
