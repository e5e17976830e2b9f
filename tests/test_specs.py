"""Every example spec in specs/ runs on a tiny Llama and gives what it promises.

A spec's PEFT checkpoints are made here with PEFT (random non-zero LoRA weights) at the paths the spec names;
the compiled graph, live and merged, must match PEFT. Fresh adapters must be the identity at init.
"""

from __future__ import annotations

import functools
from pathlib import Path

import peft
import pytest
import torch
import yaml
from models import tiny_llama, token_inputs
from oracle import Tolerance, assert_close, peft_checkpoint, perturb, run

import peftfx

SPECS = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml"))
TOL = Tolerance(1e-5, 2e-6)  # float32 logits of size ~1: a few ulps of reordering between peftfx and PEFT


def test_there_are_example_specs():
    assert len(SPECS) >= 5


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(), token_inputs()


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_example_spec(path, llama, tmp_path):
    model, inputs = llama
    data = yaml.safe_load(path.read_text())
    (tmp_path / path.name).write_text(path.read_text())
    peft_models = {}
    for i, (name, adapter) in enumerate(data.get("adapters", {}).items()):
        if "peft" in adapter:
            config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
            prepare = functools.partial(perturb, seed=i)
            peft_models[name] = peft_checkpoint(model, config, tmp_path / adapter["peft"], prepare)
    gm = peftfx.compile(model, tmp_path / path.name, inputs)
    out = run(gm, inputs)
    assert torch.isfinite(out).all()

    fresh_only = not peft_models
    if fresh_only:  # fresh adapters start at the identity, and are trainable
        assert_close(out, run(model, inputs), TOL, f"{path.name}: fresh adapters at init")
        assert any(p.requires_grad for n, p in gm.named_parameters() if n.startswith("peftfx."))
    else:
        (name, peft_model), *others = peft_models.items()
        assert not others, "example specs with several PEFT adapters need their own oracle"
        if data.get("merge"):
            peft_model = peft_model.merge_and_unload()
            assert not [n for n, _ in gm.named_parameters() if n.startswith("peftfx.")]
        assert_close(out, run(peft_model, inputs), TOL, f"{path.name} vs PEFT")
        assert not torch.allclose(out, run(model, inputs), atol=1e-3), "the adapter changed nothing"
