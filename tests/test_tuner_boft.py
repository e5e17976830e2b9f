"""BOFT against PEFT: Linear (MLP, Llama) and Conv2d, one and several butterfly factors, create, save, errors.

PEFT builds more than one butterfly factor only when its CUDA block-diagonal extension loads. The
``butterfly`` fixture stands in for that extension with a plain-torch block diagonal (the same numbers), so
PEFT's own multi-factor math runs on CPU; otherwise PEFT is kept from trying to compile it.
"""

from __future__ import annotations

import functools

import peft
import peft.tuners.boft.layer as boft_layer
import pytest
import torch
from models import conv_inputs, conv_net, mlp, mlp_inputs, tiny_llama, token_inputs
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


class _BlockDiag:
    @staticmethod
    def apply(blocks: torch.Tensor) -> torch.Tensor:  # [N, D, H, H] -> [N, D*H, D*H]
        return torch.stack([torch.block_diag(*factor) for factor in blocks])


@pytest.fixture(autouse=True)
def no_extension(monkeypatch):
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)


@pytest.fixture
def butterfly(monkeypatch):
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: object())
    monkeypatch.setattr(boft_layer, "FastBlockDiag", _BlockDiag)


MLP = functools.partial(mlp, sizes=(12, 16, 8))
MLP16 = functools.partial(mlp, sizes=(16, 16, 8))
LAYERS = ["layers.0", "layers.1"]


def boft(**kw) -> peft.BOFTConfig:
    kw.setdefault("target_modules", LAYERS)
    if "boft_block_num" in kw:
        kw.setdefault("boft_block_size", 0)
    return peft.BOFTConfig(**kw)


CASES = {
    "size": (MLP, 12, boft(boft_block_size=4)),
    "num": (MLP, 12, boft(boft_block_num=2)),
    "dropout-bias": (MLP, 12, boft(boft_block_size=2, boft_dropout=0.2, bias="boft_only")),
}
BUTTERFLY = {
    "2-factors": (MLP, 12, boft(boft_block_size=2, boft_n_butterfly_factor=2)),
    "3-factors": (MLP16, 16, boft(boft_block_size=2, boft_n_butterfly_factor=3)),
    "2-factors-num": (MLP16, 16, boft(boft_block_num=4, boft_n_butterfly_factor=2)),
}


@pytest.mark.parametrize("case", CASES)
def test_mlp(case, tmp_path):
    make, n, config = CASES[case]
    # float32, exact Cayley of 2x2..6x6 blocks in front of the weight: 1e-5 holds
    check(make(), config, mlp_inputs(n), tmp_path)


@pytest.mark.parametrize("case", BUTTERFLY)
def test_mlp_butterfly(case, butterfly, tmp_path):
    make, n, config = BUTTERFLY[case]
    result = check(make(), config, mlp_inputs(n), tmp_path)
    gm = result["unmerged"]
    shapes = [p.shape for name, p in gm.named_parameters() if name.endswith("boft_R")]
    assert all(s[0] == config.boft_n_butterfly_factor for s in shapes)


def test_mlp_float64(butterfly, tmp_path):
    config = boft(boft_block_size=2, boft_n_butterfly_factor=2)
    check(MLP(dtype=torch.float64), config, mlp_inputs(dtype=torch.float64), tmp_path, tol=Tolerance(1e-10, 1e-12))


def test_llama(tmp_path):
    config = peft.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])
    # float32 through two transformer layers: PEFT merges in float32, peftfx in float64
    check(tiny_llama(), config, token_inputs(), tmp_path, tol=Tolerance(1e-5, 1e-5))


@pytest.mark.parametrize(
    "config",
    [
        boft(target_modules=["conv1", "conv2"], boft_block_size=0, boft_block_num=3),
        boft(target_modules=["conv2"], boft_block_size=6, boft_n_butterfly_factor=2),
    ],
    ids=["conv-num", "conv-butterfly"],
)
def test_conv2d(config, butterfly, tmp_path):
    # the conv weight is rotated and scaled before the conv; float32, 1e-5 holds
    check(conv_net(2), config, conv_inputs(2), tmp_path)


def test_conv2d_float64(tmp_path):
    config = boft(target_modules=["conv1", "conv2"], boft_block_size=9)
    dtype = torch.float64
    check(conv_net(2, dtype=dtype), config, conv_inputs(2, dtype=dtype), tmp_path, tol=Tolerance(1e-10, 1e-12))


def test_fresh_identity_and_save(tmp_path):
    base, inputs = MLP(), mlp_inputs()
    spec = {"adapters": {"f": {"type": "boft", "at": {"op": "linear"}}}}
    gm = peftfx.compile(base, spec, inputs)
    assert torch.equal(run(gm, inputs), run(base, inputs))  # zero skew parts, unit scales: the base layer
    params = dict(gm.named_parameters())
    shapes = {n.rsplit(".", 1)[-1]: params[n].shape for n in adapter_parameters(gm) if params[n].requires_grad}
    assert len(adapter_parameters(gm)) == 4 and shapes == {"boft_R": (1, 4, 4, 4), "boft_s": (8, 1)}
    check_fresh_save(base, spec, inputs, tmp_path)


def test_fresh_butterfly_save(butterfly, tmp_path):
    with_ = {"block_size": 0, "block_num": 4, "butterfly_factor": 2, "init": False}
    spec = {"adapters": {"f": {"type": "boft", "at": {"op": "linear"}, "with": with_, "seed": 0}}}
    check_fresh_save(MLP16(), spec, mlp_inputs(16), tmp_path)


def test_fresh_conv_save(tmp_path):
    spec = {"adapters": {"f": {"type": "boft", "at": {"op": "conv2d"}, "with": {"block_size": 3, "init": False}}}}
    check_fresh_save(conv_net(2), spec, conv_inputs(2), tmp_path)


def test_errors(tmp_path):
    peft_checkpoint(MLP(), boft(), tmp_path / "c")
    key = "base_model.model.layers.1.boft_s"
    original = replace_tensor(tmp_path / "c", key, lambda t: t[:-1].contiguous())
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.1\.boft_s.*shape \[7, 1\]"):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())
    replace_tensor(tmp_path / "c", key, original)

    edit_config(tmp_path / "c", boft_magic=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: boft_magic=3 is not supported"):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())

    spec = {"adapters": {"a": {"type": "boft", "at": {"op": "linear"}, "with": {"block_size": 5}}}}
    with pytest.raises(peftfx.PeftfxError, match="not divisible by boft_block_size=5"):
        peftfx.compile(MLP(), spec, mlp_inputs())
