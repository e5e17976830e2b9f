"""Every example spec in specs/ runs on a tiny Llama and gives what it promises.

A spec's PEFT checkpoints are made here with PEFT (random non-zero LoRA weights) at the paths the spec names;
the compiled graph, live and merged, must match PEFT. Fresh adapters must be the identity at init.
"""

from __future__ import annotations

import copy
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

    combines = {n: a for n, a in data["adapters"].items() if "combine" in a}
    if not peft_models:  # fresh adapters start at the identity, and are trainable
        assert_close(out, run(model, inputs), TOL, f"{path.name}: fresh adapters at init")
        assert any(p.requires_grad for n, p in gm.named_parameters() if n.startswith("peftfx."))
        return
    if combines:
        ((name, combine),) = combines.items()
        reference = _peft_fold(model, tmp_path, data["adapters"], name, combine)
    else:
        ((name, reference),) = peft_models.items()
    if data.get("merge"):
        assert not [n for n, _ in gm.named_parameters() if n.startswith("peftfx.")]
        reference = reference.merge_and_unload()
    assert_close(out, run(reference, inputs), TOL, f"{path.name} vs PEFT")
    assert not torch.allclose(out, run(model, inputs), atol=1e-3), "the adapter changed nothing"


def _peft_fold(model, tmp_path, adapters, name, combine):
    """PEFT's add_weighted_adapter with the spec's fields, the active adapter of the returned model."""
    first, *rest = combine["combine"]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / adapters[first]["peft"], first)
    for source in rest:
        peft_model.load_adapter(tmp_path / adapters[source]["peft"], source)
    options = {"density": combine.get("density"), "majority_sign_method": combine.get("majority_sign", "total")}
    peft_model.add_weighted_adapter(
        combine["combine"],
        combine.get("weights", [1.0] * len(combine["combine"])),
        name,
        combination_type=combine["method"],
        **options,
    )
    peft_model.set_adapter(name)
    return peft_model.eval()
