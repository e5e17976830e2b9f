"""``compile(..., inplace=True)`` writes the merge into the model's own weights, with the default's bits; LoRA
merges are exactly rounded (one rounding from the exact value), even where float64 alone rounds wrong."""

from __future__ import annotations

import copy
import tempfile
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from models import tiny_llama, token_inputs

import peftfx
from peftfx import rounding
from peftfx.rounding import add_low_rank, round_fraction

KINDS = {
    "lora": {"type": "lora", "with": {"r": 4, "init": False}},
    "dora": {"type": "dora", "with": {"r": 4, "init": False}},
    "loha": {"type": "loha", "with": {"r": 2, "init_weights": False}},
}


@pytest.mark.parametrize(
    ("kinds", "dtype"),
    [
        (["lora"], torch.float32),
        (["lora"], torch.bfloat16),
        (["dora"], torch.float32),
        (["loha", "lora"], torch.bfloat16),
    ],
)
def test_inplace_merge_equals_the_default_bit_for_bit(kinds, dtype):
    at = {"op": "linear", "exclude": {"module": "lm_head"}}
    spec = {
        "adapters": {k: {**KINDS[k], "at": at, "seed": i} for i, k in enumerate(kinds)},  # two kinds share sites
        "merge": True,
    }
    model, inputs = tiny_llama(dtype=dtype), token_inputs()
    before = copy.deepcopy(model.state_dict())
    default = peftfx.compile(model, spec, inputs)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())  # the default leaves it be
    storage = model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    inplace = peftfx.compile(model, spec, inputs, inplace=True)
    for key, tensor in default.state_dict().items():
        assert torch.equal(inplace.state_dict()[key], tensor), key
    q = inplace.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert q.data_ptr() == storage  # written into the model's own tensor, not a copy
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)
    assert not torch.equal(q, before["model.layers.0.self_attn.q_proj.weight"])
    with torch.no_grad():
        assert torch.equal(inplace(**inputs).logits, default(**inputs).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_tie_float64_misses_is_rounded_exactly(dtype):
    """``1 + m + tiny``, ``m`` half an ulp of ``dtype`` at 1: float64 drops ``tiny`` and rounds the tie to even
    (1); the exact value is above the tie, so it rounds up."""
    half_ulp = torch.finfo(dtype).eps / 2
    weight = torch.ones(1, 4, dtype=dtype)
    left = torch.tensor([[1.0, 1.0]], dtype=torch.float32)
    right = torch.tensor([[half_ulp] * 3 + [3 * half_ulp], [2.0**-70, -(2.0**-70), 0.0, 0.0]], dtype=torch.float32)
    naive = (weight.double() + left.double() @ right.double()).to(dtype)
    assert naive.tolist()[0][:3] == [1.0, 1.0, 1.0]
    out = torch.empty_like(weight)
    add_low_rank(out, weight, left, right, 1.0)
    # above the tie, below it, exactly the tie (to the even neighbour: 1), the tie between 1 + ulp and 1 + 2 ulp
    assert out.tolist() == [[1.0 + 2 * half_ulp, 1.0, 1.0, 1.0 + 4 * half_ulp]]


def test_round_fraction_is_ieee_rounding():
    values = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values = torch.cat(
        [
            values * 1e-3,
            values * 1e30,
            values * 1e-40,
            torch.tensor([1e300, -0.0, 65504.0, 65520.0], dtype=torch.float64),
        ]
    )
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        expected = values.to(dtype).double().tolist()
        assert [round_fraction(Fraction(v), dtype) for v in values.tolist()] == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("cols", "inplace"), [(64, False), (63, True)])
def test_every_entry_is_the_exactly_rounded_value(dtype, cols, inplace, monkeypatch):
    """Against rational arithmetic, entry by entry: fine factors and coarse ones (bfloat16-valued, as trained in
    mixed precision: exact ties), zero rows, blocks of a few rows, on two torch threads, into a new tensor or into
    the weight itself (the doubtful entries are settled after every block is written)."""
    monkeypatch.setattr(rounding, "BLOCK_BYTES", 8 * 64 * 5)  # five rows a block
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(24, cols, generator=generator) * 0.05).to(dtype)
    left = torch.randn(24, 3, generator=generator) * 0.3
    right = torch.randn(3, cols, generator=generator) * 0.05
    left[:12] = left[:12].bfloat16().float()  # coarse rows
    right[:, :32] = right[:, :32].bfloat16().float()
    left[5] = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = weight.clone() if inplace else torch.empty_like(weight)
        add_low_rank(out, out if inplace else weight, left, right, 2.0)
    finally:
        torch.set_num_threads(threads)
    for i in range(24):
        for j in range(cols):
            dot = sum(Fraction(left[i, c].item()) * Fraction(right[c, j].item()) for c in range(3))
            assert out[i, j].item() == round_fraction(Fraction(weight[i, j].item()) + 2 * dot, dtype), (i, j)


