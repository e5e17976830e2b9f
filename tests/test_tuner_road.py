"""RoAd against PEFT: Linear on an MLP and Llama, variants road_1/2/4 and group sizes, create, save, errors."""

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


def road(**kw) -> peft.RoadConfig:
    kw.setdefault("target_modules", LAYERS)
    kw.setdefault("group_size", 4)
    return peft.RoadConfig(**kw)


CASES = {
    "road_1": road(),
    "road_2": road(variant="road_2", group_size=8),
    "road_4": road(variant="road_4"),
    "road_4-g2": road(variant="road_4", group_size=2),
    "road_1-no-bias": road(variant="road_1", group_size=8),
}


@pytest.mark.parametrize("case", CASES)
def test_mlp(case, tmp_path):
    base = MLP(bias=case != "road_1-no-bias")
    # float32, elementwise products after the base output: 1e-5 holds (merge also rotates the bias)
    check(base, CASES[case], mlp_inputs(), tmp_path)


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_mlp_float64(variant, tmp_path):
    dtype = torch.float64
    check(MLP(dtype=dtype), road(variant=variant), mlp_inputs(dtype=dtype), tmp_path, tol=Tolerance(1e-10, 1e-12))


def test_llama(tmp_path):
    config = road(variant="road_2", group_size=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    # float32 through two transformer layers
    check(tiny_llama(), config, token_inputs(), tmp_path, tol=Tolerance(1e-5, 1e-5))


def test_fresh_identity_and_save(tmp_path):
    base, inputs = MLP(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "road", "at": {"op": "linear"}, "with": {"group_size": 8}}}}
    gm = peftfx.compile(base, spec, inputs)
    assert torch.equal(run(gm, inputs), run(base, inputs))  # θ = 0, alpha = 1
    params = dict(gm.named_parameters())
    assert [params[n].shape for n in adapter_parameters(gm)] == [(8,), (8,), (4,), (4,)]
    assert all(params[n].requires_grad for n in adapter_parameters(gm))
    check_fresh_save(base, spec, inputs, tmp_path)


def test_fresh_road_4_save(tmp_path):
    with_ = {"variant": "road_4", "group_size": 4, "init": False}
    spec = {"adapters": {"f": {"type": "road", "at": {"op": "linear", "module": "re:.*(q|v)_proj"}, "with": with_}}}
    check_fresh_save(tiny_llama(), spec, token_inputs(), tmp_path, Tolerance(1e-5, 1e-5))


def test_errors(tmp_path):
    peft_checkpoint(MLP(), road(), tmp_path / "c")
    key = "base_model.model.layers.0.road_alpha"
    original = replace_tensor(tmp_path / "c", key, lambda t: t[:-1].contiguous())
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.road_alpha.*shape \[7\]"):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())
    replace_tensor(tmp_path / "c", key, original)

    edit_config(tmp_path / "c", road_magic=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: road_magic=3 is not supported"):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())

    spec = {"adapters": {"a": {"type": "road", "at": {"op": "linear"}, "with": {"group_size": 6}}}}
    with pytest.raises(peftfx.PeftfxError, match="group_size=6 must be even and divide 16"):
        peftfx.compile(MLP(), spec, mlp_inputs())
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        spec = {"adapters": {"a": {"type": "road", "at": {"module": "re:.*c_attn"}, "with": {"group_size": 8}}}}
        peftfx.compile(tiny_gpt2(), spec, token_inputs())
