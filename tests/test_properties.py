"""Property tests: for random small models and LoRA-family settings, merged == unmerged in float64.

Each example builds a random MLP / conv net / embedding model, puts fresh adapters on it from a spec, moves every
adapter tensor off its initial value, and compares the live graph with the same graph folded by the ``merge``
pass, and with ``merge: true`` compiled from the same seed.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from oracle import adapter_parameters, perturb
from peftfx.passes import Cleanup, Merge, run_passes
from torch import nn

import peftfx
import peftfx.adapters

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# float64 throughout: both sides compute the same sums in a different order, so they agree to ~1e-15 relative
RTOL = 1e-10

ranks = st.integers(1, 5)
alphas = st.one_of(st.floats(0.25, 16.0), st.floats(-8.0, -0.25))  # negative alphas flip the delta: also exact


@st.composite
def lora_params(draw, bias_ok: bool = True) -> dict:
    dora = draw(st.booleans())
    params = {"r": draw(ranks), "alpha": draw(alphas), "rslora": draw(st.booleans()), "dora": dora}
    if bias_ok and not dora:
        params["lora_bias"] = draw(st.booleans())
    params["init"] = draw(st.sampled_from([True, False, "gaussian"]))
    return params


def check(model: nn.Module, x: tuple, adapters: dict, seed: int) -> None:
    """Perturbed live graph == the merge pass on it; ``merge: true`` on the seed == the live graph of the seed."""
    model = model.double().eval()
    spec = {"adapters": adapters}
    with torch.no_grad():
        base = model(*x)
    base_nodes = len(peftfx.compile(model, {}, x).graph.nodes)

    gm = peftfx.compile(model, spec, x)
    assert adapter_parameters(gm)
    perturb(gm, scale=0.5, seed=seed)  # every adapter tensor random and non-zero, as after training
    with torch.no_grad():
        live = gm(*x)
        merged_gm = run_passes(copy.deepcopy(gm), [Merge(list(adapters)), Cleanup()])
        merged = merged_gm(*x)
    assert torch.isfinite(live).all()
    # a drawn net whose output is identically zero (a ReLU that kills every unit) cannot show any adapter
    assume(base.abs().max() > 1e-9 or live.abs().max() > 1e-9)
    assert not torch.allclose(live, base, rtol=1e-6, atol=1e-9), "the perturbed adapters must change the output"
    assert adapter_parameters(merged_gm) == []
    assert len(merged_gm.graph.nodes) == base_nodes
    scale = live.abs().max().item() + 1.0
    torch.testing.assert_close(merged, live, rtol=RTOL, atol=RTOL * scale)

    # the declarative path: the same seeded creation, folded at compile time
    with torch.no_grad():
        fresh = peftfx.compile(model, spec, x)(*x)
        folded_gm = peftfx.compile(model, {**spec, "merge": True}, x)
        folded = folded_gm(*x)
    assert adapter_parameters(folded_gm) == []
    torch.testing.assert_close(folded, fresh, rtol=RTOL, atol=RTOL * (fresh.abs().max().item() + 1.0))


def adapter(kind_params: dict, selector: dict, seed: int) -> dict:
    params = dict(kind_params)
    kind = "dora" if params.pop("dora") else "lora"
    return {"type": kind, "at": selector, "with": params, "seed": seed}


# -- MLPs ------------------------------------------------------------------------------------------------------


class RandomMLP(nn.Module):
    def __init__(self, sizes: list[int], bias: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in itertools.pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    bias=st.booleans(),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    first=lora_params(),
    second=st.one_of(st.none(), lora_params()),
    seed=st.integers(0, 2**16),
)
def test_mlp_merged_equals_unmerged(sizes, bias, lead, first, second, seed):
    torch.manual_seed(seed)
    model = RandomMLP(sizes, bias)
    x = (torch.randn(*lead, sizes[0], dtype=torch.float64),)
    if first.get("lora_bias") and not bias:
        first["lora_bias"] = False  # PEFT's lora_bias needs a base bias to fold into
    adapters = {"a": adapter(first, {"op": "linear"}, seed)}
    if second is not None:  # a second adapter stacked on some of the same sites
        second.pop("lora_bias", None)
        adapters["b"] = adapter(second, {"op": "linear", "layers": [0]}, seed + 1)
    check(model, x, adapters, seed)


# -- conv nets -------------------------------------------------------------------------------------------------

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_layer(draw, dims: int, in_ch: int) -> dict:
    kernel = draw(st.integers(1, 3))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    return {
        "in_channels": in_ch,
        "out_channels": draw(st.integers(1, 4)),
        "kernel_size": kernel,
        "stride": draw(st.integers(1, 2)),
        "padding": draw(st.integers(0 if padding_mode == "zeros" else 1, 2)),
        "dilation": draw(st.integers(1, 2)),
        "padding_mode": padding_mode,
        "bias": draw(st.booleans()),
    }


def out_size(size: int, c: dict) -> int:
    return (size + 2 * c["padding"] - c["dilation"] * (c["kernel_size"] - 1) - 1) // c["stride"] + 1


@SETTINGS
@given(data=st.data(), dims=st.sampled_from([1, 2, 2, 3]), seed=st.integers(0, 2**16))
def test_conv_merged_equals_unmerged(data, dims, seed):
    """conv → tanh → grouped conv (not adapted: LoRA refuses groups) → tanh → conv; the two plain convs adapted."""
    in_ch = data.draw(st.integers(1, 3), "in_channels")
    first = data.draw(conv_layer(dims, in_ch), "first")
    groups = data.draw(st.sampled_from([1, 2]), "groups")
    mid = first["out_channels"] * groups
    first["out_channels"] = mid
    grouped = {"in_channels": mid, "out_channels": mid, "kernel_size": 1, "groups": groups}
    last = data.draw(conv_layer(dims, mid), "last")
    size = data.draw(st.integers(3 if dims == 3 else 4, 5 if dims == 3 else 9), "size")
    inner = size
    for c in (first, last):
        assume(c["padding_mode"] == "zeros" or c["padding"] < inner)  # reflect padding needs pad < input size
        inner = out_size(inner, c)
        assume(inner >= 1)
    torch.manual_seed(seed)
    model = nn.Sequential(
        CONV[dims](**first), nn.Tanh(), CONV[dims](**grouped), nn.Tanh(), CONV[dims](**last), nn.Flatten()
    )
    x = (torch.randn(2, in_ch, *[size] * dims, dtype=torch.float64),)
    params = data.draw(lora_params(), "params")
    if params.get("lora_bias") and not (first["bias"] and last["bias"]):
        params["lora_bias"] = False
    conv = f"conv{dims}d"
    check(model, x, {"a": adapter(params, {"op": conv, "module": ["0", "4"], "expect": 2}, seed)}, seed)


@SETTINGS
@given(
    dims=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**16),
)
def test_lora_on_a_grouped_conv_merges_exactly(dims, groups, seed):
    """A grouped conv takes a LoRA whose rank the groups divide, live as PEFT and merged into a dense conv."""
    torch.manual_seed(seed)
    model = nn.Sequential(CONV[dims](groups * 2, groups * 2, 3, groups=groups, padding=1), nn.Tanh())
    x = (torch.randn(2, groups * 2, *[4] * dims, dtype=torch.float64),)
    at = {"op": f"conv{dims}d"}
    check(model, x, {"a": {"type": "lora", "at": at, "with": {"r": groups * 2}, "seed": seed}}, seed)
    indivisible = {"adapters": {"a": {"type": "lora", "at": at, "with": {"r": groups + 1}, "seed": seed}}}
    with pytest.raises(peftfx.SpecError, match="not divisible"):
        peftfx.compile(model, indivisible, x)


# -- embeddings ------------------------------------------------------------------------------------------------


class EmbedHead(nn.Module):
    def __init__(self, vocab: int, dim: int, out: int, padding_idx: int | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.head = nn.Linear(dim, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


@SETTINGS
@given(
    vocab=st.integers(2, 12),
    dim=st.integers(1, 6),
    out=st.integers(1, 4),
    padded=st.booleans(),
    params=lora_params(bias_ok=False),
    head=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_embedding_merged_equals_unmerged(vocab, dim, out, padded, params, head, seed):
    torch.manual_seed(seed)
    model = EmbedHead(vocab, dim, out, 0 if padded else None)
    ids = (torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(seed)),)
    selector = {"op": ["embedding", "linear"] if head else "embedding"}
    check(model, ids, {"a": adapter(params, selector, seed)}, seed)


def test_dora_after_lora_bias_merged_equals_unmerged():
    """Live, DoRA scales the earlier adapter's bias shift too; merged, that shift is already in the bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double().eval()
    x = (torch.randn(4, 3, dtype=torch.float64),)
    adapters = {
        "a": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 1, "lora_bias": True}, "seed": 0},
        "b": {"type": "dora", "at": {"op": "linear"}, "with": {"r": 1}, "seed": 1},
    }
    check(model, x, adapters, seed=0)


