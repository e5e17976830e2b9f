"""``combine`` beyond PEFT's LoRA fold: other kinds' delta weights, IA³, per-layer values, and clear errors.

Oracle for folds of mixed kinds: PEFT merges each source alone (``merge_and_unload``), which gives its
``ΔW_i = W_i' - W`` (and ``Δb_i``); the expected model has ``W + Σ w_i ΔW_i``. Dense results are exact up to
float32 rounding of the merged weights (rtol 1e-5, atol 1e-6); an SVD at full rank is exact up to the SVD's
rounding (rtol 1e-4, atol 1e-5).
"""

from __future__ import annotations

import copy
import functools

import peft
import peftfx.passes
import pytest
import torch
from models import mlp, mlp_inputs
from oracle import Tolerance, adapter_parameters, assert_close, peft_checkpoint, perturb, run

import peftfx
from peftfx.errors import PeftfxError

EXACT = Tolerance(1e-5, 1e-6)
SVD = Tolerance(1e-4, 1e-5)
ALL = ["layers.0", "layers.1", "layers.2"]

CONFIGS = {
    "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["layers.0", "layers.1"]),
    "lora8": peft.LoraConfig(r=8, lora_alpha=8, target_modules=["layers.0", "layers.1"]),
    "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["layers.0"], use_dora=True),
    "loha": peft.LoHaConfig(r=4, alpha=8, target_modules=["layers.1", "layers.2"]),
    "ia3_ff": peft.IA3Config(target_modules=["layers.0", "layers.2"], feedforward_modules=["layers.0", "layers.2"]),
    "ia3_out": peft.IA3Config(target_modules=["layers.0", "layers.1"], feedforward_modules=[]),
    "ia3_out2": peft.IA3Config(target_modules=ALL, feedforward_modules=[]),
}


@functools.cache
def base_and_inputs():
    return mlp(sizes=(12, 16, 16, 8)), mlp_inputs()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("fold_spec")
    base, _ = base_and_inputs()
    models = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        models[name] = peft_checkpoint(base, config, root / name, functools.partial(perturb, seed=10 + i))
    return {name: root / name for name in CONFIGS}, models


def spec_of(paths, names, **mix):
    return {"adapters": {**{n: {"peft": str(paths[n])} for n in names}, "mix": {"combine": list(names), **mix}}}


def expected_fold(models, names, weights) -> torch.nn.Module:
    """The base with ``W + Σ w_i (W_i' - W)``, each ``W_i'`` from PEFT's own merge of source i."""
    base, _ = base_and_inputs()
    out = copy.deepcopy(base)
    state = {k: v.double() for k, v in base.state_dict().items()}
    total = {k: v.clone() for k, v in state.items()}
    for name, w in zip(names, weights, strict=True):
        merged = copy.deepcopy(models[name]).merge_and_unload().state_dict()
        for k in total:
            total[k] += w * (merged[k].double() - state[k])
    out.load_state_dict({k: v.float() for k, v in total.items()})
    return out


def test_mixed_kinds_task_arithmetic_is_exact(ckpt):
    """LoRA + LoHa + IA³ (output scaling, so the bias changes too) as one dense delta, live and merged."""
    paths, models = ckpt
    base, inputs = base_and_inputs()
    names, weights = ["lora", "loha", "ia3_out"], [0.8, -0.5, 1.5]
    spec = spec_of(paths, names, weights=weights, method="task_arithmetic")
    expected = run(expected_fold(models, names, weights), inputs)
    gm = peftfx.compile(base, spec, inputs)
    assert {r.kind for r in gm.meta["peftfx"]["records"]} == {"delta"}
    assert_close(run(gm, inputs), expected, EXACT, "dense fold")
    merged = peftfx.compile(base, {**spec, "merge": True}, inputs)
    assert adapter_parameters(merged) == []
    assert_close(run(merged, inputs), expected, EXACT, "dense fold merged")


def test_mixed_kinds_svd_at_full_rank_is_exact_and_ties_agree(ckpt):
    paths, models = ckpt
    base, inputs = base_and_inputs()
    names, weights = ["lora", "loha", "ia3_ff"], [1.0, 0.7, -0.4]
    svd = peftfx.compile(base, spec_of(paths, names, weights=weights, method="svd", svd_rank=16), inputs)
    assert {r.kind for r in svd.meta["peftfx"]["records"]} == {"lora"}
    assert_close(run(svd, inputs), run(expected_fold(models, names, weights), inputs), SVD, "svd fold")
    ties = dict(weights=weights, density=0.6, majority_sign="frequency")
    dense = peftfx.compile(base, spec_of(paths, names, method="ties_delta", **ties), inputs)
    low_rank = peftfx.compile(base, spec_of(paths, names, method="ties_svd", svd_rank=16, **ties), inputs)
    assert_close(run(low_rank, inputs), run(dense, inputs), SVD, "ties_svd at full rank vs ties_delta")


