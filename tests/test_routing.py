"""Per-sample routing: one graph, many adapters per batch, checked against PEFT's ``adapter_names``.

Two LoRA checkpoints of different ranks (rank_pattern too) and targets (``b`` adapts the embedding as well) on
a tiny Llama, in several orders, eager, compiled and in ONNX. Where PEFT refuses to mix a batch (DoRA, other
tuners), the oracle is each PEFT adapter alone on the whole batch, row by row. Tolerance: float32, rtol 1e-5 /
atol 1e-6: the gathered batched matmuls sum the same products as PEFT's per-sub-batch linears, possibly in another
order (measured: bit-identical on the Llama); dense rows are merged weights, a few ulps from PEFT's unmerged path.
"""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import conv_inputs, conv_net, mlp, mlp_inputs, tiny_gpt2, tiny_llama
from oracle import Tolerance, assert_close, assert_unchanged, peft_checkpoint, perturb, run, snapshot
from torch._dynamo.testing import CompileCounterWithBackend

import peftfx
from peftfx.ir import Routing, records, routing

TOL = Tolerance(1e-5, 1e-6)
BASE = "__base__"
CONFIGS = {
    "a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": peft.LoraConfig(
        r=8,
        lora_alpha=4,
        use_rslora=True,
        rank_pattern={"up_proj": 2},
        target_modules=["v_proj", "o_proj", "up_proj", "embed_tokens"],
    ),
}
IDS = torch.randint(0, 64, (5, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base Llama, the two checkpoints, and PEFT holding both adapters."""
    base = tiny_llama()
    root = tmp_path_factory.mktemp("routing")
    return base, root, _peft_pair(base, CONFIGS, root)


def spec(root, routed=("a", "b"), **extra):
    return {"adapters": {n: {"peft": str(root / n)} for n in CONFIGS}, "routing": {"adapters": list(routed)}, **extra}


def index(names: list[str], routed) -> torch.Tensor:
    return torch.tensor([-1 if n == BASE else list(routed).index(n) for n in names])


def expected(peft_model, names: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return peft_model(input_ids=IDS, adapter_names=names).logits


ORDERS = [
    ["a", "b", BASE, "b", "a"],
    [BASE, "a", "a", "b", BASE],
    ["b"] * 5,
    [BASE] * 5,
]


@pytest.mark.parametrize("routed", [("a", "b"), ("b", "a")])
def test_matches_peft_adapter_names(setup, routed):
    base, root, peft_model = setup
    before = snapshot(base)
    gm = peftfx.compile(base, spec(root, routed), {"input_ids": IDS})
    for names in ORDERS:
        out = run(gm, {"input_ids": IDS, "adapter_index": index(names, routed)})
        assert_close(out, expected(peft_model, names), TOL, f"routing {names}")
    assert not torch.allclose(expected(peft_model, ORDERS[0]), run(base, {"input_ids": IDS}), atol=1e-3)
    assert_unchanged(base, before)


def test_stacked_factors_are_padded_trainable_parameters(setup):
    base, root, _ = setup
    gm = peftfx.compile(base, spec(root), {"input_ids": IDS})
    params = dict(gm.named_parameters())
    prefix = "peftfx.routing.model__layers__0__"
    v_a, v_b = params[prefix + "self_attn__v_proj.lora_A"], params[prefix + "self_attn__v_proj.lora_B"]
    assert v_a.shape == (3, 8, 32) and v_b.shape == (3, 16, 8) and v_a.requires_grad  # rows: a, b, base
    assert not v_a[0, 4:].any() and not v_a[2].any() and not v_b[2].any()  # a's rank 4 padded to 8; base zeros
    q_a = params[prefix + "self_attn__q_proj.lora_A"]
    assert q_a.shape == (3, 4, 32) and not q_a[1].any()  # b does not target q_proj: a zero row
    assert params[prefix + "mlp__up_proj.lora_A"].shape == (3, 2, 32)  # b's rank_pattern
    assert routing(gm) == Routing("adapter_index", ["a", "b"])
    assert not [r for r in records(gm) if r.adapter in ("a", "b")]


def test_other_adapters_stay_always_on(setup):
    """Adapters not routed apply to every sample (here ``b``, merged by ``merge: true``); ``a`` to its samples."""
    base, root, _ = setup
    gm = peftfx.compile(base, spec(root, routed=["a"], merge=True), {"input_ids": IDS})
    assert not any(n.startswith("peftfx.b.") for n, _ in gm.named_parameters())
    out = run(gm, {"input_ids": IDS, "adapter_index": torch.tensor([0, -1, -1, 0, -1])})
    both = peftfx.compile(base, {**spec(root), "routing": None, "merge": ["b"]}, {"input_ids": IDS})
    b_only = peftfx.compile(base, {**spec(root), "routing": None, "active": ["b"], "merge": True}, {"input_ids": IDS})
    assert_close(out[[0, 3]], run(both, {"input_ids": IDS})[[0, 3]], TOL, "a routed on top of b")
    assert_close(out[[1, 2, 4]], run(b_only, {"input_ids": IDS})[[1, 2, 4]], TOL, "b alone")


@pytest.mark.slow
def test_compiled_without_graph_breaks_or_recompiles(setup):
    base, root, peft_model = setup
    gm = peftfx.compile(base, spec(root), {"input_ids": IDS})
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True)
    for names in ORDERS:
        out = run(compiled, {"input_ids": IDS, "adapter_index": index(names, ("a", "b"))})
        assert_close(out, expected(peft_model, names), TOL, f"compiled, routing {names}")
    assert counter.frame_count == 1, "changing the routing recompiled the graph"


@pytest.mark.slow
def test_dynamic_batch(setup):
    base, root, peft_model = setup
    gm = peftfx.compile(base, spec(root), {"input_ids": IDS}, dynamic_shapes="auto")
    names = ["b", BASE, "a"]
    ids = IDS[:3, :4]
    with torch.no_grad():
        want = peft_model(input_ids=ids, adapter_names=names).logits
    assert_close(run(gm, {"input_ids": ids, "adapter_index": index(names, ("a", "b"))}), want, TOL, "batch 3")


@pytest.mark.slow
def test_onnx_export_takes_adapter_index(setup):
    import onnxruntime as ort

    base, root, peft_model = setup
    gm = peftfx.compile(base, spec(root), {"input_ids": IDS})
    example = {"input_ids": IDS, "adapter_index": index(ORDERS[0], ("a", "b"))}
    program = torch.onnx.export(gm, (), kwargs=example, dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    assert [i.name for i in session.get_inputs()] == ["input_ids", "adapter_index"]
    for names in ORDERS[1:3]:
        feeds = {"input_ids": IDS.numpy(), "adapter_index": index(names, ("a", "b")).numpy()}
        out = torch.from_numpy(session.run(None, feeds)[0])
        assert_close(out, expected(peft_model, names), TOL, f"onnxruntime, routing {names}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dynamic", "batch", "sequence"), [(True, "batch", "sequence"), ({"input_ids": {0: "n", 1: "t"}}, "n", "t")]
)
def test_export_onnx_adds_adapter_index_with_a_dynamic_batch(setup, tmp_path, dynamic, batch, sequence):
    """Example inputs without adapter_index (as the CLI's): the file takes it anyway, its dim 0 the batch, also
    when a ``dynamic`` mapping names only the model's inputs."""
    import onnxruntime as ort

    base, root, peft_model = setup
    shapes = peftfx.dynamic_shapes({"input_ids": IDS}, dynamic)
    gm = peftfx.compile(base, spec(root), {"input_ids": IDS}, dynamic_shapes=shapes)
    path = peftfx.export_onnx(gm, {"input_ids": IDS}, tmp_path / "m.onnx", dynamic=dynamic)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert {i.name: i.shape for i in session.get_inputs()} == {
        "input_ids": [batch, sequence],
        "adapter_index": [batch],
    }
    names, ids = ["b", BASE, "a"], IDS[:3, :4]
    feeds = {"input_ids": ids.numpy(), "adapter_index": index(names, ("a", "b")).numpy()}
    with torch.no_grad():
        want = peft_model(input_ids=ids, adapter_names=names).logits
    assert_close(torch.from_numpy(session.run(None, feeds)[0]), want, TOL, "onnxruntime, batch 3")


MLP_CONFIGS = {
    "lora": {
        "a": peft.LoraConfig(r=2, target_modules=["layers.0"]),
        "b": peft.LoraConfig(r=4, target_modules=["layers.0", "layers.2"]),
    },
    "dora-bias": {  # DoRA on biased linears next to a LoRA with lora_bias
        "a": peft.LoraConfig(r=2, target_modules=["layers.0", "layers.1"], lora_bias=True),
        "b": peft.LoraConfig(r=4, target_modules=["layers.0", "layers.2"], use_dora=True),
    },
    "dense": {  # other kinds, as dense per-adapter deltas: IA3 scales the bias too, LoHa sits beside a LoRA
        "a": peft.LoHaConfig(r=2, target_modules=["layers.0", "layers.1"]),
        "b": peft.IA3Config(target_modules=["layers.1", "layers.2"], feedforward_modules=["layers.2"]),
        "c": peft.LoraConfig(r=4, target_modules=["layers.0"]),
    },
}


@pytest.mark.parametrize("case", MLP_CONFIGS)
def test_plain_module(tmp_path, case):
    """A plain module (symbolic_trace: no pytree spec) gets the keyword input too."""
    base, inputs = mlp(sizes=(12, 16, 16, 8)), mlp_inputs()
    x = torch.cat([inputs[0], -inputs[0]])  # batch 6
    names = [*MLP_CONFIGS[case], BASE, "a", BASE, "b"][:6]
    want = one_by_one(base, MLP_CONFIGS[case], tmp_path, lambda m: m(x), names)
    adapters = {n: {"peft": str(tmp_path / n)} for n in MLP_CONFIGS[case]}
    routed = sorted(adapters, reverse=True)
    gm = peftfx.compile(base, {"adapters": adapters, "routing": {"adapters": routed}}, inputs)
    assert_close(gm(x, adapter_index=index(names, routed)), want, TOL, case)


def test_dora_and_dense_rows_on_llama(setup, tmp_path):
    """DoRA rows and a dense row (trainable tokens) beside plain LoRA rows, on the embedding and attention."""
    base, _, _ = setup
    configs = {
        "a": CONFIGS["a"],
        "d": peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=True),
        "t": peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 5, 9, 30]),
    }
    names = ["d", "a", BASE, "t", "d"]
    ids = IDS.clone()
    ids[:, 0] = 5  # every sample reads a trained token
    want = one_by_one(base, configs, tmp_path, lambda m: m(input_ids=ids).logits, names)
    adapters = {n: {"peft": str(tmp_path / n)} for n in configs}
    gm = peftfx.compile(base, {"adapters": adapters, "routing": {"adapters": ["d", "t", "a"]}}, {"input_ids": ids})
    buffers = dict(gm.named_buffers())
    assert "peftfx.routing.model__layers__0__self_attn__q_proj.dora" in buffers
    assert "peftfx.routing.model__embed_tokens.delta" in buffers
    out = run(gm, {"input_ids": ids, "adapter_index": index(names, ["d", "t", "a"])})
    assert_close(out, want, TOL, f"routing {names}")


