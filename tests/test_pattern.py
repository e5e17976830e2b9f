"""The pattern language (design.md §2): every selector key on real captured graphs, explain, per-site values."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from models import conv_inputs, conv_net, mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import adapter_parameters, run
from torch import nn

import peftfx
from peftfx.pattern import Matcher
from peftfx.sites import find_sites

L = "model.layers"
QKVO = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_PROJ = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LLAMA_LINEARS = [f"{L}.{i}.{m}" for i in (0, 1) for m in (*QKVO, *MLP_PROJ)] + ["lm_head"]


def both(*suffixes: str, layers=(0, 1)) -> list[str]:
    return sorted(f"{L}.{i}.{s}" for i in layers for s in suffixes)


@functools.cache
def llama():
    model, x = tiny_llama(), token_inputs()
    return model, x, peftfx.capture(model, x)


@functools.cache
def conv():
    model, x = conv_net(2), conv_inputs(2)
    return model, x, peftfx.capture(model, x)


@functools.cache
def deep_mlp():
    """Four linears, ``layers.0`` .. ``layers.3``, float64."""
    model, x = mlp(sizes=(6, 8, 8, 8, 4), dtype=torch.float64), mlp_inputs(6, dtype=torch.float64)
    return model, x, peftfx.capture(model, x)


def select(graph, selector: dict, field: str = "at") -> list[str]:
    _, _, gm = graph()
    matcher = Matcher(gm, find_sites(gm))
    return sorted(site.module for site in matcher.select(peftfx.Selector.model_validate(selector), field))


def fresh(selector: dict, **kw) -> dict:
    return {"adapters": {"a": {"type": "lora", "at": selector, **kw}}}


def adapted_sites(gm: torch.fx.GraphModule) -> dict[str, dict[str, tuple[int, ...]]]:
    """{site key: {role: shape}} of adapter ``a``'s tensors in a compiled graph."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, p in gm.named_parameters():
        if name.startswith("peftfx.a."):
            site, role = name.removeprefix("peftfx.a.").rsplit(".", 1)
            out.setdefault(site, {})[role] = tuple(p.shape)
    return out


# -- op ---------------------------------------------------------------------------------------------------------


def test_op():
    assert select(llama, {"op": "embedding"}) == ["model.embed_tokens"]
    assert select(llama, {"op": "linear"}) == sorted(LLAMA_LINEARS)
    assert select(llama, {"op": ["linear", "embedding"]}) == sorted([*LLAMA_LINEARS, "model.embed_tokens"])
    assert select(conv, {"op": "conv2d"}) == ["conv1", "conv2"]
    assert select(conv, {"op": ["conv2d", "linear"]}) == ["conv1", "conv2", "head"]
    assert select(conv, {"op": "conv1d", "expect": "any"}) == []
    assert select(deep_mlp, {"op": "linear"}) == ["layers.0", "layers.1", "layers.2", "layers.3"]


def test_module_type():
    assert select(llama, {"module_type": "Embedding"}) == ["model.embed_tokens"]
    assert select(conv, {"module_type": ["Conv2d", "Linear"], "op": "conv2d"}) == ["conv1", "conv2"]


# -- module ----------------------------------------------------------------------------------------------------


def test_module_glob():
    assert select(llama, {"module": "*.q_proj"}) == both("self_attn.q_proj")
    assert select(llama, {"module": f"{L}.?.mlp.*"}) == both(*MLP_PROJ)
    assert select(llama, {"module": "*_proj", "op": "linear"}) == both(*QKVO, *MLP_PROJ)
    assert select(conv, {"module": "conv?"}) == ["conv1", "conv2"]
    assert select(llama, {"module": "q_proj", "expect": "any"}) == []  # a glob matches the whole path


def test_module_regex_is_a_full_match():
    assert select(llama, {"module": r"re:.*\.(q|v)_proj"}) == both("self_attn.q_proj", "self_attn.v_proj")
    assert select(llama, {"module": r"re:model\.layers\.1\.mlp\.\w+"}) == both(*MLP_PROJ, layers=[1])
    assert select(llama, {"module": "re:q_proj", "expect": "any"}) == []  # no search semantics
    assert select(llama, {"module": "re:.*q_pro", "expect": "any"}) == []


