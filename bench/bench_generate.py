"""Generation with a KV cache: peftfx's graphs beside PEFT's and the base model's own ``generate``, in tokens/s.

    .venv/bin/python bench/bench_generate.py [--hidden 256 --layers 4 --prompt 128 --new 64 --batches 1 8 --repeats 3]

A prompt of ``--prompt`` random tokens, then ``--new`` greedy tokens (no eos: every row runs to the end), at each
batch size: the base model's ``generate`` with a static cache, PEFT's ``generate`` (eager, its dynamic cache) with a
LoRA r 16 on every linear layer, and peftfx's graph captured with ``max_cache_len`` (live, merged, and live under
``torch.compile``, Inductor, unless ``--no-compile``) driven by ``peftfx.generate``. Then a routed batch (the largest
batch size) over ``--adapters`` LoRAs and the base model, against PEFT's ``adapter_names``. Before timing, each
variant's tokens are compared with PEFT's (greedy: they must be identical). One generation of each variant per round,
medians of CPU time (the figures: with one thread, the latency other jobs' time slices do not inflate) and of wall
time. Results: results/generate.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import Figure, interleave, llama, load, median, parser, save_lora, table, write
from peft import PeftModel

import peftfx

BASE = "__base__"


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="also time the torch.compile'd graph"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = load()

    base = llama(args.hidden, args.layers)
    base.config.use_cache = base.generation_config.use_cache = True  # common.llama turns the cache off
    base.generation_config.eos_token_id = None  # every row generates all --new tokens
    base.generation_config.pad_token_id = 0
    length = args.prompt + args.new
    names = [f"a{i}" for i in range(args.adapters)]
    rows: list[tuple[Any, ...]] = []
    figures: list[Figure] = []
    data: dict[str, Any] = {"tokens_per_s": {}, "wall_tokens_per_s": {}, "identical": {}, "compile_s": {}}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for i, name in enumerate(names):
            save_lora(base, root / name, args.rank, seed=i + 1)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), root / names[0], adapter_name=names[0]).eval()
        for name in names[1:]:
            peft_model.load_adapter(root / name, adapter_name=name)
        peft_model.set_adapter(names[0])
        one = {"adapters": {names[0]: {"peft": str(root / names[0])}}}
        routed_spec = {"adapters": {n: {"peft": str(root / n)} for n in names}, "routing": {"adapters": names}}

        for batch in args.batches:
            ids = torch.randint(1, base.config.vocab_size, (batch, args.prompt))
            t = time.perf_counter()
            live = peftfx.compile(base, one, {"input_ids": ids}, max_cache_len=length)
            merged = peftfx.compile(base, {**one, "merge": True}, {"input_ids": ids}, max_cache_len=length)
            data["compile_s"][f"peftfx, batch {batch}"] = (time.perf_counter() - t) / 2

            def hf(model: Any, ids: torch.Tensor = ids, **kw: Any) -> Callable[[], torch.Tensor]:
                return lambda: model.generate(input_ids=ids, max_new_tokens=args.new, do_sample=False, **kw)

            def ours(gm: Any, ids: torch.Tensor = ids, **kw: Any) -> Callable[[], torch.Tensor]:
                return lambda: peftfx.generate(gm, ids, max_new_tokens=args.new, **kw)

            variants = {
                "base generate (static cache)": hf(base, cache_implementation="static"),
                "PEFT generate (eager)": hf(peft_model),
                "peftfx live": ours(live),
                "peftfx merged": ours(merged),
            }
            if args.compile:
                compiled = torch.compile(live)
                t = time.perf_counter()
                variants["peftfx live (torch.compile)"] = ours(compiled)
                variants["peftfx live (torch.compile)"]()
                data["compile_s"][f"torch.compile first generate, batch {batch}"] = time.perf_counter() - t
            key = f"batch {batch}"
            ms = _run(variants, "PEFT generate (eager)", args.repeats, data, key, batch * args.new, rows)
            peft_ms = ms["PEFT generate (eager)"]
            figures += [
                Figure(f"merged / base generate (static cache), {key}", ms["peftfx merged"] / ms[next(iter(ms))], 1.0),
                Figure(f"live / PEFT generate (eager), {key}", ms["peftfx live"] / peft_ms, 1.0),
            ]
            if args.compile:
                figures.append(
                    Figure(f"live torch.compile / PEFT generate (eager), {key}", ms[list(ms)[-1]] / peft_ms, 1 / 1.5)
                )

        batch = max(args.batches)
        ids = torch.randint(1, base.config.vocab_size, (batch, args.prompt))
        choices = [*names, BASE]
        picks = [choices[i % len(choices)] for i in range(batch)]
        index = [-1 if p == BASE else names.index(p) for p in picks]
        routed = peftfx.compile(base, routed_spec, {"input_ids": ids}, max_cache_len=length)
        variants = {
            "PEFT generate adapter_names (eager)": lambda: peft_model.generate(
                input_ids=ids, max_new_tokens=args.new, do_sample=False, adapter_names=picks
            ),
            "peftfx routed": lambda: peftfx.generate(routed, ids, max_new_tokens=args.new, adapter_index=index),
        }
        key = f"routed batch {batch}"
        ms = _run(variants, "PEFT generate adapter_names (eager)", args.repeats, data, key, batch * args.new, rows)
        figures.append(
            Figure(
                f"routed / PEFT adapter_names, batch {batch}",
                ms["peftfx routed"] / ms["PEFT generate adapter_names (eager)"],
                1.0,
            )
        )

    lines = [
        f"Llama hidden {args.hidden}, {args.layers} layers, float32, LoRA r {args.rank} on every linear layer; prompt "
        f"{args.prompt} random tokens + {args.new} greedy tokens, max_cache_len {length}; routed: {args.adapters} "
        f"adapters and the base model over the batch (picks {' '.join(p.replace(BASE, 'base') for p in picks)}). "
        f"Medians of {args.repeats} interleaved rounds; a figure is a ratio of CPU times (time per generation, so "
        "lower is faster: a goal of 0.667 is 1.5x PEFT's tokens/s). Tokens/s count new tokens only.",
        "",
        *table(
            ["case", "variant", "tokens/s (CPU)", "tokens/s (wall)", "CPU time / PEFT's", "tokens = PEFT's"],
            rows,
            "--rrr-",
        ),
        "",
        "peftfx.compile with max_cache_len, seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in data["compile_s"].items())
        + ". peftfx graphs take the cache as inputs and write it in place; PEFT's eager generate grows a dynamic "
        "cache; the base model's row is transformers' own loop over its static cache.",
    ]
    write(
        args.output_dir, "generate", "Generation with a KV cache: peftfx beside PEFT", lines, figures, data, load_start
    )


def _run(
    variants: dict[str, Callable[[], torch.Tensor]],
    reference: str,
    repeats: int,
    data: dict[str, Any],
    key: str,
    tokens: int,
    rows: list[tuple[Any, ...]],
) -> dict[str, float]:
    """Tokens checked against ``reference`` (greedy: identical), then interleaved rounds; CPU ms per generation."""
    with torch.inference_mode():
        want = variants[reference]()
    identical = {name: bool(torch.equal(fn(), want)) for name, fn in variants.items() if name.startswith("peftfx")}
    times = interleave(variants, repeats, warmup=0)
    ms = {name: median(cpu) * 1e3 for name, (_, cpu) in times.items()}
    wall = {name: median(w) * 1e3 for name, (w, _) in times.items()}
    for name in ms:
        rows.append(
            (
                key,
                name,
                f"{tokens / ms[name] * 1e3:.0f}",
                f"{tokens / wall[name] * 1e3:.0f}",
                f"{ms[name] / ms[reference]:.3f}",
                {True: "yes", False: "**no**", None: ""}[identical.get(name)],
            )
        )
    data["tokens_per_s"][key] = {n: tokens / v * 1e3 for n, v in ms.items()}
    data["wall_tokens_per_s"][key] = {n: tokens / v * 1e3 for n, v in wall.items()}
    data["identical"][key] = identical
    return ms


if __name__ == "__main__":
    main()
