"""Exactly rounded low-rank merges: ``W + s · L @ R``, rounded once from the exact value, one block at a time.

A merge computed in float64 and rounded to a narrower dtype (float32, bfloat16, float16) is the exactly rounded
result except where the exact value lies within float64's error of a rounding boundary. That error is bounded:
each entry is a ``k``-term dot product, scaled, plus ``W``, so (Higham, any summation order, fused or
not) ``|computed - exact| <= gamma(k+2) · (|W| + |s| Σ|L||R|)``, ``gamma(n) = n u / (1 - n u)``, ``u = 2^-53``; it is
over-estimated (twice over) by ``2 gamma(k+2) (|r| + 2 |s| max|L_i·| Σ|R_·j|)``. Where the two ends of that interval
round to the same value, so does the exact value (rounding is monotonic); the rare entries whose interval
straddles a boundary are recomputed in rational arithmetic. Blocks of rows keep the float64 temporaries small
(in cache) and let ``out`` be ``W`` itself: each block is read whole before it is written.

Where the package's C extension is built (``peftfx/_round.c``), a bfloat16 or float32 weight's block is the product
alone, and one pass adds the weight, rounds, and lists the entries in doubt; torch's ops do the same in a dozen
passes otherwise (float16, other devices, several torch threads, a build without a C compiler). A bfloat16 weight
with float32 factors (as adapters are saved) takes a float32 product there, half a float64 one's cost: its error is
bounded per entry too (``gamma(k)`` with float32's ``u``, against bfloat16's 8 bits), and the few entries in a
thousand that bound leaves undecided are recomputed in float64 by the same pass. The result is the same: exactly
rounded.
"""

from __future__ import annotations

import functools
import math
import threading
from fractions import Fraction

import torch

try:
    from . import _round
except ImportError:  # built without a C compiler: torch's ops run the epilogue
    _round = None

BLOCK_BYTES = 1 << 22  # float64 bytes of one block's result: in cache, and few enough blocks for the per-block work
_U = 2.0**-53
_GROUP = 64  # entries a minimum is taken over, in the search for doubtful ones
_RANK32 = 32  # the largest rank merged from a float32 product (``_Job.factors32``)
_FEW = 16  # doubtful entries of a weight settled one by one in rational arithmetic (~30 us each)


