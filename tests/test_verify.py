"""``peftfx.verify``: what a user's CI asserts on. It must pass on right graphs and fail on a wrong merge."""

from __future__ import annotations

import functools
import importlib
import json

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_llama, token_inputs
from oracle import assert_unchanged, peft_checkpoint, perturb, snapshot

import peftfx
from peftfx.adapters import KINDS

verify_module = importlib.import_module("peftfx.verify")  # the attribute peftfx.verify is the function


@pytest.fixture
def checkpoints(tmp_path):
    model = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for name in ("a", "b"):
        peft_checkpoint(model, config, tmp_path / name)
    return model, tmp_path


def test_a_checkpoint_is_compared_live_merged_and_with_peft(checkpoints):
    model, ckpt = checkpoints
    before = snapshot(model)
    report = peftfx.verify(model, {"adapters": {"a": {"peft": str(ckpt / "a")}}}, token_inputs())
    assert report.ok, str(report)
    assert [(r.adapter, r.check, r.output) for r in report.rows] == [
        ("a", "live vs base", "logits"),
        ("a", "merged vs live", "logits"),
        ("a", "live vs PEFT", "logits"),
        ("a", "merged vs PEFT merged", "logits"),
    ]
    assert report.rows[0].ok is None and report.rows[0].max_abs > 1e-2  # the adapter does something
    assert all(r.max_abs < 1e-5 and r.max_rel < 1e-5 for r in report.rows[1:])
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True
    assert_unchanged(model, before)


def test_several_adapters_are_checked_one_by_one_then_together(checkpoints):
    model, ckpt = checkpoints
    spec = {
        "adapters": {
            "a": {"peft": str(ckpt / "a")},
            "b": {"peft": str(ckpt / "b"), "scale": 0.5},
            "mix": {"combine": ["a", "b"], "method": "cat", "weights": [1.0, -0.5]},
        },
        "active": ["a", "b", "mix"],
    }
    report = peftfx.verify(model, spec, token_inputs())
    assert report.ok, str(report)
    checks = {(r.adapter, r.check) for r in report.rows}
    assert ("a", "merged vs PEFT merged") in checks and ("all", "merged vs live") in checks
    assert ("all", "live vs PEFT") not in checks  # PEFT has no single model of the three stacked
    # a scale is not in PEFT's checkpoint, so neither b nor a fold of it has a PEFT reference: the report says so
    assert ("b", "live vs PEFT") not in checks and ("mix", "live vs PEFT") not in checks
    assert any(n.startswith("b: loaded with a scale") for n in report.notes)
    assert any(n.startswith("mix: a source is loaded with a scale") for n in report.notes)


def test_a_wrong_merge_fails(checkpoints, monkeypatch):
    model, ckpt = checkpoints
    lora = KINDS["lora"]
    merge = lora.merge

    def off_by_a_percent(*args, **kwargs):
        weight, bias = merge(*args, **kwargs)
        return weight * 1.01, bias

    monkeypatch.setattr(lora, "merge", off_by_a_percent)
    monkeypatch.setattr(lora, "merge_into", lambda *args, **kwargs: None)  # the exact-rounding path defers to merge
    report = peftfx.verify(model, {"adapters": {"a": {"peft": str(ckpt / "a")}}}, token_inputs())
    assert not report.ok
    assert {(r.adapter, r.check) for r in report.failures} == {("a", "merged vs live"), ("a", "merged vs PEFT merged")}
    assert "FAIL" in str(report)


def test_fresh_adapters_are_moved_off_their_init_unless_asked(tmp_path):
    spec = {"adapters": {"s": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2}, "seed": 0}}}
    model, inputs = mlp(), mlp_inputs()
    moved = peftfx.verify(model, spec, inputs)
    assert moved.ok and moved.rows[0].max_abs > 1e-3
    at_init = peftfx.verify(model, spec, inputs, perturb=False)
    assert at_init.ok and at_init.rows[0].max_abs == 0
    assert any("leaves every output unchanged" in n for n in at_init.notes)


def test_every_output_tensor_is_compared():
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = torch.nn.Linear(12, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"hidden": h, "scores": (self.head(h), h.sum(-1))}

    spec = {"adapters": {"s": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2}, "seed": 0}}}
    report = peftfx.verify(TwoHeads().eval(), spec, mlp_inputs())
    assert report.ok
    assert [r.output for r in report.rows if r.check == "merged vs live"] == ["hidden", "scores[0]", "scores[1]"]


def test_without_peft_the_report_says_so(checkpoints, monkeypatch):
    model, ckpt = checkpoints
    monkeypatch.setattr(verify_module, "_peft_installed", lambda: False)
    report = peftfx.verify(model, {"adapters": {"a": {"peft": str(ckpt / "a")}}}, token_inputs())
    assert report.ok and {r.check for r in report.rows} == {"live vs base", "merged vs live"}
    assert any("peft is not installed" in n for n in report.notes)