def test_gpt2_conv1d_rows(tmp_path):
    """transformers' Conv1D sites see ``[batch * seq, in]`` rows: still one adapter per sample."""
    base = tiny_gpt2().eval()
    configs = {
        "a": peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True),
        "b": peft.LoraConfig(r=4, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True),
    }
    peft_model = _peft_pair(base, configs, tmp_path)
    adapters = {n: {"peft": str(tmp_path / n)} for n in configs}
    ids = IDS[:4]
    gm = peftfx.compile(base, {"adapters": adapters, "routing": {"adapters": ["a", "b"]}}, {"input_ids": ids})
    names = ["b", BASE, "a", "b"]
    with torch.no_grad():
        want = peft_model(input_ids=ids, adapter_names=names).logits
    assert_close(run(gm, {"input_ids": ids, "adapter_index": index(names, ["a", "b"])}), want, TOL, "GPT-2")


def test_bfloat16_model_keeps_float32_factors(tmp_path):
    """As PEFT: adapters of a half-precision model stay float32; the input is upcast, the delta cast back.

    Tolerance: bfloat16 outputs, atol 1e-2 (a few bf16 ulps of values ~1 after three layers).
    """
    base = mlp(sizes=(12, 16, 16, 8), dtype=torch.bfloat16)
    x = torch.randn(4, 12, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    configs = {"a": peft.LoraConfig(r=2, target_modules=["layers.0"]), "b": MLP_CONFIGS["lora"]["b"]}
    peft_model = _peft_pair(base, configs, tmp_path)
    adapters = {n: {"peft": str(tmp_path / n)} for n in configs}
    gm = peftfx.compile(base, {"adapters": adapters, "routing": {"adapters": ["a", "b"]}}, (x,))
    assert dict(gm.named_parameters())["peftfx.routing.layers__0.lora_A"].dtype == torch.float32
    names = ["a", "b", BASE, "b"]
    with torch.no_grad():
        want = peft_model(x, adapter_names=names)
    assert_close(gm(x, adapter_index=index(names, ["a", "b"])), want, Tolerance(1e-2, 1e-2), "bfloat16")
    assert not torch.allclose(want[[0, 1, 3]].float(), run(base, (x,))[[0, 1, 3]].float(), atol=5e-2)


def test_gradients_reach_only_the_picked_rows():
    """The stacked factors train: a batch routed to adapter 0 and the base model moves row 0 only."""
    adapters = {n: {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2, "init": False}, "seed": 0} for n in "ab"}
    gm = peftfx.compile(mlp(), {"adapters": adapters, "routing": {"adapters": ["a", "b"]}}, mlp_inputs())
    gm(*mlp_inputs(), adapter_index=torch.tensor([0, -1, 0])).sum().backward()
    grad = dict(gm.named_parameters())["peftfx.routing.layers__0.lora_A"].grad
    assert grad[0].abs().sum() > 0 and not grad[1:].any()


