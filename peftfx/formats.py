"""LoRA files as diffusion users share them, read as PEFT checkpoints and written back.

diffusers' ``save_lora_weights`` writes ``pytorch_lora_weights.safetensors`` alone (no adapter_config.json): keys
``<component>.<module>.lora_A.weight`` for each pipeline part (``unet``, ``transformer``, ``text_encoder``, ...),
the LoRA config, when known, in the file's metadata. kohya / A1111 files (``lora_unet_...``, ``lora_te_...``,
``lora_down``/``lora_up`` and an ``alpha`` per module) are what most shared files are. Both are converted with
the converters diffusers keeps (``lora_state_dict``, ``convert_unet_state_dict_to_peft``,
``convert_state_dict_to_peft``) and the LoRA config diffusers would give PEFT (``_create_lora_config``), so the
result is exactly what ``load_lora_weights`` loads, and from there a PEFT checkpoint like any other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import PREFIX, Checkpoint, load_safetensors
from .errors import CheckpointError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def is_lora_file(path: Path) -> bool:
    """A diffusers or kohya LoRA: a ``.safetensors`` file, or a folder with ``pytorch_lora_weights.safetensors``."""
    return (path.is_file() and path.suffix == ".safetensors") or (path / LORA_WEIGHTS).is_file()


def read_lora_file(path: Path, component: str | None, field: str, has_text_model: bool = True) -> Checkpoint:
    """The ``component`` part of a diffusers- or kohya-format LoRA file as a PEFT LoRA checkpoint.

    ``has_text_model``: whether the model has CLIP's ``text_model`` level (transformers 5 flattened it; files
    keep it), as diffusers asks of the text encoder it loads into.
    """
    _need_diffusers(field)
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    file = path if path.is_file() else path / LORA_WEIGHTS
    raw = load_safetensors(file)
    try:
        state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(raw))
    except Exception as error:  # diffusers' converters raise ValueError/KeyError on keys they do not know
        raise CheckpointError(f"{file}: not a LoRA file diffusers can read: {error}") from error
    parts = sorted({key.split(".", 1)[0] for key in state_dict})
    if component is None:
        if len(parts) != 1:
            raise CheckpointError(
                f"{field}: {file} holds LoRAs for {', '.join(parts)}; say which with `component` next to it"
            )
        component = parts[0]
    if component not in parts:
        raise CheckpointError(f"{field}: {file} has no {component!r} LoRA (it has {', '.join(parts)})")
    mine = _strip(state_dict, component)
    config, tensors = _config(mine, _strip(alphas or {}, component), _metadata(file, component), component, file)
    if component in TEXT_ENCODERS and not has_text_model:
        tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
        config["target_modules"] = sorted({m.removeprefix("text_model.") for m in config["target_modules"]})
    folder = path if path.is_dir() else path.parent
    return Checkpoint(folder, config, str(file), {PREFIX + key: tensor for key, tensor in tensors.items()})


def _config(
    state_dict: dict[str, torch.Tensor],
    alphas: dict[str, Any],
    metadata: dict[str, Any] | None,
    component: str,
    file: Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's keys and the LoraConfig diffusers would give PEFT for them."""
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if component in TEXT_ENCODERS:
        state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
    elif "lora_A" not in next(iter(state_dict)):
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    ranks = {f"^{key}": t.shape[1] for key, t in state_dict.items() if "lora_B" in key and t.ndim > 1}
    if not ranks:
        raise CheckpointError(f"{file}: no lora_B tensor for {component!r}")
    try:
        config = _create_lora_config(
            state_dict, alphas or None, metadata, ranks, is_unet=component not in TEXT_ENCODERS
        ).to_dict()
    except Exception as error:
        raise CheckpointError(f"{file}: diffusers cannot make a LoRA config of it: {error}") from error
    # as PEFT writes adapter_config.json: sets as lists, enums (str subclasses) as their values
    return json.loads(json.dumps(config, default=sorted)), state_dict


def _strip(mapping: Mapping[str, Any], component: str) -> dict[str, Any]:
    return {k.removeprefix(f"{component}."): v for k, v in mapping.items() if k.startswith(f"{component}.")}


def _metadata(file: Path, component: str) -> dict[str, Any] | None:
    """The LoRA config diffusers stores in the file's header for ``component``, if any."""
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata

    try:
        metadata = _load_sft_state_dict_metadata(str(file))
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: unreadable LoRA metadata: {error}") from error
    return _strip(metadata, component) or None if metadata else None


def write_lora_file(directory: Path, component: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write a PEFT LoRA (keys ``<module>.lora_A.weight``, its config) as diffusers' ``save_lora_weights`` does."""
    _need_diffusers("save_adapter")
    from diffusers.loaders.lora_base import LoraBaseMixin

    metadata = {k: v for k, v in config.items() if k in _METADATA_FIELDS}
    LoraBaseMixin._save_lora_weights(  # PEFT's keys, as the diffusers training scripts pass them
        save_directory=directory,
        lora_layers={component: tensors},
        lora_metadata={component: metadata},
        weight_name=LORA_WEIGHTS,
    )


# the LoraConfig fields a LoRA needs; diffusers makes its config of these when it reads the file back
_METADATA_FIELDS = (
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "use_dora",
    "use_rslora",
    "lora_bias",
    "fan_in_fan_out",
    "bias",
)


def _need_diffusers(field: str) -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise CheckpointError(f"{field}: reading and writing diffusers LoRA files needs `diffusers`") from None
