"""Fresh LoRA/DoRA adapters from a spec: identity at init, trainable in the graph, seeded, mergeable."""

from __future__ import annotations

import copy

import pytest
import torch
from models import conv_inputs, conv_net, embed_net, id_inputs, mlp, mlp_inputs, tiny_llama, token_inputs
from oracle import adapter_parameters, assert_unchanged, perturb, run, snapshot
from peftfx.passes import Cleanup, Merge, run_passes

import peftfx

# (model, inputs, selector): every op kind LoRA supports.
CASES = {
    "mlp": (lambda dt: mlp(dtype=dt), lambda dt: mlp_inputs(dtype=dt), {"op": "linear"}),
    "conv1d": (lambda dt: conv_net(1, dtype=dt), lambda dt: conv_inputs(1, dtype=dt), {"op": ["conv1d", "linear"]}),
    "conv2d": (lambda dt: conv_net(2, dtype=dt), lambda dt: conv_inputs(2, dtype=dt), {"op": ["conv2d", "linear"]}),
    "conv3d": (lambda dt: conv_net(3, dtype=dt), lambda dt: conv_inputs(3, dtype=dt), {"op": "conv3d"}),
    "embed": (lambda dt: embed_net(dtype=dt), lambda dt: id_inputs(), {"op": ["embedding", "linear"]}),
}
KINDS = ["lora", "dora"]


def make(case: str, dtype: torch.dtype = torch.float32):
    model, inputs, selector = CASES[case]
    return model(dtype), inputs(dtype), selector


def spec(kind: str, selector: dict, **with_) -> dict:
    return {"adapters": {"f": {"type": kind, "at": selector, "with": {"r": 2, "alpha": 6, **with_}, "seed": 0}}}


def params(gm: torch.fx.GraphModule) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in gm.named_parameters() if n.startswith("peftfx.")}


# -- identity at init ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_identity_at_init(case, kind, init):
    model, x, selector = make(case)
    gm = peftfx.compile(model, spec(kind, selector, init=init, rslora=True), x)
    assert len(params(gm)) >= 2 * (3 if kind == "dora" else 2)  # at least two sites adapted
    # the adapter really is in the graph (B, or A for embeddings, starts at zero; the other factor does not)
    assert any(p.abs().sum() > 0 for n, p in params(gm).items() if n.endswith(("lora_A", "lora_B")))
    out, base = run(gm, x), run(model, x)
    if kind == "lora":
        assert torch.equal(out, base)  # B = 0: the added path is an exact zero
    else:
        torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-6)  # m / ‖W‖ is 1 up to rounding


def test_dora_magnitude_is_the_weight_norm():
    model, x, _ = make("mlp", torch.float64)
    gm = peftfx.compile(model, spec("dora", {"module": "layers.0"}), x)
    (magnitude,) = [p for n, p in params(gm).items() if n.endswith("lora_magnitude")]
    torch.testing.assert_close(magnitude, model.layers[0].weight.norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(run(gm, x), run(model, x), rtol=1e-12, atol=1e-12)


def test_init_false_is_not_the_identity():
    model, x, selector = make("mlp")
    gm = peftfx.compile(model, spec("lora", selector, init=False), x)
    assert not torch.allclose(run(gm, x), run(model, x), atol=1e-3)


def test_llama_fresh_lora_and_dora_are_identity_at_init():
    model, x = tiny_llama(), token_inputs()
    both = {
        "adapters": {
            "l": {"type": "lora", "at": {"module": ["q_proj", "v_proj", "embed_tokens"]}, "with": {"r": 4}},
            "d": {"type": "dora", "at": {"module": "re:.*mlp\\.\\w+_proj"}, "with": {"r": 2}},
        }
    }
    gm = peftfx.compile(model, both, x)
    names = params(gm)
    assert sum(n.startswith("peftfx.l.") for n in names) == 2 * 5  # 4 q/v + 1 embedding, A and B
    assert sum(n.startswith("peftfx.d.") for n in names) == 3 * 6
    torch.testing.assert_close(run(gm, x), run(model, x), rtol=1e-6, atol=1e-6)


# -- trainable -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mlp", "conv2d", "embed"])
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_tensors_are_trainable_parameters(case, kind):
    model, x, selector = make(case)
    before = snapshot(model)
    gm = peftfx.compile(model, spec(kind, selector), x)
    adapter = params(gm)
    roles = {n.rsplit(".", 1)[1] for n in adapter}
    assert roles == ({"lora_A", "lora_B", "lora_magnitude"} if kind == "dora" else {"lora_A", "lora_B"})
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in adapter.values())
    # the base weights stay frozen, and are not the model's Parameter objects
    base = {n: p for n, p in gm.named_parameters() if not n.startswith("peftfx.")}
    assert base and not any(p.requires_grad for p in base.values())
    model_params = {id(p) for p in model.parameters()}
    assert not any(id(p) in model_params for p in gm.parameters())

    trainable = [p for p in gm.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter.values()}
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    gm.train()
    start = run(gm, x).clone()
    out = gm(*x)
    loss = (out - 1.0).pow(2).mean()
    loss.backward()
    # the zero-initialised factor (B; A on embeddings) gets a gradient; the other one's is zero at init
    grads = {n: p.grad for n, p in adapter.items()}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith(("lora_A", "lora_B")))
    if kind == "dora":
        assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_magnitude"))
    assert all(p.grad is None for p in base.values())
    optimizer.step()
    optimizer.zero_grad()
    after = run(gm, x)
    assert not torch.allclose(after, start, atol=1e-4), "an optimizer step must change the output"
    # a second step: now every factor has a gradient
    gm(*x).pow(2).mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in adapter.values())
    assert_unchanged(model, before)