FRESH = {
    "lo": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2, "init": False}, "seed": 1},
    "do": {"type": "dora", "at": {"module": "layers.1"}, "with": {"r": 3, "init": False}, "seed": 2},
    "rs": {"type": "lora", "at": {"module": "layers.[02]"}, "with": {"r": 5, "rslora": True, "init": False}, "seed": 3},
}


@functools.cache
def _fresh_graphs():
    """The routed MLP graph, and each adapter's ordinary graph (base model under -1), on a pool of 6 rows."""
    base, x = mlp(sizes=(12, 16, 16, 8)), torch.randn(6, 12, generator=torch.Generator().manual_seed(3))
    routed = peftfx.compile(base, {"adapters": FRESH, "routing": {"adapters": list(FRESH)}}, (x,))
    alone = {-1: run(base, (x,))}
    for k, name in enumerate(FRESH):
        alone[k] = run(peftfx.compile(base, {"adapters": {name: FRESH[name]}}, (x,)), (x,))
    return routed, x, alone


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(-1, len(FRESH) - 1), min_size=1, max_size=6))
def test_each_row_is_its_adapter_alone(picks):
    """Whatever the routing, row k is what adapter picks[k] alone computes for it (the base model for -1)."""
    routed, x, alone = _fresh_graphs()
    with torch.no_grad():
        out = routed(x[: len(picks)], adapter_index=torch.tensor(picks))
    want = torch.stack([alone[k][row] for row, k in enumerate(picks)])
    assert_close(out, want, TOL, f"routing {picks}")