def test_lowest_bit_is_the_largest_power_of_two_dividing_each_entry():
    """Against rationals: normals, powers of two, subnormals, negatives, the extremes; zeros impose nothing."""
    generator = torch.Generator().manual_seed(2)
    values = torch.cat(
        [
            torch.randn(200, dtype=torch.float64, generator=generator) * 1e-3,
            torch.randn(50, generator=generator).bfloat16().double(),  # coarse: low bits clear
            torch.tensor(
                [1.0, -0.5, 2.0**-1022, 2.0**-1074, 3 * 2.0**-1074, 2.0**-1060, 1.5 * 2.0**1023, -96.0],
                dtype=torch.float64,
            ),
        ]
    )
    assert bool(values.ne(0).all())
    expected = []
    for v in values.tolist():
        x, n = abs(Fraction(v)), -1074
        while (x / Fraction(2) ** (n + 1)).denominator == 1:
            n += 1
        expected.append(n)
    assert rounding._lowest_bit(values).tolist() == expected
    assert rounding._lowest_bit(torch.tensor([0.0, -0.0], dtype=torch.float64)).tolist() == [1 << 20] * 2


def test_coarse_factors_ties_are_settled_without_rationals(monkeypatch):
    """bfloat16-valued factors (mixed-precision training) put float64 exactly on ties, one entry in a few thousand:
    their exactness is proven from the factors' lowest bits, so none goes to rational arithmetic."""
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(256, 512, generator=generator) * 0.02).bfloat16()
    left = (torch.randn(256, 16, generator=generator) * 0.05).bfloat16().float()
    right = (torch.randn(16, 512, generator=generator) * 0.05).bfloat16().float()
    doubtful = []
    settle = rounding._Job.settle

    def counting(job, flat, value, weight):
        doubtful.append(flat.clone())
        settle(job, flat, value, weight)

    monkeypatch.setattr(rounding._Job, "settle", counting)
    monkeypatch.setattr(rounding, "round_fraction", lambda *a: pytest.fail("a tie went to rational arithmetic"))
    monkeypatch.setattr(rounding, "_round", None)  # torch's ops; the C pass settles them itself (test_rounding_native)
    out = torch.empty_like(weight)
    add_low_rank(out, weight, left, right, 2.0)
    (flat,) = doubtful
    assert len(flat) > 5  # ties were there to settle
    for n in flat.tolist():
        i, j = divmod(n, 512)
        dot = sum(Fraction(left[i, c].item()) * Fraction(right[c, j].item()) for c in range(16))
        assert out[i, j].item() == round_fraction(Fraction(weight[i, j].item()) + 2 * dot, torch.bfloat16), (i, j)


def test_an_inplace_merge_refused_for_a_nan_leaves_the_model_untouched():
    """The NaN sits at the last site merged: every adapter is checked before the model's first weight is written."""
    lora = {**KINDS["lora"], "at": {"op": "linear", "exclude": {"module": "lm_head"}}, "seed": 0}
    model, inputs = tiny_llama(), token_inputs()
    good = peftfx.compile(model, {"adapters": {"a": lora}}, inputs)  # live: the tensors, to poison one and save
    last = [n for n, _ in good.named_parameters() if n.startswith("peftfx.")][-1]
    with torch.no_grad():
        good.get_parameter(last).view(-1)[0] = float("nan")
    folder = peftfx.save_adapter(good, "a", Path(tempfile.mkdtemp()) / "a")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(peftfx.MergeError, match="NaN or inf"):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(folder)}}, "merge": True}, inputs, inplace=True)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_dyadic_splits_every_finite_float_exactly():
    """``_round_exactly`` sums integers scaled by powers of two: each float must split into exactly that."""
    generator = torch.Generator().manual_seed(4)
    values = torch.randn(300, dtype=torch.float64, generator=generator) * torch.pow(
        10.0, torch.randint(-300, 300, (300,)).double()
    )
    extremes = [0.0, -0.0, 5e-324, -(2.0**-1022), 1.7976931348623157e308, 1.0, -3.0, 2.0**-149]
    for x in [*values.tolist(), *extremes]:
        m, e = rounding._dyadic(x)
        assert Fraction(m) * Fraction(2) ** e == Fraction(x), x
