"""PEFT's ``add_weighted_adapter`` is the oracle for ``combine``: every method, live and merged.

Checkpoints: three PEFT LoRAs per model with random non-zero factors (``oracle.perturb``, distinct seeds),
different scalings, ``a``/``b`` of equal rank (factor-level methods need it) and ``c`` of a higher rank
(``cat`` and the SVD methods take mixed ranks); ``b`` also targets a module the others do not, so a site where
only some sources are present is always exercised. Weights include a negative one.

Tolerances (float32): factor-level methods and ``cat`` compute the same float32 operations as PEFT, so
outputs agree to rounding (rtol 1e-5, atol 1e-6). The SVD methods run ``torch.linalg.svd`` on a ``ΔW`` that
peftfx sums in the same order as PEFT, so the factors are the same up to a sign per singular pair (which
cancels in ``B @ A``); truncation makes the result sensitive to ``ΔW`` rounding by ``ε‖ΔW‖/gap``, so they get
rtol 1e-4, atol 1e-5. DARE is compared at density 1 exactly (nothing dropped) and statistically below 1 in
``test_fold_tensors.py`` and here (kept fraction).
"""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch
from models import conv_inputs, conv_net, embed_net, id_inputs, mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import (
    Tolerance,
    adapter_parameters,
    assert_close,
    assert_unchanged,
    peft_checkpoint,
    perturb,
    run,
    snapshot,
)
from peftfx.passes import Cleanup, Merge, run_passes

import peftfx
from peftfx.capture import capture
from peftfx.driver import rewrite
from peftfx.plan import make_plan
from peftfx.spec import load_spec

EXACT = Tolerance(1e-5, 1e-6)
SVD = Tolerance(1e-4, 1e-5)

SOURCES = {
    "llama": {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]),
        "c": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    },
    "mlp": {
        "a": dict(r=3, lora_alpha=6, target_modules=["layers.0", "layers.1"]),
        "b": dict(r=3, lora_alpha=3, target_modules=["layers.0", "layers.1", "layers.2"]),
        "c": dict(r=5, lora_alpha=10, target_modules=["layers.1", "layers.2"]),
    },
    # other layouts: transformers Conv1D (stored transposed), embeddings (PEFT's A/B roles swap), kxk convs
    "gpt2": {
        "a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        "b": dict(r=6, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
    },
    "embed": {
        "a": dict(r=3, lora_alpha=6, target_modules=["emb", "out"]),
        "b": dict(r=3, lora_alpha=16, target_modules=["emb"]),
    },
    "conv2d": {
        "a": dict(r=3, lora_alpha=6, target_modules=["conv1", "conv2"]),
        "b": dict(r=3, lora_alpha=2, target_modules=["conv2", "head"]),
    },
}
MODELS = {
    "llama": (tiny_llama, token_inputs),
    "mlp": (functools.partial(mlp, sizes=(12, 16, 16, 8)), mlp_inputs),
    "gpt2": (tiny_gpt2, token_inputs),
    "embed": (embed_net, id_inputs),
    "conv2d": (functools.partial(conv_net, 2), functools.partial(conv_inputs, 2)),
}

# (method, sources, weights, PEFT keyword arguments)
CASES = [
    ("linear", "ab", [1.0, -0.6], {}),
    ("cat", "abc", [0.7, -0.6, 1.3], {}),
    ("svd", "abc", [1.0, -0.6, 0.5], {}),
    ("svd", "ac", [1.0, 0.8], {"svd_rank": 12, "svd_full_matrices": False}),
    ("ties", "ab", [1.0, -0.6], {"density": 0.5}),
    ("ties", "ab", [0.5, 2.0], {"density": 0.7, "majority_sign_method": "frequency"}),
    ("ties_svd", "abc", [1.0, -0.6, 0.5], {"density": 0.4}),
    ("dare_linear", "ab", [1.0, -0.6], {"density": 1.0}),
    ("dare_ties", "ab", [1.0, -0.6], {"density": 1.0}),
    ("dare_linear_svd", "abc", [1.0, -0.6, 0.5], {"density": 1.0}),
    ("dare_ties_svd", "ac", [1.0, 0.5], {"density": 1.0, "majority_sign_method": "frequency"}),
    ("magnitude_prune", "ab", [1.0, -0.6], {"density": 0.3}),
    ("magnitude_prune_svd", "abc", [1.0, -0.6, 0.5], {"density": 0.3, "svd_rank": 6, "svd_clamp": 0.9}),
]
LAYOUT_CASES = [
    ("gpt2", "cat", [1.0, -0.7], {}),
    ("gpt2", "svd", [1.0, -0.7], {}),
    ("gpt2", "ties_svd", [1.0, 0.7], {"density": 0.5}),
    ("embed", "linear", [1.0, -0.7], {}),
    ("embed", "cat", [1.0, -0.7], {}),
    ("embed", "svd", [0.6, 0.7], {"svd_rank": 4}),  # PEFT breaks above a site's min(m, n); peftfx zero-pads
    ("embed", "ties", [1.0, 0.7], {"density": 0.5}),
    ("conv2d", "linear", [1.0, -0.7], {}),
    ("conv2d", "cat", [1.0, -0.7], {}),
    ("conv2d", "svd", [0.6, 0.7], {"svd_rank": 4}),
    ("conv2d", "dare_ties_svd", [1.0, -0.7], {"density": 1.0}),
]
SPEC_NAMES = {"majority_sign_method": "majority_sign"}


