"""The C epilogue of exact merges (``peftfx/_round.c``) gives torch's ops' bits, entry for entry, and is built
wherever a C compiler is: without it the fast path would go untested and unnoticed."""

from __future__ import annotations

import math
import shutil
import sys
import sysconfig
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftfx import rounding
from peftfx.rounding import add_low_rank

native = pytest.mark.skipif(rounding._round is None, reason="peftfx._round not built (no C compiler)")


def test_the_extension_is_built_where_a_c_compiler_is():
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler})")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        pytest.skip("no Python headers (a python3-dev package)")
    assert rounding._round is not None, "a C compiler is here but peftfx._round was not built: reinstall the package"


def _merge(weight, left, right, s, *, inplace, fused, monkeypatch):
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(rounding, "_round", None)
        out = weight.clone() if inplace else torch.empty_like(weight)
        add_low_rank(out, out if inplace else weight, left, right, s)
    return out


@pytest.fixture(params=["float32", "float64"])
def product(request, monkeypatch):
    """Which product a bfloat16 weight's C pass takes: float32 (its factors are float32 values) or float64."""
    if request.param == "float64":
        monkeypatch.setattr(rounding._Job, "factors32", property(lambda job: None))
    return request.param


def _case(dtype, rows, cols, k, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    weight[0, :5] = torch.tensor([1e-40, -3e-39, 0.0, -0.0, 2.0**-130])  # subnormal and zero weights
    weight = weight.to(dtype)
    left = torch.randn(rows, k, generator=generator) * 0.3
    right = torch.randn(k, cols, generator=generator) * 0.05
    left[: rows // 2] = left[: rows // 2].bfloat16().float()  # coarse rows and columns: exact ties
    right[:, : cols // 2] = right[:, : cols // 2].bfloat16().float()
    return weight, left, right


def _bits(t):
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "cols", "k", "s"), [(70, 129, 8, 2.0), (9, 64, 16, -0.37), (33, 7, 1, 0.5)])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_epilogue_gives_torch_ops_bits(dtype, rows, cols, k, s, inplace, product, monkeypatch):
    """Random merges at odd widths (groups of 64 cut at row ends and at a block's end), blocks of a few rows,
    into a new tensor and into the weight; the doubtful entries' settling is shared, so every entry must agree."""
    monkeypatch.setattr(rounding, "BLOCK_BYTES", 8 * cols * 5)
    weight, left, right = _case(dtype, rows, cols, k, seed=rows + cols)
    fused = _merge(weight, left, right, s, inplace=inplace, fused=True, monkeypatch=monkeypatch)
    plain = _merge(weight, left, right, s, inplace=inplace, fused=False, monkeypatch=monkeypatch)
    assert torch.equal(_bits(fused), _bits(plain))


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_epilogue_on_non_finite_and_overflowing_entries(dtype, product, monkeypatch):
    """NaN and infinite weights, and sums past the dtype's largest value, come out as torch's ops write them (a NaN
    as a NaN: torch's own conversions disagree on its bits, 0x7FC0 one at a time, 0xFFFF vectorised)."""
    weight, left, right = _case(dtype, 4, 70, 4, seed=3)
    big = torch.finfo(dtype).max
    weight[1, :6] = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), big, -big]).to(dtype)
    left[1] = 4.0
    right[:, 4:6] = torch.tensor([[1.0, -1.0]] * 4) * big / 2  # 8 big over and under: infinite
    fused = _merge(weight, left, right, 1.0, inplace=False, fused=True, monkeypatch=monkeypatch)
    plain = _merge(weight, left, right, 1.0, inplace=False, fused=False, monkeypatch=monkeypatch)
    assert fused[1, 4].item() == float("inf") and fused[1, 5].item() == -float("inf")
    assert bool(fused[1, :2].isnan().all()) and bool(plain[1, :2].isnan().all())
    if dtype == torch.bfloat16:  # the C pass writes one NaN, whichever product runs
        assert _bits(fused[1, :2]).tolist() == [0x7FC0, 0x7FC0]
    fused[1, :2] = plain[1, :2] = 0
    assert torch.equal(_bits(fused), _bits(plain))


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_epilogue_against_rationals_at_a_real_width(dtype, product, monkeypatch):
    """A 256 x 4096 weight, r = 16, coarse factors: against rational arithmetic at every entry torch's ops find in
    doubt (exact ties, nearly all: the C pass proves them exact and rounds them to even itself, so no more go to
    rationals than torch's settling sends there: none for bfloat16, the subnormal weights' few for float32), 400 of
    them and 400 others drawn at random (all 1 M would take minutes in Python)."""
    weight, left, right = _case(dtype, 256, 4096, 16, seed=4)
    doubtful, left_over, rational = [], [], {True: 0, False: 0}
    settle, fraction = rounding._Job.settle, rounding.round_fraction

    def recording(job, flat, value, w):
        (left_over if rounding._round else doubtful).append(flat.clone())
        settle(job, flat, value, w)

    def counting(*args):
        rational[rounding._round is not None] += 1
        return fraction(*args)

    monkeypatch.setattr(rounding._Job, "settle", recording)
    monkeypatch.setattr(rounding, "round_fraction", counting)
    plain = _merge(weight, left, right, 2.0, inplace=False, fused=False, monkeypatch=monkeypatch)
    out = _merge(weight, left, right, 2.0, inplace=False, fused=True, monkeypatch=monkeypatch)
    assert torch.equal(_bits(out), _bits(plain))
    assert len(doubtful[0]) > 10 and len(left_over[0]) < len(doubtful[0]) / 10
    assert rational[True] == rational[False] == (0 if dtype == torch.bfloat16 else len(left_over[0])) < 10
    generator = torch.Generator().manual_seed(5)
    some = doubtful[0][torch.randperm(len(doubtful[0]), generator=generator)[:400]]
    for flat in torch.cat([some, torch.randint(0, weight.numel(), (400,), generator=generator)]).tolist():
        i, j = divmod(flat, 4096)
        dot = sum(Fraction(left[i, c].item()) * Fraction(right[c, j].item()) for c in range(16))
        assert out[i, j].item() == fraction(Fraction(weight[i, j].item()) + 2 * dot, dtype), (i, j)


