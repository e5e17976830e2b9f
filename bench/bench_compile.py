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
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

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
            peftfx.compile(base, spec, inputs, cache=False)

        def compile_cached() -> None:
            peftfx.compile(base, spec, inputs, cache=True)

        def capture() -> torch.fx.GraphModule:
            return peftfx.capture(base, inputs, cache=False)

        def capture_cached() -> None:
            peftfx.capture(base, inputs, cache=True)

        before = os.environ.get("PEFTFX_CACHE_DIR")
        os.environ["PEFTFX_CACHE_DIR"] = str(Path(directory) / "cache")  # filled by round 0's compile_cached
        try:
            for round_ in range(args.repeats + 1):  # round 0 warms up (imports, first-call caches), is dropped
                timed(times, "PEFT from_pretrained + merge_and_unload", peft_merge)
                timed(times, "peftfx compile (capture + merge)", compile_merge)
                gm = timed(times, "peftfx capture alone", capture)
                timed(times, "peftfx compile minus capture", apply, gm, load_spec(spec)[0])
                timed(times, CACHED, compile_cached)
                timed(times, "peftfx capture from the cache alone", capture_cached)
                if round_ == 0:
                    times.clear()
            times.update(_in_new_processes(args, spec, args.repeats))
        finally:
            if before is None:
                del os.environ["PEFTFX_CACHE_DIR"]
            else:
                os.environ["PEFTFX_CACHE_DIR"] = before
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
        Figure("compile with merge, capture cached / PEFT load + merge", s[CACHED] / peft_s, 1.0),
        Figure(
            "in new processes: compile with merge, capture cached / PEFT load + merge",
            s[NEW_PROCESS] / s[NEW_PROCESS_PEFT],
            1.0,
        ),
        Figure(
            "compile with merge, capture cached, in a new process / PEFT load + merge (warm)", s[NEW_PROCESS] / peft_s
        ),
        Figure("in a new process: compile with the cache / without", s[NEW_PROCESS] / s[NEW_PROCESS_NO_CACHE]),
        Figure(
            "capture from the cache / capture (torch.export)",
            s["peftfx capture from the cache alone"] / s["peftfx capture alone"],
        ),
    ]
    sites = 7 * args.layers
    lines = [
        f"Llama hidden {args.hidden}, {args.layers} layers ({sites} linear sites), float32, LoRA r={args.rank} on "
        f"every linear layer but the head; medians of {args.repeats} interleaved rounds after one warm-up round. "
        "The capture cache is off but where named; *in a new process*: the compile's own time in a fresh Python "
        "(imports excluded), with the cache holding the graph (the case it is for) and without it, and PEFT's load + "
        "merge likewise, in turn.",
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


CACHED = "peftfx compile, capture from the cache"
NEW_PROCESS = "peftfx compile, capture from the cache, in a new process"
NEW_PROCESS_NO_CACHE = "peftfx compile without the cache, in a new process"
NEW_PROCESS_PEFT = "PEFT from_pretrained + merge_and_unload, in a new process"

_NEW_PROCESS = """
import copy, json, sys, time
import torch
sys.path.insert(0, {bench!r})
from common import llama
import peftfx
from peft import PeftModel
torch.set_num_threads({threads})
base = llama({hidden}, {layers})
inputs = {{"input_ids": torch.randint(0, base.config.vocab_size, (1, 16))}}
spec = json.loads({spec!r})
wall, cpu = time.perf_counter(), time.process_time()
if {cache!r} == "peft":
    PeftModel.from_pretrained(copy.deepcopy(base), spec["adapters"]["a"]["peft"]).merge_and_unload()
else:
    peftfx.compile(base, spec, inputs, cache={cache})
print(json.dumps([time.perf_counter() - wall, time.process_time() - cpu]))
"""


def _in_new_processes(args: Any, spec: dict, repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """(wall, CPU) seconds of a compile in fresh processes (imports excluded), with the cache (filled already) and
    without, and of PEFT's load + merge there too (its first call pays a fresh process's first-use costs as
    well), in turn."""
    variants = ((NEW_PROCESS_NO_CACHE, False), (NEW_PROCESS, True), (NEW_PROCESS_PEFT, "peft"))
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _ in variants}
    for _ in range(repeats):
        for name, cache in variants:
            code = _NEW_PROCESS.format(
                bench=str(Path(__file__).parent),
                threads=args.threads,
                hidden=args.hidden,
                layers=args.layers,
                spec=json.dumps(spec),
                cache=cache,
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            wall, cpu = json.loads(out.stdout.strip().splitlines()[-1])
            times[name][0].append(wall)
            times[name][1].append(cpu)
    return times


if __name__ == "__main__":
    main()