# -- any mergeable kind, on the sites a random selector picks --------------------------------------------------

# kinds that merge into a linear's weight and accept a tiny one (rank 1 where they have a rank)
MERGEABLE = ["lora", "dora", "loha", "lokr", "ia3", "hira", "vera", "delora", "miss", "glora", "hra", "beft", "c3a"]


@st.composite
def site_selectors(draw, depth: int) -> dict:
    """A selector over ``layers.0`` .. ``layers.{depth-1}``: by path, by index, by regex, or all but some."""
    chosen = draw(st.lists(st.integers(0, depth - 1), min_size=1, max_size=depth, unique=True))
    form = draw(st.sampled_from(["module", "layers", "regex", "exclude"]))
    if form == "module":
        return {"module": [f"layers.{i}" for i in chosen]}
    if form == "layers":
        return {"op": "linear", "layers": chosen}
    if form == "regex":
        return {"module": "re:layers\\.(" + "|".join(map(str, chosen)) + ")"}
    return {"op": "linear", "exclude": {"layers": chosen}}


@SETTINGS
@given(data=st.data(), sizes=st.lists(st.integers(2, 8), min_size=2, max_size=4), seed=st.integers(0, 2**16))
def test_any_kind_on_any_selection_merged_equals_unmerged(data, sizes, seed):
    torch.manual_seed(seed)
    model = RandomMLP(sizes, bias=True)
    x = (torch.randn(2, sizes[0], dtype=torch.float64),)
    kind = data.draw(st.sampled_from(MERGEABLE), "kind")
    fields = peftfx.adapters.KINDS[kind].Params.model_fields
    params = {"r": 1} if "r" in fields else {}
    if kind == "c3a":
        params["block_size"] = 1  # must divide both dims
    selector = data.draw(site_selectors(len(sizes) - 1), "selector")
    assume(selector.get("exclude") is None or len(selector["exclude"]["layers"]) < len(sizes) - 1)
    check(model, x, {"a": {"type": kind, "at": selector, "with": params, "seed": seed}}, seed)


def test_merge_pass_on_a_compiled_graph_with_shared_tensors():
    """Regression (found by the test above): VeRA's projections are one get_attr for every site once cleanup has
    run, so merging the first site must leave the node the others still read."""
    torch.manual_seed(0)
    model = RandomMLP([2, 2, 2, 2], bias=True)
    x = (torch.randn(2, 2, dtype=torch.float64),)
    check(model, x, {"a": {"type": "vera", "at": {"module": ["layers.1", "layers.2"]}, "with": {"r": 1}}}, seed=0)
