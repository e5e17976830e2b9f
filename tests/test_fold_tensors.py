"""The merge algebra without graphs: properties (hypothesis), PEFT's merge_utils as oracle, DARE statistics."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from peftfx.fold.tensors import (
    TASK_MERGES,
    cat_factors,
    exact_low_rank,
    linear_factors,
    merge_tasks,
    svd_factors,
    trim_task,
)

FAST = settings(max_examples=25, deadline=None)
weights_st = st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=1, max_size=4)


def tasks_for(n: int, seed: int, shape=(6, 5)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def factors_for(n: int, seed: int, m=7, k=6, r=3):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, k, generator=g, dtype=torch.float64) for _ in range(n)]
    Bs = [torch.randn(m, r, generator=g, dtype=torch.float64) for _ in range(n)]
    return As, Bs


@FAST
@given(weights_st, weights_st, st.floats(-2, 2), st.integers(0, 2**16))
def test_linear_fold_is_linear_in_the_weights(w1, w2, c, seed):
    n = min(len(w1), len(w2))
    w1, w2 = w1[:n], w2[:n]
    tasks = tasks_for(n, seed)
    mixed = [a + c * b for a, b in zip(w1, w2, strict=True)]
    expected = merge_tasks(tasks, w1) + c * merge_tasks(tasks, w2)
    torch.testing.assert_close(merge_tasks(tasks, mixed), expected)
    # the exact low-rank folds are linear in the weights too (as products)
    As, Bs = factors_for(n, seed)
    for fold in (lambda w: cat_factors(As, Bs, w, [1.0] * n), lambda w: exact_low_rank(As, Bs, w)):
        (A1, B1), (A2, B2), (A, B) = fold(w1), fold(w2), fold(mixed)
        torch.testing.assert_close(B @ A, B1 @ A1 + c * (B2 @ A2))


@FAST
@given(weights_st, st.integers(0, 2**16), st.sampled_from(["total", "frequency"]))
def test_density_one_reduces_to_the_unpruned_forms(weights, seed, sign):
    tasks = tasks_for(len(weights), seed)
    plain = merge_tasks(tasks, weights)
    for name in ("magnitude_prune", "dare_linear"):
        torch.testing.assert_close(TASK_MERGES[name](tasks, weights, density=1.0), plain)
    elected = merge_tasks(tasks, weights, elect=sign)  # TIES without the trim
    for name in ("ties", "dare_ties"):
        torch.testing.assert_close(TASK_MERGES[name](tasks, weights, density=1.0, majority_sign=sign), elected)


@FAST
@given(st.integers(0, 2**16), st.sampled_from(sorted(TASK_MERGES)), st.floats(0.1, 4))
def test_one_adapter_with_weight_one_is_that_adapter(seed, name, s):
    (task,) = tasks_for(1, seed)
    torch.testing.assert_close(TASK_MERGES[name]([task], [1.0], density=1.0), task)
    As, Bs = factors_for(1, seed)
    delta = s * Bs[0] @ As[0]
    for A, B in (
        linear_factors(As, Bs, [1.0], [s]),
        cat_factors(As, Bs, [1.0], [s]),
        exact_low_rank(As, Bs, [s], rank=3),
        svd_factors(delta, rank=3),
    ):
        torch.testing.assert_close(B @ A, delta)


@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_same_numbers_as_peft_merge_utils(density, sign):
    tasks = [t.float() for t in tasks_for(3, 7)]
    w = torch.tensor([0.7, -1.2, 0.4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {
            "task_arithmetic": merge_utils.task_arithmetic(tasks, w),
            "magnitude_prune": merge_utils.magnitude_prune(tasks, w, density),
            "ties": merge_utils.ties(tasks, w, density, sign),
        }
        if density == 1.0:  # nothing dropped: the random methods are deterministic
            expected["dare_linear"] = merge_utils.dare_linear(tasks, w, density)
            expected["dare_ties"] = merge_utils.dare_ties(tasks, w, density, sign)
    for name, value in expected.items():
        got = TASK_MERGES[name](tasks, w.tolist(), density=density, majority_sign=sign)
        torch.testing.assert_close(got, value, rtol=0, atol=0, msg=name)


def test_dare_keeps_density_and_expectation():
    """Bernoulli(density) keep mask, rescaled by 1/density: the kept fraction is the density, the mean is kept."""
    task = torch.randn(200, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([trim_task(task, 0.3, "random", g) for _ in range(400)])
    kept = (draws != 0).double().mean().item()
    assert abs(kept - 0.3) < 0.005, kept  # 8e6 Bernoulli draws: std 1.6e-4
    # the mean over draws is the task: per entry std = |t| sqrt(0.7/0.3/400) ≈ 0.076 |t|
    err = (draws.mean(0) - task).abs() / task.abs().clamp(min=1e-3)
    assert err.mean().item() < 0.08
    # every kept entry is the task's entry rescaled by 1/density
    nonzero = draws != 0
    torch.testing.assert_close(draws[nonzero], (task / 0.3).expand_as(draws)[nonzero])


def test_dare_is_deterministic_under_a_generator():
    (task,) = tasks_for(1, 3)
    a = trim_task(task, 0.5, "random", torch.Generator().manual_seed(5))
    b = trim_task(task, 0.5, "random", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_magnitude_trim_keeps_the_largest():
    task = torch.tensor([[0.1, -3.0, 0.5], [2.0, -0.2, 0.05]])
    assert torch.equal(trim_task(task, 0.5, "magnitude"), torch.tensor([[0.0, -3.0, 0.5], [2.0, 0.0, 0.0]]))


def test_ties_is_a_mean_over_agreeing_entries():
    """PEFT's quirk, kept: with weights [2, 2], entries 1 and 2 merge to 3, not 6."""
    got = merge_tasks([torch.tensor([1.0, -1.0]), torch.tensor([2.0, 3.0])], [2.0, 2.0], elect="total")
    assert torch.equal(got, torch.tensor([3.0, 6.0]))


