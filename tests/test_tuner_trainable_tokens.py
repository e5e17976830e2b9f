"""Trainable tokens against PEFT: replaced rows of an embedding (or a bias-free head), live, merged, saved."""

from __future__ import annotations

import functools
import json

import peft
import pytest
import torch
from models import embed_net, id_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, assert_close, check, check_fresh_save, edit_config, peft_checkpoint, run

import peftfx

# Rows are copied, not computed: the only arithmetic is the base model's own, so float32 agrees to a few ulps.
TOL = Tolerance(1e-5, 2e-6)
TOL64 = Tolerance(1e-10, 1e-12)
llama = functools.partial(tiny_llama, num_hidden_layers=1)


def tokens(targets, indices) -> peft.TrainableTokensConfig:
    return peft.TrainableTokensConfig(target_modules=targets, token_indices=indices)


CASES = {
    # unsorted, including the first and the last row, and a token the inputs use
    "embed": (embed_net, id_inputs, tokens(["emb"], [19, 3, 0, 7])),
    "llama-embed-tokens": (llama, lambda: token_inputs(), tokens(["embed_tokens"], [3, 63, 21])),
    "llama-untied-head": (llama, lambda: token_inputs(), tokens(["lm_head"], [2, 40])),
}


@pytest.mark.parametrize(("make", "inputs", "config"), CASES.values(), ids=CASES.keys())
def test_matches_peft(make, inputs, config, tmp_path):
    x = inputs()
    ids = x[0] if isinstance(x, tuple) else x["input_ids"]
    if "emb" in str(config.target_modules):
        assert set(ids.flatten().tolist()) & set(config.token_indices), "the inputs must read a replaced row"
    check(make(), config, x, tmp_path, tol=TOL)


def test_matches_peft_float64(tmp_path):
    check(llama(dtype=torch.float64), tokens(["embed_tokens"], [59, 17, 9]), token_inputs(), tmp_path, tol=TOL64)


def test_fresh_is_identity_trainable_and_saves(tmp_path):
    model, inputs = llama(), token_inputs()
    spec = {
        "adapters": {"f": {"type": "trainable_tokens", "at": {"op": "embedding"}, "with": {"token_indices": "3, 9"}}}
    }
    gm = peftfx.compile(model, spec, inputs)
    assert_close(run(gm, inputs), run(model, inputs), Tolerance(0, 0), "identity at init")
    (param,) = [p for n, p in gm.named_parameters() if n.startswith("peftfx.f.")]
    assert param.requires_grad and param.shape == (2, 32)
    check_fresh_save(model, spec, inputs, tmp_path)
    assert json.loads((tmp_path / "fresh" / "adapter_config.json").read_text())["token_indices"] == [3, 9]


def test_refusals(tmp_path):
    inputs = token_inputs()
    at = {"op": "embedding"}
    # GPT-2 ties lm_head to wte: PEFT would replace the head's rows too
    with pytest.raises(peftfx.PeftfxError, match="tied to lm_head"):
        peftfx.compile(
            tiny_gpt2(),
            {"adapters": {"f": {"type": "trainable_tokens", "at": at, "with": {"token_indices": 1}}}},
            inputs,
        )
    with pytest.raises(peftfx.PeftfxError, match="out of range"):
        peftfx.compile(
            llama(),
            {"adapters": {"f": {"type": "trainable_tokens", "at": at, "with": {"token_indices": "60-64"}}}},
            inputs,
        )


def test_errors_name_the_file_and_key(tmp_path):
    model, inputs = embed_net(), id_inputs()
    ckpt = tmp_path / "peft"
    peft_checkpoint(model, tokens(["emb"], [1, 2]), ckpt)
    config = edit_config(ckpt, token_indices=[1, 2, 3])
    with pytest.raises(
        peftfx.PeftfxError, match=r"safetensors: 'base_model\.model\.emb\.trainable_tokens_delta'.*\[2, 8\]"
    ):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt)}}}, inputs)
    edit_config(ckpt, config, some_new_field=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: some_new_field=3"):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt)}}}, inputs)
    edit_config(ckpt, config)
    with pytest.raises(peftfx.PeftfxError, match="no scaling factor"):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt), "scale": 2.0}}}, inputs)
