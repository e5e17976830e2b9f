"""The ``model:`` block and ``--model``: three ways to name a base model, each error naming its field."""

from __future__ import annotations

import pytest
import torch
from models import tiny_llama
from safetensors.torch import save_file

import peftfx
from peftfx.cli import load_model as cli_load_model
from peftfx.model_ref import ModelRef, load_model, parse_reference

LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def test_a_config_builds_the_same_random_model_every_time():
    ref = ModelRef(config=LLAMA, seed=3, inputs={"batch": 2, "seq_len": 5})
    (a, inputs), (b, _) = load_model(ref), load_model(ref)
    assert type(a).__name__ == "LlamaForCausalLM" and not a.training
    assert inputs["input_ids"].shape == (2, 5) and int(inputs["input_ids"].max()) < 64
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    state = torch.get_rng_state()
    load_model(ModelRef(config=LLAMA, seed=4))
    assert torch.equal(state, torch.get_rng_state()), "building a model moved the caller's random state"


def test_a_directory_a_factory_and_an_inputs_file(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    ids = torch.tensor([[1, 2, 3]])
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    model, inputs = load_model(ModelRef(path="llama", inputs={"file": "ids.safetensors"}), base_dir=tmp_path)
    assert type(model).__name__ == "LlamaForCausalLM" and torch.equal(inputs["input_ids"], ids)
    model, inputs = load_model(ModelRef(factory="models:tiny_llama"))
    assert inputs["input_ids"].shape == (1, 8)


def test_the_cli_reference_forms(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    assert parse_reference(str(tmp_path / "llama")).path == str(tmp_path / "llama")
    assert parse_reference(str(tmp_path / "llama" / "config.json")).config["model_type"] == "llama"
    assert parse_reference("models:tiny_llama", seq_len=4).inputs.seq_len == 4
    model, inputs = cli_load_model(str(tmp_path / "llama" / "config.json"), 5)  # a random model of that config
    assert type(model).__name__ == "LlamaForCausalLM" and inputs["input_ids"].shape == (1, 5)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"config": {**LLAMA, "hidden_size": "big"}}, "model.config.hidden_size: expected an integer, got 'big'"),
        ({"config": {**LLAMA, "hiden_size": 32}}, "model.config.hiden_size: unknown field for a llama config"),
        ({"config": {"hidden_size": 32}}, "model.config.model_type: required"),
        ({"config": {"model_type": "nope"}}, "model.config.model_type: unknown transformers model type 'nope'"),
        ({"path": "x", "factory": "a:b"}, "model: give exactly one of path, config or factory (got path, factory)"),
        ({"factory": "no colon"}, "model.factory: 'no colon' must look like 'package.module:function'"),
        ({"path": "x", "inputs": {"batch": 0}}, "model.inputs.batch: Input should be greater than 0"),
        ({"path": "x", "dtype": "float16"}, "model.dtype: unknown field"),
    ],
)
def test_spec_errors_name_the_field(model, message):
    with pytest.raises(peftfx.SpecError) as info:
        peftfx.load_spec({"model": model})
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ({"path": "missing"}, "model.path: missing is not a transformers model directory (no config.json)"),
        ({"factory": "no_such_module:f"}, "model.factory: cannot import no_such_module:f"),
        ({"factory": "builtins:dict"}, "model.factory: builtins:dict returned dict, not an nn.Module"),
        ({"factory": "models:mlp"}, "model: MLP has no config.vocab_size"),
        ({"factory": "models:mlp", "inputs": {"file": "nope.safetensors"}}, "model.inputs.file: nope.safetensors"),
    ],
)
def test_load_errors_name_the_field(ref, message):
    with pytest.raises(peftfx.PeftfxError) as info:
        load_model(ModelRef.model_validate(ref))
    assert message in str(info.value)