@native
def test_the_fused_pass_lets_other_threads_run():
    """It releases the GIL: the out-of-core merge writes the last tensor on a second thread while this one merges.
    With a switch interval longer than the test, a held GIL would let no line of this thread run during the pass."""
    n = 1 << 22
    generator = torch.Generator().manual_seed(6)
    result, weight = torch.randn(n, dtype=torch.float64, generator=generator), torch.randn(n, generator=generator)
    out, weights = torch.empty(n), torch.empty(n)
    index, value = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float64)
    test = rounding._Grid(torch.float32, 1e-15, 1.0).test(torch.float64)

    def merge(span: list, started: threading.Event) -> None:
        started.set()
        start = time.perf_counter()
        rounding._round.round_block(
            result.data_ptr(), weight.data_ptr(), out.data_ptr(), n, True, *test,
            index.data_ptr(), value.data_ptr(), weights.data_ptr(),
        )  # fmt: skip
        span.append((start, time.perf_counter()))

    def ran_beside() -> bool:
        span, started, ticks = [], threading.Event(), []
        thread = threading.Thread(target=merge, args=(span, started))
        thread.start()
        started.wait()
        while thread.is_alive():
            ticks.append(time.perf_counter())
            time.sleep(0)  # hands the GIL over when the thread wants it back
        thread.join()
        ((start, stop),) = span
        return any(start < t < stop for t in ticks)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:  # a few tries: on a loaded machine this thread may find no core free during one pass (a held GIL: none)
        assert any(ran_beside() for _ in range(5)), "no other thread ran during a fused pass"
    finally:
        sys.setswitchinterval(interval)
    assert torch.equal(out, (result + weight.double()).float())


