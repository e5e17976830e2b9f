"""PEFT's ``adapter_config.json``, typed: one pydantic model per tuner, checked before any field is read.

A field of the wrong type (``lora_alpha: "16"``, ``target_modules: 5``), a number that is not finite or a rank
below 1 would otherwise surface as a ``TypeError`` deep in targeting, as NaN in every output, or as a message that
contradicts itself; here each is one ``CheckpointError`` naming the file and the field. Types are strict (no
``"4"`` for 4, no ``true`` for 1), sizes are at least 1 and PEFT's fixed choices are ``Literal``s. Fields a
model does not declare stay allowed (each kind refuses the ones that would change its math), but every float among
them must be finite too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import CheckpointError
from .sizes import Seed

Rank = Annotated[int, Field(ge=1)]
Size = Annotated[int, Field(ge=1)]  # a count of elements, blocks or vectors: at least one
Count = Annotated[int, Field(ge=0)]  # a size where 0 means "derive it" or "none"
Finite = Annotated[float, Field(allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Share = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # a share of a dimension, in (0, 1]
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


class TunerConfig(PeftConfig):
    """The fields most tuners add: which biases train, and whether the adapter starts as the identity."""

    bias: str = "none"
    init_weights: bool = True


class RankedConfig(TunerConfig):
    """Tuners whose ``r`` is a rank (of factors, bases or blocks): at least 1."""

    r: Rank = 8


class LoraConfig(PeftConfig):
    r: Rank = 8
    lora_alpha: Finite = 8
    lora_dropout: Fraction = 0.0
    rank_pattern: dict[str, Rank] | None = None
    alpha_pattern: dict[str, Finite] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    init_lora_weights: bool | str = True


class AdaloraConfig(LoraConfig):
    """AdaLoRA's ``rank_pattern`` is a keep-mask per module (one boolean per ``init_r`` triplet), not a rank."""

    init_r: Rank = 12
    target_r: Rank = 8
    rank_pattern: dict[str, list[bool]] | None = None
    beta1: Finite = 0.85
    beta2: Finite = 0.85
    orth_reg_weight: Finite = 0.5
    tinit: Count = 0
    tfinal: Count = 0
    deltaT: Size = 1
    total_step: Size | None = None


class LycorisConfig(TunerConfig):
    """LoHa and LoKr: a rank and an alpha, per module through the patterns."""

    r: Rank = 8
    alpha: Finite = 8
    rank_dropout: Fraction = 0.0
    module_dropout: Fraction = 0.0
    rank_pattern: dict[str, Rank] | None = None
    alpha_pattern: dict[str, Finite] | None = None
    use_effective_conv2d: bool = False


class LokrConfig(LycorisConfig):
    init_weights: bool | Literal["lycoris"] = True
    decompose_both: bool = False
    decompose_factor: int = -1  # -1: PEFT picks the factor
    rank_dropout_scale: bool = False


class VeraConfig(RankedConfig):
    """VeRA and PVeRA: the rank of the shared projections and the key they are drawn from."""

    r: Rank = 256
    projection_prng_key: Seed = 0
    save_projection: bool = True
    d_initial: Finite = 0.1
    vera_dropout: Fraction = 0.0


class PveraConfig(VeraConfig):
    pvera_dropout: Fraction = 0.0
    sample_at_inference: bool = False
    generator_seed: Seed | None = None


class Ia3Config(PeftConfig):
    feedforward_modules: Names | None = None
    init_ia3_weights: bool = True


class AdamssConfig(RankedConfig):
    r: Rank = 100
    num_subspaces: Size = 5
    subspace_rank: Size = 1
    random_seed: Seed = 0
    svd_threshold: Finite = 0.1
    use_dynamic_rank: bool = False
    use_asa: bool = False
    asa_target_subspaces: Size = 50
    asa_importance_beta: Finite = 0.85
    asa_uncertainty_beta: Finite = 0.85
    asa_schedule_exponent: Finite = 3.0
    init_warmup: Count = 50
    final_warmup: Count = 1000
    mask_interval: Size = 100
    init_weights: Literal["orthogonal"] | None = "orthogonal"