def test_task_arithmetic_of_loras_is_exact_low_rank(ckpt):
    paths, models = ckpt
    base, inputs = base_and_inputs()
    names, weights = ["lora", "lora8"], [1.0, -2.0]
    gm = peftfx.compile(base, spec_of(paths, names, weights=weights, method="task_arithmetic"), inputs)
    assert_close(run(gm, inputs), run(expected_fold(models, names, weights), inputs), EXACT, "exact low-rank")
    ranks = {r.hyper["r"] for r in gm.meta["peftfx"]["records"]}
    assert ranks == {12}
    truncated = peftfx.compile(
        base, spec_of(paths, names, weights=weights, method="task_arithmetic", svd_rank=5), inputs
    )
    svd = peftfx.compile(base, spec_of(paths, names, weights=weights, method="svd", svd_rank=5), inputs)
    assert_close(run(truncated, inputs), run(svd, inputs), SVD, "QR-based truncation vs SVD of ΔW")


def test_ia3_weighted_combination_matches_peft(ckpt):
    paths, _ = ckpt
    base, inputs = base_and_inputs()
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths["ia3_out"], adapter_name="ia3_out")
    model.load_adapter(paths["ia3_out2"], adapter_name="ia3_out2")
    model.add_weighted_adapter(["ia3_out", "ia3_out2"], [0.7, 0.5], "mix")
    model.set_adapter("mix")
    expected = run(model.eval(), inputs)
    spec = spec_of(paths, ["ia3_out", "ia3_out2"], weights=[0.7, 0.5])
    gm = peftfx.compile(base, spec, inputs)
    assert {r.kind for r in gm.meta["peftfx"]["records"]} == {"ia3"}
    assert_close(run(gm, inputs), expected, EXACT, "IA3 fold vs PEFT")
    merged = peftfx.compile(base, {**spec, "merge": True}, inputs)
    assert_close(run(merged, inputs), run(model.merge_and_unload(), inputs), EXACT, "IA3 fold merged vs PEFT")


def test_per_layer_weights_and_density(ckpt):
    """A gradient weight is interpolated across the selected layers; cases pick a density per site."""
    paths, _ = ckpt
    base, inputs = base_and_inputs()
    spec = spec_of(paths, ["lora", "loha"], weights=[1.0, {"gradient": [0.0, 1.0]}], method="task_arithmetic")
    gm = peftfx.compile(base, spec, inputs)
    assert_close(
        run(gm, inputs),
        run(
            peftfx.compile(
                base,
                spec_of(
                    paths,
                    ["lora", "loha"],
                    weights=[
                        1.0,
                        {
                            "cases": [
                                {"when": {"layers": [0]}, "value": 0.0},
                                {"when": {"layers": [1]}, "value": 0.5},
                                {"value": 1.0},
                            ]
                        },
                    ],
                    method="task_arithmetic",
                ),
                inputs,
            ),
            inputs,
        ),
        EXACT,
        "gradient vs the same values as cases",
    )
    density = {"cases": [{"when": {"layers": [1]}, "value": 1.0}, {"value": 0.0}]}
    pruned = peftfx.compile(
        base, spec_of(paths, ["lora", "lora8"], method="magnitude_prune_svd", density=density), inputs
    )
    tensors = dict(pruned.named_parameters())
    assert torch.count_nonzero(tensors["peftfx.mix.layers__0.lora_B"]) == 0  # density 0: nothing kept
    assert torch.count_nonzero(tensors["peftfx.mix.layers__1.lora_B"]) > 0


@pytest.mark.parametrize(
    ("names", "mix", "message"),
    [
        (["lora", "lora8"], {"method": "linear"}, r"adapters\.mix\.method: linear .* ranks must be equal"),
        (["lora", "dora"], {"method": "cat"}, r"adapters\.mix\.combine\[1\]: DoRA"),
        (["lora", "loha"], {"method": "cat"}, r"adapters\.mix\.combine\[1\]: method cat works on LoRA factors"),
        (["ia3_ff", "ia3_out"], {}, r"adapters\.mix\.combine: .*feedforward"),
        (["ia3_out", "ia3_out2"], {"method": "ties", "density": 0.5}, "IA³ adapters fold only linearly"),
        (["lora", "ia3_out"], {"method": "svd"}, r"adapters\.mix\.method: .* changes the bias"),
        (["loha", "ia3_ff"], {"method": "svd"}, r"adapters\.mix\.svd_rank: no source is a LoRA"),
    ],
)
def test_unrepresentable_folds_are_refused(ckpt, names, mix, message):
    paths, _ = ckpt
    base, inputs = base_and_inputs()
    with pytest.raises(PeftfxError, match=message):
        peftfx.compile(base, spec_of(paths, names, **mix), inputs)


def test_active_defaults_to_adapters_not_consumed():
    spec, _ = peftfx.load_spec(
        {"adapters": {"a": {"peft": "x"}, "b": {"peft": "y"}, "c": {"peft": "z"}, "mix": {"combine": ["a", "b"]}}}
    )
    assert spec.active_adapters() == ["c", "mix"]
    spec, _ = peftfx.load_spec({"adapters": {"a": {"peft": "x"}, "mix": {"combine": ["a"]}}, "active": ["a", "mix"]})
    assert spec.active_adapters() == ["a", "mix"]


