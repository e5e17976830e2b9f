"""Wall time to a merged model: ``peftfx.compile`` with ``merge: true`` beside PEFT's load and ``merge_and_unload``.

    .venv/bin/python bench/bench_compile.py [--hidden 256 --layers 4 --rank 16 --repeats 7]

Both start from the base model in memory and a LoRA checkpoint on disk, and leave the base model untouched:
PEFT loads onto a deep copy (it adapts the model it is given), peftfx never mutates the model. peftfx's time
is split into the capture (torch.export, which PEFT does not need) and the rest (``peftfx.driver.apply``:
read the checkpoint, plan, insert, merge, clean up), as when one model is captured once and compiled with
several specs. Rounds are interleaved. The figures are of CPU time (the work is single-threaded Python and
one torch thread: it is the wall time of an idle machine, which other jobs' time slices do not inflate), with
the wall time beside. Results: results/compile.md and .json.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from common import Figure, llama, load, median, parser, save_lora, table, timed, write
from peft import PeftModel

import peftfx
from peftfx.driver import apply
from peftfx.spec import load_spec


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = load()

    base = llama(args.hidden, args.layers)
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (1, 16))}
    times: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        save_lora(base, Path(directory), args.rank)
        spec = {"adapters": {"a": {"peft": directory}}, "merge": True}

        def peft_merge() -> None:
            PeftModel.from_pretrained(copy.deepcopy(base), directory).merge_and_unload()

        def compile_merge() -> None:
            peftfx.compile(base, spec, inputs)

        for round_ in range(args.repeats + 1):  # round 0 warms up (imports, first-call caches) and is dropped
            timed(times, "PEFT from_pretrained + merge_and_unload", peft_merge)
            timed(times, "peftfx compile (capture + merge)", compile_merge)
            gm = timed(times, "peftfx capture alone", peftfx.capture, base, inputs)
            timed(times, "peftfx compile minus capture", apply, gm, load_spec(spec)[0])
            if round_ == 0:
                times.clear()
    s = {name: median(cpu) for name, (_, cpu) in times.items()}
    wall = {name: median(w) for name, (w, _) in times.items()}
    peft_wall = wall["PEFT from_pretrained + merge_and_unload"]
    peft_s = s["PEFT from_pretrained + merge_and_unload"]
    figures = [
        Figure(
            "compile with merge / PEFT load + merge_and_unload", s["peftfx compile (capture + merge)"] / peft_s, 1.0
        ),
        Figure(
            "compile with merge, capture done once / PEFT load + merge", s["peftfx compile minus capture"] / peft_s, 1.0
        ),
        Figure("capture (torch.export) / PEFT load + merge", s["peftfx capture alone"] / peft_s),
    ]
    sites = 7 * args.layers
    lines = [
        f"Llama hidden {args.hidden}, {args.layers} layers ({sites} linear sites), float32, LoRA r={args.rank} on "
        f"every linear layer but the head; medians of {args.repeats} interleaved rounds after one warm-up round.",
        "",
        *table(
            ["variant", "CPU ms", "ratio to PEFT", "wall ms", "wall ratio to PEFT"],
            [
                (n, f"{v * 1e3:.1f}", f"{v / peft_s:.2f}", f"{wall[n] * 1e3:.1f}", f"{wall[n] / peft_wall:.2f}")
                for n, v in s.items()
            ],
        ),
    ]
    write(
        args.output_dir,
        "compile",
        "Compile with merge: peftfx beside PEFT's load + merge",
        lines,
        figures,
        {"seconds": s, "wall_seconds": wall, "layers": args.layers, "hidden": args.hidden},
        load_start,
    )


if __name__ == "__main__":
    main()
