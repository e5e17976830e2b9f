"""OSF against PEFT: Linear on an MLP and Llama, effective_rank as count/fraction/default and rank_pattern."""

from __future__ import annotations

import functools

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import (
    Tolerance,
    adapter_parameters,
    check,
    check_fresh_save,
    edit_config,
    peft_checkpoint,
    replace_tensor,
    run,
)

import peftfx

MLP = functools.partial(mlp, sizes=(12, 16, 8))
LAYERS = ["layers.0", "layers.1"]

CASES = {
    "default-half": peft.OSFConfig(target_modules=LAYERS),
    "count": peft.OSFConfig(effective_rank=3, target_modules=LAYERS),
    "fraction": peft.OSFConfig(effective_rank=0.25, target_modules=LAYERS),
    "rank-pattern": peft.OSFConfig(effective_rank=2, rank_pattern={r"layers\.1": 6}, target_modules=LAYERS),
    "random-init": peft.OSFConfig(effective_rank=5, init_weights=False, target_modules=LAYERS),
}


@pytest.mark.parametrize("case", CASES)
def test_mlp(case, tmp_path):
    # float32; the frozen part comes from the same float32 SVD of the same weight as PEFT's, so rtol 1e-5 holds.
    # random-init: N(0, 1) factors push outputs to ~1e2, where PEFT's float32 merge rounds at ~4e-6 absolute
    tol = Tolerance(1e-5, 1e-5 if case == "random-init" else 1e-6)
    check(MLP(), CASES[case], mlp_inputs(), tmp_path, tol=tol)


def test_mlp_float64(tmp_path):
    # PEFT takes the SVD in float32 and casts it to float64; peftfx does the same, then both compute in float64
    dtype = torch.float64
    config = peft.OSFConfig(effective_rank=3, target_modules=LAYERS)
    check(MLP(dtype=dtype), config, mlp_inputs(dtype=dtype), tmp_path, tol=Tolerance(1e-10, 1e-12))


def test_llama(tmp_path):
    config = peft.OSFConfig(effective_rank=0.5, target_modules=["q_proj", "v_proj", "down_proj"])
    # float32 through two transformer layers
    check(tiny_llama(), config, token_inputs(), tmp_path, tol=Tolerance(1e-5, 1e-5))


def test_fresh_identity_and_save(tmp_path):
    base, inputs = MLP(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "osf", "at": {"op": "linear"}, "with": {"effective_rank": 3}}}}
    gm = peftfx.compile(base, spec, inputs)
    # the stored low part is the base weight's own: the update cancels up to float32 rounding
    torch.testing.assert_close(run(gm, inputs), run(base, inputs), rtol=1e-6, atol=1e-6)
    params = dict(gm.named_parameters())
    shapes = [params[n].shape for n in adapter_parameters(gm)]
    assert shapes == [(16, 9), (9,), (9, 12), (8, 5), (5,), (5, 16)]
    assert all(params[n].requires_grad for n in adapter_parameters(gm))
    check_fresh_save(base, spec, inputs, tmp_path)


def test_fresh_llama_save(tmp_path):
    spec = {
        "adapters": {"f": {"type": "osf", "at": {"op": "linear", "module": "re:.*(q|o)_proj"}, "with": {"init": False}}}
    }
    check_fresh_save(tiny_llama(), spec, token_inputs(), tmp_path, Tolerance(1e-5, 1e-5))


def test_errors(tmp_path):
    peft_checkpoint(MLP(), CASES["count"], tmp_path / "c")
    key = "base_model.model.layers.0.osf_svd_params.S_low"
    original = replace_tensor(tmp_path / "c", key, lambda t: t[:-1].contiguous())
    with pytest.raises(
        peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.osf_svd_params\.S_low.*\[8\]"
    ):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())
    replace_tensor(tmp_path / "c", key, original)

    edit_config(tmp_path / "c", osf_x=1)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: osf_x=1 is not supported"):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())

    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        spec = {"adapters": {"a": {"type": "osf", "at": {"module": "re:.*c_attn"}}}}
        peftfx.compile(tiny_gpt2(), spec, token_inputs())