def one_by_one(base, configs, root, call, names: list[str]) -> torch.Tensor:
    """What adapter_names means, where PEFT cannot mix a batch (DoRA, other tuners): each adapter alone, by rows.

    Saves each config's checkpoint (perturbed) under ``root``.
    """
    rows = {}
    with torch.no_grad():
        rows[BASE] = call(base)
        for seed, (name, config) in enumerate(configs.items()):
            rows[name] = call(peft_checkpoint(base, config, root / name, functools.partial(perturb, seed=seed)))
    return torch.stack([rows[name][k] for k, name in enumerate(names)])


def _peft_pair(base, configs, root):
    """Checkpoints of ``configs`` saved under ``root``, and one PeftModel holding them all."""
    for seed, (name, config) in enumerate(configs.items()):
        peft_checkpoint(base, config, root / name, functools.partial(perturb, seed=seed))
    first, *rest = configs
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), root / first, adapter_name=first).eval()
    for name in rest:
        peft_model.load_adapter(root / name, adapter_name=name)
    return peft_model


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"routing": {"adapters": ["a", "c"]}}, r"routing\.adapters\[1\]: 'c' is not an active adapter"),
        ({"active": ["b"]}, r"routing\.adapters\[0\]: 'a' is not an active adapter"),
        ({"merge": ["a"]}, r"routing\.adapters\[0\]: 'a' is merged"),
        ({"routing": {"adapters": ["a", "a"]}}, r"routing\.adapters\[1\]: 'a' is listed twice"),
        ({"routing": {"adapters": []}}, r"routing\.adapters: List should have at least 1 item"),
    ],
)
def test_spec_errors(setup, extra, message):
    base, root, _ = setup
    with pytest.raises(peftfx.SpecError, match=message):
        peftfx.compile(base, {**spec(root), **extra}, {"input_ids": IDS})