class BoftConfig(TunerConfig):
    """Either the block size or the block count is given (the other is 0, derived from the site)."""

    boft_block_size: Count = 4
    boft_block_num: Count = 0
    boft_n_butterfly_factor: Size = 1
    boft_dropout: Fraction = 0.0


class C3aConfig(TunerConfig):
    block_size: Size = 256
    block_size_pattern: dict[str, Size] | None = None
    init_weights: bool | Literal["gaussian", "kaiming_uniform", "xavier_uniform"] | None = "xavier_uniform"


class DeftConfig(RankedConfig):
    decomposition_method: Literal["relu", "qr"] = "relu"
    alpha: Finite | None = None
    init_scale: Finite = 1.0
    para: bool = False
    deft_dropout: Fraction = 0.0


class DeloraConfig(RankedConfig):
    bias: Literal["none", "all", "delora_only"] = "none"
    rank_pattern: dict[str, Rank] | None = None
    delora_lambda: Finite = 15
    lambda_pattern: dict[str, Finite] | None = None
    module_dropout: Fraction = 0.0


class SpectralConfig(TunerConfig):
    """FourierFT and WaveFT: how many spectral coefficients train, where, and their scale."""

    n_frequency: Size = 1000
    n_frequency_pattern: dict[str, Size] | None = None
    scaling: Finite = 150.0
    random_loc_seed: Seed | None = 777


class WaveftConfig(SpectralConfig):
    wavelet_family: str = "db1"
    use_idwt: bool = True
    proportional_parameters: bool = False


class FrodConfig(TunerConfig):
    projection_prng_key: Seed = 0
    save_projection: bool = True
    sparse_rate: Fraction = 0.01
    regularization_alpha: Finite = 0.001
    frod_dropout: Fraction = 0.0


class GloraConfig(RankedConfig):
    config_A_B: Literal["lora", "vector", "constant", "none"] = "lora"
    config_C: Literal["lora", "vector", "none"] = "lora"
    config_D_E: Literal["vector", "constant", "none"] = "constant"


class GraloraConfig(RankedConfig):
    alpha: Finite = 64
    gralora_k: Size = 2
    hybrid_r: Count = 0
    gralora_dropout: Fraction = 0.0


class HiraConfig(RankedConfig):
    rank_pattern: dict[str, Rank] | None = None
    hira_dropout: Fraction = 0.0
    init_weights: bool | Literal["gaussian"] | None = True


class HraConfig(RankedConfig):
    apply_GS: bool = False


class MissConfig(RankedConfig):
    mini_r: Size = 1
    miss_dropout: Fraction = 0.0
    init_weights: bool | Literal["bat", "mini"] = True


class OftConfig(TunerConfig):
    """Either the block count ``r`` or the block size is given (the other is 0, derived from the site)."""

    bias: Literal["none", "all", "oft_only"] = "none"
    r: Count = 0
    oft_block_size: Count = 32
    block_share: bool = False
    coft: bool = False
    eps: Finite = 6e-5
    module_dropout: Fraction = 0.0
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: Count = 5


class OsfConfig(PeftConfig):
    """An effective rank is a count of directions, or (a float) a fraction of the smaller dimension."""

    effective_rank: Share | Size | None = None
    rank_pattern: dict[str, Share | Size] | None = None
    target_svd_config: dict[str, Size] | None = None
    init_weights: bool | None = True


class PeanutConfig(RankedConfig):
    depth: Count = 0
    act_fn: str = "relu"
    scaling: Finite = 1.0


