"""Forward latency of peftfx graphs beside PEFT's eager model and the base model, in one process.

    .venv/bin/python bench/bench_lora.py [--hidden 256 --layers 4 --batch 4 --seq 64 --rank 16 --repeats 30]

One call of each variant per round (eager, and torch.compile'd unless ``--no-compile``), medians and ratios,
of CPU time (the figures: with one thread, the latency other jobs' time slices do not inflate) and of wall
time. A second table times a tiny input, where the call itself dominates: the captured graph's wrapper
overhead (``ep.module()`` as torch.export returns it, and as peftfx trims it). Results: results/lora.md, .json.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from common import Figure, interleave, llama, load, median, parser, save_lora, table, write
from peft import PeftModel

import peftfx


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--tiny-repeats", type=int, default=300)
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="also time torch.compile'd graphs"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = load()

    base = llama(args.hidden, args.layers)
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (args.batch, args.seq))}
    with tempfile.TemporaryDirectory() as directory:
        save_lora(base, Path(directory), args.rank)
        peft_live = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
        peft_merged = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval().merge_and_unload()
        fx_live = peftfx.compile(base, {"adapters": {"a": {"peft": directory}}}, inputs)
        fx_merged = peftfx.compile(base, {"adapters": {"a": {"peft": directory}}, "merge": True}, inputs)
    models = {
        "base (eager)": base,
        "PEFT unmerged": peft_live,
        "peftfx unmerged": fx_live,
        "PEFT merged": peft_merged,
        "peftfx merged": fx_merged,
    }
    compile_s = {}
    if args.compile:
        for name, model in (("PEFT unmerged", peft_live), ("peftfx unmerged", fx_live)):
            compiled = torch.compile(model)
            t = time.perf_counter()
            with torch.inference_mode():
                compiled(**inputs)
            compile_s[name] = time.perf_counter() - t
            models[f"{name}, torch.compile"] = compiled
    with torch.inference_mode():
        times = interleave({name: _caller(model, inputs) for name, model in models.items()}, args.repeats)
    ms = {name: median(cpu) * 1e3 for name, (_, cpu) in times.items()}
    wall_ms = {name: median(wall) * 1e3 for name, (wall, _) in times.items()}
    tiny = _tiny(args.rank, args.tiny_repeats)

    base_ms, peft_ms = ms["base (eager)"], ms["PEFT unmerged"]
    figures = [
        Figure("merged graph / base model (eager)", ms["peftfx merged"] / base_ms, 1.03),
        Figure("unmerged graph / PEFT unmerged (eager)", ms["peftfx unmerged"] / peft_ms, 1.00),
    ]
    if args.compile:
        compiled_ms = ms["peftfx unmerged, torch.compile"]
        figures += [
            Figure("unmerged graph, torch.compile / PEFT unmerged (eager)", compiled_ms / peft_ms, 0.8),
            Figure(
                "unmerged graph, torch.compile / PEFT unmerged, torch.compile",
                compiled_ms / ms["PEFT unmerged, torch.compile"],
            ),
        ]
    figures += [
        Figure("merged graph / PEFT merged (eager)", ms["peftfx merged"] / ms["PEFT merged"]),
        Figure("tiny input: captured graph / base model (eager)", tiny["peftfx capture"] / tiny["base (eager)"]),
        Figure("tiny input: untrimmed ep.module() / base model (eager)", tiny["ep.module()"] / tiny["base (eager)"]),
    ]
    lines = [
        f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}, float32, LoRA r={args.rank} "
        f"on every linear layer but the head; medians of {args.repeats} interleaved rounds. The ratios are of CPU "
        "time (see above); the wall-clock ones, inflated by other jobs, are beside them.",
        "",
        *table(
            ["variant", "CPU ms", "ratio to base", "ratio to PEFT unmerged", "wall ms", "wall ratio to base"],
            [
                (
                    n,
                    f"{v:.2f}",
                    f"{v / base_ms:.3f}",
                    f"{v / peft_ms:.3f}",
                    f"{wall_ms[n]:.2f}",
                    f"{wall_ms[n] / wall_ms['base (eager)']:.3f}",
                )
                for n, v in ms.items()
            ],
        ),
        "",
    ]
    if compile_s:
        first = ", ".join(f"{name} {s:.1f} s" for name, s in compile_s.items())
        lines += [f"torch.compile (Inductor), first call: {first}.", ""]
    lines += [
        "Call overhead on a tiny input (Llama hidden 64, 2 layers, batch 1x8; medians of "
        f"{args.tiny_repeats} interleaved rounds). `ep.module()` is torch.export's module as it comes: its "
        "hooks re-flatten and match the inputs and its graph asserts each `.to`'s dtype on every call; peftfx's "
        "capture drops both and keeps the shape guards.",
        "",
        *table(
            ["variant", "CPU ms", "ratio to base"],
            [(n, f"{v:.3f}", f"{v / tiny['base (eager)']:.3f}") for n, v in tiny.items()],
        ),
    ]
    data = {"latency_ms": ms, "wall_ms": wall_ms, "tiny_ms": tiny, "torch_compile_first_call_s": compile_s}
    write(
        args.output_dir,
        "lora",
        "LoRA forward latency: peftfx beside PEFT and the base model",
        lines,
        figures,
        data,
        load_start,
    )


def _caller(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    return lambda: model(**inputs)


def _tiny(rank: int, repeats: int) -> dict[str, float]:
    """Milliseconds per call on a tiny input: the wrapper's own cost shows, the arithmetic hardly does."""
    base = llama(64, 2, vocab=128)
    inputs = {"input_ids": torch.randint(0, 128, (1, 8))}
    with tempfile.TemporaryDirectory() as directory:
        save_lora(base, Path(directory), rank)
        merged = peftfx.compile(base, {"adapters": {"a": {"peft": directory}}, "merge": True}, inputs)
    raw = torch.export.export(base, (), inputs, strict=False).module()
    models = {"base (eager)": base, "ep.module()": raw, "peftfx capture": peftfx.capture(base, inputs)}
    models["peftfx merged"] = merged
    with torch.inference_mode():
        times = interleave({name: _caller(m, inputs) for name, m in models.items()}, repeats, warmup=10)
    return {name: median(cpu) * 1e3 for name, (_, cpu) in times.items()}


if __name__ == "__main__":
    main()
