"""Every PEFT type peftfx loads has a typed ``adapter_config.json`` model: PEFT's own file passes it, and each typed
field, corrupted in turn, is one ``CheckpointError`` naming the file and the field, never another exception."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import peft
import pytest
from models import embed_net

import peftfx
from peftfx.adapters import PEFT_TYPES
from peftfx.peft_config import CONFIGS, PeftConfig, check_peft_config

OUT = ["out"]  # embed_net's Linear(8, 4): every size below fits it

# PEFT type -> a PEFT config for embed_net (emb: Embedding(20, 8), norm: LayerNorm(8), out: Linear(8, 4))
CASES: dict[str, Callable[[], peft.PeftConfig]] = {
    "ADALORA": lambda: peft.AdaLoraConfig(init_r=2, total_step=10, target_modules=OUT),
    "ADAMSS": lambda: peft.AdamssConfig(r=4, num_subspaces=2, subspace_rank=1, target_modules=OUT),
    "BEFT": lambda: peft.BeftConfig(target_modules=OUT),
    "BOFT": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=OUT),
    "C3A": lambda: peft.C3AConfig(block_size=4, target_modules=OUT),
    "DEFT": lambda: peft.DeftConfig(r=2, target_modules=OUT),
    "DELORA": lambda: peft.DeloraConfig(r=2, target_modules=OUT),
    "FOURIERFT": lambda: peft.FourierFTConfig(n_frequency=8, target_modules=OUT),
    "FROD": lambda: peft.FrodConfig(progressbar=False, target_modules=OUT),
    "GLORA": lambda: peft.GloraConfig(r=2, target_modules=OUT),
    "GRALORA": lambda: peft.GraloraConfig(r=4, alpha=6, gralora_k=2, target_modules=OUT),
    "HIRA": lambda: peft.HiraConfig(r=2, target_modules=OUT),
    "HRA": lambda: peft.HRAConfig(r=2, target_modules=OUT),
    "IA3": lambda: peft.IA3Config(target_modules=OUT, feedforward_modules=OUT),
    "LN_TUNING": lambda: peft.LNTuningConfig(target_modules=["norm"]),
    "LOHA": lambda: peft.LoHaConfig(r=2, target_modules=OUT),
    "LOKR": lambda: peft.LoKrConfig(r=2, target_modules=OUT),
    "LORA": lambda: peft.LoraConfig(r=2, target_modules=OUT),
    "MISS": lambda: peft.MissConfig(r=2, target_modules=OUT),
    "OFT": lambda: peft.OFTConfig(oft_block_size=4, target_modules=OUT),
    "OSF": lambda: peft.OSFConfig(target_modules=OUT),
    "PEANUT": lambda: peft.PeanutConfig(r=2, target_modules=OUT),
    "PSOFT": lambda: peft.PsoftConfig(r=2, target_modules=OUT),
    "PVERA": lambda: peft.PveraConfig(r=2, target_modules=OUT),
    "RANDLORA": lambda: peft.RandLoraConfig(r=2, target_modules=OUT),
    "ROAD": lambda: peft.RoadConfig(group_size=2, target_modules=OUT),
    "SHIRA": lambda: peft.ShiraConfig(r=2, random_seed=1, target_modules=OUT),
    "SUPERTUNING": lambda: peft.SupertuningConfig(sparsity=0.5, target_modules=OUT),
    "TINYLORA": lambda: peft.TinyLoraConfig(r=2, u=4, target_modules=OUT),
    "TRAINABLE_TOKENS": lambda: peft.TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 3]),
    "UNILORA": lambda: peft.UniLoraConfig(r=2, theta_d_length=10, save_indices=True, target_modules=OUT),
    "VBLORA": lambda: peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=4, target_modules=OUT),
    "VERA": lambda: peft.VeraConfig(r=2, target_modules=OUT),
    "WAVEFT": lambda: peft.WaveFTConfig(n_frequency=8, target_modules=OUT),
}

NAN = float("nan")
# what a careless or hostile edit puts in a field: a string for a number, null, NaN, a negative size, a list for a
# scalar or a dict, a dict for a list or a scalar, a fraction for a count, a boolean for a number
CORRUPTIONS = ["x", None, NAN, -1, [[1]], {"k": [1]}, 1.5, True]
ALWAYS_REFUSED = [NAN, [[1]], {"k": [1]}]  # no typed field of any tuner takes these
# the fields that are sizes (a rank, a count of blocks, vectors or coefficients): 0 and below are refused
SIZES: dict[str, Sequence[str]] = {
    "ADALORA": ["r", "init_r", "target_r", "deltaT"],
    "ADAMSS": ["r", "num_subspaces", "subspace_rank", "asa_target_subspaces", "mask_interval"],
    "BOFT": ["boft_n_butterfly_factor"],
    "C3A": ["block_size"],
    "FOURIERFT": ["n_frequency"],
    "GRALORA": ["r", "gralora_k"],
    "MISS": ["r", "mini_r"],
    "PSOFT": ["r", "psoft_svd_lowrank_niter"],
    "ROAD": ["group_size"],
    "TINYLORA": ["r", "u"],
    "UNILORA": ["r", "theta_d_length"],
    "VBLORA": ["r", "num_vectors", "vector_length", "topk"],
    "WAVEFT": ["n_frequency"],
    **dict.fromkeys(
        [
            "DEFT",
            "DELORA",
            "GLORA",
            "HIRA",
            "HRA",
            "LOHA",
            "LOKR",
            "LORA",
            "PEANUT",
            "PVERA",
            "RANDLORA",
            "SHIRA",
            "VERA",
        ],
        ("r",),
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Callable[[str], tuple[dict[str, Any], str]]:
    """PEFT type -> (the adapter_config.json PEFT writes for it, its path); each type is saved once."""
    base, cache = embed_net(), {}

    def get(peft_type: str) -> tuple[dict[str, Any], str]:
        if peft_type not in cache:
            directory = tmp_path_factory.mktemp(peft_type.lower())
            peft.get_peft_model(copy.deepcopy(base), CASES[peft_type]()).save_pretrained(directory)
            file = Path(directory) / "adapter_config.json"
            cache[peft_type] = (json.loads(file.read_text()), str(file))
        return cache[peft_type]

    return get


def checks(config: dict[str, Any], file: str) -> None:
    """The planner's checks of a checkpoint's config, in its order: the typed model, then the kind's own."""
    check_peft_config(config, file)
    PEFT_TYPES[config["peft_type"]].check_peft_config(config, file)


