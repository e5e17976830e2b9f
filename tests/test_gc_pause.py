"""The garbage collector is held off while peftfx compiles or merges, and is left as the caller had it: after an
error, when the caller had turned it off, and across nested and concurrent pauses."""

from __future__ import annotations

import gc
import threading

import peft
import pytest
from models import tiny_llama, token_inputs
from oracle import peft_checkpoint

import peftfx
from peftfx import driver, out_of_core
from peftfx.gc_pause import gc_paused

LORA = {"type": "lora", "at": {"op": "linear"}, "with": {"init": False}, "seed": 0}


@pytest.fixture
def collector():
    """The collector on, as a caller has it, whatever the test leaves."""
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


@pytest.mark.parametrize("step", ["capture_graph", "make_plan", "rewrite"])
def test_a_compile_runs_its_steps_with_the_collector_off_and_leaves_it_on(collector, monkeypatch, step):
    seen = []
    original = getattr(driver, step)
    monkeypatch.setattr(driver, step, lambda *a, **k: (seen.append(gc.isenabled()), original(*a, **k))[1])
    peftfx.compile(tiny_llama(), {"adapters": {"a": LORA}, "merge": True}, token_inputs())
    assert seen == [False]
    assert gc.isenabled()


def test_an_out_of_core_merge_runs_with_the_collector_off(collector, monkeypatch, tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    peft_checkpoint(model, peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "adapter")
    seen = []
    get = out_of_core._Tensors.get
    monkeypatch.setattr(out_of_core._Tensors, "get", lambda *a: (seen.append(gc.isenabled()), get(*a))[1])
    spec = {"adapters": {"a": {"peft": str(tmp_path / "adapter")}}}
    out_of_core.merge_checkpoint(spec, tmp_path / "base", tmp_path / "out")
    assert seen and not any(seen)
    assert gc.isenabled()


def test_an_error_restores_the_collector_and_a_disabled_one_stays_off(collector):
    with pytest.raises(peftfx.PeftfxError):
        peftfx.compile(tiny_llama(), {"adapters": {"a": {**LORA, "at": {"module": "nowhere"}}}}, token_inputs())
    assert gc.isenabled()
    gc.disable()
    peftfx.compile(tiny_llama(), {"adapters": {"a": LORA}}, token_inputs())
    assert not gc.isenabled()


def test_nested_and_concurrent_pauses_end_with_the_last(collector):
    inner_done, outer_may_end = threading.Event(), threading.Event()
    states = []

    def other():
        with gc_paused():
            states.append(gc.isenabled())
            outer_may_end.set()
            inner_done.wait(10)
        states.append(gc.isenabled())  # the last pause to end

    with gc_paused():
        with gc_paused():
            states.append(gc.isenabled())
        states.append(gc.isenabled())  # the outer pause still holds
        thread = threading.Thread(target=other)
        thread.start()
        outer_may_end.wait(10)
    states.append(gc.isenabled())  # the other thread's pause still holds
    inner_done.set()
    thread.join(10)
    assert states == [False, False, False, False, True]
    assert gc.isenabled()
