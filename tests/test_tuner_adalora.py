"""AdaLoRA against PEFT: Linear, Conv1D (GPT-2), Conv2d, Llama, pruned triplets (rank_pattern); fresh; errors."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import conv_inputs, conv_net, mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import (
    Tolerance,
    assert_close,
    check,
    check_fresh_save,
    edit_config,
    peft_checkpoint,
    perturb,
    replace_tensor,
    run,
    saved_peft,
)
from safetensors.torch import load_file

import peftfx


def ada(**kw) -> peft.AdaLoraConfig:
    return peft.AdaLoraConfig(total_step=10, **{"init_r": 4, **kw})


def perturb_keep_ranknum(model) -> None:
    """``perturb``, but ranknum keeps its value: PEFT never saves it (it is rebuilt as init_r on load), yet after a
    dtype cast (float64 here) PEFT's ranknum Parameter comes back with requires_grad=True and would be perturbed."""
    ranknums = {n: p.detach().clone() for n, p in model.named_parameters() if ".ranknum." in n}
    perturb(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in ranknums:
                p.copy_(ranknums[n])


def prune(masks: dict[str, list[bool]]):
    """Perturb, then prune triplets as AdaLoRA's allocator does: E zeroed, masks recorded in rank_pattern."""

    def prepare(model) -> None:
        perturb_keep_ranknum(model)
        with torch.no_grad():
            for module, mask in masks.items():
                E = model.base_model.model.get_submodule(module).lora_E["default"]
                E[~torch.tensor(mask)] = 0.0
        model.peft_config["default"].rank_pattern = {f"{m}.lora_E": mask for m, mask in masks.items()}

    return prepare


@pytest.mark.parametrize(
    ("model", "inputs", "config"),
    [
        (mlp, mlp_inputs, ada(target_modules=["layers.0", "layers.1"], lora_alpha=3)),
        (lambda: conv_net(2), lambda: conv_inputs(2), ada(target_modules=["conv1", "conv2", "head"], init_r=3)),
        (tiny_gpt2, token_inputs, ada(target_modules=["c_attn", "c_fc", "mlp.c_proj"], fan_in_fan_out=True)),
        (tiny_llama, token_inputs, ada(target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=-1, init_r=6)),
    ],
    ids=["mlp", "conv2d", "gpt2-conv1d", "llama-alpha-le-0"],
)
def test_matches_peft(model, inputs, config, tmp_path):
    check(model(), config, inputs(), tmp_path)


MASKS = {
    "model.layers.0.self_attn.q_proj": [True, False, True, False],
    "model.layers.1.self_attn.v_proj": [False, False, False, True],
    "model.layers.1.self_attn.q_proj": [False] * 4,
}


def test_pruned_triplets(tmp_path):
    config = ada(target_modules=["q_proj", "v_proj"])
    check(tiny_llama(), config, token_inputs(), tmp_path, prepare=prune(MASKS))
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape[0] == 2


def test_pruned_triplets_alpha_0(tmp_path):
    # With lora_alpha <= 0 the numerator is the module's rank, which PEFT takes as the *kept* rank when it reloads a
    # pruned checkpoint (but init_r in the model that saved it): the checkpoint as PEFT reloads it is the reference.
    base, inputs = tiny_llama(), token_inputs()
    peft_checkpoint(base, ada(target_modules=["q_proj", "v_proj"], lora_alpha=0), tmp_path / "c", prune(MASKS))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "c").eval()
    spec = {"adapters": {"a": {"peft": str(tmp_path / "c")}}}
    assert_close(run(peftfx.compile(base, spec, inputs), inputs), run(reloaded, inputs), Tolerance(), "unmerged")
    merged = peftfx.compile(base, {**spec, "merge": True}, inputs)
    assert_close(run(merged, inputs), run(reloaded, inputs), Tolerance(), "merged")


def test_float64(tmp_path):
    # ranknum lives in the base dtype, so init_r + 1e-5 is taken in float64 here, exactly as PEFT does
    config = ada(target_modules=["conv1", "conv2", "head"], lora_alpha=5)
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    base, inputs = conv_net(2).double(), conv_inputs(2, dtype=torch.float64)
    check(base, config, inputs, tmp_path, tol=tol, prepare=perturb_keep_ranknum)


def test_scale_multiplies_delta(tmp_path):
    base, inputs = mlp(), mlp_inputs()
    result = check(base, ada(target_modules=["layers.1"]), inputs, tmp_path, merge=False, save=False)
    spec = {"adapters": {"a": {"peft": str(tmp_path / "peft"), "scale": 0.5}}}
    half = run(peftfx.compile(base, spec, inputs), inputs)
    full, plain = run(result["unmerged"], inputs), run(base, inputs)
    torch.testing.assert_close(half, plain + 0.5 * (full - plain), rtol=1e-5, atol=1e-6)


def test_fresh_identity_and_save(tmp_path):
    base, inputs = conv_net(2), conv_inputs(2)
    spec = {"adapters": {"f": {"type": "adalora", "at": {"op": ["linear", "conv2d"]}, "with": {"r": 3}, "seed": 1}}}
    gm = peftfx.compile(base, spec, inputs)
    torch.testing.assert_close(run(gm, inputs), run(base, inputs), rtol=0, atol=0)  # E = 0: identity at init
    trainable = [n for n, p in gm.named_parameters() if n.startswith("peftfx.") and p.requires_grad]
    assert len(trainable) == 9
    check_fresh_save(base, spec, inputs, tmp_path)


def test_fresh_gpt2_save(tmp_path):
    spec = {
        "adapters": {"f": {"type": "adalora", "at": {"module": "re:.*c_attn"}, "with": {"alpha": 4, "init": False}}}
    }
    check_fresh_save(tiny_gpt2(), spec, token_inputs(), tmp_path)


def _checkpoint(tmp_path):
    return saved_peft(mlp(), ada(target_modules=["layers.0"]), tmp_path)


def test_misshaped_tensor(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    replace_tensor(ckpt, "base_model.model.layers.0.lora_E", torch.zeros(3, 1))
    with pytest.raises(peftfx.PeftfxError, match=r"layers.0.lora_E.*shape \[3, 1\], expected \[4, 1\]"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())


def test_unsupported_config_field(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    edit_config(ckpt, lora_bias=True)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config.json: lora_bias=True"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": str(ckpt)}}}, mlp_inputs())
