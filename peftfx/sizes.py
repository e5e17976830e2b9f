"""Bounds on what a spec may ask for: seeds of 64 bits, and tensors no larger than a stated limit.

A size field (a rank, a number of frequencies or vectors, ``max_rank``) is only an int in the schema: ``r: 10**9``
on a 12-wide layer would ask the allocator for 48 GB, and ``r: 10**30`` overflows torch's int64. Rather than a
bound per field of each of the 35 kinds, the tensor factories (``torch.zeros``, ``randn``, ``new_empty``, ...) are
watched while an adapter is made or padded, and a request past ``limit(site)`` numbers is refused before any memory
is taken. The limit: 64 times the site's weight, and never under 2^24 numbers (64 MiB of float32), far above
what any sensible adapter takes (a LoRA of rank min(in, out), the most PEFT's math can use, is at most 2x).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any

import torch
from pydantic import Field
from torch.overrides import TorchFunctionMode

Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]
"""What torch's generators take: 64 bits (``seed: 2**70`` would overflow in ``manual_seed``)."""

FLOOR = 2**24
TIMES_WEIGHT = 64

_FACTORIES = {
    torch.empty,
    torch.zeros,
    torch.ones,
    torch.rand,
    torch.randn,
    torch.full,
    torch.randint,
    torch.normal,
    torch.eye,
    torch.randperm,
    torch.Tensor.new_empty,
    torch.Tensor.new_zeros,
    torch.Tensor.new_ones,
    torch.Tensor.new_full,
}


class TooLarge(Exception):
    """A tensor factory was asked for more numbers than the limit; the caller names the spec field."""

    def __init__(self, shape: list[int], numel: int, limit: int) -> None:
        super().__init__(f"{shape}: {numel} numbers, past the limit of {limit}")
        self.shape, self.numel, self.limit = shape, numel, limit


def limit(weight_numel: int) -> int:
    return max(FLOOR, TIMES_WEIGHT * weight_numel)


@contextmanager
def bounded(numbers: int) -> Iterator[None]:
    """Within the block, a tensor factory asked for more than ``numbers`` numbers raises ``TooLarge`` instead."""
    with _Bounded(numbers):
        yield


class _Bounded(TorchFunctionMode):
    def __init__(self, numbers: int) -> None:
        super().__init__()
        self.numbers = numbers

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES:
            shape = _shape(func, args, kwargs)
            numel = math.prod(shape) if shape is not None else 0
            if numel > self.numbers:
                raise TooLarge(shape, numel, self.numbers)
        return func(*args, **kwargs)


def _shape(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> list[int] | None:
    """The shape a factory call asks for: a ``size`` sequence, or the leading int arguments (``zeros(r, n)``)."""
    positional = list(args[1:] if func.__name__.startswith("new_") else args)
    if func is torch.eye:
        n = positional[0] if positional else kwargs.get("n", 0)
        return [n, positional[1] if len(positional) > 1 and _is_int(positional[1]) else kwargs.get("m", n)]
    size = kwargs.get("size")
    if size is None:
        size = next((a for a in positional if _is_sizes(a)), None)
    if size is None:
        size = []
        for a in positional:
            if not _is_int(a):
                break
            size.append(a)
        if func is torch.randint:  # randint(low, high, size): ints before the size are bounds, not dims
            return None
    return [int(d) for d in size] if _is_sizes(size) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sizes(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(_is_int(d) for d in value)