def test_every_loaded_type_has_a_model_and_a_case():
    assert set(CASES) == set(PEFT_TYPES)
    assert set(PEFT_TYPES) <= set(CONFIGS)
    untyped = [t for t in PEFT_TYPES if CONFIGS[t] is PeftConfig and t != "LN_TUNING"]  # LN tuning has no fields
    assert not untyped


@pytest.mark.parametrize("peft_type", sorted(CASES))
def test_each_typed_field_corrupted_is_a_checkpoint_error_naming_it(saved, peft_type):
    config, file = saved(peft_type)
    checks(config, file)  # PEFT's own file loads
    model = CONFIGS[peft_type]
    for field in model.model_fields:
        if field == "peft_type":
            continue
        refused = []
        for bad in CORRUPTIONS:
            try:
                checks({**config, field: bad}, file)
            except peftfx.CheckpointError as e:
                assert re.match(rf"{re.escape(file)}: {field}\b", str(e)), (field, bad, str(e))
                refused.append(bad)
            # any other exception fails the test as it is raised
        assert all(any(b is r or b == r for r in refused) for b in ALWAYS_REFUSED), (field, refused)
        if field in SIZES.get(peft_type, ()):  # a string, a boolean or a fraction is never a size
            assert {"x", True, 1.5} <= {r for r in refused if isinstance(r, str | bool | float)}, (field, refused)
            for size in (-1, 0):
                with pytest.raises(peftfx.CheckpointError, match=rf"{re.escape(file)}: {field}: input should be great"):
                    checks({**config, field: size}, file)
        if re.search("seed|prng", field):  # torch's generators take 64 bits: a larger seed would overflow there
            with pytest.raises(peftfx.CheckpointError, match=rf"{re.escape(file)}: {field}: input should be less"):
                checks({**config, field: 2**70}, file)


@pytest.mark.parametrize(
    ("peft_type", "field", "value", "match"),
    [
        ("DEFT", "decomposition_method", "svd", "input should be 'relu' or 'qr'"),
        ("PSOFT", "ab_svd_init", "x", "input should be 'psoft_init' or 'pissa_init'"),
        ("ROAD", "variant", "road_3", "input should be 'road_1', 'road_2' or 'road_4'"),
        ("GLORA", "config_C", "constant", "input should be 'lora', 'vector' or 'none'"),
        ("LORA", "bias", "vera_only", "input should be 'none', 'all' or 'lora_only'"),
        ("TRAINABLE_TOKENS", "token_indices", [], "list should have at least 1 item after validation, not 0"),
        ("SUPERTUNING", "sparsity", 1.5, "input should be less than or equal to 1"),
        ("OSF", "effective_rank", 1.5, "input should be less than or equal to 1"),
    ],
)
def test_a_value_outside_peft_s_choices_is_named(saved, peft_type, field, value, match):
    config, file = saved(peft_type)
    with pytest.raises(peftfx.CheckpointError, match=rf"{re.escape(file)}: {field}: {match} \(got "):
        checks({**config, field: value}, file)
