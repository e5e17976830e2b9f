"""PEFT's ``adapter_config.json``, typed: one pydantic model per tuner, checked before any field is read.

A field of the wrong type (``lora_alpha: "16"``, ``target_modules: 5``), a number that is not finite or a rank
below 1 would otherwise surface as a ``TypeError`` deep in targeting, as NaN in every output, or as a message that
contradicts itself; here each is one ``CheckpointError`` naming the file and the field. Types are strict (no
``"4"`` for 4, no ``true`` for 1). Fields a model does not declare stay allowed (each kind refuses the ones that
would change its math), but every float among them must be finite too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import CheckpointError

Rank = Annotated[int, Field(ge=1)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Names = str | list[str]


class PeftConfig(BaseModel):
    """What every tuner's config shares: its type and PEFT's targeting fields (``peft_targeting`` reads them)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    peft_type: str
    target_modules: Names | None = None
    target_parameters: Names | None = None
    exclude_modules: Names | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: Names | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False

    @model_validator(mode="after")
    def _finite_extras(self) -> PeftConfig:
        for key, value in (self.model_extra or {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{key}: must be a finite number, got {value}")
        return self


class LoraConfig(PeftConfig):
    r: Rank = 8
    lora_alpha: Finite = 8
    lora_dropout: Finite = 0.0
    rank_pattern: dict[str, Rank] | None = None
    alpha_pattern: dict[str, Finite] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False


class LycorisConfig(PeftConfig):
    """LoHa and LoKr: a rank and an alpha, per module through the patterns."""

    r: Rank = 8
    alpha: Finite = 8
    rank_dropout: Finite = 0.0
    module_dropout: Finite = 0.0
    rank_pattern: dict[str, Rank] | None = None
    alpha_pattern: dict[str, Finite] | None = None
    use_effective_conv2d: bool = False


class VeraConfig(PeftConfig):
    """VeRA and PVeRA: the rank of the shared projections and the key they are drawn from."""

    r: Rank = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    d_initial: Finite = 0.1


class RankedConfig(PeftConfig):
    """Tuners whose ``r`` is a rank (of factors, bases or blocks): at least 1."""

    r: Rank = 8


class Ia3Config(PeftConfig):
    feedforward_modules: Names | None = None


# PEFT's peft_type -> its config's model; tuners not listed are checked against the shared fields.
CONFIGS: dict[str, type[PeftConfig]] = {
    "LORA": LoraConfig,
    "LOHA": LycorisConfig,
    "LOKR": LycorisConfig,
    "VERA": VeraConfig,
    "PVERA": VeraConfig,
    "IA3": Ia3Config,
    **dict.fromkeys(
        ["RANDLORA", "HIRA", "DELORA", "GRALORA", "VBLORA", "UNILORA", "TINYLORA", "MISS", "SHIRA"], RankedConfig
    ),
}


def check_peft_config(config: Mapping[str, Any], file: str) -> None:
    """Refuse ``config`` (read from ``file``) unless every field it has is of its tuner's type."""
    model = CONFIGS.get(str(config.get("peft_type")), PeftConfig)
    try:
        model.model_validate(dict(config))
    except ValidationError as e:
        err = e.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error":  # the finite check names its own field
            raise CheckpointError(f"{file}: {message}") from None
        where, got = _located(config, err["loc"])
        raise CheckpointError(f"{file}: {where}: {message[:1].lower()}{message[1:]} (got {got!r})") from None


def _located(config: Any, loc: tuple[Any, ...]) -> tuple[str, Any]:
    """The error's path in the file and the value there: the keys and indices that exist in it (pydantic adds
    the names of union branches)."""
    path, value = "", config
    for part in loc:
        if isinstance(value, Mapping) and part in value:
            path += f".{part}" if path else str(part)
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            path += f"[{part}]"
        else:
            break
        value = value[part]
    return path, value