@functools.cache
def model_and_inputs(kind: str):
    make, inputs = MODELS[kind]
    return make(), inputs()


@functools.cache
def captured(kind: str) -> torch.fx.GraphModule:
    base, inputs = model_and_inputs(kind)
    return capture(base, inputs)


def fast_compile(kind: str, spec: dict) -> torch.fx.GraphModule:
    """``peftfx.compile`` without re-capturing the model for every case."""
    spec_, base_dir = load_spec(spec)
    gm = copy.deepcopy(captured(kind))
    return rewrite(gm, spec_, make_plan(gm, spec_, base_dir))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fold")
    out = {}
    for kind, sources in SOURCES.items():
        base, _ = model_and_inputs(kind)
        for i, (name, config) in enumerate(sources.items()):
            directory = root / kind / name
            peft_checkpoint(base, peft.LoraConfig(**config), directory, functools.partial(perturb, seed=i + 1))
            out[kind, name] = directory
    return out


def peft_fold(kind: str, checkpoints, names: str, weights, method: str, kwargs) -> peft.PeftModel:
    base, _ = model_and_inputs(kind)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), checkpoints[kind, names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(checkpoints[kind, name], adapter_name=name)
    model.add_weighted_adapter(list(names), weights, "mix", combination_type=method, **kwargs)
    model.set_adapter("mix")
    return model.eval()


def fold_spec(kind: str, checkpoints, names: str, weights, method: str, kwargs) -> dict:
    params = {SPEC_NAMES.get(k, k): v for k, v in kwargs.items()}
    adapters = {name: {"peft": str(checkpoints[kind, name])} for name in names}
    return {"adapters": {**adapters, "mix": {"combine": list(names), "weights": weights, "method": method, **params}}}


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("kind", ["llama", "mlp"])
@pytest.mark.parametrize(("method", "names", "weights", "kwargs"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_fold_matches_peft(kind, method, names, weights, kwargs, checkpoints):
    base, inputs = model_and_inputs(kind)
    before = snapshot(base)
    tol = SVD if method.endswith("svd") else EXACT
    reference = peft_fold(kind, checkpoints, names, weights, method, kwargs)
    expected = run(reference, inputs)

    gm = fast_compile(kind, fold_spec(kind, checkpoints, names, weights, method, kwargs))
    assert {r.adapter for r in gm.meta["peftfx"]["records"]} == {"mix"}, "sources consumed by a combine run too"
    assert_close(run(gm, inputs), expected, tol, f"{method} unmerged vs PEFT")

    merged = run_passes(copy.deepcopy(gm), [Merge(["mix"]), Cleanup()])
    assert adapter_parameters(merged) == []
    assert_close(run(merged, inputs), run(reference.merge_and_unload(), inputs), tol, f"{method} merged vs PEFT")
    assert_unchanged(base, before)


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize(
    ("kind", "method", "weights", "kwargs"), LAYOUT_CASES, ids=[f"{c[0]}-{c[1]}" for c in LAYOUT_CASES]
)
def test_fold_layouts_match_peft(kind, method, weights, kwargs, checkpoints):
    _, inputs = model_and_inputs(kind)
    tol = SVD if method.endswith("svd") else EXACT
    reference = peft_fold(kind, checkpoints, "ab", weights, method, kwargs)
    gm = fast_compile(kind, fold_spec(kind, checkpoints, "ab", weights, method, kwargs))
    assert_close(run(gm, inputs), run(reference, inputs), tol, f"{kind} {method} unmerged vs PEFT")
    merged = run_passes(copy.deepcopy(gm), [Merge(["mix"]), Cleanup()])
    expected = run(reference.merge_and_unload(), inputs)
    assert_close(run(merged, inputs), expected, tol, f"{kind} {method} merged vs PEFT")


@pytest.mark.parametrize("method", ["ties", "cat"])
def test_merge_true_in_spec(method, checkpoints):
    """``merge: true`` bakes the folded adapter in; nothing of it, or of its sources, stays in the graph."""
    kwargs = {"density": 0.5} if method == "ties" else {}
    base, inputs = model_and_inputs("llama")
    spec = fold_spec("llama", checkpoints, "ab", [0.8, 0.4], method, kwargs)
    merged = peftfx.compile(base, {**spec, "merge": True}, inputs)
    expected = run(peft_fold("llama", checkpoints, "ab", [0.8, 0.4], method, kwargs).merge_and_unload(), inputs)
    assert adapter_parameters(merged) == []
    assert_close(run(merged, inputs), expected, EXACT, "merge: true vs PEFT merged")


def test_single_adapter_is_linear_like_peft(checkpoints):
    """PEFT forces ``linear`` for one source; with weight 1 that is the source itself (scaling folded in)."""
    base, inputs = model_and_inputs("mlp")
    expected = run(peft_fold("mlp", checkpoints, "c", [1.0], "linear", {}), inputs)
    alone = run(peft.PeftModel.from_pretrained(copy.deepcopy(base), checkpoints["mlp", "c"]).eval(), inputs)
    gm = fast_compile("mlp", fold_spec("mlp", checkpoints, "c", [1.0], "linear", {}))
    assert_close(run(gm, inputs), expected, EXACT, "one source vs PEFT")
    assert_close(run(gm, inputs), alone, EXACT, "one source vs the source")


def test_rslora_quirk_reproduced(tmp_path):
    """PEFT copies use_rslora from the first source, so the fold comes out √new_r too large: reproduced."""
    base, inputs = model_and_inputs("mlp")
    dirs = []
    for i, rslora in enumerate([True, False]):
        config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["layers.0"], use_rslora=rslora)
        dirs.append(tmp_path / str(i))
        peft_checkpoint(base, config, dirs[-1], functools.partial(perturb, seed=i + 7))
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name="a")
    model.load_adapter(dirs[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "mix", combination_type="cat")
    model.set_adapter("mix")
    spec = {
        "adapters": {
            "a": {"peft": str(dirs[0])},
            "b": {"peft": str(dirs[1])},
            "mix": {"combine": ["a", "b"], "weights": [1.0, 0.5], "method": "cat"},
        }
    }
    assert_close(run(fast_compile("mlp", spec), inputs), run(model.eval(), inputs), EXACT, "rslora cat")


def test_folded_lora_saves_as_peft(checkpoints, tmp_path):
    """A folded LoRA is an ordinary fresh LoRA: ``save_adapter`` writes what PEFT loads to the same outputs."""
    base, inputs = model_and_inputs("llama")
    gm = peftfx.compile(base, fold_spec("llama", checkpoints, "abc", [1.0, -0.5, 0.3], "cat", {}), inputs)
    peftfx.save_adapter(gm, "mix", tmp_path / "mix")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix").eval()
    assert_close(run(reloaded, inputs), run(gm, inputs), EXACT, "saved fold, loaded by PEFT")


def test_dare_below_one_keeps_density_fraction(checkpoints):
    """DARE at density 0.5 with a seed: about half the entries kept, the same fold every time."""
    _, inputs = model_and_inputs("llama")
    spec = fold_spec("llama", checkpoints, "ab", [1.0, 1.0], "dare_linear", {"density": 0.5})
    spec["adapters"]["mix"]["seed"] = 3
    first = fast_compile("llama", spec)
    again = fast_compile("llama", spec)
    torch.testing.assert_close(run(first, inputs), run(again, inputs), rtol=0, atol=0)
    # a: drop half, b: drop half -> the linear fold's A has zero where both drew a zero: about 1/4 of entries
    A = dict(first.named_parameters())["peftfx.mix.model__layers__0__self_attn__q_proj.lora_A"]
    zero = (A == 0).float().mean().item()
    assert 0.15 < zero < 0.35, zero