def test_training_leaves_the_model_and_other_compiles_alone():
    model, x, selector = make("mlp")
    before = snapshot(model)
    gm = peftfx.compile(model, spec("lora", selector), x)
    other = peftfx.compile(model, spec("lora", selector), x)
    optimizer = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        gm(*x).pow(2).sum().backward()
        optimizer.step()
    assert not torch.allclose(run(gm, x), run(model, x), atol=1e-3)
    assert torch.equal(run(other, x), run(model, x))
    assert_unchanged(model, before)


# -- seeds -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_seed_makes_creation_deterministic(kind):
    model, x, selector = make("conv2d")
    s = spec(kind, selector, init=False)
    s["adapters"]["f"]["seed"] = 7
    torch.manual_seed(1)
    first = params(peftfx.compile(model, s, x))
    torch.manual_seed(2)  # the global RNG does not matter when a seed is given
    second = params(peftfx.compile(model, s, x))
    assert first.keys() == second.keys() and len(first) >= 4
    for name in first:
        assert torch.equal(first[name], second[name]), name
    s["adapters"]["f"]["seed"] = 8
    third = params(peftfx.compile(model, s, x))
    assert not torch.equal(first["peftfx.f.conv1.lora_A"], third["peftfx.f.conv1.lora_A"])
    assert not torch.equal(first["peftfx.f.conv1.lora_B"], third["peftfx.f.conv1.lora_B"])


def test_without_seed_creation_follows_the_global_rng():
    model, x, selector = make("mlp")
    s = spec("lora", selector)
    del s["adapters"]["f"]["seed"]
    torch.manual_seed(5)
    a = params(peftfx.compile(model, s, x))
    torch.manual_seed(5)
    b = params(peftfx.compile(model, s, x))
    torch.manual_seed(6)
    c = params(peftfx.compile(model, s, x))
    name = "peftfx.f.layers__0.lora_A"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


# -- merged == unmerged ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged_after_perturbing(case, kind):
    """Train-like noise on every adapter tensor, then fold the live graph: same outputs, base-sized graph."""
    model, x, selector = make(case, torch.float64)
    before = snapshot(model)
    base_nodes = len(peftfx.compile(model, {}, x).graph.nodes)
    gm = peftfx.compile(model, spec(kind, selector, rslora=kind == "dora"), x)
    perturb(gm, scale=0.3)
    live = run(gm, x)
    assert not torch.allclose(live, run(model, x), atol=1e-3), "the perturbed adapter must change the output"
    merged = run_passes(copy.deepcopy(gm), [Merge(["f"]), Cleanup()])
    assert adapter_parameters(merged) == []
    assert len(merged.graph.nodes) == base_nodes
    torch.testing.assert_close(run(merged, x), live, rtol=1e-10, atol=1e-12)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", ["mlp", "conv2d", "embed"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_true_equals_unmerged_on_the_same_seed(case, kind):
    """``merge: true`` creates the same seeded tensors and folds them: the live graph's outputs."""
    model, x, selector = make(case, torch.float64)
    s = spec(kind, selector, init=False)
    live = peftfx.compile(model, s, x)
    merged = peftfx.compile(model, {**s, "merge": True}, x)
    assert adapter_parameters(merged) == []
    assert not torch.allclose(run(live, x), run(model, x), atol=1e-3)
    torch.testing.assert_close(run(merged, x), run(live, x), rtol=1e-10, atol=1e-12)
