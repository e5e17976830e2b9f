"""A causal mask that torch.export computed from shapes alone goes back to SDPA as ``is_causal``; any other stays.

Tolerance: float32, rtol 1e-6 / atol 1e-7: SDPA's causal and masked paths sum the same products (measured:
bit-identical to the eager models here, which themselves call SDPA with ``is_causal`` when there is no padding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, assert_close, run
from torch import nn

import peftfx
from peftfx.capture import capture
from peftfx.causal import SDPA, restore_is_causal

TOL = Tolerance(1e-6, 1e-7)


def attention(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return list(gm.graph.find_nodes(op="call_function", target=SDPA))


def masked(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in attention(gm) if (n.args[3:4] or [n.kwargs.get("attn_mask")])[0] is not None)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_a_static_causal_capture_uses_is_causal(factory):
    model, inputs = factory(), token_inputs()
    assert masked(capture(model, inputs)) > 0, "the capture is the model as it ran; the causal pass rewrites it"
    gm = peftfx.compile(model, {}, inputs)
    assert attention(gm) and all(n.kwargs.get("is_causal") for n in attention(gm))
    assert masked(gm) == 0
    assert not gm.graph.find_nodes(op="call_function", target=torch.ops.aten.cumsum.default), "mask nodes left"
    assert_close(run(gm, inputs), run(model, inputs), TOL, "is_causal capture")


def test_a_merged_and_a_live_graph_keep_is_causal():
    model, inputs = tiny_llama(), token_inputs()
    lora = {"type": "lora", "at": {"module": ["q_proj", "v_proj"]}, "with": {"r": 2, "init": False}, "seed": 0}
    for merge in (False, True):
        gm = peftfx.compile(model, {"adapters": {"a": lora}, "merge": merge}, inputs)
        assert masked(gm) == 0 and all(n.kwargs.get("is_causal") for n in attention(gm))


@pytest.mark.parametrize("case", ["padding", "dynamic"])
def test_a_mask_that_depends_on_inputs_stays(case):
    model, inputs = tiny_llama(), token_inputs()
    if case == "padding":
        inputs["attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
        gm = peftfx.compile(model, {}, inputs)
    else:
        gm = peftfx.compile(model, {}, inputs, dynamic_shapes=peftfx.dynamic_shapes(inputs))
    assert masked(gm) == len(attention(gm)) > 0
    assert_close(run(gm, inputs), run(model, inputs), TOL, f"{case} mask kept")


class Attention(nn.Module):
    """One SDPA with a mask built from constants: the causal triangle, or another pattern of the same shape."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        n = q.shape[-2]
        ones = torch.ones(n, n, dtype=torch.bool)
        mask = {
            "causal": ones.tril(),
            "window": ones.tril() & ones.triu(-1),
            "upper": ones.triu(),
            "float": torch.zeros(n, n).masked_fill(~ones.tril(), float("-inf")),
        }[self.pattern]
        return F.scaled_dot_product_attention(q, q.flip(-1), q.cos(), attn_mask=mask)


@pytest.mark.parametrize(("pattern", "rewritten"), [("causal", 1), ("window", 0), ("upper", 0), ("float", 0)])
def test_only_the_exact_boolean_triangle_is_rewritten(pattern, rewritten):
    model, q = Attention(pattern), torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    gm = peftfx.compile(model, {"capture": "export"}, (q,))
    assert masked(gm) == 1 - rewritten
    assert restore_is_causal(gm) == 0, "a second run finds nothing more"
    assert_close(run(gm, (q,)), model(q), TOL, f"{pattern} mask")


def test_a_mask_that_cannot_be_evaluated_outside_its_graph_stays():
    def no_eager_value() -> torch.Tensor:
        raise RuntimeError("only runs inside its graph")

    graph = torch.fx.Graph()
    q = graph.placeholder("q")
    graph.output(graph.call_function(SDPA, (q, q, q, graph.call_function(no_eager_value))))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    assert restore_is_causal(gm) == 0 and masked(gm) == 1
