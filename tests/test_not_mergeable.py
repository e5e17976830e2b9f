"""A PEFT tuner that cannot be merged into weights gets an error naming it and the file."""

from __future__ import annotations

import peft
import pytest
from models import tiny_llama, token_inputs

import peftfx


@pytest.mark.parametrize(
    "config",
    [
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    ],
    ids=["prompt", "prefix"],
)
def test_prompt_learning_is_refused_by_name(config, tmp_path):
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    with pytest.raises(
        peftfx.CheckpointError,
        match=rf"adapter_config.json: peft_type '{config.peft_type.value}'.*"
        "cannot merge",
    ):
        peftfx.compile(tiny_llama(), {"adapters": {"p": {"peft": str(tmp_path)}}}, token_inputs())
