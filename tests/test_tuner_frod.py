"""FRoD against PEFT: shared per-category bases (MLP, Llama, GPT-2 Conv1D), float64, and what is refused."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check

import peftfx


def frod(**kw) -> peft.FrodConfig:
    return peft.FrodConfig(**{"target_modules": ["layers.0", "layers.1"], "progressbar": False, **kw})


@pytest.mark.parametrize(
    "config",
    [frod(), frod(sparse_rate=0.2, init_weights=False)],
    ids=["default", "dense-pattern-random-init"],
)
def test_mlp(config, tmp_path):
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_llama_shares_bases_across_layers(tmp_path):
    config = frod(target_modules=["q_proj", "v_proj", "down_proj"], sparse_rate=0.05)
    result = check(tiny_llama(), config, token_inputs(), tmp_path)
    bases = [n for n, _ in result["unmerged"].named_parameters() if ".V__" in n]
    assert sorted(bases) == [f"peftfx.a.V__{c}" for c in ("mlp_down_proj", "self_attn_q_proj", "self_attn_v_proj")]
    gm = result["unmerged"]
    gm(**token_inputs())["logits"].sum().backward()
    assert gm.get_parameter("peftfx.a.V__self_attn_q_proj").grad is None  # a frozen buffer in PEFT
    assert gm.get_parameter("peftfx.a.model__layers__0__self_attn__q_proj.lambda_l").grad is not None


def test_gpt2_conv1d(tmp_path):
    config = frod(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, sparse_rate=0.05)
    check(tiny_gpt2(), config, token_inputs(), tmp_path)


def test_float64(tmp_path):
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    check(mlp(dtype=torch.float64), frod(sparse_rate=0.1), mlp_inputs(dtype=torch.float64), tmp_path, tol=tol)


def test_fresh_is_refused():
    spec = {"adapters": {"f": {"type": "frod", "at": {"op": "linear"}}}}
    with pytest.raises(peftfx.PeftfxError, match="joint decomposition"):
        peftfx.compile(mlp(), spec, mlp_inputs())


def _saved(tmp_path, **kw):
    peft.get_peft_model(mlp(), frod(**kw)).save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def test_unsaved_projection_and_scale_are_refused(tmp_path):
    _saved(tmp_path / "unsaved", save_projection=False)
    with pytest.raises(peftfx.PeftfxError, match="save_projection=false"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path / "unsaved")}}}, mlp_inputs())
    _saved(tmp_path / "saved")
    with pytest.raises(peftfx.PeftfxError, match="no natural scaling"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path / "saved"), "scale": 2}}}, mlp_inputs())


def test_wrong_shape_and_unknown_field_name_the_culprit(tmp_path):
    config = _saved(tmp_path)
    wrong = mlp(sizes=(10, 16, 8))  # layers.0 has 10 inputs, the file's basis is 12x12
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors: 'base_model\.frod_V\.layers_0'.*shape"):
        peftfx.compile(wrong, {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs(10))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_magic": True}))
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: use_magic=True"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())
