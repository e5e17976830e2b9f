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

SHARED_PREFIX = "base_model."


@dataclass(frozen=True)
class Checkpoint:
    """A PEFT checkpoint as stored: its config and every tensor, keyed as in the file."""

    directory: Path
    config: dict[str, Any]
    file: str
    tensors: dict[str, torch.Tensor]

    def key(self, module: str, role: str) -> str:
        return f"{PREFIX}{module}.{role}"

    def split(self, prefix: str) -> Layout:
        """Sort the tensors by owner, given the attribute prefix of the adapter's kind (``lora_``, ``hada_``...).

        ``base_model.model.<module>.<prefix>...`` belongs to an adapted module, ``base_model.<name>`` is shared
        by all of them (VeRA's projections, VB-LoRA's vector bank), anything else under ``base_model.model.``
        replaces a base tensor (modules_to_save copies, trained biases).
        """
        role = re.compile(rf"^(?P<module>.+?)\.(?P<role>{re.escape(prefix)}.*)$")
        modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        shared: dict[str, torch.Tensor] = {}
        overrides: dict[str, tuple[str, torch.Tensor]] = {}
        for key, tensor in self.tensors.items():
            if not key.startswith(PREFIX):
                shared_name = key[len(SHARED_PREFIX) :]
                # dotted shared names only under the kind's own prefix (FRoD's per-category frod_V.<category>)
                if key.startswith(SHARED_PREFIX) and ("." not in shared_name or shared_name.startswith(prefix)):
                    shared[shared_name] = tensor
                    continue
                raise CheckpointError(f"{self.file}: tensor {key!r} does not start with {PREFIX!r}")
            name = key[len(PREFIX) :]
            match = role.match(name)
            if match:
                modules[match["module"]][match["role"]] = tensor
            elif ".original_module." not in name:  # bias="all" also saves the untouched original of a saved module
                overrides[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = (key, tensor)
        return Layout(dict(modules), shared, overrides)


@dataclass(frozen=True)
class Layout:
    modules: dict[str, dict[str, torch.Tensor]]  # module path -> {role suffix: tensor}
    shared: dict[str, torch.Tensor]  # adapter-wide tensors, by name
    overrides: dict[str, tuple[str, torch.Tensor]]  # base attribute path -> (key in the file, tensor)


def read_checkpoint(
    directory: str | Path,
    *,
    allow_pickle: bool = False,
    field: str = "peft",
) -> Checkpoint:
    """A PEFT checkpoint directory (diffusers/kohya LoRA files: ``formats.read_lora_file``)."""
    path = Path(directory)
    config_file = path / CONFIG
    if not path.is_dir():
        raise CheckpointError(f"{field}: checkpoint directory {str(path)!r} not found")
    if not config_file.is_file():
        raise CheckpointError(f"{field}: {config_file} not found")
    try:
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{config_file}: not UTF-8 (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(config, dict) or "peft_type" not in config:
        raise CheckpointError(f"{config_file}: not a PEFT adapter config (no peft_type)")
    weights_file = path / WEIGHTS
    if weights_file.is_file():
        tensors = load_safetensors(weights_file)
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
    return Checkpoint(path, config, file, tensors)


def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file: {e}") from e