@native
def test_on_several_torch_threads_torch_ops_run_the_epilogue(monkeypatch):
    """OpenMP's idle threads would spin beside the serial pass (twice its time on two cores): torch's ops run there,
    with the same bits."""
    weight, left, right = _case(torch.bfloat16, 40, 96, 4, seed=7)
    one = _merge(weight, left, right, 2.0, inplace=False, fused=True, monkeypatch=monkeypatch)
    monkeypatch.setattr(rounding._Job, "_run_fused", lambda *a: pytest.fail("the fused pass ran on two threads"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = _merge(weight, left, right, 2.0, inplace=False, fused=True, monkeypatch=monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_bits(one), _bits(two))


@pytest.mark.parametrize("fused", [False, True])
def test_an_interval_reaching_a_neighbouring_middle_is_not_settled(fused):
    """Just above a power of two, the middle below lies a quarter ulp away: an error bound past that leaves the
    entry to exact arithmetic, though the middle above is farther still (torch's settling and the C pass alike)."""
    if fused and rounding._round is None:
        pytest.skip("peftfx._round not built (no C compiler)")
    ulp = 2.0**-23  # float32's at 1
    value = torch.tensor([1.0 + ulp / 8, 1.0 + ulp / 8], dtype=torch.float64)
    tolerance = torch.tensor([0.3 * ulp, 0.2 * ulp], dtype=torch.float64)  # reaches 1 - ulp/4, or not
    if not fused:
        rounded, settled = rounding._Grid(torch.float32, 1e-15, 1.0).settle(value, tolerance)
        assert settled.tolist() == [False, True] and rounded[1].item() == 1.0
        return
    out = torch.zeros(2)
    index, weights = torch.tensor([0, 1]), torch.zeros(2)
    left_max, right_sum, none = torch.zeros(1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 0
    for tol, left in ((0.3, 2), (0.2, 0)):  # bound * |value| is the tolerance where the delta's size is 0
        values = value.clone()  # held: the pass reads and reorders it
        n = rounding._round.settle_block(
            out.data_ptr(), True, 2, 2, index.data_ptr(), values.data_ptr(), weights.data_ptr(),
            left_max.data_ptr(), right_sum.data_ptr(), none, none, 0, 0, tol * ulp / value[0].item(), False,
        )  # fmt: skip
        assert n == left
    assert out.tolist() == [1.0, 1.0]  # settled by the smaller bound


def _rational(weight, left, right, s, i, j):
    dot = sum(Fraction(left[i, c].item()) * Fraction(right[c, j].item()) for c in range(left.shape[1]))
    return rounding.round_fraction(Fraction(weight[i, j].item()) + Fraction(s) * dot, torch.bfloat16)


def _spy(monkeypatch):
    """The weights merged from a float32 product."""
    calls, real = [], rounding._Job._run_from32
    monkeypatch.setattr(rounding._Job, "_run_from32", lambda job, step: calls.append(job) or real(job, step))
    return calls


@native
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("inplace", [False, True])
def test_an_entry_the_float32_product_cannot_decide_is_recomputed(sign, inplace, monkeypatch):
    """1 + 2^-8 - 2^-40 rounds down to 1 in bfloat16, but its float32 product rounds to the tie 2^-8 and the tie
    up to even (1 + 2^-7): the error bound must flag it for float64. A row beside it that float32 decides."""
    calls = _spy(monkeypatch)
    weight = torch.tensor([[1.0, 1.0], [0.5, 0.5]]).mul(sign).bfloat16()
    left = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).mul(sign)
    right = torch.tensor([[2.0**-8, 2.0**-9], [-(2.0**-40), 2.0**-41]])
    out = _merge(weight, left, right, 1.0, inplace=inplace, fused=True, monkeypatch=monkeypatch)
    assert calls, "the float32 product did not run"
    expected = [[_rational(weight, left, right, 1.0, i, j) for j in range(2)] for i in range(2)]
    assert out.float().tolist() == expected
    assert out[0, 0].item() == sign * 1.0  # the float32 value, rounded, would be 1 + 2^-7


@native
@pytest.mark.parametrize(
    ("rows", "cols", "k", "s", "scale", "cancel", "flush"),
    [
        (6, 77, 3, 2.0, 1.0, None, False),
        (5, 64, 16, -0.3, 1e-3, None, False),
        (12, 200, 32, 1 / 3, 1e3, None, False),
        (4, 33, 16, 2.0, 2.0**-118, None, False),
        (4, 33, 16, 2.0, 2.0**-118, None, True),
        (8, 130, 16, 2.0, 1.0, "pairs", False),
        (8, 256, 32, 1.0, 1.0, "halves", False),
    ],
)
def test_the_float32_product_against_rationals_at_every_entry(rows, cols, k, s, scale, cancel, flush, monkeypatch):
    """Every entry against rational arithmetic: deltas as large as the weights, odd widths, a scaling float32
    cannot hold (1/3), large and near-underflow magnitudes (where float32's product and the bound's floor decide
    nothing and float64 does), and terms that cancel to a thousandth of their sizes (where the product's error bound,
    not float32's roundings after it, decides which entries float64 recomputes): in pairs, or in halves, the first
    half's terms all near 1 and the second's their negatives, whose partial sums grow to half the terms' total, so
    float32's error reaches a few units of it (a bound k times too small, from the largest terms alone, let 4 of
    these 2048 entries through misrounded); once with subnormals flushed to zero (``torch.set_flush_denormal``), as a
    process may run."""
    calls = _spy(monkeypatch)
    generator = torch.Generator().manual_seed(rows * cols + k)
    weight = (torch.randn(rows, cols, generator=generator) * 0.05 * scale).bfloat16()
    left = torch.randn(rows, k, generator=generator) * 0.3 * math.sqrt(scale)
    right = torch.randn(k, cols, generator=generator) * 0.1 * math.sqrt(scale)
    if cancel == "pairs":
        left[:, 1::2] = left[:, ::2]
        right[1::2] = -right[::2] * (1 + 1e-3 * torch.randn(k // 2, cols, generator=generator))
        right *= 30
    if cancel == "halves":
        h = k // 2
        left = 1 + 0.01 * torch.rand(rows, k, generator=generator)
        left[:, h:] = left[:, :h]
        right = 1 + 0.01 * torch.rand(k, cols, generator=generator)
        right[h:] = -right[:h] * (1 + 1e-3 * torch.randn(h, cols, generator=generator))
    monkeypatch.setattr(rounding, "BLOCK_BYTES", 8 * cols * 2)
    if flush and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        out = _merge(weight, left, right, s, inplace=False, fused=True, monkeypatch=monkeypatch)
        assert rounding._flushing() == flush  # the merge turned flushing off for itself alone
    finally:
        torch.set_flush_denormal(False)
    assert calls, "the float32 product did not run"
    for i in range(rows):
        for j in range(cols):
            assert out[i, j].item() == _rational(weight, left, right, s, i, j), (i, j)


@native
def test_factors_float32_cannot_hold_or_a_reduced_precision_product_take_float64(monkeypatch):
    """Factors with float64 bits past float32's, a rank past ``_RANK32``, or torch allowed to multiply float32 in
    bfloat16 or TF32 (where its error bound would not hold): the float64 product runs, with the same exact bits."""
    weight, left, right = _case(torch.bfloat16, 20, 70, 8, seed=8)
    wide = left.double() + 2.0**-40
    calls = _spy(monkeypatch)
    exact = _merge(weight, wide, right, 2.0, inplace=False, fused=False, monkeypatch=monkeypatch)
    assert torch.equal(
        _bits(_merge(weight, wide, right, 2.0, inplace=False, fused=True, monkeypatch=monkeypatch)), _bits(exact)
    )
    assert not calls
    weight, wide_left, wide_right = _case(torch.bfloat16, 20, 70, rounding._RANK32 + 1, seed=9)
    exact = _merge(weight, wide_left, wide_right, 2.0, inplace=False, fused=False, monkeypatch=monkeypatch)
    fused = _merge(weight, wide_left, wide_right, 2.0, inplace=False, fused=True, monkeypatch=monkeypatch)
    assert torch.equal(_bits(fused), _bits(exact)) and not calls
    weight, left, right = _case(torch.bfloat16, 20, 70, 8, seed=8)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        reduced = _merge(weight, left, right, 2.0, inplace=False, fused=True, monkeypatch=monkeypatch)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert not calls
    assert torch.equal(
        _bits(reduced), _bits(_merge(weight, left, right, 2.0, inplace=False, fused=False, monkeypatch=monkeypatch))
    )


@pytest.mark.parametrize("fused", [False, True])
def test_a_float64_sum_one_bit_too_wide_is_not_proven_exact(fused, monkeypatch):
    """1 + 2^-8 + 2^-53 needs 54 bits: float64 rounds it to the bfloat16 tie 1 + 2^-8 (to even), which would round
    to 1, but the exact value lies above the tie: 1 + 2^-7. The terms' lowest bit (2^-53) and their top (2^1) are
    54 bits apart, one too many for the proof that float64 computed the sum exactly: rational arithmetic decides."""
    if fused and rounding._round is None:
        pytest.skip("peftfx._round not built (no C compiler)")
    n = 2 * rounding._FEW  # past the few sent to rational arithmetic at once: the proof runs
    weight = torch.ones(1, n).bfloat16()
    left, right = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0**-8] * n, [2.0**-53, 2.0**-52] * (n // 2)])
    out = _merge(weight, left, right, 1.0, inplace=False, fused=fused, monkeypatch=monkeypatch)
    assert out.float().tolist() == [[1.0 + 2.0**-7] * n]  # the second kind is exact in float64: above the tie


@native
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 80), st.integers(1, rounding._RANK32)),
    exponents=st.tuples(st.integers(-135, 127), st.integers(-80, 64), st.integers(-80, 64)),
    s=st.sampled_from([2.0, -0.5, 1 / 3, 3 / 32, -1e-3]),
    inplace=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_bfloat16_merge_is_exactly_rounded(shape, exponents, s, inplace, seed, product, monkeypatch):
    """Drawn shapes, scalings and magnitudes, from the subnormal weights to sums past bfloat16's largest value
    (infinite, as IEEE rounds them), through both products: every entry is the rational value rounded once."""
    (rows, cols, k), (w_exp, l_exp, r_exp) = shape, exponents
    generator = torch.Generator().manual_seed(seed)

    def draw(*size, exponent):
        return (torch.rand(*size, generator=generator) * 2 - 1) * 2.0**exponent

    weight, left, right = (
        draw(rows, cols, exponent=w_exp).bfloat16(),
        draw(rows, k, exponent=l_exp),
        draw(k, cols, exponent=r_exp),
    )
    monkeypatch.setattr(rounding, "BLOCK_BYTES", 8 * cols * 2)
    out = _merge(weight, left, right, s, inplace=inplace, fused=True, monkeypatch=monkeypatch)
    for i in range(rows):
        for j in range(cols):
            assert out[i, j].item() == _rational(weight, left, right, s, i, j), (i, j)