def test_unroutable_site_is_refused():
    base, inputs = conv_net(), conv_inputs()
    adapters = {
        "head": {"type": "lora", "at": {"module": "head"}, "with": {"r": 2}},
        "conv": {"type": "lora", "at": {"op": "conv2d"}, "with": {"r": 2}},
    }
    with pytest.raises(peftfx.SpecError, match=r"routing\.adapters\[1\]: 'conv' targets conv2d conv1 .*linear and emb"):
        peftfx.compile(base, {"adapters": adapters, "routing": {"adapters": ["head", "conv"]}}, inputs)


class _TakesAdapterIndex(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, adapter_index):
        return self.lin(x) * adapter_index


def test_a_model_input_of_the_same_name_is_refused():
    lora = {"type": "lora", "at": {"op": "linear"}}
    with pytest.raises(peftfx.SpecError, match="routing: the model already has an input named 'adapter_index'"):
        peftfx.compile(_TakesAdapterIndex(), {"adapters": {"a": lora}, "routing": {"adapters": ["a"]}})


def _routed_mlp(extra: dict | None = None):
    adapters = {n: {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2}, "seed": 0} for n in "ab"}
    return peftfx.compile(
        mlp(), {"adapters": {**adapters, **(extra or {})}, "routing": {"adapters": ["a", "b"]}}, mlp_inputs()
    )


def test_a_routed_adapter_is_not_swappable():
    with pytest.raises(peftfx.SpecError, match=r"swap_adapter: 'a' is routed"):
        peftfx.swap_adapter(_routed_mlp(), "a", {"adapters": {"x": {"type": "lora", "at": {"op": "linear"}}}})


def test_an_always_on_adapter_may_not_be_called_routing():
    """Its tensors would sit at peftfx.routing.<module>, where the routing stacks are."""
    with pytest.raises(peftfx.SpecError, match=r"adapters\.routing: .* taken by the routing tensors"):
        _routed_mlp({"routing": {"type": "lora", "at": {"op": "linear"}}})


def test_compile_output_of_a_bare_tensor_input(tmp_path):
    """A routed graph saved from example inputs given as one tensor gets an all-base adapter_index to trace with."""
    from peftfx.inputs import with_index

    args, kwargs = with_index(_routed_mlp(), mlp_inputs()[0])
    assert len(args) == 1 and kwargs["adapter_index"].tolist() == [-1] * mlp_inputs()[0].shape[0]


def test_a_non_additive_routed_adapter_may_not_share_a_site_with_an_always_on_one():
    """IA3 or DoRA rows start from the raw site output: an always-on adapter there would be skipped for them."""
    with pytest.raises(peftfx.SpecError, match=r"routing\.adapters\[1\]: 'b' \(dora\) does more than add to layers\.0"):
        _routed_mlp(
            {
                "b": {"type": "dora", "at": {"op": "linear"}, "with": {"r": 2}},
                "c": {"type": "lora", "at": {"module": "layers.0"}},
            }
        )
