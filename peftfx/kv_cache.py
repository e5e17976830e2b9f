"""Capture a transformers decoder with a static KV cache whose tensors are explicit inputs and outputs.

The graph is one step of generation: ``gm(input_ids, attention_mask, position_ids, cache_position,
past_key_values)`` returns ``(logits, *present)``, the next-token logits ``[batch, 1, vocab]`` and the cache,
one key and one value ``[batch, kv_heads, max_cache_len, head_dim]`` per layer. The cache is an input rather than
state of the GraphModule so that one graph serves any number of concurrent generations, and so the ONNX file has
it as inputs and outputs (``past_key_values.<layer>.key|value`` in, ``present.<layer>.key|value`` out, Optimum's
names). The graph writes the new positions into the given cache tensors in place (``index_copy_``) and returns
them, so a loop feeds back what it got without copying; the ONNX export is functional.

The sequence dim is dynamic (1 to ``max_cache_len``): the prompt is one call (prefill), each new token another.
``attention_mask`` is ``[batch, max_cache_len]``, static, 0 at left padding. The cache is transformers'
StaticCache with every layer a full-length ``StaticLayer`` (as transformers' executorch export does): sliding-window
layers then hold every position and their window is applied by the mask, so generating past the window is exact.
The model is captured through a shallow copy of itself whose ``forward`` takes the cache tensors: its submodules
are the model's own, so module paths (and PEFT checkpoints' keys) are unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from .capture import Inputs, capture, split_inputs
from .errors import CaptureError, GenerationError
from .ir import KVCache, kv_cache, set_kv_cache

CACHE = "past_key_values"
SEQUENCE_AXES = {"input_ids": {1: "sequence"}, "position_ids": {1: "sequence"}, "cache_position": {0: "sequence"}}


def capture_with_cache(
    model: nn.Module, example_inputs: Inputs | None, max_cache_len: int, *, cache: bool | None = None
) -> fx.GraphModule:
    """Capture ``model`` as a generation step over a static cache of ``max_cache_len`` positions (see the module);
    ``cache`` as for ``capture``."""
    from transformers import StaticCache

    name = type(model).__name__
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if config is None or not can_generate() or getattr(config, "is_encoder_decoder", False):
        raise CaptureError(
            f"max_cache_len: {name} is not a decoder-only transformers language model with a KV cache "
            "(its can_generate() is False or it is encoder-decoder), so it cannot be captured for generation"
        )
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 2:
        raise GenerationError(f"max_cache_len: {max_cache_len!r} is not an int of at least 2")
    ids = _example_ids(example_inputs)
    batch, length = ids.shape
    if length > max_cache_len:
        raise GenerationError(
            f"max_cache_len: the example prompt has {length} tokens, more than max_cache_len={max_cache_len}"
        )
    try:
        static = StaticCache(config=config, max_cache_len=max_cache_len)
    except Exception as error:
        raise CaptureError(f"max_cache_len: transformers' StaticCache does not support {name}: {error}") from error
    generation = getattr(model, "generation_config", None)
    layout = KVCache(
        max_cache_len=max_cache_len,
        batch=batch,
        shapes=_layer_shapes(model, static, batch, max_cache_len),
        dtype=next(model.parameters()).dtype,
        vocab_size=getattr(config.get_text_config(), "vocab_size", None),
        eos_token_id=getattr(generation, "eos_token_id", None),
        pad_token_id=getattr(generation, "pad_token_id", None),
    )
    steps = max(length, 2)  # torch.export fixes dims of size 1: trace a two-token step
    example = {
        "input_ids": torch.zeros(batch, steps, dtype=torch.long),
        "attention_mask": torch.ones(batch, max_cache_len, dtype=torch.long),
        "position_ids": torch.arange(steps).expand(batch, steps),
        "cache_position": torch.arange(steps),
        CACHE: empty_cache(layout),
    }
    sequence = Dim("sequence", min=1, max=max_cache_len)
    dynamic = {
        "input_ids": {1: sequence},
        "attention_mask": None,
        "position_ids": {1: sequence},
        "cache_position": {0: sequence},
        CACHE: (None,) * len(layout.shapes),
    }
    with _sdpa_gqa():
        step = _with_cache_forward(model, max_cache_len)
        gm = capture(step, example, method="export", dynamic_shapes=dynamic, cache=cache)
    set_kv_cache(gm, layout)
    return gm


def step_inputs(gm: Any, input_ids: torch.Tensor) -> dict[str, Any]:
    """The inputs of ``gm``'s first step on the prompt ``input_ids`` (no padding, an empty cache): an example for
    ``export_onnx``, whose file then takes any prompt length (its ``sequence`` dim) and the decode steps."""
    cache = kv_cache(gm)
    if cache is None:
        raise GenerationError("step_inputs: the graph was not captured with max_cache_len")
    batch, length = input_ids.shape
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch, cache.max_cache_len, dtype=torch.long),
        "position_ids": torch.arange(length).expand(batch, length),
        "cache_position": torch.arange(length),
        CACHE: empty_cache(cache),
    }


def empty_cache(cache: KVCache) -> tuple[torch.Tensor, ...]:
    """Zeros for every cache tensor of a graph: a fresh generation's ``past_key_values``."""
    return tuple(torch.zeros(s, dtype=cache.dtype) for s in cache.shapes)