def test_module_list_is_peft_suffix_rule():
    assert select(llama, {"module": ["q_proj", "v_proj"]}) == both("self_attn.q_proj", "self_attn.v_proj")
    assert select(llama, {"module": ["self_attn.o_proj", "lm_head"]}) == ["lm_head", *both("self_attn.o_proj")]
    assert select(llama, {"module": [f"{L}.0.mlp.up_proj"]}) == [f"{L}.0.mlp.up_proj"]  # an exact name
    # a suffix only counts at a dot: "proj" is not a suffix of "...q_proj", nor "_proj"
    assert select(llama, {"module": ["proj", "_proj", "up"], "expect": "any"}) == []
    assert select(deep_mlp, {"module": ["layers.1", "3"]}) == ["layers.1", "layers.3"]


# -- layers ----------------------------------------------------------------------------------------------------


def test_layers_list_range_and_int():
    assert select(deep_mlp, {"layers": [0, 3]}) == ["layers.0", "layers.3"]  # a list of indices
    assert select(deep_mlp, {"layers": "1-2"}) == ["layers.1", "layers.2"]  # an inclusive range
    assert select(deep_mlp, {"layers": 2}) == ["layers.2"]
    assert select(deep_mlp, {"layers": [0, "2-3"]}) == ["layers.0", "layers.2", "layers.3"]
    assert select(llama, {"layers": [1], "module": "*.k_proj"}) == [f"{L}.1.self_attn.k_proj"]
    # sites outside any numbered block have no layer index, so `layers` never selects them
    assert "lm_head" not in select(llama, {"layers": "0-9"})
    assert "model.embed_tokens" not in select(llama, {"layers": "0-9"})
    assert len(select(llama, {"layers": "0-9", "op": "linear"})) == 14


