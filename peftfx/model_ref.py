"""Naming the base model a spec applies to, so a spec file (or ``--model``) is enough to run it.

Three forms: a local transformers directory (loaded offline), a transformers config for a random model (built
under a seed, so every run sees the same weights), or a ``module:function`` factory returning a model or
``(model, example_inputs)``. Example inputs come from a safetensors file of named tensors, the factory, or
random token ids drawn from the config's vocabulary.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import PeftfxError, SpecError
from .sizes import Seed

TOKENS = 2**24
"""The most random token ids ``inputs`` may ask for (batch x seq_len): 128 MiB of int64."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputsRef(_Strict):
    """Example inputs: a file of named tensors (keyword arguments), or random token ids of this shape."""

    file: str | None = Field(None, description="a .safetensors file of named input tensors, e.g. input_ids")
    batch: int = Field(1, gt=0, description="batch size of random token ids")
    seq_len: int = Field(8, gt=0, description="sequence length of random token ids")
    seed: Seed = Field(0, description="seed for random token ids")

    @model_validator(mode="after")
    def _bounded(self) -> InputsRef:
        if self.batch * self.seq_len > TOKENS:
            raise ValueError(f"batch x seq_len = {self.batch * self.seq_len:,} token ids, past the limit of {TOKENS:,}")
        return self


class ModelRef(_Strict):
    """The base model: exactly one of ``path``, ``config`` or ``factory``."""

    path: str | None = Field(None, description="a local transformers model directory (config.json + safetensors)")
    config: dict[str, Any] | None = Field(
        None, description="a transformers config for a random model, with its model_type (e.g. llama)"
    )
    seed: Seed = Field(0, description="seed for the random weights of a `config` model")
    factory: str | None = Field(None, description="'package.module:function' returning a model or (model, inputs)")
    inputs: InputsRef = Field(default_factory=InputsRef)

    @model_validator(mode="after")
    def _one_form(self) -> ModelRef:
        given = [k for k in ("path", "config", "factory") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, config or factory (got {', '.join(given) or 'none'})")
        return self

    @field_validator("factory")
    @classmethod
    def _check_factory(cls, value: str | None) -> str | None:
        if value is not None and not _is_factory(value):
            raise ValueError(f"{value!r} must look like 'package.module:function'")
        return value

    @field_validator("config")
    @classmethod
    def _check_config(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            _config_class(value)
        return value


def parse_reference(reference: str, seq_len: int = 8) -> ModelRef:
    """``--model``: a model directory, a ``config.json`` of a random model, or ``module:function``."""
    path = Path(reference)
    inputs = InputsRef(seq_len=seq_len)
    if _is_factory(reference) and not path.exists():
        return ModelRef(factory=reference, inputs=inputs)
    if path.is_file() and path.suffix == ".json":
        try:
            return ModelRef(config=json.loads(path.read_text()), inputs=inputs)
        except ValueError as e:
            raise SpecError(f"--model {reference}: not a transformers config ({e})") from None
    return ModelRef(path=reference, inputs=inputs)


def load_model(
    ref: ModelRef, base_dir: Path | None = None, where: str = "model", *, allow_factory: bool = True
) -> tuple[torch.nn.Module, Any]:
    """The model (in eval mode) and its example inputs. ``where`` names the reference in errors.

    A factory imports and runs code: ``allow_factory=False`` (the CLI's ``--no-factory``) refuses it.
    """
    inputs = None
    if ref.factory is not None and not allow_factory:
        raise SpecError(
            f"{_at(where, 'factory')}: {ref.factory} would import and run code, and factories are refused here "
            "(--no-factory)"
        )
    if ref.factory is not None:
        module_name, _, attr = ref.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise SpecError(f"{_at(where, 'factory')}: cannot import {ref.factory} ({e})") from None
        made = factory()
        model, inputs = made if isinstance(made, tuple) else (made, None)
        if not isinstance(model, torch.nn.Module):
            raise SpecError(f"{_at(where, 'factory')}: {ref.factory} returned {type(model).__name__}, not an nn.Module")
    elif ref.config is not None:
        model = _random_model(ref.config, ref.seed, _at(where, "config"))
    else:
        model = _pretrained(_resolve(str(ref.path), base_dir), _at(where, "path"))
    if ref.inputs.file is not None:
        inputs = read_inputs(_resolve(ref.inputs.file, base_dir), _at(where, "inputs.file"))
    elif inputs is None:
        inputs = token_inputs(model, ref.inputs.batch, ref.inputs.seq_len, ref.inputs.seed, where)
    return model.eval(), inputs


def token_inputs(
    model: torch.nn.Module, batch: int = 1, seq_len: int = 8, seed: int = 0, where: str = "model"
) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` for a model whose config has a vocabulary."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise SpecError(
            f"{where}: {type(model).__name__} has no config.vocab_size to draw token ids from; give a safetensors "
            "file of example inputs, or return (model, example_inputs) from a factory"
        )
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=generator)}


def read_inputs(path: Path, where: str) -> dict[str, torch.Tensor]:
    """Named tensors from a safetensors file: the model's keyword arguments (never a pickle)."""
    if not path.is_file():
        raise PeftfxError(f"{where}: {path}: file not found")
    if path.suffix != ".safetensors":
        raise PeftfxError(f"{where}: {path}: inputs are read from .safetensors files only")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise PeftfxError(f"{where}: {path}: not a safetensors file ({e})") from None


def _at(where: str, field: str) -> str:
    """``model.factory`` in a spec; a command-line option (``--model``) is named as it is."""
    return where if where.startswith("-") else f"{where}.{field}"


def _is_factory(value: str) -> bool:
    module, sep, attr = value.partition(":")
    return bool(sep) and module.replace(".", "").replace("_", "").isalnum() and attr.isidentifier()


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path)
    return base_dir / p if base_dir is not None and not p.is_absolute() else p


def _config_class(config: dict[str, Any]) -> type:
    """The transformers config class, after refusing unknown keys and values of the wrong type."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError("model_type: required, e.g. llama, gpt2, bert")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model_type: unknown transformers model type {model_type!r}")
    cls = CONFIG_MAPPING[model_type]
    known = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            known.update(inspect.signature(klass.__init__).parameters)
    for key, value in config.items():
        if key == "model_type":
            continue
        if key not in known:
            raise ValueError(f"{key}: unknown field for a {model_type} config")
        default = known[key].default
        if isinstance(default, bool) or default is None or default is inspect.Parameter.empty:
            continue
        if isinstance(default, int) and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        if isinstance(default, float) and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
    return cls


def _random_model(config: dict[str, Any], seed: int, where: str) -> torch.nn.Module:
    """Built under ``seed`` without touching the caller's random state."""
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        cls = _config_class(config)
        made = cls(**{k: v for k, v in config.items() if k != "model_type"})
    except Exception as e:
        raise SpecError(f"{where}: not a valid transformers config ({e})") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return AutoModelForCausalLM.from_config(made)
        except ValueError:
            return AutoModel.from_config(made)


def _pretrained(path: Path, where: str) -> torch.nn.Module:
    if not (path / "config.json").is_file():
        raise SpecError(f"{where}: {path} is not a transformers model directory (no config.json)")
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except ValueError:
        return AutoModel.from_pretrained(path, local_files_only=True)
