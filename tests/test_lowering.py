"""What a compiled graph is for: torch.compile lowers it and ONNX exports it, live and merged, with the same numbers.
These are the plain-torch checks on an MLP; test_compile.py and test_export.py cover Llama, GPT-2 and a conv net.

Tolerance: float32, rtol 1e-5 / atol 1e-6. Inductor and onnxruntime fuse and reorder the same float32 ops, which
moves the last bits (measured ~1e-7 on these outputs of size ~1).
"""

from __future__ import annotations

import pytest
import torch
from models import mlp, mlp_inputs
from oracle import Tolerance, assert_close, run

import peftfx

TOL = Tolerance(1e-5, 1e-6)
LORA = {"type": "lora", "at": {"op": "linear"}, "with": {"r": 4, "init": False}, "seed": 0}


@pytest.fixture(scope="module", params=["live", "merged"])
def compiled(request):
    model, inputs = mlp(sizes=(12, 32, 32, 8)), mlp_inputs()
    return peftfx.compile(model, {"adapters": {"a": LORA}, "merge": request.param == "merged"}, inputs), inputs


def test_torch_compile_inductor(compiled):
    gm, inputs = compiled
    torch._dynamo.reset()
    assert_close(torch.compile(gm)(*inputs), run(gm, inputs), TOL, "inductor")


def test_compiled_graph_sees_adapter_updates():
    """Adapters are parameters, not frozen constants: an in-place update shows without recompiling."""
    model, inputs = mlp(), mlp_inputs()
    gm = peftfx.compile(model, {"adapters": {"a": LORA}}, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="aot_eager")
    before = compiled(*inputs).detach()
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith("peftfx."):
                p.mul_(2.0)
    after = compiled(*inputs).detach()
    assert not torch.allclose(before, after, atol=1e-3)
    assert_close(after, run(gm, inputs), TOL, "after the update")


def _onnx_run(gm, inputs) -> tuple[torch.Tensor, int]:
    """The first output as onnxruntime computes it from the exported graph, and the graph's node count."""
    import onnxruntime as ort

    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), dict(inputs))
    program = torch.onnx.export(gm, args, kwargs=kwargs, dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    feeds = dict(zip((i.name for i in session.get_inputs()), [*args, *kwargs.values()], strict=True))
    out = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    return torch.from_numpy(out), len(program.model_proto.graph.node)


def test_onnx_export(compiled):
    gm, inputs = compiled
    assert_close(_onnx_run(gm, inputs)[0], run(gm, inputs), TOL, "onnxruntime")