def test_random_methods_and_per_layer_weights_have_no_peft_reference(checkpoints):
    model, ckpt = checkpoints
    sources = {"a": {"peft": str(ckpt / "a")}, "b": {"peft": str(ckpt / "b")}}
    dare = {"combine": ["a", "b"], "method": "dare_linear", "density": 0.5, "seed": 0}
    graded = {"combine": ["a", "b"], "method": "linear", "weights": [{"gradient": [0.5, 1.0]}, 1.0]}
    report = peftfx.verify(model, {"adapters": {**sources, "dare": dare, "graded": graded}}, token_inputs())
    assert report.ok, str(report)
    assert not any("PEFT" in r.check for r in report.rows)
    assert any(n.startswith("dare: method dare_linear is random") for n in report.notes)
    assert any(n.startswith("graded: per-layer weights") for n in report.notes)


def test_tolerance_follows_the_dtype_and_an_empty_spec_is_an_error():
    spec = {"adapters": {"s": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2}, "seed": 0}}}
    report = peftfx.verify(mlp(dtype=torch.float64), spec, mlp_inputs(dtype=torch.float64))
    assert report.tolerance == peftfx.Tolerance(rtol=1e-9, atol=1e-12) and report.ok
    with pytest.raises(peftfx.SpecError, match="no active adapter"):
        peftfx.verify(mlp(), {}, mlp_inputs())


@pytest.fixture
def routed(tmp_path):
    """A tiny Llama and two PEFT LoRAs of other ranks and targets (distinct seeds), routed per sample."""
    model = tiny_llama()
    configs = {
        "a": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        "b": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "o_proj"]),
    }
    for seed, (name, config) in enumerate(configs.items()):
        peft_checkpoint(model, config, tmp_path / name, functools.partial(perturb, seed=seed))
    spec = {"adapters": {n: {"peft": str(tmp_path / n)} for n in configs}, "routing": {"adapters": ["a", "b"]}}
    return model, spec


@pytest.mark.slow
def test_a_routed_spec_checks_each_row_against_its_adapter_alone_and_peft(routed):
    model, spec = routed
    report = peftfx.verify(model, spec, token_inputs())
    assert report.ok, str(report)
    checks = [(r.adapter, r.check) for r in report.rows]
    assert ("a", "merged vs PEFT merged") in checks and ("b", "merged vs PEFT merged") in checks
    assert checks[-2:] == [("routing", "routed vs alone"), ("routing", "routed vs PEFT")]
    assert not [c for c in checks if c[0] == "all"]  # every adapter on every sample is not what the spec runs


@pytest.mark.slow
def test_a_routed_spec_with_an_always_on_adapter_has_no_peft_row(routed):
    """PEFT's adapter_names has no adapter that runs for every sample: rows are compared with the graphs alone."""
    model, spec = routed
    fresh = {"type": "lora", "at": {"module": "*.up_proj"}, "with": {"r": 2, "init": False}, "seed": 0}
    report = peftfx.verify(model, {**spec, "adapters": {**spec["adapters"], "up": fresh}}, token_inputs())
    assert report.ok, str(report)
    routing = [r.check for r in report.rows if r.adapter == "routing"]
    assert routing == ["routed vs alone"]


@pytest.mark.slow
def test_a_wrong_routed_graph_fails(routed, monkeypatch):
    route = importlib.import_module("peftfx.passes.route")
    low_rank_delta = route._low_rank_delta
    monkeypatch.setattr(route, "_low_rank_delta", lambda *args: 1.01 * low_rank_delta(*args))
    report = peftfx.verify(*routed, token_inputs())
    assert {(r.adapter, r.check) for r in report.failures} == {
        ("routing", "routed vs alone"),
        ("routing", "routed vs PEFT"),
    }


def test_verify_merges_as_compile_does():
    """An `expect: any` adapter that placed nothing, and a hyphenated fresh adapter (moved off its init too)."""
    adapters = {
        "none-here": {"type": "lora", "at": {"op": "conv2d", "expect": "any"}},
        "my-lora": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2}, "seed": 0},
    }
    report = peftfx.verify(mlp(), {"adapters": adapters, "merge": True}, mlp_inputs())
    assert report.ok, str(report)
    moved = [r for r in report.rows if r.adapter == "my-lora" and r.check == "live vs base"]
    assert moved and moved[0].max_abs > 1e-3  # perturbed: the merge check compares a real adapter


@pytest.mark.parametrize("wrong", [False, True])
def test_fresh_routed_adapters_are_moved_off_their_init_too(monkeypatch, wrong):
    """At init a LoRA is the identity, so routed rows would equal the base model's whatever the routing did."""
    fresh = {n: {"type": "lora", "at": {"op": "linear"}, "with": {"r": r}, "seed": r} for n, r in (("a", 2), ("b", 4))}
    if wrong:
        route = importlib.import_module("peftfx.passes.route")
        low_rank_delta = route._low_rank_delta
        monkeypatch.setattr(route, "_low_rank_delta", lambda *args: 1.01 * low_rank_delta(*args))
    report = peftfx.verify(mlp(), {"adapters": fresh, "routing": {"adapters": ["a", "b"]}}, mlp_inputs())
    assert [(r.adapter, r.check) for r in report.failures] == ([("routing", "routed vs alone")] if wrong else [])
    assert all(r.max_abs > 1e-3 for r in report.rows if r.check == "live vs base")
