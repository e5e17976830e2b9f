"""A compiled graph's inputs beyond the model's own: where its batch is, and the routing index it takes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from .capture import Inputs, split_inputs
from .errors import SpecError
from .ir import ROUTING_INPUT, routing


def batch_input(inputs: Inputs) -> int | str:
    """Where routing reads the batch (an ``adapter_index``'s length): the position or keyword of the first tensor
    input with a dim; the batch is its dim 0."""
    args, kwargs = split_inputs(inputs)
    for key, value in [*enumerate(args), *kwargs.items()]:
        if isinstance(value, torch.Tensor) and value.ndim:
            return key
    raise SpecError("routing: the example inputs have no tensor whose dim 0 is the batch")


def batch_size(inputs: Inputs) -> int:
    args, kwargs = split_inputs(inputs)
    key = batch_input(inputs)
    return (args[key] if isinstance(key, int) else kwargs[key]).shape[0]


def with_index(gm: fx.GraphModule, inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``inputs`` as (args, kwargs), with an all-base ``adapter_index`` added when ``gm`` is routed and they lack
    one: its values never change the graph, so any routing traces (and exports) the same one."""
    args, kwargs = split_inputs(inputs)
    routed = routing(gm)
    if routed is not None and routed.input not in kwargs:
        kwargs[routed.input] = torch.full((batch_size(inputs),), -1, dtype=torch.int64)
    return args, kwargs


def without_index(inputs: Inputs | None) -> Inputs | None:
    """``inputs`` less an ``adapter_index`` keyword: the routed graph takes it, the model it was captured from never
    does (``with_index``'s inverse)."""
    if isinstance(inputs, Mapping) and ROUTING_INPUT in inputs:
        return {k: v for k, v in inputs.items() if k != ROUTING_INPUT}
    return inputs
