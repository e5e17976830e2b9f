"""``generate``: token ids from a graph captured with a KV cache, as transformers' ``model.generate`` gives them.

The prompt runs once (prefill), then one step per new token reads and extends the cache; nothing is recomputed.
The loop drives a peftfx graph, its ``torch.compile`` wrapper, or an onnxruntime session of its ONNX export
(``export_onnx``), so every deployment path decodes alike. Greedy by default; sampling uses transformers' own
logits warpers (temperature, top-k, top-p, in its order) and draws from ``generator``. A row that emits
``eos_token_id`` is finished: it gets ``pad_token_id`` from then on, and the loop stops when every row is done,
as transformers does. Left padding is given by ``attention_mask`` (0 where padded); positions count only the
unpadded tokens, as transformers counts them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .errors import GenerationError
from .ir import KVCache, kv_cache, routing
from .kv_cache import CACHE, empty_cache, onnx_names

Step = Callable[[dict[str, Any]], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]


def generate(
    model: Any,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    adapter_index: torch.Tensor | Sequence[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    feeds: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """``[batch, prompt + new]`` token ids: the prompt, then up to ``max_new_tokens`` generated tokens.

    ``model`` is a graph from ``peftfx.compile(..., max_cache_len=L)``, that graph under ``torch.compile``, or an
    ``onnxruntime.InferenceSession`` of its ``export_onnx`` file (``feeds``: its adapter inputs, when adapters are
    ``as_inputs``). ``adapter_index`` picks each row's adapter in a routed graph (-1 the base model).
    ``eos_token_id`` and ``pad_token_id`` default to the model's generation config. Everything is checked before
    the first step.
    """
    step, cache, routed = _stepper(model, feeds)
    batch, _ = _check(input_ids, attention_mask, max_new_tokens, cache)
    index = _index(adapter_index, batch, routed)
    choose = _chooser(do_sample, temperature, top_k, top_p, generator)
    stop = _stop(
        cache.eos_token_id if eos_token_id is None else eos_token_id,
        cache.pad_token_id if pad_token_id is None else pad_token_id,
    )
    prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    with torch.no_grad():  # live adapters are trainable parameters; decoding records no graph
        return _loop(step, cache, input_ids, prompt_mask, max_new_tokens, index, choose, stop)


Choose = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _loop(
    step: Step,
    cache_spec: KVCache,
    input_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    index: dict[str, torch.Tensor],
    choose: Choose,
    stop: tuple[torch.Tensor, int] | None,
) -> torch.Tensor:
    """Prefill, then one step per token; ``stop`` is (the eos ids, the pad id) or None."""
    batch, length = input_ids.shape
    mask = torch.ones(batch, cache_spec.max_cache_len, dtype=torch.long)  # later positions: the causal mask hides them
    mask[:, :length] = prompt_mask
    position = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)  # transformers' count, padding skipped
    cache = empty_cache(cache_spec)
    tokens, ids, done = input_ids, input_ids, torch.zeros(batch, dtype=torch.bool)
    for offset in range(max_new_tokens):
        start = length + offset - 1 if offset else 0
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": position,
            "cache_position": torch.arange(start, start + ids.shape[1]),
            CACHE: cache,
            **index,
        }
        logits, cache = step(inputs)
        new = choose(tokens, logits[:, -1].float())
        if stop is not None:
            eos, pad = stop
            new = torch.where(done, pad, new)
            done = done | torch.isin(new, eos)
        tokens = torch.cat([tokens, new[:, None]], dim=1)
        if stop is not None and bool(done.all()):
            break
        ids, position = new[:, None], position[:, -1:] + 1
    return tokens


def _stop(eos_token_id: int | Sequence[int] | None, pad_token_id: int | None) -> tuple[torch.Tensor, int] | None:
    """The ids that end a row and the id a finished row gets (the first eos id when none is set, as transformers)."""
    if eos_token_id is None:
        return None
    eos = torch.tensor(eos_token_id, dtype=torch.long).reshape(-1)
    if not eos.numel():
        return None  # an empty list: no token ends a row
    return eos, int(eos[0]) if pad_token_id is None else pad_token_id


def _check(input_ids: Any, attention_mask: Any, max_new_tokens: Any, cache: KVCache) -> tuple[int, int]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
        raise GenerationError("generate: input_ids must be an integer tensor [batch, prompt length]")
    batch, length = input_ids.shape
    if not input_ids.numel():
        raise GenerationError(f"generate: input_ids is empty ({list(input_ids.shape)})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"generate: max_new_tokens={max_new_tokens!r} is not a positive int")
    if batch != cache.batch:
        raise GenerationError(
            f"generate: input_ids has batch {batch}, but the graph was captured for batch {cache.batch} (its "
            "cache is [batch, ...]); compile with example input_ids of that batch"
        )
    if length < 1 or length + max_new_tokens > cache.max_cache_len:
        raise GenerationError(
            f"generate: a prompt of {length} tokens plus max_new_tokens={max_new_tokens} is {length + max_new_tokens} "
            f"positions, more than the graph's max_cache_len={cache.max_cache_len}"
        )
    vocab = cache.vocab_size
    low, high = int(input_ids.min()), int(input_ids.max())
    if vocab is not None and not 0 <= low <= high < vocab:
        raise GenerationError(f"generate: input_ids hold {low}..{high}, outside the vocabulary 0..{vocab - 1}")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
    ):
        shape = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise GenerationError(f"generate: attention_mask is {shape}, input_ids is {list(input_ids.shape)}")
    return batch, length


Routed = tuple[str, int | None] | None  # a routed step's index input and its number of adapters (None: unknown)


def _index(adapter_index: Any, batch: int, routed: Routed) -> dict[str, torch.Tensor]:
    """The routing input of every step: each row's adapter, all base rows when none is given."""
    if adapter_index is None:
        return {} if routed is None else {routed[0]: torch.full((batch,), -1, dtype=torch.int64)}
    if routed is None:
        raise GenerationError("generate: adapter_index is given, but the graph is not routed (no routing: in its spec)")
    name, n = routed
    index = torch.as_tensor(adapter_index, dtype=torch.int64)
    if index.shape != (batch,):
        raise GenerationError(f"generate: adapter_index has shape {list(index.shape)}; the batch is {batch}")
    if bool((index < -1).any()) or (n is not None and bool((index >= n).any())):
        top = "" if n is None else f"..{n - 1}"
        raise GenerationError(f"generate: adapter_index {index.tolist()} leaves -1{top} (-1 is the base model)")
    return {name: index}


