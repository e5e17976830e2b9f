"""PEFT is the oracle: a PEFT LoRA/DoRA checkpoint run by peftfx gives PEFT's numbers, live and merged."""

from __future__ import annotations

import functools

import peft
import pytest
import torch
from models import (
    conv_inputs,
    conv_net,
    embed_net,
    id_inputs,
    mlp,
    mlp_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_inputs,
)
from oracle import Tolerance, assert_close, assert_unchanged, peft_checkpoint, run, snapshot

import peftfx
from peftfx.rewrite import get_attr
from peftfx.sites import find_sites

# Models and inputs per kind. Models are cached (compile never mutates them, and every test checks that).
MODELS = {
    "llama": (tiny_llama, lambda dtype: token_inputs()),
    "gpt2": (tiny_gpt2, lambda dtype: token_inputs()),
    "bert": (tiny_bert, lambda dtype: token_inputs()),
    "mlp": (functools.partial(mlp, sizes=(12, 16, 16, 8)), lambda dtype: mlp_inputs(dtype=dtype)),
    "conv1d": (functools.partial(conv_net, 1), lambda dtype: conv_inputs(1, dtype=dtype)),
    "conv2d": (functools.partial(conv_net, 2), lambda dtype: conv_inputs(2, dtype=dtype)),
    "conv3d": (functools.partial(conv_net, 3), lambda dtype: conv_inputs(3, dtype=dtype)),
    "embed": (embed_net, lambda dtype: id_inputs()),
}


@functools.cache
def model_and_inputs(kind: str, dtype: torch.dtype):
    make, inputs = MODELS[kind]
    return make(dtype=dtype), inputs(dtype)


@functools.cache
def base_node_count(kind: str, dtype: torch.dtype) -> int:
    model, inputs = model_and_inputs(kind, dtype)
    return len(peftfx.compile(model, {}, inputs).graph.nodes)


def lora(**kw) -> peft.LoraConfig:
    return peft.LoraConfig(r=kw.pop("r", 4), lora_alpha=kw.pop("lora_alpha", 8), **kw)


