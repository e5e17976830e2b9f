"""The example specs of specs/, made runnable: each one's own model, and the PEFT checkpoints it names.

A spec's checkpoints are made here with PEFT (random non-zero weights) at the paths the spec names, beside a
copy of the spec, so the spec runs as a user would run it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import yaml
from oracle import peft_checkpoint, perturb
from torch import nn

from peftfx.model_ref import ModelRef, load_model

SPECS = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml"))
LORA = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
# PEFT configs of the checkpoints a spec names, by directory, when not LORA
CONFIGS = {
    "ia3_adapter": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "legal": peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["v_proj", "o_proj", "up_proj"]),
}


@dataclass
class Example:
    spec: Path  # the copy beside the checkpoints
    data: dict[str, Any]
    model: nn.Module
    inputs: Any
    peft_models: dict[str, nn.Module] = field(default_factory=dict)  # PEFT's own model of each checkpoint


def example(path: Path, tmp_path: Path) -> Example:
    data = yaml.safe_load(path.read_text())
    model, inputs = load_model(ModelRef.model_validate(data["model"]))
    spec = tmp_path / path.name
    spec.write_text(path.read_text())
    out = Example(spec, data, model, inputs)
    for i, (name, adapter) in enumerate(data.get("adapters", {}).items()):
        if "peft" in adapter:
            config = CONFIGS.get(adapter["peft"], LORA)
            prepare = functools.partial(perturb, seed=i)
            out.peft_models[name] = peft_checkpoint(model, config, tmp_path / adapter["peft"], prepare)
    return out