def test_a_fold_can_be_folded_again(ckpt):
    """Nested combines: ``task_arithmetic(cat(lora, lora8), loha)`` is ``task_arithmetic(lora, lora8, loha)``."""
    paths, _ = ckpt
    base, inputs = base_and_inputs()
    adapters = {n: {"peft": str(paths[n])} for n in ("lora", "lora8", "loha")}
    nested = {
        **adapters,
        "inner": {"combine": ["lora", "lora8"], "weights": [1.0, 0.5], "method": "cat"},
        "mix": {"combine": ["inner", "loha"], "weights": [2.0, -1.0], "method": "task_arithmetic"},
    }
    flat = spec_of(paths, ["lora", "lora8", "loha"], weights=[2.0, 1.0, -1.0], method="task_arithmetic")
    gm = peftfx.compile(base, {"adapters": nested}, inputs)
    assert {r.adapter for r in gm.meta["peftfx"]["records"]} == {"mix"}
    assert_close(run(gm, inputs), run(peftfx.compile(base, flat, inputs), inputs), EXACT, "nested fold")


def test_fresh_adapter_folded_alone_is_itself():
    """A fresh (spec-defined) source folds like a checkpoint: one source with weight 1 is that adapter."""
    base, inputs = base_and_inputs()
    fresh = {"type": "lora", "at": {"module": ["layers.0", "layers.2"]}, "with": {"r": 3, "init": False}, "seed": 4}
    alone = peftfx.compile(base, {"adapters": {"f": fresh}}, inputs)
    for method in ("linear", "cat", "task_arithmetic"):
        spec = {"adapters": {"f": fresh, "mix": {"combine": ["f"], "weights": [1.0], "method": method}}}
        assert_close(run(peftfx.compile(base, spec, inputs), inputs), run(alone, inputs), EXACT, method)


def test_fresh_dense_delta_kind():
    """``type: delta`` (what mixed-kind folds become): zero at init, and merged equals live once trained."""
    base, inputs = base_and_inputs()
    spec = {"adapters": {"d": {"type": "delta", "at": {"module": ["layers.0", "layers.2"]}, "with": {"bias": True}}}}
    gm = peftfx.compile(base, spec, inputs)
    assert_close(run(gm, inputs), run(base, inputs), EXACT, "zero delta is the base")
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith("peftfx."):
                p.add_(0.1 * torch.randn_like(p))
    live = run(gm, inputs)
    merged = peftfx.passes.run_passes(gm, [peftfx.passes.Merge(["d"]), peftfx.passes.Cleanup()])
    assert adapter_parameters(merged) == []
    assert_close(run(merged, inputs), live, EXACT, "delta merged vs live")


FIELD_VALUES = {
    "density": 0.5,
    "majority_sign": "frequency",
    "seed": 1,
    "svd_rank": 2,
    "svd_clamp": 0.9,
    "svd_full_matrices": False,
}
UNREAD = [
    (method, field)
    for method, entry in peftfx.fold.METHODS.items()
    for field in peftfx.fold.FOLD_FIELDS
    if field not in entry.reads
]


@pytest.mark.parametrize(("method", "field"), UNREAD, ids=[f"{m}-{f}" for m, f in UNREAD])
def test_a_method_refuses_a_field_it_does_not_read(method, field):
    """Nothing is silently ignored: `method: linear` with a density would change nothing."""
    mix = {"combine": ["a", "b"], "method": method, field: FIELD_VALUES[field]}
    if peftfx.fold.METHODS[method].needs_density and field != "density":
        mix["density"] = 0.5
    adapters = {n: {"type": "lora", "at": {"op": "linear"}} for n in ("a", "b")}
    with pytest.raises(peftfx.SpecError, match=rf"adapters\.mix\.{field}: method {method} does not read {field}"):
        peftfx.spec.load_spec({"adapters": {**adapters, "mix": mix}})


def test_every_field_is_read_by_some_method():
    assert set().union(*(m.reads for m in peftfx.fold.METHODS.values())) == set(peftfx.fold.FOLD_FIELDS)


def test_the_default_fold_of_ia3_sources_refuses_fields(ckpt):
    """Without a method, IA³ sources fold linearly: known only once the sources are read."""
    model, x = base_and_inputs()
    dirs, _ = ckpt
    spec = {
        "adapters": {
            "p": {"peft": str(dirs["ia3_out"])},
            "q": {"peft": str(dirs["ia3_out2"])},
            "mix": {"combine": ["p", "q"], "svd_rank": 2},
        }
    }
    with pytest.raises(peftfx.SpecError, match=r"adapters\.mix\.svd_rank: method linear \(IA³\) does not read"):
        peftfx.compile(model, spec, x)