def onnx_names(n_tensors: int) -> tuple[list[str], list[str]]:
    """Optimum's names for the cache inputs and outputs, ``past_key_values.<layer>.key|value`` and
    ``present.<layer>.key|value``, in the graph's order (key then value, layer by layer)."""
    leaves = [f"{layer}.{role}" for layer in range(n_tensors // 2) for role in ("key", "value")]
    return [f"{CACHE}.{leaf}" for leaf in leaves], [f"present.{leaf}" for leaf in leaves]


def _example_ids(example_inputs: Inputs | None) -> torch.Tensor:
    args, kwargs = split_inputs(example_inputs) if example_inputs is not None else ((), {})
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point or not ids.numel():
        raise GenerationError(
            "example_inputs: capturing for generation needs input_ids, integer [batch, prompt length] (the batch "
            "the graph serves)"
        )
    return ids


def _layer_shapes(model: nn.Module, cache: Any, batch: int, length: int) -> list[tuple[int, ...]]:
    """Key and value shapes, layer by layer, from transformers' own count of heads and head size."""
    from transformers.integrations.executorch import get_head_shapes

    heads, head_dim = get_head_shapes(model.config.get_text_config())
    return [(batch, heads, length, head_dim)] * (2 * len(cache.layers))


def _with_cache_forward(model: nn.Module, max_cache_len: int) -> nn.Module:
    """A shallow copy of ``model`` (same submodules, parameters and config; the model is not touched) whose
    forward is one generation step over the given cache tensors."""
    cls = type(model)
    step = type(f"{cls.__name__}Step", (cls,), {"forward": _step_forward})
    copy = cls.__new__(step)
    # its own module, parameter, buffer and hook tables (dicts), holding the model's objects
    copy.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in model.__dict__.items()})
    copy._peftfx_max_cache_len = max_cache_len
    return copy


@contextlib.contextmanager
def _sdpa_gqa() -> Iterator[None]:
    """Grouped-query attention as SDPA's ``enable_gqa`` rather than keys and values repeated per query head.

    Traced, transformers repeats a masked step's keys and values (its eager decode packs the query instead), which
    copies the whole cache every step: a third of a batch-8 step on CPU (measured). ``TRANSFORMERS_SDPA_FORCE_GQA``
    is transformers' own switch; the tokens are the same.
    """
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def _step_forward(
    self: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache_position: torch.Tensor,
    past_key_values: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    length = self._peftfx_max_cache_len
    cache = StaticCache(config=self.config, max_cache_len=length)
    for i in range(len(cache.layers)):
        layer = StaticLayer(length)
        keys, values = past_key_values[2 * i], past_key_values[2 * i + 1]
        layer.keys, layer.values, layer.device = keys, values, keys.device
        layer.batch_size, layer.num_heads = keys.shape[:2]
        layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
        layer.cumulative_length = cache_position[0].clone()  # where this step writes
        layer.is_initialized = True
        cache.layers[i] = layer
    out = (
        type(self)
        .__mro__[1]
        .forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache_position=cache_position,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    )
    return (out.logits, *(t for layer in cache.layers for t in (layer.keys, layer.values)))
