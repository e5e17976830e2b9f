"""Folding 3 LoRA adapters into one: peftfx ``combine`` against PEFT's ``add_weighted_adapter``, in one process.

    .venv/bin/python bench/bench_fold.py [--hidden 256 --layers 4 --rank 16 --repeats 3 --threads 1]

For each method both sides start from the same three checkpoints on disk and end with a model running the
folded adapter: PEFT loads the adapters and calls ``add_weighted_adapter``; peftfx plans a spec with a
``combine`` on a captured graph (load, fold, insert: ``peftfx.compile`` minus the capture, which is done once
and reported apart, since PEFT has no equivalent). The fold step alone is timed too (PEFT's
``add_weighted_adapter`` call; peftfx's per-site folds).

Peak memory is the largest growth of the C heap in use (glibc's mallinfo2, where torch's CPU tensors live;
the resident set where that is unavailable) over the run's start, sampled every millisecond by a thread
(torch's allocations are invisible to tracemalloc). After one unmeasured warm-up of every variant, runs are
interleaved; times are medians, peaks maxima. Results go to bench/results/fold.md with the machine noted.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peftfx.passes import Cleanup, Insert, run_passes
from transformers import LlamaConfig, LlamaForCausalLM

import peftfx.fold
from peftfx.capture import capture
from peftfx.plan import make_plan
from peftfx.spec import load_spec

METHODS = {"cat": {}, "ties": {"density": 0.5}, "svd": {}, "ties_svd": {"density": 0.5}}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "fold.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
    )
    base = LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (1, 16))}
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
        dirs = {}
        for i, name in enumerate(names):
            torch.manual_seed(i + 1)
            lora = LoraConfig(
                r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False
            )
            dirs[name] = Path(directory) / name
            get_peft_model(copy.deepcopy(base), lora).save_pretrained(dirs[name])

        def run_peft(method: str) -> Callable[[], float]:
            def go() -> float:
                model = PeftModel.from_pretrained(copy.deepcopy(base), dirs["a"], adapter_name="a")
                for name in names[1:]:
                    model.load_adapter(dirs[name], adapter_name=name)
                t = time.perf_counter()
                model.add_weighted_adapter(names, weights, "mix", combination_type=method, **METHODS[method])
                fold_s = time.perf_counter() - t
                model.set_adapter("mix")
                return fold_s

            return go

        def run_peftfx(method: str) -> Callable[[], float]:
            params = {"combine": names, "weights": weights, "method": method, **METHODS[method]}
            spec = {"adapters": {**{n: {"peft": str(dirs[n])} for n in names}, "mix": params}}

            def go() -> float:
                fold_time[0] = 0.0
                gm = copy.deepcopy(captured)
                plan = make_plan(gm, load_spec(spec)[0], None)
                run_passes(gm, [Insert(plan.placements, plan.overrides, plan.configs), Cleanup()])
                return fold_time[0]

            return go

        for method in METHODS:  # warm-up: first-call costs (imports, export caches) are not the fold's
            run_peft(method)()
            run_peftfx(method)()
        results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
        for _ in range(args.repeats):
            for method in METHODS:
                for side, make in (("PEFT", run_peft), ("peftfx", run_peftfx)):
                    results.setdefault((method, side), []).append(measure(make(method)))

    def summary(method: str, side: str) -> tuple[float, float, float]:
        runs = results[method, side]
        return (
            statistics.median(r[0] for r in runs),
            statistics.median(r[1] for r in runs),
            max(r[2] for r in runs) / 2**20,
        )

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    lines = [
        "# Folding 3 LoRA adapters: peftfx combine vs PEFT add_weighted_adapter",
        "",
        f"Machine: {machine}. Llama hidden {args.hidden}, {args.layers} layers: {sites} linear sites; 3 LoRAs "
        f"r={args.rank} on all of them, weights {weights}; medians of {args.repeats} interleaved runs, peak = max "
        f"growth of {MEMORY} over the run's start, sampled every ms.",
        "",
        "Load+fold = PEFT: load 3 adapters + add_weighted_adapter; peftfx: load + fold + insert on a captured graph "
        f"(the capture, {capture_s:.2f} s once per model, is left out). Fold = PEFT's add_weighted_adapter call; "
        "peftfx's per-site folds.",
        "",
        "| method | PEFT load+fold s | peftfx load+fold s | ratio | PEFT fold s | peftfx fold s | fold ratio "
        "| PEFT peak MiB | peftfx peak MiB | peak ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in METHODS:
        (pt, pf, pm), (xt, xf, xm) = summary(method, "PEFT"), summary(method, "peftfx")
        lines.append(
            f"| {method} | {pt:.3f} | {xt:.3f} | {xt / pt:.2f} | {pf:.3f} | {xf:.3f} | {xf / pf:.2f} "
            f"| {pm:.1f} | {xm:.1f} | {xm / max(pm, 1e-9):.2f} |"
        )
    lines += [
        "",
        "Ratios are peftfx / PEFT (below 1: peftfx is cheaper). The machine is shared with other jobs, so "
        "differences under about 30% are within run-to-run noise.",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
