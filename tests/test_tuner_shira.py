"""SHiRA against PEFT: Linear on an MLP and Llama, unmerged, merged and saved back; fresh; errors."""

from __future__ import annotations

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, perturb, replace_tensor, run, saved_peft

import peftfx


@pytest.mark.parametrize("seed", [None, 7])
def test_mlp(seed, tmp_path):
    config = peft.ShiraConfig(r=2, random_seed=seed, target_modules=["layers.0", "layers.1"])
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_llama(tmp_path):
    config = peft.ShiraConfig(r=3, random_seed=1, target_modules=["q_proj", "v_proj", "gate_proj"])
    check(tiny_llama(), config, token_inputs(), tmp_path)


def test_float64(tmp_path):
    config = peft.ShiraConfig(r=2, random_seed=2, target_modules=["layers.0", "layers.1"])
    x = tuple(t.double() for t in mlp_inputs())
    check(mlp(dtype=torch.float64), config, x, tmp_path, tol=Tolerance(1e-10, 1e-12))


def test_fresh(tmp_path):
    spec = {
        "adapters": {"f": {"type": "shira", "at": {"op": "linear", "module": "re:.*(q_proj|v_proj)"}, "with": {"r": 2}}}
    }
    base = tiny_llama()
    gm = peftfx.compile(base, spec, token_inputs())
    torch.testing.assert_close(run(gm, token_inputs()), run(base, token_inputs()), rtol=0, atol=0)
    params = {n: p for n, p in gm.named_parameters() if n.startswith("peftfx.")}
    assert sorted(n.rsplit(".", 1)[1] for n, p in params.items() if p.requires_grad) == ["weight"] * 4
    assert all(p.dtype == torch.int32 for n, p in params.items() if n.endswith(".indices"))
    check_fresh_save(base, spec, token_inputs(), tmp_path)


def test_fresh_random_init_matches_peft_mask(tmp_path):
    spec = {
        "adapters": {
            "f": {"type": "shira", "at": {"op": "linear"}, "with": {"r": 1, "random_seed": 4, "init_weights": False}}
        }
    }
    check_fresh_save(mlp(), spec, mlp_inputs(), tmp_path)
    gm = peftfx.compile(mlp(), spec, mlp_inputs())
    peft_model = peft.get_peft_model(mlp(), peft.ShiraConfig(r=1, random_seed=4, target_modules=["layers.0"]))
    ours = dict(gm.named_parameters())["peftfx.f.layers__0.indices"]
    assert torch.equal(ours, peft_model.base_model.model.layers[0].shira_indices["default"])


def test_errors(tmp_path):
    config = peft.ShiraConfig(r=1, target_modules=["layers.0"])
    ckpt = tmp_path / "ckpt"
    saved_peft(mlp(), config, ckpt)
    key = "base_model.model.layers.0.shira_indices"
    indices = replace_tensor(
        ckpt, key, lambda t: t.index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(99, dtype=t.dtype))
    )
    spec = {"adapters": {"a": {"peft": str(ckpt)}}}
    with pytest.raises(peftfx.PeftfxError, match=r"layers\.0\.shira_indices.*outside 16x12"):
        peftfx.compile(mlp(), spec, mlp_inputs())
    replace_tensor(ckpt, key, indices[:, 1:].contiguous())
    with pytest.raises(peftfx.PeftfxError, match=r"layers\.0\.shira_indices.*shape \[2, 27\], expected \[2, 28\]"):
        peftfx.compile(mlp(), spec, mlp_inputs())
    edit_config(ckpt, n_frequency=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config.json: n_frequency=3"):
        peftfx.compile(mlp(), spec, mlp_inputs())
    fresh = {"adapters": {"f": {"type": "shira", "at": {"module": "re:.*c_attn"}, "with": {"r": 1}}}}
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        peftfx.compile(tiny_gpt2(), fresh, token_inputs())


def test_scale(tmp_path):
    model = peft.get_peft_model(mlp(), peft.ShiraConfig(r=1, target_modules=["layers.0"]))
    perturb(model)
    model.save_pretrained(tmp_path / "a")
    gm = peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(tmp_path / "a"), "scale": 0.5}}}, mlp_inputs())
    model.base_model.model.layers[0].set_scale("default", 0.5)
    torch.testing.assert_close(run(gm, mlp_inputs()), run(model.eval(), mlp_inputs()), rtol=1e-5, atol=1e-6)
