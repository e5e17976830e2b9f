"""FRoD against PEFT: shared per-category bases (MLP, Llama, GPT-2 Conv1D), float64, fresh adapters, refusals."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, run, saved_peft
from torch import nn

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


# PEFT's role names, from peftfx's: per-site roles and the category-wide (shared) buffers.
_PEFT_ROLE = {"lambda_l": "frod_lambda_l", "s_values": "frod_lambda_s_values"}


def _peft_name(name: str) -> str:
    """``peftfx.f.<module key>.<role>`` or ``peftfx.f.<name>__<category>`` -> the PEFT parameter/buffer name."""
    parts = name.split(".")
    if len(parts) == 3:
        role, category = parts[2].split("__", 1)
        return f"base_model.frod_{role}.{category}.default"
    return f"base_model.model.{parts[2].replace('__', '.')}.{_PEFT_ROLE[parts[3]]}.default"


@pytest.mark.parametrize(
    ("model", "inputs", "at", "with_", "targets"),
    [
        (mlp, mlp_inputs, {"op": "linear"}, {"sparse_rate": 0.1}, ["layers.0", "layers.1"]),
        (
            tiny_llama,
            token_inputs,
            {"module": "re:.*(q_proj|v_proj|down_proj)"},
            {"sparse_rate": 0.05, "projection_prng_key": 3, "regularization_alpha": 0.01},
            ["q_proj", "v_proj", "down_proj"],
        ),
        (tiny_gpt2, token_inputs, {"module": "re:.*(c_attn|c_fc)"}, {"sparse_rate": 0.05}, ["c_attn", "c_fc"]),
    ],
    ids=["mlp", "llama", "gpt2-conv1d"],
)
def test_fresh_is_peft_init(model, inputs, at, with_, targets, tmp_path):
    """Bit for bit PEFT's initialisation (the MLP covers the SVD branch, layers.1 being 8x16, and the QR one;
    Llama's categories stack two layers each), identity at init as PEFT's is, and a round trip through PEFT."""
    base, x = model(), inputs()
    spec = {"adapters": {"f": {"type": "frod", "at": at, "with": with_}}}
    gm = peftfx.compile(base, spec, x)
    config = frod(target_modules=targets, fan_in_fan_out=model is tiny_gpt2, **with_)
    ref = peft.get_peft_model(model(), config)
    theirs = dict(ref.named_parameters()) | dict(ref.named_buffers())
    mine = {_peft_name(n): p for n, p in gm.named_parameters() if n.startswith("peftfx.")}
    # all of PEFT's adapter tensors but U, a non-persistent buffer PEFT derives from V and the weight (as peftfx does)
    assert set(mine) == {k for k in theirs if k.endswith(".default") and ".frod_U." not in k}
    for key, tensor in mine.items():
        assert tensor.dtype == theirs[key].dtype and torch.equal(tensor, theirs[key]), key
    trainable = {key for key, p in mine.items() if p.requires_grad}
    assert trainable == {n for n, p in ref.named_parameters() if p.requires_grad}
    # U and λ are rounded to float32 as PEFT keeps them: W_eff = U diag(λ) Vᵀ is W up to that rounding, as in PEFT
    out = run(gm, x)
    torch.testing.assert_close(out, run(ref, x), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, run(base, x), rtol=1e-5, atol=1e-6)
    check_fresh_save(base, spec, x, tmp_path)


def test_fresh_random_init_round_trip(tmp_path):
    """init_weights=False: PEFT draws its noise on S and λ from the global generator, so those values are not a
    function of the config; here they come from the spec's seed. V and the positions are still PEFT's exactly."""
    spec = {"adapters": {"f": {"type": "frod", "at": {"op": "linear"}, "with": {"init_weights": False}, "seed": 1}}}
    gm = peftfx.compile(mlp(), spec, mlp_inputs())
    ref = peft.get_peft_model(mlp(), frod(init_weights=False))
    theirs = dict(ref.named_buffers())
    shared = {n: t for n, t in gm.named_parameters() if n.startswith("peftfx.") and n.count(".") == 2}
    assert len(shared) == 6  # V, positions and their size, for each of the two categories
    for name, tensor in shared.items():
        assert torch.equal(tensor, theirs[_peft_name(name)]), name
    check_fresh_save(mlp(), spec, mlp_inputs(), tmp_path)


class _TwoBlocks(nn.Module):
    """``enc.mlp.fc`` and ``dec.mlp.fc``: one FRoD category, no layer index in either path."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Module(), nn.Module()
        self.enc.mlp, self.dec.mlp = nn.Module(), nn.Module()
        self.enc.mlp.fc, self.dec.mlp.fc = nn.Linear(12, 12), nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec.mlp.fc(self.enc.mlp.fc(x))


def test_fresh_without_layer_order_is_refused():
    spec = {"adapters": {"f": {"type": "frod", "at": {"op": "linear"}}}}
    with pytest.raises(peftfx.PeftfxError, match=r"adapters\.f: frod: the layers of category 'mlp_fc'.*module order"):
        peftfx.compile(_TwoBlocks().eval(), spec, mlp_inputs())


def _saved(tmp_path, **kw):
    saved_peft(mlp(), frod(**kw), tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def test_unsaved_projection_and_scale_are_refused(tmp_path):
    _saved(tmp_path / "unsaved", save_projection=False)
    with pytest.raises(peftfx.PeftfxError, match="save_projection=false"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path / "unsaved")}}}, mlp_inputs())
    _saved(tmp_path / "saved")
    with pytest.raises(peftfx.PeftfxError, match="no scaling factor"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path / "saved"), "scale": 2}}}, mlp_inputs())


def test_wrong_shape_and_unknown_field_name_the_culprit(tmp_path):
    config = _saved(tmp_path)
    wrong = mlp(sizes=(10, 16, 8))  # layers.0 has 10 inputs, the file's basis is 12x12
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors: 'base_model\.frod_V\.layers_0'.*shape"):
        peftfx.compile(wrong, {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs(10))
    edit_config(tmp_path, config, use_magic=True)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: use_magic=True"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path)}}}, mlp_inputs())
