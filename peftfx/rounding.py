"""Exactly rounded low-rank merges: ``W + s · L @ R``, rounded once from the exact value, one block at a time.

A merge computed in float64 and rounded to a narrower dtype (float32, bfloat16, float16) is the exactly rounded
result except where the exact value lies within float64's error of a rounding boundary. That error is bounded:
each entry is a ``k``-term dot product, scaled, plus ``W``, so (Higham, any summation order, fused or
not) ``|computed - exact| <= gamma(k+2) · (|W| + |s| Σ|L||R|)``, ``gamma(n) = n u / (1 - n u)``, ``u = 2^-53``; it is
over-estimated (twice over) by ``2 gamma(k+2) (|r| + 2 |s| max|L_i·| Σ|R_·j|)``. Where the two ends of that interval
round to the same value, so does the exact value (rounding is monotonic); the rare entries whose interval
straddles a boundary are recomputed in rational arithmetic. Blocks of rows keep the float64 temporaries small
(in cache) and let ``out`` be ``W`` itself: each block is read whole before it is written.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import torch

BLOCK_BYTES = 1 << 20  # float64 bytes of one block's result: small enough to stay in cache
_U = 2.0**-53


def add_low_rank(out: torch.Tensor, weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, s: float) -> None:
    """``out = round(weight + s · left @ right)`` exactly rounded to ``out``'s dtype; 2-D, ``out`` may be ``weight``.

    ``left`` is ``[rows, k]``, ``right`` ``[k, cols]`` (any float dtype; taken exactly, in float64). Blocks run on
    ``torch.get_num_threads()`` threads: each op on a block is too small for torch's own threads to split.
    """
    rows, cols = weight.shape
    left, right = left.double(), right.double()
    step = max(1, BLOCK_BYTES // (8 * max(cols, 1)))
    job = _Job(out, weight, left, right, s)
    starts = range(0, rows, step)
    threads = min(torch.get_num_threads(), len(starts))
    if threads <= 1:
        job.run(starts, step)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: job.run(starts[i::threads], step), range(threads)))


class _Job:
    """One weight's merge; ``run`` does some of its blocks with buffers of its own."""

    def __init__(self, out: torch.Tensor, weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, s: float):
        self.out, self.weight, self.left, self.right, self.s = out, weight, left, right, s
        self.exact = out.dtype != torch.float64  # a float64 weight is as exact as float64 makes it
        k = left.shape[1]
        self.bound = 2 * _gamma(k + 2)
        self.left_max = left.abs().amax(1) if k else left.new_zeros(left.shape[0])
        self.right_sum = right.abs().sum(0)
        self.most = 2 * abs(s) * float(self.left_max.max()) * float(self.right_sum.max()) if left.numel() else 0.0

    def run(self, starts: range, step: int) -> None:
        rows, cols = self.weight.shape
        shape = (min(step, rows), cols)
        buffers = [torch.empty(shape, dtype=torch.float64) for _ in range(2)]
        buffers += [torch.empty(shape, dtype=self.out.dtype) for _ in range(2)]
        for start in starts:
            stop = min(start + step, rows)
            block, scratch, low, high = (b[: stop - start] for b in buffers)
            block.copy_(self.weight[start:stop])
            block.addmm_(self.left[start:stop], self.right, alpha=self.s)
            if self.exact:
                self._round(block, scratch, low, high, start)
            self.out[start:stop].copy_(block)

    def _round(self, block: torch.Tensor, scratch: torch.Tensor, low: torch.Tensor, high: torch.Tensor, start: int):
        """Entries whose rounding the float64 error could change are set to their exactly rounded value (exact in
        float64 too, so the final copy keeps it). A bound for the whole block first, then per entry where it fails."""
        dtype = self.out.dtype
        least, most = torch.aminmax(block)
        largest = max(-float(least), float(most))
        if not math.isfinite(largest):  # NaN and inf stay what float64 made them; the rest is bounded as usual
            largest = float(torch.where(block.isfinite(), block, 0).abs().max())
        slack = self.bound * (largest + self.most)
        low.copy_(torch.sub(block, slack, out=scratch))
        high.copy_(torch.add(block, slack, out=scratch))
        if torch.equal(low, high):
            return
        for i, j in ((low != high) & block.isfinite()).nonzero().tolist():
            value = block[i, j].item()
            tol = self.bound * (abs(value) + 2 * abs(self.s) * float(self.left_max[start + i] * self.right_sum[j]))
            ends = torch.tensor([value - tol, value + tol], dtype=torch.float64).to(dtype).tolist()
            if ends[0] != ends[1]:
                w = Fraction(self.weight[start + i, j].item())
                row, col = self.left[start + i].tolist(), self.right[:, j].tolist()
                dot = sum(Fraction(a) * Fraction(b) for a, b in zip(row, col, strict=True))
                block[i, j] = round_fraction(w + Fraction(self.s) * dot, dtype)


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


def round_fraction(x: Fraction, dtype: torch.dtype) -> float:
    """``x`` rounded to the nearest ``dtype`` value, ties to even (IEEE's default), as a Python float."""
    info = torch.finfo(dtype)
    digits = 2 - math.frexp(info.eps)[1]  # significand bits, the implicit one included (eps = 2^(1 - digits))
    if x == 0:
        return 0.0
    sign, a = (-1 if x < 0 else 1), abs(x)
    exponent = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** exponent > a:
        exponent -= 1  # now 2**exponent <= a < 2**(exponent + 1)
    min_exponent = math.frexp(info.tiny)[1] - 1
    quantum = Fraction(2) ** (max(exponent, min_exponent) - digits + 1)  # subnormals share the smallest one
    n, rest = divmod(a / quantum, 1)
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2 == 1):
        n += 1
    value = n * quantum
    return sign * (math.inf if value > info.max else float(value))
