"""Cheaper paths that must stay exact: the captured graph's call, the pass loop, the merge's finiteness check."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from models import mlp, mlp_inputs, tiny_llama, token_inputs
from oracle import run
from peftfx.passes import Cleanup, Pass, run_passes
from peftfx.passes.merge import finite
from torch import fx

import peftfx
from peftfx.errors import PassError
from peftfx.graph_file import with_code


def test_export_capture_drops_per_call_checks_but_keeps_shape_guards():
    model, x = tiny_llama(), token_inputs()
    gm = peftfx.capture(model, x)
    assert not gm.graph.find_nodes(op="call_function", target=torch.ops.aten._assert_tensor_metadata.default)
    assert not gm._forward_pre_hooks and not gm._forward_hooks
    assert torch.equal(run(gm, x), run(model, x))
    assert type(gm(**x)) is type(model(**x))  # same output structure
    with pytest.raises(AssertionError, match=r"Guard failed: input_ids\.size\(\)\[1\] == 6"):
        gm(input_ids=x["input_ids"][:, :3])


def test_export_capture_generates_its_code_once_for_the_caller(monkeypatch):
    """torch.export's intermediate graph modules generate their code lazily, and the captured graph's code is left
    to whoever calls it (``capture``) or rewrites it first (``compile``): fewer generations, the same graph and code."""
    capture = importlib.import_module("peftfx.capture")  # the module: the package's ``capture`` is its function
    model, x = tiny_llama(), token_inputs()
    generated = []
    recompile = fx.GraphModule.recompile
    monkeypatch.setattr(fx.GraphModule, "recompile", lambda gm: (generated.append(gm), recompile(gm))[1])
    lazy = capture.capture_graph(model, x, cache=False)
    lazy_count = len(generated)
    assert lazy.__dict__.get("_peftfx_code_pending")
    with_code(lazy)
    assert lazy.code == lazy.graph.python_code("self").src
    generated.clear()
    monkeypatch.setattr(capture, "_lazy_code", contextlib.nullcontext)
    eager = with_code(capture.capture_graph(model, x, cache=False))
    assert lazy_count < len(generated) - 1
    assert lazy.code == eager.code
    assert torch.equal(run(lazy, x), run(model, x))


def test_module_inputs_keep_exports_hooks():
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor, act: torch.nn.Module) -> torch.Tensor:
            return act(self.proj(x))

    gm = peftfx.capture(Scaled(), (torch.randn(2, 3), torch.nn.ReLU()), method="export")
    assert gm._forward_pre_hooks


class _Relu(Pass):
    """Makes the graph return relu of its output: visible only once the code is regenerated."""

    name = "relu"

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        output = next(iter(reversed(gm.graph.nodes)))
        with gm.graph.inserting_before(output):
            output.args = (gm.graph.call_function(torch.relu, (output.args[0],)),)
        return gm


class _Broken(Pass):
    name = "broken"

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        output = next(iter(reversed(gm.graph.nodes)))
        output.prev.prepend(output)  # the output now comes before the value it returns
        return gm


def test_run_passes_lints_each_pass_and_generates_the_code_at_the_end():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    x = torch.randn(4, 3)
    gm = run_passes(peftfx.capture(model, (x,)), [_Relu(), _Relu(), Cleanup()])
    assert torch.equal(gm(x), torch.relu(model(x)))
    assert gm.code.count("torch.relu(") == 2
    with pytest.raises(PassError, match=r"pass 'broken' \(after relu\) left an invalid graph"):
        run_passes(peftfx.capture(model, (x,)), [_Relu(), _Broken()])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_sees_every_nan_and_infinity(dtype):
    t = torch.randn(4, 5).to(dtype)
    assert finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[1, 2] = bad
        assert not finite(u)
    assert finite(torch.arange(3)) and finite(torch.empty(0, dtype=dtype))
    assert not finite(torch.tensor([1 + 1j, complex("nan")]))


def test_merge_gives_freed_memory_back_as_it_goes_and_merges_the_same(monkeypatch):
    import peftfx.passes.merge as merge

    model, x = mlp(), mlp_inputs()
    spec = {"adapters": {"a": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2, "init": False}, "seed": 0}}}
    expected = run(peftfx.compile(model, spec, x), x)
    trims, real = [], merge._give_back_freed_memory
    real()  # a no-op where the C library has no malloc_trim
    monkeypatch.setattr(merge, "_TRIM_EVERY", 1)
    monkeypatch.setattr(merge, "_give_back_freed_memory", lambda: trims.append(1))
    merged = peftfx.compile(model, {**spec, "merge": True}, x)
    assert len(trims) == 2  # one per site: each merged more than a byte
    torch.testing.assert_close(run(merged, x), expected)