def _chooser(
    do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Choose:
    """The next token from the last logits: their argmax, or a draw after transformers' own warpers, in the order
    its ``generate`` applies them."""
    if not do_sample:
        return lambda tokens, scores: scores.argmax(-1)
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warp = LogitsProcessorList()
    try:
        if temperature != 1.0:
            warp.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            warp.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warp.append(TopPLogitsWarper(top_p))
    except ValueError as error:  # transformers' own check of the value
        raise GenerationError(f"generate: {error}") from None

    def draw(tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(warp(tokens, scores), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return draw


def _stepper(model: Any, feeds: Mapping[str, Any] | None) -> tuple[Step, KVCache, Routed]:
    """One step as a function of the inputs, the cache it steps over, and its routing input."""
    cache = kv_cache(model)
    if cache is not None:
        if feeds:
            raise GenerationError("generate: feeds are for an onnxruntime session; a graph holds its adapters")
        routes = routing(getattr(model, "_orig_mod", model))

        def run(inputs: dict[str, Any]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            logits, *present = model(**inputs)
            return logits, tuple(present)

        return run, cache, None if routes is None else (routes.input, len(routes.adapters))
    if type(model).__name__ == "InferenceSession":
        return _onnx_stepper(model, dict(feeds or {}))
    raise GenerationError(
        f"generate: {type(model).__name__} is not a graph captured with max_cache_len (peftfx.compile(..., "
        "max_cache_len=L)), nor an onnxruntime session of one"
    )


def _onnx_stepper(session: Any, feeds: dict[str, Any]) -> tuple[Step, KVCache, Routed]:
    """The loop over an ONNX export: the cache's shapes are read off the file's inputs (its eos: pass it)."""
    inputs = {i.name: i for i in session.get_inputs()}
    n = sum(name.startswith(f"{CACHE}.") for name in inputs)
    past, _ = onnx_names(n)
    if not n or any(name not in inputs for name in past):
        raise GenerationError("generate: the ONNX file has no past_key_values.<layer>.key|value inputs")
    shapes = [tuple(inputs[name].shape) for name in past]
    dtypes = {"tensor(float)": torch.float32, "tensor(double)": torch.float64, "tensor(float16)": torch.float16}
    cache = KVCache(max_cache_len=shapes[0][2], batch=shapes[0][0], shapes=shapes, dtype=dtypes[inputs[past[0]].type])
    routed = ("adapter_index", None) if "adapter_index" in inputs else None  # the file does not say how many
    fixed = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()}

    def run(step_inputs: dict[str, Any]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        flat = {k: v.numpy() for k, v in step_inputs.items() if k != CACHE}
        flat.update({name: t.numpy() for name, t in zip(past, step_inputs[CACHE], strict=True)})
        logits, *present = session.run(None, {**flat, **fixed})
        return torch.from_numpy(logits), tuple(torch.from_numpy(t) for t in present)

    return run, cache, routed