QV = ["q_proj", "v_proj"]
CASES = {
    "llama-qv": ("llama", lora(target_modules=QV)),
    "llama-regex": ("llama", lora(target_modules=r".*\.layers\.1\.(self_attn\.k_proj|mlp\.(gate|up)_proj)")),
    "llama-all-linear": ("llama", lora(target_modules="all-linear", task_type="CAUSAL_LM")),
    "llama-layers": (
        "llama",
        lora(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"),
    ),
    "llama-rank-alpha-pattern": (
        "llama",
        lora(
            target_modules=["q_proj", "v_proj", "o_proj"],
            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
            alpha_pattern={"o_proj": 3, r"layers\.0\.self_attn\.q_proj": 20},
        ),
    ),
    "llama-exclude-list": ("llama", lora(target_modules=QV, exclude_modules=["model.layers.0.self_attn.q_proj"])),
    "llama-exclude-regex": ("llama", lora(target_modules="all-linear", exclude_modules=r".*mlp.*")),
    "llama-embed": ("llama", lora(target_modules=["embed_tokens", "q_proj"])),
    "llama-dora-rslora": ("llama", lora(target_modules=["o_proj", "up_proj"], use_dora=True, use_rslora=True)),
    "gpt2-lora": ("gpt2", lora(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-dora": ("gpt2", lora(target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True, use_dora=True)),
    "bert-save-bias-all": (
        "bert",
        lora(target_modules=["query", "value"], task_type="SEQ_CLS", modules_to_save=["classifier"], bias="all"),
    ),
    "bert-save-bias-lora-only": (
        "bert",
        lora(target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only"),
    ),
    "mlp-lora": ("mlp", lora(target_modules=["layers.0", "layers.2"])),
    "mlp-rslora": ("mlp", lora(target_modules=["layers.0", "layers.1"], use_rslora=True, r=3, lora_alpha=5)),
    "mlp-dora": ("mlp", lora(target_modules=["layers.0", "layers.1", "layers.2"], use_dora=True)),
    "mlp-lora-bias": ("mlp", lora(target_modules=["layers.1", "layers.2"], lora_bias=True)),
    **{
        f"{k}-{name}": (k, lora(target_modules=["conv1", "conv2"], r=2, use_dora=dora))
        for k in ("conv1d", "conv2d", "conv3d")
        for name, dora in (("lora", False), ("dora", True))
    },
    "embed-lora": ("embed", lora(target_modules=["emb"])),
    "embed-and-head-lora": ("embed", lora(target_modules=["emb", "out"])),
    "embed-dora": ("embed", lora(target_modules=["emb", "out"], use_dora=True)),
}

# One float64 case per model kind: the same math, so agreement down to float64 rounding.
CASES_F64 = {
    "llama-f64": ("llama", lora(target_modules="all-linear", use_rslora=True)),
    "gpt2-f64": ("gpt2", lora(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
    "bert-f64": ("bert", lora(target_modules=["query", "value"], modules_to_save=["classifier"], bias="all")),
    "mlp-f64": ("mlp", lora(target_modules=["layers.0", "layers.1"], use_dora=True)),
    "conv-f64": ("conv2d", lora(target_modules=["conv1", "conv2"], r=2, use_dora=True)),
    "embed-f64": ("embed", lora(target_modules=["emb"], use_dora=True)),
}

# Tolerances. float32 outputs here are of magnitude ~0.1-3, so atol 2e-6 is a few ulps at 1.0: peftfx and PEFT
# add the same products in a slightly different order (and peftfx merges in float64 before rounding once, where
# PEFT rounds every step in float32), which moves the last bits. float64 agrees to ~1e-15, rtol 1e-10 is loose.
TOL = {torch.float32: Tolerance(1e-5, 2e-6), torch.float64: Tolerance(1e-10, 1e-12)}


def _run_case(kind: str, config: peft.LoraConfig, dtype: torch.dtype, tmp_path) -> None:
    model, inputs = model_and_inputs(kind, dtype)
    before = snapshot(model)
    peft_model = peft_checkpoint(model, config, tmp_path / "peft")
    spec = {"adapters": {"a": {"peft": str(tmp_path / "peft")}}}
    tol = TOL[dtype]

    live = peftfx.compile(model, spec, inputs)
    assert any(n.startswith("peftfx.a.") for n, _ in live.named_parameters())
    expected = run(peft_model, inputs)
    assert expected.dtype == dtype
    assert not torch.allclose(expected, run(model, inputs), rtol=1e-3, atol=1e-4), "adapter is the identity"
    assert_close(run(live, inputs), expected, tol, "unmerged vs PEFT")

    merged = peftfx.compile(model, {**spec, "merge": True}, inputs)
    assert not [n for n, _ in merged.named_parameters() if n.startswith("peftfx.")]
    assert not any(n.op == "get_attr" and str(n.target).startswith("peftfx.") for n in merged.graph.nodes)
    assert len(merged.graph.nodes) == base_node_count(kind, dtype)
    assert_close(run(merged, inputs), run(peft_model.merge_and_unload(), inputs), tol, "merged vs PEFT merged")

    assert_unchanged(model, before)


@pytest.mark.parametrize(("kind", "config"), CASES.values(), ids=CASES.keys())
def test_matches_peft_float32(kind, config, tmp_path):
    _run_case(kind, config, torch.float32, tmp_path)


@pytest.mark.parametrize(("kind", "config"), CASES_F64.values(), ids=CASES_F64.keys())
def test_matches_peft_float64(kind, config, tmp_path):
    _run_case(kind, config, torch.float64, tmp_path)


def test_targeting_matches_peft(tmp_path):
    """explain lists exactly the modules PEFT wrapped, for the trickier targeting rules."""
    model, inputs = model_and_inputs("llama", torch.float32)
    for key in ("llama-layers", "llama-exclude-list", "llama-exclude-regex", "llama-all-linear", "llama-regex"):
        _, config = CASES[key]
        peft_model = peft_checkpoint(model, config, tmp_path / key)
        wrapped = sorted(
            name.removeprefix("base_model.model.")
            for name, module in peft_model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)
        )
        explanation = peftfx.explain(model, {"adapters": {"a": {"peft": str(tmp_path / key)}}}, inputs)
        assert sorted(explanation.matches("a")) == wrapped, key


def test_tied_embedding_lora_leaves_lm_head(tmp_path):
    """GPT-2 ties lm_head to wte: a LoRA on wte changes the lookup only, live and merged, as PEFT's live model."""
    model, inputs = model_and_inputs("gpt2", torch.float32)
    before = snapshot(model)
    peft_model = peft_checkpoint(model, lora(target_modules=["wte"]), tmp_path)
    spec = {"adapters": {"a": {"peft": str(tmp_path)}}}
    expected = run(peft_model, inputs)

    assert_close(run(peftfx.compile(model, spec, inputs), inputs), expected, TOL[torch.float32], "unmerged")
    merged = peftfx.compile(model, {**spec, "merge": True}, inputs)
    assert_close(run(merged, inputs), expected, TOL[torch.float32], "merged")
    sites = {s.module: s for s in find_sites(merged)}
    wte = model.transformer.wte.weight
    assert torch.equal(get_attr(merged, str(sites["lm_head"].weight.target)), wte)
    assert not torch.equal(get_attr(merged, str(sites["transformer.wte"].weight.target)), wte)
    # the merged wte needs a name of its own, so exactly one get_attr more than the base graph
    assert len(merged.graph.nodes) == base_node_count("gpt2", torch.float32) + 1
    # PEFT's merge_and_unload writes into the shared tensor and so also changes lm_head; peftfx does not follow.
    assert not torch.allclose(run(peft_model.merge_and_unload(), inputs), expected, atol=1e-3)
    assert_unchanged(model, before)


def test_scale_multiplies_scaling(tmp_path):
    """`scale` on a PEFT adapter is PEFT's set_scale: scale 0 is the base model, scale 2 doubles the delta."""
    model, inputs = model_and_inputs("mlp", torch.float64)
    peft_model = peft_checkpoint(model, lora(target_modules=["layers.0"]), tmp_path)
    base, full = run(model, inputs), run(peft_model, inputs)
    exact = Tolerance(1e-12, 1e-12)
    zero = peftfx.compile(model, {"adapters": {"a": {"peft": str(tmp_path), "scale": 0.0}}}, inputs)
    assert_close(run(zero, inputs), base, exact, "scale 0")
    peft_model.base_model.model.layers[0].scaling["default"] *= 2
    double = peftfx.compile(model, {"adapters": {"a": {"peft": str(tmp_path), "scale": 2.0}}}, inputs)
    assert not torch.allclose(full, run(peft_model, inputs))
    assert_close(run(double, inputs), run(peft_model, inputs), exact, "scale 2")


def test_chained_sites_match_peft(tmp_path):
    """Two adapted linears back to back: the second adapter reads the first one's adapted output."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).double().eval()
    x = (torch.randn(2, 4, dtype=torch.float64),)
    peft_model = peft_checkpoint(model, lora(target_modules=["0", "1"], r=2), tmp_path)
    spec = {"adapters": {"a": {"peft": str(tmp_path)}}}
    expected = run(peft_model, x)
    exact = Tolerance(1e-10, 1e-12)
    assert_close(run(peftfx.compile(model, {**spec, "merge": True}, x), x), expected, exact, "merged")
    assert_close(run(peftfx.compile(model, spec, x), x), expected, exact, "unmerged")
