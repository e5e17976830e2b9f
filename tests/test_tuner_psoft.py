"""PSOFT against PEFT: Linear on an MLP and Llama; Cayley exact/Neumann(+eps), free R, magnitudes, pissa split."""

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


def psoft(**kw) -> peft.PsoftConfig:
    kw.setdefault("target_modules", LAYERS)
    kw.setdefault("r", 4)
    kw.setdefault("psoft_alpha", 8)
    return peft.PsoftConfig(**kw)


CASES = {
    "cayley": psoft(),
    "neumann": psoft(use_cayley_neumann=True, num_cayley_neumann_terms=4),
    "neumann-eps": psoft(use_cayley_neumann=True, cayley_neumann_eps=0.3),
    "free-R": psoft(psoft_orth=False),
    "no-magnitudes": psoft(psoft_mag_a=False, psoft_mag_b=False, r=6),
    "pissa": psoft(ab_svd_init="pissa_init", psoft_mag_a=False),
}


@pytest.mark.parametrize("case", CASES)
def test_mlp(case, tmp_path):
    # float32: A and B come from the same float32 SVD of the same weight as PEFT's, so 1e-5 holds
    check(MLP(), CASES[case], mlp_inputs(), tmp_path)


def test_float64_refused(tmp_path):
    # PEFT refuses PSOFT on float64 weights (it rebuilds A and B from a float32 SVD); so does peftfx
    peft_checkpoint(MLP(), psoft(), tmp_path / "c")
    spec = {"adapters": {"a": {"peft": str(tmp_path / "c")}}}
    with pytest.raises(peftfx.PeftfxError, match="float32/16 or bfloat16 weight"):
        peftfx.compile(MLP(dtype=torch.float64), spec, mlp_inputs(dtype=torch.float64))


def test_llama(tmp_path):
    config = psoft(r=8, target_modules=["q_proj", "v_proj", "up_proj"], use_cayley_neumann=True)
    # float32 through two transformer layers
    check(tiny_llama(), config, token_inputs(), tmp_path, tol=Tolerance(1e-5, 1e-5))


def test_fresh_identity_and_save(tmp_path):
    base, inputs = MLP(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "psoft", "at": {"op": "linear"}, "with": {"r": 4, "alpha": 8}}}}
    gm = peftfx.compile(base, spec, inputs)
    assert torch.equal(run(gm, inputs), run(base, inputs))  # R = I: B (R - I) A = 0
    params = dict(gm.named_parameters())
    shapes = [params[n].shape for n in adapter_parameters(gm)]
    assert shapes == [(6,), (4,), (4,)] * 2 and all(params[n].requires_grad for n in adapter_parameters(gm))
    check_fresh_save(base, spec, inputs, tmp_path)


def test_fresh_variants_save(tmp_path):
    with_ = {"r": 4, "orth": False, "mag_a": False, "ab_svd_init": "pissa_init", "init": False}
    spec = {"adapters": {"f": {"type": "psoft", "at": {"op": "linear", "module": "re:.*(q|v)_proj"}, "with": with_}}}
    check_fresh_save(tiny_llama(), spec, token_inputs(), tmp_path, Tolerance(1e-5, 1e-5))


def test_errors(tmp_path):
    peft_checkpoint(MLP(), psoft(), tmp_path / "c")
    key = "base_model.model.layers.0.psoft_R.weight"
    original = replace_tensor(tmp_path / "c", key, lambda t: t[:-1].contiguous())
    with pytest.raises(
        peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.psoft_R\.weight.*shape \[5\]"
    ):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())
    replace_tensor(tmp_path / "c", key, original)

    config = edit_config(tmp_path / "c", psoft_svd="lowrank")
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: psoft_svd='lowrank'"):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())
    edit_config(tmp_path / "c", config, psoft_magic=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: psoft_magic=3 is not supported"):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())

    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        spec = {"adapters": {"a": {"type": "psoft", "at": {"module": "re:.*c_attn"}, "with": {"r": 4}}}}
        peftfx.compile(tiny_gpt2(), spec, token_inputs())