class Stack(nn.Module):
    """Blocks named ``stage0``..``stage2``: no layer index the default rule knows."""

    def __init__(self) -> None:
        super().__init__()
        for i in range(3):
            setattr(self, f"stage{i}", nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(torch.relu(self.stage1(torch.relu(self.stage0(x)))))


def test_layers_from_named_group():
    model, x = Stack().double().eval(), (torch.randn(2, 4, dtype=torch.float64),)
    named = r"re:stage(?P<layer>\d+)"
    e = peftfx.explain(model, fresh({"module": named, "layers": "1-2"}), x)
    assert e.matches("a") == ["stage1", "stage2"]
    # without the named group the paths carry no layer index
    e = peftfx.explain(model, fresh({"module": r"re:stage\d+", "layers": "1-2"}), x)
    assert e.matches("a") == []
    assert {r.reason for r in e.rows} == {"layers: 'stage0' has no layer index"} | {
        f"layers: 'stage{i}' has no layer index" for i in (1, 2)
    }


def test_named_group_that_is_not_a_number_does_not_match():
    """A ``layer`` group that captures something other than digits is no layer index; no crash, a reason."""
    model, x, _ = deep_mlp()
    with pytest.raises(peftfx.MatchError, match=r"adapters\.a\.at: selector matched 0 sites.*layer"):
        peftfx.compile(model, fresh({"module": r"re:(?P<layer>\w+)\.\d"}), x)


# -- exclude, weight -------------------------------------------------------------------------------------------


def test_exclude_always_wins():
    got = select(llama, {"op": "linear", "exclude": {"module": ["lm_head", "o_proj"]}})
    assert got == sorted(set(LLAMA_LINEARS) - {"lm_head", *both("self_attn.o_proj")})
    assert len(got) == 12
    # excluding everything the selector picks leaves nothing, whatever else holds
    assert select(llama, {"module": "*.q_proj", "exclude": {"op": "linear"}, "expect": "any"}) == []


def test_weight_predicates():
    # llama: q/o [32, 32], k/v [16, 32], gate/up [64, 32], down [32, 64], lm_head [64, 32], embed [64, 32]
    assert select(llama, {"weight": {"out_features": 16}}) == both("self_attn.k_proj", "self_attn.v_proj")
    assert select(llama, {"op": "linear", "weight": {"in_features": 64}}) == both("mlp.down_proj")
    assert select(llama, {"op": "linear", "weight": {"shape": [64, None]}}) == ["lm_head", *both(*MLP_PROJ[:2])]
    assert select(llama, {"weight": {"shape": [32, 32]}}) == both("self_attn.q_proj", "self_attn.o_proj")
    # an embedding's logical features: in = vocabulary (64), out = embedding dim (32)
    assert select(llama, {"op": "embedding", "weight": {"in_features": 64, "out_features": 32}}) == [
        "model.embed_tokens"
    ]
    assert select(llama, {"op": "linear", "weight": {"divisible_by": [None, 64]}}) == both("mlp.down_proj")
    assert len(select(llama, {"op": "linear", "weight": {"divisible_by": 32}})) == 11  # all 15 but k/v (16 rows)
    assert select(llama, {"weight": {"dtype": "float64"}, "expect": "any"}) == []
    assert len(select(llama, {"op": ["linear", "embedding"], "weight": {"dtype": ["float16", "float32"]}})) == 16
    # conv: conv1 [4, 3, 3, 3], conv2 [4, 4, 3, 3], head [5, 4]
    assert select(conv, {"weight": {"ndim": 4}}) == ["conv1", "conv2"]
    assert select(conv, {"weight": {"ndim": 2}}) == ["head"]
    assert select(conv, {"weight": {"shape": [None, 4, 3, 3]}}) == ["conv2"]
    assert select(conv, {"weight": {"shape": [4, None]}, "expect": "any"}) == []  # rank must agree too
    assert select(conv, {"weight": {"in_features": 3}}) == ["conv1"]
    assert select(deep_mlp, {"weight": {"dtype": "float64", "out_features": 4}}) == ["layers.3"]


def test_gpt2_conv1d_is_a_linear_with_logical_shape():
    """transformers' Conv1D stores its weight [in, out] and exports to addmm: still a `linear`, shaped [out, in]."""
    model, x = tiny_gpt2(), token_inputs()
    e = peftfx.explain(model, fresh({"op": "linear", "weight": {"out_features": 96, "in_features": 32}}), x)
    assert e.matches("a") == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    e = peftfx.explain(model, fresh({"op": "linear", "module_type": "Conv1D", "layers": 1, "expect": 4}), x)
    assert e.matches("a") == [f"transformer.h.1.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    e = peftfx.explain(model, fresh({"op": "layer_norm", "layers": "0-0", "expect": 2}), x)
    assert e.matches("a") == ["transformer.h.0.ln_1", "transformer.h.0.ln_2"]  # GPT-2's blocks are `h.N`


# -- graph context ---------------------------------------------------------------------------------------------


def test_feeds_and_fed_by_on_llama():
    assert select(llama, {"feeds": {"op": "silu"}}) == both("mlp.gate_proj")
    # v_proj reaches attention through view + transpose; o_proj reads it back through transpose + reshape
    assert select(llama, {"feeds": {"op": "scaled_dot_product_attention"}}) == both("self_attn.v_proj")
    assert select(llama, {"fed_by": {"op": "scaled_dot_product_attention"}}) == both("self_attn.o_proj")
    # down_proj reads silu(gate) * up, and up_proj feeds that product
    assert select(llama, {"feeds": {"op": "linear", "module": "*.down_proj"}, "expect": "any"}) == []
    assert select(llama, {"feeds": {"op": "mul", "feeds": {"module": "*.down_proj"}}}) == both("mlp.up_proj")
    assert select(llama, {"op": "linear", "fed_by": {"op": "placeholder"}, "expect": "any"}) == []
    assert select(llama, {"fed_by": {"op": "placeholder"}}) == ["model.embed_tokens"]


def test_feeds_and_fed_by_on_conv_and_mlp():
    assert select(conv, {"feeds": {"op": "relu"}}) == ["conv1"]
    assert select(conv, {"fed_by": {"op": "relu"}}) == ["conv2"]
    assert select(conv, {"feeds": {"op": "mean"}}) == ["conv2"]  # through flatten
    assert select(conv, {"fed_by": {"op": "mean"}}) == ["head"]
    assert select(deep_mlp, {"fed_by": {"op": "relu"}}) == ["layers.1", "layers.2", "layers.3"]
    assert select(deep_mlp, {"feeds": {"op": "output"}}) == ["layers.3"]
    # relu is not looked through: no linear directly feeds another
    assert select(deep_mlp, {"feeds": {"op": "linear"}, "expect": "any"}) == []


class ViewsAndCasts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(3, 2)
        self.c = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).to(torch.float32).contiguous()
        h = F.dropout(h, 0.1, training=self.training).reshape(-1, 3).float()
        return self.b(h).sum() + torch.tanh(self.c(x)).sum()


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_feeds_looks_through_views_casts_and_dropout(capture):
    model, x = ViewsAndCasts().eval(), (torch.randn(4, 6),)

    def matches(selector):
        return peftfx.explain(model, {**fresh({**selector, "expect": "any"}), "capture": capture}, x).matches("a")

    assert matches({"feeds": {"op": "linear"}}) == ["a"]
    assert matches({"feeds": {"module": "b"}}) == ["a"]
    assert matches({"fed_by": {"op": "linear", "module": "a"}}) == ["b"]
    assert matches({"fed_by": {"op": "linear"}}) == ["b"]
    assert matches({"feeds": {"op": "tanh"}}) == ["c"]


# -- combinators -----------------------------------------------------------------------------------------------


def test_any_of_all_of_not():
    assert select(llama, {"any_of": [{"module": "*.q_proj"}, {"module": "*.v_proj"}]}) == both(
        "self_attn.q_proj", "self_attn.v_proj"
    )
    assert select(llama, {"all_of": [{"op": "linear"}, {"layers": [1]}, {"module": "*.self_attn.*"}]}) == both(
        *QKVO, layers=[1]
    )
    assert select(llama, {"op": ["linear", "embedding"], "not": {"op": "linear"}}) == ["model.embed_tokens"]
    assert (
        select(llama, {"op": "linear", "not": {"any_of": [{"layers": "0-9"}, {"module": "lm_head"}]}, "expect": 0})
        == []
    )
    embedding_not_2d = {"all_of": [{"op": "embedding"}, {"not": {"weight": {"ndim": 2}}}]}
    nested = {"any_of": [{"all_of": [{"layers": 0}, {"module": ["down_proj"]}]}, embedding_not_2d]}
    assert select(llama, nested) == [f"{L}.0.mlp.down_proj"]  # the embedding is 2-d


# -- expect ----------------------------------------------------------------------------------------------------


def test_expect_counts():
    q = {"module": "*.q_proj"}
    assert len(select(llama, {**q, "expect": 2})) == 2
    assert len(select(llama, {**q, "expect": ">=2"})) == 2
    assert len(select(llama, {**q, "expect": "<=2"})) == 2
    assert len(select(llama, {**q, "expect": "1-3"})) == 2
    assert len(select(llama, {**q, "expect": "2"})) == 2
    for wrong, wanted in ((3, "exactly 3"), (">=3", "at least 3"), ("<=1", "0-1"), ("3-5", "3-5")):
        with pytest.raises(peftfx.MatchError, match=rf"adapters\.x\.at: selector matched 2 sites, expected {wanted}"):
            select(llama, {**q, "expect": wrong}, "adapters.x.at")


def test_expect_mismatch_through_compile_leaves_the_model_alone():
    model, x, _ = deep_mlp()
    with pytest.raises(peftfx.MatchError, match=r"adapters\.a\.at: selector matched 4 sites, expected exactly 3") as e:
        peftfx.compile(model, fresh({"op": "linear", "expect": 3}), x)
    assert isinstance(e.value, peftfx.PeftfxError) and isinstance(e.value, ValueError)
    # `expect: any` allows nothing to match: no adapter, the base graph
    gm = peftfx.compile(model, fresh({"op": "conv2d", "expect": "any"}), x)
    assert adapter_parameters(gm) == []
    assert torch.equal(run(gm, x), run(model, x))


def test_matching_nothing_names_the_field_and_the_reasons():
    model, x, _ = deep_mlp()
    with pytest.raises(peftfx.MatchError) as info:
        peftfx.compile(model, fresh({"op": "linear", "module": "*.q_proj"}), x)
    message = str(info.value)
    assert message.startswith("adapters.a.at: selector matched 0 sites, expected at least 1")
    assert "module: 'layers.0' does not match glob '*.q_proj'" in message


# -- explain ---------------------------------------------------------------------------------------------------


def test_explain_gives_the_first_failing_predicate():
    model, x, gm = llama()
    spec = fresh({"op": "linear", "module": "*.q_proj", "layers": [1], "weight": {"out_features": 32}})
    e = peftfx.explain(model, spec, x)
    assert isinstance(e, peftfx.Explanation)
    rows = {r.module: r for r in e.rows}
    assert [r.module for r in e.rows] == [site.module for site in find_sites(gm)]  # one row per site
    assert len(e.rows) >= 16 and {r.adapter for r in e.rows} == {"a"}
    assert e.matches("a") == [f"{L}.1.self_attn.q_proj"]
    assert rows[f"{L}.1.self_attn.q_proj"].matched and rows[f"{L}.1.self_attn.q_proj"].reason == "matched"
    # predicates are tried in order: op, module, layers, weight
    assert rows["model.embed_tokens"].reason == "op: 'embedding' is not 'linear'"
    assert rows[f"{L}.0.self_attn.q_proj"].reason == "layers: layer 0 is not in [1]"
    assert rows[f"{L}.1.self_attn.k_proj"].reason.startswith("module: 'model.layers.1.self_attn.k_proj' does not")
    assert rows["lm_head"].reason == "module: 'lm_head' does not match glob '*.q_proj'"
    assert rows[f"{L}.1.self_attn.q_proj"].layer == 1 and rows["lm_head"].layer is None
    assert rows["model.embed_tokens"].op == "embedding"
    text = str(e)
    assert "match" in text and "no: layers: layer 0 is not in [1]" in text
    assert e.to_dict()[0]["module"] == "model.embed_tokens"


def test_explain_reasons_for_combinators_and_context():
    model, x, _ = conv()
    spec = {
        "adapters": {
            "ctx": {"type": "lora", "at": {"feeds": {"op": "relu"}}},
            "alt": {"type": "lora", "at": {"any_of": [{"op": "conv1d"}, {"module": "head"}]}},
            "neg": {"type": "lora", "at": {"op": "conv2d", "not": {"module": "conv1"}, "exclude": {"layers": 0}}},
            "all": {"type": "lora", "at": {"all_of": [{"op": "conv2d"}, {"weight": {"in_features": 4}}]}},
        }
    }
    e = peftfx.explain(model, spec, x)
    reason = {(r.adapter, r.module): r.reason for r in e.rows}
    assert e.matches("ctx") == ["conv1"] and reason["ctx", "conv2"] == "feeds: no consumer matches"
    assert e.matches("alt") == ["head"]
    assert (
        reason["alt", "conv1"] == "any_of: none holds (op: 'conv2d' is not 'conv1d'; module: 'conv1' does not "
        "match glob 'head')"
    )
    assert e.matches("neg") == ["conv2"] and reason["neg", "conv1"] == "not: the negated selector holds"
    assert reason["neg", "head"] == "op: 'linear' is not 'conv2d'"
    assert e.matches("all") == ["conv2"] and reason["all", "conv1"] == "all_of[1].weight: in_features 3 is not 4"


def test_explain_does_not_raise_on_no_match_nor_rewrite():
    model, x, _ = deep_mlp()
    e = peftfx.explain(model, fresh({"op": "conv2d"}), x)
    assert e.matches("a") == [] and len(e.rows) == 4
    assert all(r.reason == "op: 'linear' is not 'conv2d'" for r in e.rows)
    assert not any(n.startswith("peftfx") for n, _ in model.named_parameters())


def test_explain_selector_agrees_with_compile():
    model, x, _ = deep_mlp()
    spec = fresh({"fed_by": {"op": "relu"}, "exclude": {"layers": 2}}, **{"with": {"r": 2}})
    assert peftfx.explain(model, spec, x).matches("a") == ["layers.1", "layers.3"]
    assert set(adapted_sites(peftfx.compile(model, spec, x))) == {"layers__1", "layers__3"}


# -- parameter values per site ---------------------------------------------------------------------------------


def test_scalar_value_everywhere():
    model, x, _ = deep_mlp()
    gm = peftfx.compile(model, fresh({"op": "linear"}, **{"with": {"r": 3}}), x)
    assert {k: v["lora_A"][0] for k, v in adapted_sites(gm).items()} == {f"layers__{i}": 3 for i in range(4)}


def test_rank_gradient_over_layers_shapes_the_tensors():
    model, x, _ = deep_mlp()
    gm = peftfx.compile(model, fresh({"op": "linear"}, **{"with": {"r": {"gradient": [2, 8]}}}), x)
    sites = adapted_sites(gm)
    assert {k: v["lora_A"] for k, v in sites.items()} == {
        "layers__0": (2, 6),
        "layers__1": (4, 8),
        "layers__2": (6, 8),
        "layers__3": (8, 8),
    }
    assert sites["layers__2"]["lora_B"] == (8, 6)
    # a three-point gradient, over the selected layers only (1..3): 4 at layer 1, 1 at 2, 7 at 3
    gm = peftfx.compile(model, fresh({"layers": "1-3"}, **{"with": {"r": {"gradient": [4, 1, 7]}}}), x)
    assert {k: v["lora_A"][0] for k, v in adapted_sites(gm).items()} == {"layers__1": 4, "layers__2": 1, "layers__3": 7}
    # a one-point gradient is a constant
    gm = peftfx.compile(model, fresh({"layers": [0, 3]}, **{"with": {"r": {"gradient": [5]}}}), x)
    assert {k: v["lora_A"][0] for k, v in adapted_sites(gm).items()} == {"layers__0": 5, "layers__3": 5}


def test_alpha_gradient_sets_the_scaling():
    """alpha 1 → 4 over four layers, r=1, init false: each layer's delta scales as its alpha."""
    model, x, _ = deep_mlp()
    grad = fresh({"op": "linear"}, **{"with": {"r": 1, "alpha": {"gradient": [1, 4]}, "init": False}, "seed": 3})
    flat = fresh({"op": "linear"}, **{"with": {"r": 1, "alpha": 1, "init": False}, "seed": 3})
    records = {r.module: r.hyper["scaling"] for r in peftfx.compile(model, grad, x).meta["peftfx"]["records"]}
    assert records == {"layers.0": 1.0, "layers.1": 2.0, "layers.2": 3.0, "layers.3": 4.0}
    # same seed, same tensors: the outputs differ only through the scaling
    assert not torch.allclose(run(peftfx.compile(model, grad, x), x), run(peftfx.compile(model, flat, x), x))


def test_cases_first_match_wins_with_default():
    model, x, _ = deep_mlp()
    r = {
        "cases": [
            {"when": {"layers": 0}, "value": 6},
            {"when": {"module": ["layers.1", "layers.0"]}, "value": 4},
            {"when": {"weight": {"out_features": 4}}, "value": {"gradient": [1, 3]}},
            {"value": 2},
        ]
    }
    gm = peftfx.compile(model, fresh({"op": "linear"}, **{"with": {"r": r}}), x)
    ranks = {k: v["lora_A"][0] for k, v in adapted_sites(gm).items()}
    # layers.3 takes the gradient's value at its place in the selected span (layers 0..3): its end
    assert ranks == {"layers__0": 6, "layers__1": 4, "layers__2": 2, "layers__3": 3}


def test_value_errors_name_the_field():
    model, x, _ = deep_mlp()
    no_default = {"cases": [{"when": {"layers": 0}, "value": 2}]}
    with pytest.raises(peftfx.SpecError, match=r"adapters\.a\.with\.r: no case matches linear layers\.1"):
        peftfx.compile(model, fresh({"op": "linear"}, **{"with": {"r": no_default}}), x)
    # a gradient that reaches r=0 at some layer fails validation there, naming the site
    with pytest.raises(peftfx.SpecError, match=r"adapters\.a\.with\.r: .*greater than 0.*layers\.0"):
        peftfx.compile(model, fresh({"op": "linear"}, **{"with": {"r": {"gradient": [0, 4]}}}), x)
    stack, xs = Stack(), (torch.randn(2, 4),)
    with pytest.raises(peftfx.SpecError, match=r"adapters\.a\.with\.alpha: a gradient needs a layer index"):
        peftfx.compile(stack, fresh({"op": "linear"}, **{"with": {"alpha": {"gradient": [1, 2]}}}), xs)


def test_gradient_over_named_group_layers():
    model, x = Stack(), (torch.randn(2, 4),)
    spec = fresh({"module": r"re:stage(?P<layer>\d+)"}, **{"with": {"r": {"gradient": [2, 6]}}})
    ranks = {k: v["lora_A"][0] for k, v in adapted_sites(peftfx.compile(model, spec, x)).items()}
    assert ranks == {"stage0": 2, "stage1": 4, "stage2": 6}
