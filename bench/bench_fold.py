"""Folding 3 LoRA adapters into one: peftfx ``combine`` against PEFT's ``add_weighted_adapter``, in one process.

    .venv/bin/python bench/bench_fold.py [--hidden 256 --layers 4 --rank 16 --repeats 3 --threads 1]

For each method both sides start from the same three checkpoints on disk and end with a model running the
folded adapter: PEFT loads the adapters and calls ``add_weighted_adapter``; peftfx applies a spec with a
``combine`` to a captured graph (load, fold, insert: ``peftfx.compile`` minus the capture, which is done once
and reported apart, since PEFT has no equivalent). "ties + merge" also merges the folded adapter into the
weights (PEFT: ``merge_and_unload``; peftfx: ``merge: [mix]``). The fold step alone is timed too (PEFT's
``add_weighted_adapter`` call; peftfx's per-site folds). The model each run starts from (a deep copy of the
base for PEFT, of the capture for peftfx) is made before the clock starts.

Peak memory is the largest growth of the C heap in use (glibc's mallinfo2, where torch's CPU tensors live;
the resident set where that is unavailable) over the run's start, sampled every millisecond by a thread
(torch's allocations are invisible to tracemalloc). After one unmeasured warm-up of every variant, runs are
interleaved; times are medians, peaks maxima. Results: results/fold.md and .json.
"""

from __future__ import annotations

import copy
import ctypes
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import Figure, llama, load, parser, save_lora, table, write
from peft import PeftModel

import peftfx.fold
from peftfx.capture import capture
from peftfx.driver import apply
from peftfx.spec import load_spec

METHODS = {"cat": {}, "ties": {"density": 0.5}, "svd": {}, "ties_svd": {"density": 0.5}}
VARIANTS = [(method, False) for method in METHODS] + [("ties", True)]  # (method, merge)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _heap_reader() -> tuple[Callable[[], int], str]:
    """Bytes in use on the C heap (glibc's mallinfo2: torch's CPU tensors live there), else the resident set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2

        def heap() -> int:
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        heap()
        return heap, "C-heap bytes in use (glibc mallinfo2)"
    except (OSError, AttributeError):
        page = os.sysconf("SC_PAGE_SIZE")

        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return rss, "resident set size"


rss, MEMORY = _heap_reader()


def measure(fn: Callable[[], float]) -> tuple[float, float, int]:
    """(seconds, fold seconds reported by ``fn``, peak memory growth in bytes)."""
    start, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss() - start)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    fold_s = fn()
    seconds = time.perf_counter() - t
    done.set()
    thread.join()
    return seconds, fold_s, max(peak[0], rss() - start)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = load()

    base = llama(args.hidden, args.layers)
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (1, 16))}
    t = time.perf_counter()
    captured = capture(base, inputs)
    capture_s = time.perf_counter() - t
    names = ["a", "b", "c"]
    weights = [1.0, -0.5, 0.7]
    sites = 7 * args.layers

    fold_time = [0.0]
    original = peftfx.fold.fold_site

    def timed_fold(*a, **kw):
        t = time.perf_counter()
        out = original(*a, **kw)
        fold_time[0] += time.perf_counter() - t
        return out

    peftfx.fold.fold_site = timed_fold

    with tempfile.TemporaryDirectory() as directory:
        dirs = {name: save_lora(base, Path(directory) / name, args.rank, seed=i + 1) for i, name in enumerate(names)}

        def run_peft(method: str, merge: bool) -> Callable[[], float]:
            model = copy.deepcopy(base)

            def go() -> float:
                peft_model = PeftModel.from_pretrained(model, dirs["a"], adapter_name="a")
                for name in names[1:]:
                    peft_model.load_adapter(dirs[name], adapter_name=name)
                t = time.perf_counter()
                peft_model.add_weighted_adapter(names, weights, "mix", combination_type=method, **METHODS[method])
                fold_s = time.perf_counter() - t
                peft_model.set_adapter("mix")
                if merge:
                    peft_model.merge_and_unload()
                return fold_s

            return go

        def run_peftfx(method: str, merge: bool) -> Callable[[], float]:
            params = {"combine": names, "weights": weights, "method": method, **METHODS[method]}
            spec = {"adapters": {**{n: {"peft": str(dirs[n])} for n in names}, "mix": params}}
            if merge:
                spec["merge"] = ["mix"]
            gm = copy.deepcopy(captured)

            def go() -> float:
                fold_time[0] = 0.0
                apply(gm, load_spec(spec)[0])
                return fold_time[0]

            return go

        for variant in VARIANTS:  # warm-up: first-call costs (imports, export caches) are not the fold's
            run_peft(*variant)()
            run_peftfx(*variant)()
        results: dict[tuple[tuple[str, bool], str], list[tuple[float, float, int]]] = {}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                for side, make in (("PEFT", run_peft), ("peftfx", run_peftfx)):
                    results.setdefault((variant, side), []).append(measure(make(*variant)))

    def summary(variant: tuple[str, bool], side: str) -> tuple[float, float, float]:
        runs = results[variant, side]
        return (
            statistics.median(r[0] for r in runs),
            statistics.median(r[1] for r in runs),
            max(r[2] for r in runs) / 2**20,
        )

    rows, ratios = [], {}
    for variant in VARIANTS:
        (pt, pf, pm), (xt, xf, xm) = summary(variant, "PEFT"), summary(variant, "peftfx")
        label = f"{variant[0]} + merge" if variant[1] else variant[0]
        ratios[label] = xt / pt
        rows.append(
            (
                label,
                f"{pt:.3f}",
                f"{xt:.3f}",
                f"{xt / pt:.2f}",
                f"{pf:.3f}",
                f"{xf:.3f}",
                f"{xf / pf:.2f}",
                f"{pm:.1f}",
                f"{xm:.1f}",
                f"{xm / max(pm, 1e-9):.2f}",
            )
        )
    figures = [
        Figure("TIES fold of 3 adapters + merge / PEFT add_weighted_adapter(ties) + merge", ratios["ties + merge"], 1.0)
    ]
    figures += [
        Figure(f"{label} fold (load + fold + insert) / PEFT", r) for label, r in ratios.items() if "merge" not in label
    ]
    lines = [
        f"Llama hidden {args.hidden}, {args.layers} layers: {sites} linear sites; 3 LoRAs r={args.rank} on all of "
        f"them, weights {weights}; medians of {args.repeats} interleaved runs, peak = max growth of {MEMORY} over the "
        "run's start, sampled every ms.",
        "",
        "Load+fold = PEFT: load 3 adapters + add_weighted_adapter (+ merge_and_unload); peftfx: load + fold + insert "
        f"(+ merge) on a captured graph (the capture, {capture_s:.2f} s once per model, is left out). Fold = PEFT's "
        "add_weighted_adapter call; peftfx's per-site folds.",
        "",
        *table(
            [
                "method",
                "PEFT load+fold s",
                "peftfx load+fold s",
                "ratio",
                "PEFT fold s",
                "peftfx fold s",
                "fold ratio",
                "PEFT peak MiB",
                "peftfx peak MiB",
                "peak ratio",
            ],
            rows,
        ),
        "",
        "Ratios are peftfx / PEFT (below 1: peftfx is cheaper).",
    ]
    data = {"ratios": ratios, "capture_s": capture_s}
    write(
        args.output_dir,
        "fold",
        "Folding 3 LoRA adapters: peftfx combine beside PEFT add_weighted_adapter",
        lines,
        figures,
        data,
        load_start,
    )


if __name__ == "__main__":
    main()
