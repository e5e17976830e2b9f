"""Mixed-adapter batches: peftfx's routed graph against PEFT's ``adapter_names`` eager loop, side by side.

    .venv/bin/python bench/bench_routing.py [--hidden 256 --layers 4 --batch 16 --seq 64 --adapters 4 --repeats 20]

Each sample of the batch picks one of the adapters (LoRA, ranks 8 and 16 alternating, targets alternating between
all linear layers and attention only) or the base model. Before any timing, the largest difference of each peftfx
variant's logits from PEFT's is measured. One call of each variant per round (eager, and the routed graph
torch.compile'd unless ``--no-compile``), medians and ratios to PEFT, of CPU time (the figures: with one thread,
the latency other jobs' time slices do not inflate) and of wall time. Results: results/routing.md and .json.
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

BASE = "__base__"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="also time the torch.compile'd graph"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = load()

    base = llama(args.hidden, args.layers)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    names = [f"a{i}" for i in range(args.adapters)]
    choices = [*names, BASE]
    picks = [choices[i % len(choices)] for i in torch.randperm(args.batch).tolist()]
    index = torch.tensor([-1 if p == BASE else names.index(p) for p in picks])
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for i, name in enumerate(names):  # the routed sites and ranks differ from one adapter to the next
            rank, targets = (8, "all-linear") if i % 2 == 0 else (16, ATTENTION)
            save_lora(base, root / name, rank, seed=i + 1, targets=targets)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), root / names[0], adapter_name=names[0]).eval()
        for name in names[1:]:
            peft_model.load_adapter(root / name, adapter_name=name)
        spec = {"adapters": {n: {"peft": str(root / n)} for n in names}, "routing": {"adapters": names}}
        t = time.perf_counter()
        routed = peftfx.compile(base, spec, {"input_ids": ids})
        compile_s = time.perf_counter() - t

    variants = {
        "base (eager)": lambda: base(input_ids=ids),
        "PEFT adapter_names (eager)": lambda: peft_model(input_ids=ids, adapter_names=picks),
        "peftfx routed (eager)": lambda: routed(input_ids=ids, adapter_index=index),
    }
    inductor_s = None
    if args.compile:
        compiled = torch.compile(routed)
        t = time.perf_counter()
        with torch.inference_mode():
            compiled(input_ids=ids, adapter_index=index)
        inductor_s = time.perf_counter() - t
        variants["peftfx routed (torch.compile)"] = lambda: compiled(input_ids=ids, adapter_index=index)

    with torch.inference_mode():
        want = peft_model(input_ids=ids, adapter_names=picks).logits
        diff = {n: (fn().logits - want).abs().max().item() for n, fn in variants.items() if n.startswith("peftfx")}
        times = interleave(variants, args.repeats)
    ms = {name: median(cpu) * 1e3 for name, (_, cpu) in times.items()}
    wall_ms = {name: median(wall) * 1e3 for name, (wall, _) in times.items()}

    peft_ms, peft_wall = ms["PEFT adapter_names (eager)"], wall_ms["PEFT adapter_names (eager)"]
    figures = [Figure("routed graph / PEFT adapter_names (eager)", ms["peftfx routed (eager)"] / peft_ms, 1.0)]
    if args.compile:
        figures.append(
            Figure(
                "routed graph, torch.compile / PEFT adapter_names (eager)",
                ms["peftfx routed (torch.compile)"] / peft_ms,
                1.0,
            )
        )
    figures.append(Figure("base model (eager) / PEFT adapter_names (eager)", ms["base (eager)"] / peft_ms))
    lines = [
        f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}, float32; {args.adapters} "
        "LoRA adapters (r 8 on all linear layers / r 16 on attention, alternating) and the base model, each sample "
        f"picking one (picks: {' '.join(p.replace(BASE, 'base') for p in picks)}); medians of {args.repeats} "
        "interleaved rounds. The ratios are of CPU time (see above); the wall-clock ones, inflated by other jobs, "
        "are beside them.",
        "",
        *table(
            ["variant", "CPU ms", "ratio to PEFT", "wall ms", "wall ratio to PEFT"],
            [
                (n, f"{v:.2f}", f"{v / peft_ms:.3f}", f"{wall_ms[n]:.2f}", f"{wall_ms[n] / peft_wall:.3f}")
                for n, v in ms.items()
            ],
        ),
        "",
        "Largest difference from PEFT's logits: "
        + ", ".join(f"{n} {d:.1e}" for n, d in diff.items())
        + f". peftfx compile (capture + route) {compile_s * 1e3:.0f} ms"
        + (f"; first torch.compile call (Inductor) {inductor_s:.1f} s." if inductor_s is not None else "."),
        "PEFT runs each adapter's layers on its sub-batch in a Python loop; the routed graph gathers every "
        "sample's factors (zero-padded to the largest rank) and applies them with two batched matmuls per site.",
    ]
    data = {
        "latency_ms": ms,
        "wall_ms": wall_ms,
        "picks": picks,
        "max_abs_diff": diff,
        "peftfx_compile_s": compile_s,
        "torch_compile_first_call_s": inductor_s,
    }
    write(
        args.output_dir,
        "routing",
        "Mixed-adapter batches: peftfx routing beside PEFT adapter_names",
        lines,
        figures,
        data,
        load_start,
    )


if __name__ == "__main__":
    main()