class PsoftConfig(RankedConfig):
    psoft_alpha: Finite = 32
    ab_svd_init: Literal["psoft_init", "pissa_init"] = "psoft_init"
    psoft_svd: Literal["full", "lowrank"] = "full"
    psoft_svd_lowrank_niter: Size = 10
    psoft_orth: bool = True
    psoft_mag_a: bool = True
    psoft_mag_b: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: Count = 5
    cayley_neumann_eps: Finite | None = None
    random_seed: Seed = 0
    psoft_dropout: Fraction = 0.0


class RandloraConfig(RankedConfig):
    randlora_alpha: Finite = 640
    projection_prng_key: Seed = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: Fraction = 0.0


class RoadConfig(PeftConfig):
    variant: Literal["road_1", "road_2", "road_4"] = "road_1"
    group_size: Size = 64
    init_weights: bool = True


class ShiraConfig(RankedConfig):
    mask_type: Literal["random"] = "random"
    random_seed: Seed | None = None


class SupertuningConfig(TunerConfig):
    sparsity: Fraction = 0.99
    select_top: bool = True
    r: Rank | None = None
    lora_alpha: Finite | None = None
    lora_dropout: Fraction = 0.0
    save_precomputed_indices: bool = True


class TinyloraConfig(RankedConfig):
    r: Rank = 2
    u: Size = 64
    weight_tying: Fraction = 0.0
    projection_seed: Seed = 42
    save_projection: bool = True
    init_v_bound: Finite = 0.02
    tinylora_dropout: Fraction = 0.0
    init_weights: bool | str = True


class TrainableTokensConfig(PeftConfig):
    token_indices: Annotated[list[Count], Field(min_length=1)]  # the ids of the rows it trains
    init_weights: bool = True


class UniloraConfig(RankedConfig):
    r: Rank = 4
    theta_d_length: Size = 256
    save_indices: bool = False
    proj_seed: Seed = 42
    init_theta_d_bound: Finite = 0.02
    unilora_dropout: Fraction = 0.0


class VbloraConfig(RankedConfig):
    r: Rank = 4
    num_vectors: Size = 256
    vector_length: Size = 256
    topk: Size = 2
    save_only_topk_weights: bool = False
    init_logits_std: Finite = 0.1
    init_vector_bank_bound: Finite = 0.02
    vblora_dropout: Fraction = 0.0


class BeftConfig(PeftConfig):
    init_weights: bool = True


# PEFT's peft_type -> its config's model; a type peftfx does not load is checked against the shared fields.
CONFIGS: dict[str, type[PeftConfig]] = {
    "ADALORA": AdaloraConfig,
    "ADAMSS": AdamssConfig,
    "BEFT": BeftConfig,
    "BOFT": BoftConfig,
    "C3A": C3aConfig,
    "DEFT": DeftConfig,
    "DELORA": DeloraConfig,
    "FOURIERFT": SpectralConfig,
    "FROD": FrodConfig,
    "GLORA": GloraConfig,
    "GRALORA": GraloraConfig,
    "HIRA": HiraConfig,
    "HRA": HraConfig,
    "IA3": Ia3Config,
    "LN_TUNING": PeftConfig,  # reads the targeting fields only
    "LOHA": LycorisConfig,
    "LOKR": LokrConfig,
    "LORA": LoraConfig,
    "MISS": MissConfig,
    "OFT": OftConfig,
    "OSF": OsfConfig,
    "PEANUT": PeanutConfig,
    "PSOFT": PsoftConfig,
    "PVERA": PveraConfig,
    "RANDLORA": RandloraConfig,
    "ROAD": RoadConfig,
    "SHIRA": ShiraConfig,
    "SUPERTUNING": SupertuningConfig,
    "TINYLORA": TinyloraConfig,
    "TRAINABLE_TOKENS": TrainableTokensConfig,
    "UNILORA": UniloraConfig,
    "VBLORA": VbloraConfig,
    "VERA": VeraConfig,
    "WAVEFT": WaveftConfig,
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