def add_low_rank(out: torch.Tensor, weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, s: float) -> None:
    """``out = round(weight + s · left @ right)`` exactly rounded to ``out``'s dtype; 2-D, ``out`` may be ``weight``.

    ``left`` is ``[rows, k]``, ``right`` ``[k, cols]`` (any float dtype; taken exactly, in float64). The blocks
    run one after another, each op on ``torch.get_num_threads()`` threads (a block is large enough to split: blocks
    on threads of our own would each run torch's threads too, more threads than cores).
    """
    flushing = _flushing()
    if flushing:  # subnormals read as zero would change the factors and the weight themselves
        torch.set_flush_denormal(False)
    try:
        job = _Job(out, weight, left.double(), right.double(), s)
        job.settle(*job.run(max(1, BLOCK_BYTES // (8 * max(weight.shape[1], 1)))))
    finally:
        if flushing:
            torch.set_flush_denormal(True)


def _flushing() -> bool:
    """Whether this thread flushes subnormals to zero (``torch.set_flush_denormal``, or a library built with fast
    math): the float32 conversion of 2^-140 then gives zero."""
    return torch.tensor(2.0**-140, dtype=torch.float32).item() == 0.0


class _Job:
    """One weight's merge; ``run`` does its blocks, ``settle`` their doubtful entries all at once (a few dozen a
    block: settled block by block, their few ops each would cost more than the block's own)."""

    def __init__(self, out: torch.Tensor, weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, s: float):
        self.out, self.weight, self.left, self.right, self.s = out, weight, left, right, s
        self.exact = out.dtype != torch.float64  # a float64 weight is as exact as float64 makes it
        k = left.shape[1]
        self.bound = 2 * _gamma(k + 2)
        self.left_max = left.abs().amax(1) if k else left.new_zeros(left.shape[0])
        self.right_sum = right.abs().sum(0)
        self.most = 2 * abs(s) * float(self.left_max.max()) * float(self.right_sum.max()) if left.numel() else 0.0
        if self.exact:
            self.grid = _Grid(out.dtype, self.bound, self.most)
            mantissa, exponent = math.frexp(s)
            self.log2_s = exponent - 1 if mantissa in (0.5, -0.5) else None  # s·x is exact for a power of two

    def run(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the float64 results rounded by torch, ``step`` rows at a time; return the entries in doubt: (flat
        index, float64 result, weight), the weight read before its block is written (``out`` may be it)."""
        if self._fused():
            return self._run_fused(step)
        rows, cols = self.weight.shape
        shape = (min(step, rows), cols)
        r = _buffer("result", shape, torch.float64)
        narrow = _buffer("image", shape, torch.float32) if self.exact and self.grid.via32 else None
        if self.exact:
            width = torch.int64 if narrow is None else torch.int32
            scratch, other = _buffer("scratch", shape, width), _buffer("other", shape, width)
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            block = r[: stop - start]
            block.copy_(self.weight[start:stop])
            block.addmm_(self.left[start:stop], self.right, alpha=self.s)
            image = block if narrow is None else narrow[: stop - start].copy_(block)  # (b)float16: via float32
            if self.exact:
                n = stop - start
                where = _negative(self.grid.doubtful(image, scratch[:n], other[:n]))
                if len(where):
                    found.append(
                        (where + start * cols, block.view(-1)[where], self.weight[start:stop].reshape(-1)[where])
                    )
            self.out[start:stop].copy_(image)
        return _joined(found, self.weight.dtype)

    def _fused(self) -> bool:
        """Whether the C epilogue applies: a bfloat16 or float32 weight rounded to its own dtype, in rows in memory,
        on one torch thread. On more, each block's product is a parallel region, after which OpenMP's idle threads
        spin for milliseconds, while the (serial) pass runs beside them: it took twice as long on two cores as on
        one. torch's ops, each split over the threads, keep them busy."""
        w, out = self.weight, self.out
        return (
            _round is not None
            and torch.get_num_threads() == 1
            and out.dtype == w.dtype in (torch.bfloat16, torch.float32)
            and out.device.type == w.device.type == "cpu"
            and w.is_contiguous()
            and out.is_contiguous()
        )

    def _run_fused(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``run`` with the C epilogue: each block the product alone (``addmm`` ignores the block when beta is 0), then
        one pass that adds the weight, writes the rounding and lists the entries in doubt."""
        if self.weight.dtype == torch.bfloat16 and self.factors32 is not None:
            return self._run_from32(2 * step)
        rows, cols = self.weight.shape
        shape = (min(step, rows), cols)
        r = _buffer("result", shape, torch.float64)
        lists = _Doubtful(self, shape[0] * cols)
        wide = self.weight.dtype == torch.float32
        test = self.grid.test(torch.float64 if wide else torch.float32)
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            block = r[: stop - start]
            torch.addmm(block, self.left[start:stop], self.right, beta=0, alpha=self.s, out=block)
            n = _round.round_block(
                block.data_ptr(), self.weight[start].data_ptr(), self.out[start].data_ptr(), block.numel(), wide,
                *test, *lists.pointers,
            )  # fmt: skip
            lists.settle(start, n)
        return lists.joined()

    def _run_from32(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``run`` for a bfloat16 weight from a float32 product (twice float64's lanes): its error, bounded per entry,
        decides all but a few in a thousand entries' rounding; the C pass recomputes those in float64."""
        rows, cols = self.weight.shape
        left, right, columns = self.factors32
        shape = (min(step, rows), cols)
        p = _buffer("product", shape, torch.float32)
        lists = _Doubtful(self, shape[0] * cols)
        k = left.shape[1]
        # the product's bound, gamma(k) Σ|L_iq R_qj| <= gamma(k) |L_i·| |R_·j| (Cauchy-Schwarz; from max|L_i·| Σ|R_·j|
        # instead, 0.66-0.90% of the benchmark adapter's entries were in doubt, against 0.48-0.67%), with float32's
        # roundings after it (and the norms' own, below 2^-40); underflow, flushed or not, costs 2^-126 an op
        slack = (_gamma(k, 2.0**-24) + 2.0**-22) * (1 + 2.0**-20) * (1 + 2.0**-40)
        coef = _up32(abs(self.s) * slack * self.left.norm(dim=1))
        right_norm = _up32(self.right.square().sum(0).sqrt_() * (1 + 2.0**-40))  # norm(dim=0): 15x the time
        floor = (abs(self.s) * (k + 2) + 6) * 2.0**-126
        test = self.grid.test(torch.float32)
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            block = p[: stop - start]
            torch.mm(left[start:stop], right, out=block)
            n = _round.round_from32(
                block.data_ptr(), self.weight[start].data_ptr(), self.out[start].data_ptr(), stop - start, cols, k,
                self.s, floor, coef[start].data_ptr(), right_norm.data_ptr(), left[start].data_ptr(),
                columns.data_ptr(), *test, *lists.pointers,
            )  # fmt: skip
            lists.settle(start, n)
        return lists.joined()

    @functools.cached_property
    def factors32(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The factors in float32, where they are float32 values, torch's float32 products are IEEE's (no
        reduced-precision mode: the error bound is float32's), and the rank is at most ``_RANK32``: the entries in
        doubt grow with it, and each costs a ``k``-term recomputation (at r = 64, deltas the size of the weights,
        the float32 product took 4.9 ns an entry against float64's 3.6; at r = 32, 2.0 against 2.3)."""
        mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
        if (
            self.left.shape[1] > _RANK32
            or torch.get_float32_matmul_precision() != "highest"
            or getattr(mkldnn, "fp32_precision", "none") not in ("none", "ieee")
        ):
            return None
        left, right = self.left.float(), self.right.float()
        if not (torch.equal(left.double(), self.left) and torch.equal(right.double(), self.right)):
            return None
        return left.contiguous(), right.contiguous(), right.t().contiguous()  # the columns: for the C pass

    @functools.cached_property
    def factors64(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float64 factors as the C settling reads their lowest bits: the rows of ``left``, the columns of
        ``right`` (a column's ``k`` terms together)."""
        return self.left.contiguous(), self.right.t().contiguous()

    @functools.cached_property
    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The error bound's terms: ``2|s| max|L_i·|`` per row and ``Σ|R_·j|`` per column (float64); an entry's
        delta is at most their product."""
        return (2 * abs(self.s) * self.left_max).contiguous(), self.right_sum.contiguous()

    @functools.cached_property
    def lowest_bits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors' lowest bits (int64) for ``_exact``'s proof: per row, over its own contiguous dimension
        (``min``: ``amin`` is slower), with ``s``'s power of two; per column. Zeros, rows of them too, impose
        nothing."""
        rows, k = self.left.shape
        if not k:
            return torch.full((rows,), 1 << 20, dtype=torch.int64), torch.zeros(self.right.shape[1], dtype=torch.int64)
        low = _lowest_bit(self.left).min(1).values + self.log2_s, _lowest_bit(self.right).min(0).values
        return low[0].contiguous(), low[1].contiguous()

    def settle(self, flat: torch.Tensor, value: torch.Tensor, weight: torch.Tensor) -> None:
        """Set the entries whose rounding is in doubt to their exactly rounded value. Doubt, cheaply: an entry
        whose float64 (or float32 image's) bits lie near the middle between two ``dtype`` values, or that is small
        beside the largest delta (cancellation); each is then settled with its own error bound, and the few that
        bound cannot settle in rational arithmetic. A few entries (what the C pass leaves) go there at once: the
        bound's few dozen vectorised ops would cost more."""
        if not len(flat):
            return
        cols = self.weight.shape[1]
        if len(flat) <= _FEW:
            for n, v, w in zip(flat.tolist(), value.tolist(), weight.tolist(), strict=True):
                if math.isfinite(v):  # else as computed: a NaN or an infinity among the terms
                    self._round_exactly(*divmod(n, cols), w)
            return
        i, j = flat // cols, flat % cols
        size = self.bounds[0][i] * self.bounds[1][j]
        tol = self.bound * (value.abs() + size)
        rounded, settled = self.grid.settle(value, tol)
        if self.log2_s is not None and not bool(settled.all()):  # the rest may be exact: coarse factors' ties
            rest = (~settled).nonzero().flatten()
            exact = self._exact(i[rest], j[rest], weight[rest], size[rest])
            rounded[rest], settled[rest] = self.grid.settle(value[rest], tol[rest].masked_fill(exact, 0.0))
        self.out[i[settled], j[settled]] = rounded[settled].to(self.out.dtype)  # a dtype value: exact in any type
        for n in (~settled & value.isfinite()).nonzero().flatten().tolist():
            self._round_exactly(int(i[n]), int(j[n]), weight[n].item())

    def _round_exactly(self, row: int, col: int, weight: float) -> None:
        """One entry from its exact value: every float is an integer times a power of two, so the terms are summed
        as integers over the smallest power (one rational at the end, not one per term)."""
        terms = [_dyadic(weight)]
        scale, shift = _dyadic(self.s)
        for a, b in zip(self.left[row].tolist(), self.right[:, col].tolist(), strict=True):
            (m, e), (n, f) = _dyadic(a), _dyadic(b)
            terms.append((scale * m * n, shift + e + f))
        low = min(e for _, e in terms)
        total = sum(m << (e - low) for m, e in terms)
        exact = Fraction(total * 2**low) if low >= 0 else Fraction(total, 2**-low)
        self.out[row, col] = round_fraction(exact, self.out.dtype)

    def _exact(self, i: torch.Tensor, j: torch.Tensor, weight: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """Which entries float64 computed exactly (no error to bound): every term of an entry is a multiple of
        ``2**lsb`` (its row's, its column's and the weight's lowest bits, and ``s``'s power of two), and their sum
        spans at most float64's 53 bits above it."""
        w = weight.double()
        lsb = torch.minimum(self.lowest_bits[0][i] + self.lowest_bits[1][j], _lowest_bit(w))
        top = _exponent(w.abs() + size) + 1  # 2**top > the sum (over-estimated where it is subnormal: safe)
        return (top - lsb <= 52) & (lsb >= -1074)


class _Doubtful:
    """A job's lists of doubtful entries (flat index, float64 result, weight), filled by the C pass block by block:
    those the error bound settles are settled at once, then those proven exact; the rest kept for ``settle``."""

    def __init__(self, job: _Job, size: int) -> None:
        self.job, self.found = job, []
        self.index, self.value = _buffer("index", (size, 1), torch.int64), _buffer("value", (size, 1), torch.float64)
        self.weight = _buffer("weights", (size, 1), job.weight.dtype)
        self.pointers = self.index.data_ptr(), self.value.data_ptr(), self.weight.data_ptr()

    def settle(self, start: int, n: int) -> None:
        """The ``n`` entries listed for the block from row ``start``."""
        job, cols = self.job, self.job.weight.shape[1]
        wide, out = job.weight.dtype == torch.float32, job.out[start].data_ptr()
        if n:
            at = job.bounds[0][start].data_ptr(), job.bounds[1].data_ptr()  # built at a weight's first doubt
            n = _round.settle_block(out, wide, cols, n, *self.pointers, *at, 0, 0, 0, 0, job.bound, False)
        if n and job.log2_s is not None:  # the factors' lowest bits read by the few entries that need them
            (rows, columns), k = job.factors64, job.left.shape[1]
            at = (*at, rows[start].data_ptr(), columns.data_ptr(), k, job.log2_s)
            n = _round.settle_block(out, wide, cols, n, *self.pointers, *at, job.bound, True)
        if n:
            self.found.append((self.index[:n, 0] + start * cols, self.value[:n, 0].clone(), self.weight[:n, 0].clone()))

    def joined(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _joined(self.found, self.job.weight.dtype)


def _joined(
    found: list[tuple[torch.Tensor, ...]], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks' doubtful entries as one (flat index, float64 result, weight)."""
    if found:
        return tuple(torch.cat(part) for part in zip(*found, strict=True))
    empty = torch.empty(0, dtype=torch.int64)
    return empty, empty.double(), empty.to(dtype)


class _Grid:
    """A narrower dtype's values as float64 bit patterns: which entries are near a rounding boundary, and how
    each rounds given an error bound.

    torch converts float64 to (b)float16 through float32, rounding twice: wrong where the float32 value lands
    on a boundary, i.e. within half a float32 ulp of one, so that zone counts as near too.
    """

    def __init__(self, dtype: torch.dtype, bound: float, most: float) -> None:
        info = torch.finfo(dtype)
        self.fraction_bits = 1 - math.frexp(info.eps)[1]  # stored significand bits (bfloat16: 7)
        self.dropped = 52 - self.fraction_bits  # float64 bits below the dtype's last one, at normal exponents
        self.min_exponent = math.frexp(info.tiny)[1] - 1
        self.via32 = dtype in (torch.float16, torch.bfloat16)
        # near a boundary: float32 images within one float32 ulp (2^29 float64 ulps) of it; float32 itself: 2^21 ulps
        self.near = 1 << (29 if self.via32 else 21)
        # past ``small``, an entry's error bound is under ``near`` ulps of it: bound (|r| + most) < near ulp(r)
        headroom = self.near / (bound * 2.0**53) - 1
        small = max(most / headroom if headroom > 0 else math.inf, info.tiny * 2)
        narrow = torch.tensor(small, dtype=torch.float32)
        if narrow.item() < small:  # rounded up: a larger threshold only doubts more entries
            narrow = torch.nextafter(narrow, torch.tensor(math.inf))
        self.small_bits = {
            torch.float64: torch.tensor(small, dtype=torch.float64).view(torch.int64).item(),
            torch.float32: narrow.view(torch.int32).item(),
        }

    def test(self, width: torch.dtype) -> tuple[int, int, int, int]:
        """The doubt test on the bits of a float64 result or of its float32 image (``width``), as integers ``(mask,
        offset, span, small)``: in doubt where ``(bits - offset) & mask < span`` (the dropped bits within ``near``
        of their middle) or where the magnitude's bits are below ``small``."""
        dropped, near = (self.dropped, self.near) if width == torch.float64 else (23 - self.fraction_bits, 2)
        return (1 << dropped) - 1, (1 << (dropped - 1)) - (near - 1), 2 * near - 1, self.small_bits[width]

    def doubtful(self, image: torch.Tensor, scratch: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """A block's entries in doubt: negative (in ``scratch``) where its bits lie near the middle between two
        ``dtype`` values, or where it is small beside the largest delta. ``image`` is the float64 block,
        or for (b)float16 its float32 image: a (b)float16 boundary is a float32 value, and an entry whose image is
        not within one float32 ulp of one is more than 1.5 of them (2^29.5 float64 ulps) away. Integer ops in the
        buffers given (``scratch``, ``other``: integers of ``image``'s width): torch's comparisons are slower."""
        bits = image.view(scratch.dtype)
        mask, offset, span, small = self.test(image.dtype)
        # |low - middle| < near  <=>  (low - middle + near - 1 mod 2^dropped) - (2 near - 1) < 0
        low = torch.bitwise_and(bits, mask, out=scratch)
        low.sub_(offset).bitwise_and_(mask).sub_(span)
        # |x| < small  <=>  |x|'s bits minus small's < 0 (non-negative floats order as their bits; NaN's are above)
        sign_bit = 8 * image.dtype.itemsize - 1
        magnitude = torch.bitwise_and(bits, (1 << sign_bit) - 1, out=other).sub_(small)
        return low.bitwise_or_(magnitude)  # negative where either is

    def settle(self, value: torch.Tensor, tol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rounded, settled): each entry rounded to the dtype where its interval ``value ± tol`` lies on one side
        of a boundary (as float64, exactly representable), else left as is and not settled."""
        bits = value.view(torch.int64)
        exponent = torch.bitwise_and(bits >> 52, 0x7FF) - 1023
        dropped = self.dropped + (self.min_exponent - exponent).clamp(min=0)  # the dtype's subnormals drop more
        usable = (dropped <= 52) & value.isfinite() & (value != 0)
        dropped = dropped.clamp(max=52)
        one = torch.ones_like(bits)
        down = torch.bitwise_and(bits, ~((one << dropped) - 1))
        up, middle = down + (one << dropped), down + (one << (dropped - 1))
        size, mid = value.abs(), middle.view(torch.float64).abs()
        # nor may the interval reach the neighbouring middles: a quarter ulp away at least (below a power of two)
        usable &= tol < (up.view(torch.float64).abs() - down.view(torch.float64).abs()) * 0.25
        above, below = size - tol > mid, size + tol < mid
        tie = (size == mid) & (tol == 0)  # exact: to the even neighbour (the last kept bit of ``down`` clear)
        even_down = torch.bitwise_and(down >> dropped, 1) == 0
        take_up = above | (tie & ~even_down)
        rounded = torch.where(
            take_up, up.view(torch.float64), torch.where(below | tie, down.view(torch.float64), value)
        )
        exact_zero = (value == 0) & (tol == 0)
        return rounded, (usable & (above | below | tie)) | exact_zero


_BUFFERS = threading.local()


def _buffer(role: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A block buffer, kept by the thread between weights (some 10 MiB): new ones each weight would fault every page
    in again, a quarter of a second a GiB."""
    size = shape[0] * shape[1] * dtype.itemsize
    flat = getattr(_BUFFERS, role, None)
    if flat is None or flat.numel() < size:
        flat = torch.empty(size, dtype=torch.uint8)
        setattr(_BUFFERS, role, flat)
    return flat[:size].view(dtype).view(shape)


def _up32(x: torch.Tensor) -> torch.Tensor:
    """Float64 values as float32 ones no smaller, and normal (a flushing product reads subnormals as zero)."""
    narrow = x.float()
    narrow = torch.where(narrow.double() < x, torch.nextafter(narrow, torch.tensor(math.inf)), narrow)
    return narrow.clamp(min=torch.finfo(torch.float32).tiny).contiguous()


def _negative(x: torch.Tensor) -> torch.Tensor:
    """The flat indices of ``x``'s negative entries: a few in a block, found in the groups of 64 whose minimum is
    negative (the reduction costs a quarter of marking every entry and scanning the marks)."""
    flat = x.view(-1)
    if flat.numel() % _GROUP:
        return (flat < 0).nonzero().flatten()
    groups = (flat.view(-1, _GROUP).amin(1) < 0).nonzero().flatten()
    candidates = (groups[:, None] * _GROUP + torch.arange(_GROUP)).flatten()
    return candidates[flat[candidates] < 0]


def _dyadic(x: float) -> tuple[int, int]:
    """``(m, e)`` with ``x == m * 2**e`` exactly (a finite float)."""
    numerator, denominator = x.as_integer_ratio()
    return numerator, 1 - denominator.bit_length()


def _lowest_bit(x: torch.Tensor) -> torch.Tensor:
    """Per entry of a float64 ``x``, the exponent of the largest power of two it is a multiple of; zeros impose
    nothing. Read off the bits: the significand's lowest set bit (the implicit one's place where the fraction is
    zero; for subnormals, whose fraction is not, setting that place changes nothing), scaled."""
    bits = x.view(torch.int64)
    field = torch.bitwise_and(bits >> 52, 0x7FF)
    significand = torch.bitwise_or(torch.bitwise_and(bits, (1 << 52) - 1), 1 << 52)
    lowest = _exponent(torch.bitwise_and(significand, -significand).double())  # of a power of two, exact
    lsb = lowest + field.clamp(min=1) - 1075  # x = significand * 2**(max(field, 1) - 1075)
    return lsb.masked_fill_(torch.bitwise_and(bits, (1 << 63) - 1) == 0, 1 << 20)


def _exponent(x: torch.Tensor) -> torch.Tensor:
    """``floor(log2(|x|))`` of normal float64 entries, read off their exponent field (``frexp`` is slower)."""
    return torch.bitwise_and(x.view(torch.int64) >> 52, 0x7FF) - 1023


def _gamma(n: int, u: float = _U) -> float:
    return n * u / (1 - n * u)


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
