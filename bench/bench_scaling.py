"""How ``peftfx.compile`` with merge scales with depth: 2, 4, 8, 16, 32 layers, beside PEFT's load + merge.

    .venv/bin/python bench/bench_scaling.py [--hidden 64 --layers 2 4 8 16 32 --rank 8 --repeats 5]

A small hidden size keeps it quick: tracing costs per op, not per weight element. Each round times, for
every depth, the capture, the rest of ``compile`` on that capture (``compile`` is their sum, per round), and
PEFT's from_pretrained (on a deep copy) + merge_and_unload; in CPU time (steady on a shared machine, see
bench_compile.py). Results: results/scaling.md and .json.
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

STAGES = ("capture", "compile minus capture", "compile", "PEFT load + merge")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = load()

    times: dict[tuple[int, str], tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        models = {}
        for n in args.layers:
            base = llama(args.hidden, n, vocab=256)
            models[n] = base, save_lora(base, Path(directory) / str(n), args.rank)
        inputs = {"input_ids": torch.randint(0, 256, (1, 16))}

        for round_ in range(args.repeats + 1):  # round 0 (the smallest model only) warms up and is dropped
            for n, (base, ckpt) in list(models.items())[: 1 if round_ == 0 else None]:
                spec = {"adapters": {"a": {"peft": str(ckpt)}}, "merge": True}
                gm = timed(times, (n, "capture"), peftfx.capture, base, inputs)
                timed(times, (n, "compile minus capture"), apply, gm, load_spec(spec)[0])
                timed(times, (n, "PEFT load + merge"), _peft_merge, base, ckpt)
            if round_ == 0:
                times.clear()
    s = {key: median(cpu) for key, (_, cpu) in times.items()}
    for n in args.layers:  # compile = capture + the rest, round by round
        rounds = zip(times[n, "capture"][1], times[n, "compile minus capture"][1], strict=True)
        s[n, "compile"] = median(map(sum, rounds))
    rows, steps = [], []
    for i, n in enumerate(args.layers):
        step = s[n, "compile"] / s[args.layers[i - 1], "compile"] if i else None
        if step is not None:
            steps.append(step)
        rows.append(
            (
                n,
                *(f"{s[n, stage] * 1e3:.0f}" for stage in STAGES),
                f"{s[n, 'compile'] / s[n, 'PEFT load + merge']:.1f}",
                f"{s[n, 'compile'] * 1e3 / n:.0f}",
                "" if step is None else f"{step:.2f}",
            )
        )
    figures = [Figure("compile time as layers double: largest step", max(steps), 2.2)] if steps else []
    lines = [
        f"Llama hidden {args.hidden}, LoRA r={args.rank} on every linear layer but the head (7 sites a layer), merged; "
        f"medians of {args.repeats} interleaved rounds after a warm-up round. CPU times in ms. Linear means a constant "
        "(or, with a fixed cost, falling) time per layer.",
        "",
        *table(["layers", *STAGES, "compile / PEFT", "compile ms / layer", "step (x2 layers)"], rows),
    ]
    data = {"layers": args.layers, "ms": {stage: [s[n, stage] * 1e3 for n in args.layers] for stage in STAGES}}
    write(args.output_dir, "scaling", "Compile time against depth", lines, figures, data, load_start)


def _peft_merge(base: torch.nn.Module, checkpoint: Path) -> None:
    PeftModel.from_pretrained(copy.deepcopy(base), checkpoint).merge_and_unload()


if __name__ == "__main__":
    main()
