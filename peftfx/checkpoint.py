"""Reading PEFT checkpoints: ``adapter_config.json`` plus ``adapter_model.safetensors``.

Pickle files (``adapter_model.bin``) can run code when loaded, so they are refused unless the spec opts in,
and even then they are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import CheckpointError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."

# Tensors PEFT stores per adapted module, by the attribute that owns them.
_ADAPTER_ROLE = re.compile(
    r"^(?P<module>.+?)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector)$"
)


@dataclass(frozen=True)
class Checkpoint:
    """A PEFT checkpoint, split into per-module adapter tensors and base-weight overrides."""

    directory: Path
    config: dict[str, Any]
    file: str
    modules: dict[str, dict[str, torch.Tensor]]  # module path -> {role suffix: tensor}
    overrides: dict[str, torch.Tensor]  # base attribute path -> tensor (modules_to_save, trained biases)

    def key(self, module: str, role: str) -> str:
        return f"{PREFIX}{module}.{role}"


def read_checkpoint(directory: str | Path, *, allow_pickle: bool = False, field: str = "peft") -> Checkpoint:
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{field}: checkpoint directory {str(path)!r} not found")
    config_file = path / CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{field}: {config_file} not found")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(config, dict) or "peft_type" not in config:
        raise CheckpointError(f"{config_file}: not a PEFT adapter config (no peft_type)")
    weights_file = path / WEIGHTS
    if weights_file.is_file():
        tensors = _load_safetensors(weights_file)
        file = str(weights_file)
    elif (path / PICKLE).is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{path / PICKLE}: pickle checkpoints can run arbitrary code and are refused; convert it to "
                f"{WEIGHTS}, or set `allow_pickle: true` on this adapter if you trust the file"
            )
        file = str(path / PICKLE)
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read: {e}") from e
    else:
        raise CheckpointError(f"{field}: {weights_file} not found")
    modules, overrides = _split(tensors, file)
    return Checkpoint(path, config, file, modules, overrides)


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file: {e}") from e


def _split(tensors: dict[str, torch.Tensor], file: str) -> tuple[dict, dict]:
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    overrides: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{file}: tensor {key!r} does not start with {PREFIX!r}")
        name = key[len(PREFIX) :]
        match = _ADAPTER_ROLE.match(name)
        if match:
            modules[match["module"]][match["role"]] = tensor
        elif ".original_module." not in name:  # bias="all" also saves the untouched original of a saved module
            overrides[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = tensor
    return dict(modules), overrides
