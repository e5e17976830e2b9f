"""C3A against PEFT: Linear on an MLP and Llama, unmerged, merged and saved back; fresh; errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, run, saved_peft

import peftfx


@pytest.mark.parametrize("init", ["xavier_uniform", "gaussian", "kaiming_uniform"])
def test_mlp_pattern(init, tmp_path):
    config = peft.C3AConfig(
        block_size=4, block_size_pattern={"layers.1": 8}, init_weights=init, target_modules=["layers.0", "layers.1"]
    )
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_llama(tmp_path):
    config = peft.C3AConfig(block_size=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    check(tiny_llama(), config, token_inputs(), tmp_path)


def test_float64(tmp_path):
    # PEFT runs C3A's FFTs in float32 even for a float64 model; peftfx keeps float64, so the two agree to
    # float32 precision only.
    config = peft.C3AConfig(block_size=4, target_modules=["layers.0", "layers.1"])
    x = tuple(t.double() for t in mlp_inputs())
    check(mlp(dtype=torch.float64), config, x, tmp_path, tol=Tolerance(1e-5, 1e-6))


def test_fresh(tmp_path):
    spec = {
        "adapters": {
            "f": {
                "type": "c3a",
                "at": {"op": "linear", "module": "re:.*(q_proj|o_proj)"},
                "with": {"block_size": {"gradient": [8, 16]}, "init_weights": True},
            }
        }
    }
    base = tiny_llama()
    gm = peftfx.compile(base, spec, token_inputs())
    torch.testing.assert_close(run(gm, token_inputs()), run(base, token_inputs()), rtol=0, atol=0)
    shapes = sorted(tuple(p.shape) for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad)
    assert shapes == [(2, 2, 16), (2, 2, 16), (4, 4, 8), (4, 4, 8)]
    check_fresh_save(base, spec, token_inputs(), tmp_path)


def test_fresh_random_init(tmp_path):
    spec = {"adapters": {"f": {"type": "c3a", "at": {"op": "linear"}, "with": {"block_size": 4}, "seed": 0}}}
    check_fresh_save(mlp(), spec, mlp_inputs(), tmp_path)


def test_errors(tmp_path):
    ckpt = tmp_path / "ckpt"
    saved_peft(mlp(), peft.C3AConfig(block_size=4, target_modules=["layers.0"]), ckpt)
    spec = {"adapters": {"a": {"peft": str(ckpt)}}}
    with pytest.raises(peftfx.PeftfxError, match="no scaling factor"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt), "scale": 0.5}}}, mlp_inputs())
    cfg = edit_config(ckpt, block_size=2)
    with pytest.raises(peftfx.PeftfxError, match=r"layers\.0\.c3a_kernel.*\[4, 3, 4\], expected \[8, 6, 2\]"):
        peftfx.compile(mlp(), spec, mlp_inputs())
    edit_config(ckpt, cfg, scaling=2.0)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config.json: scaling=2.0"):
        peftfx.compile(mlp(), spec, mlp_inputs())
    fresh = {"adapters": {"f": {"type": "c3a", "at": {"op": "linear"}, "with": {"block_size": 5}}}}
    with pytest.raises(peftfx.PeftfxError, match="block_size=5 must divide"):
        peftfx.compile(mlp(), fresh, mlp_inputs())
    fresh = {"adapters": {"f": {"type": "c3a", "at": {"module": "re:.*c_attn"}, "with": {"block_size": 8}}}}
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        peftfx.compile(tiny_gpt2(), fresh, token_inputs())
