"""torch.compile on tiny Llama, GPT-2 and a conv net: live and merged graphs trace in one graph (no breaks) and
compile to eager's numbers, and a hotswap into a compiled live graph never recompiles.

Inductor is what ships, so every graph is compiled with it (cold, a few seconds to ~30 s a graph). One compiled
module per graph is shared by the tests here.

Tolerance: float32, rtol 1e-5 / atol 1e-6: Inductor fuses and reorders float32 ops (measured ~2e-7 here).
"""

from __future__ import annotations

import functools

import pytest
import torch
from models import conv_inputs, conv_net, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, assert_close, run
from torch._dynamo.testing import CompileCounterWithBackend

import peftfx

pytestmark = pytest.mark.slow

TOL = Tolerance(1e-5, 1e-6)
MODELS = {
    "llama": (tiny_llama, token_inputs, {"module": ["q_proj", "v_proj"]}, "inductor"),
    "gpt2": (tiny_gpt2, token_inputs, {"module": ["c_attn", "c_fc"]}, "inductor"),
    "conv": (conv_net, conv_inputs, {"op": ["conv2d", "linear"]}, "inductor"),
}


def lora(at: dict, r: int, alpha: float, seed: int, max_rank: int | None = 8, **with_) -> dict:
    adapter = {"type": "lora", "at": at, "with": {"r": r, "alpha": alpha, "init": False, **with_}, "seed": seed}
    return adapter if max_rank is None else {**adapter, "max_rank": max_rank}


@functools.cache
def setup(name: str, mode: str):
    """(model, inputs, graph, compiled graph, its compile counter); live graphs are padded to max_rank 8."""
    factory, make_inputs, at, backend = MODELS[name]
    model, inputs = factory(), make_inputs()
    merged = mode == "merged"
    spec = {"adapters": {"a": lora(at, 4, 8.0, 0, None if merged else 8)}, "merge": merged}
    gm = peftfx.compile(model, spec, inputs)
    counter = CompileCounterWithBackend(backend)
    return model, inputs, gm, torch.compile(gm, backend=counter), counter


def call(module, inputs):
    return module(**inputs) if isinstance(inputs, dict) else module(*inputs)


@pytest.mark.parametrize("mode", ["live", "merged"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compiles_in_one_graph_to_eager_outputs(name, mode):
    model, inputs, gm, compiled, _ = setup(name, mode)
    explanation = call(torch._dynamo.explain(gm), inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert_close(run(compiled, inputs), run(gm, inputs), TOL, f"{MODELS[name][3]} vs eager")
    assert not torch.allclose(run(gm, inputs), run(model, inputs), atol=1e-4)  # the adapter is not an identity


@pytest.mark.parametrize("name", list(MODELS))
def test_hotswap_does_not_recompile(name):
    """Another rank, alpha and rsLoRA: values change, shapes do not (PEFT needs prepare_model_for_compiled_hotswap)."""
    model, inputs, gm, compiled, counter = setup(name, "live")
    with torch.no_grad():
        call(compiled, inputs)
    frames = counter.frame_count
    new = lora(MODELS[name][2], 6, 3.0, 1, None, rslora=True)
    peftfx.swap_adapter(gm, "a", {"adapters": {"b": new}})
    swapped = run(compiled, inputs)
    assert counter.frame_count == frames, "the swap recompiled the graph"
    fresh = peftfx.compile(model, {"adapters": {"b": new}}, inputs)
    assert_close(swapped, run(fresh, inputs), TOL, f"swapped, {MODELS[name][3]}, vs a fresh compile")