def test_svd_factors_truncate_clamp_and_pad():
    delta = tasks_for(1, 9, shape=(8, 6))[0]
    A, B = svd_factors(delta, rank=6)
    torch.testing.assert_close(B @ A, delta)
    A, B = svd_factors(delta, rank=9)  # more than min(m, n): zero-padded
    assert A.shape == (9, 6) and B.shape == (8, 9)
    torch.testing.assert_close(B @ A, delta)
    A, B = svd_factors(delta, rank=3, clamp=0.9)
    hi = torch.quantile(torch.cat([svd_factors(delta, 3)[1].flatten(), svd_factors(delta, 3)[0].flatten()]), 0.9)
    assert A.abs().max() <= hi + 1e-12 and B.abs().max() <= hi + 1e-12


def test_exact_low_rank_truncation_is_the_best_approximation():
    As, Bs = factors_for(3, 4)
    coefs = [0.5, -1.0, 2.0]
    dense = sum(c * B @ A for c, A, B in zip(coefs, As, Bs, strict=True))
    A, B = exact_low_rank(As, Bs, coefs, rank=4)
    A2, B2 = svd_factors(dense, rank=4)
    torch.testing.assert_close(B @ A, B2 @ A2)


def test_bad_arguments():
    (task,) = tasks_for(1, 0)
    with pytest.raises(ValueError, match="density"):
        trim_task(task, None, "magnitude")
    with pytest.raises(ValueError, match=">= 0"):
        trim_task(task, -0.1, "random")
    with pytest.raises(ValueError, match="weights"):
        merge_tasks([task], [1.0, 2.0])
    As, Bs = factors_for(1, 0)
    with pytest.raises(ValueError, match="equal ranks"):
        linear_factors([As[0], As[0][:2]], [Bs[0], Bs[0][:, :2]], [1, 1], [1, 1])
