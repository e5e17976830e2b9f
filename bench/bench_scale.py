"""Real sizes: merging a 1-2 GB bfloat16 Llama, in memory (default and inplace), out of core, and beside PEFT.

    .venv/bin/python bench/bench_scale.py [--hidden 2048 --intermediate 5632 --layers 8 --vocab 32000 --rank 16]

A random bfloat16 Llama built from its config is saved as a sharded transformers checkpoint in a temporary folder,
beside a PEFT LoRA (r=16, every linear layer but the head). Each variant then runs in a fresh process (no allocator
or page state carries over between them, but the files stay in the page cache, the same for every variant): the
child loads what it needs, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs the variant, and
reports its wall and CPU seconds and its peak resident set (VmHWM) above the resident set just before. Every variant
runs ``--rounds`` times, all of them in turn (each round with a capture cache of its own), and its fastest run is
reported, every run's wall time beside it: on this virtual machine the same run takes up to twice as long at times.
``read + write`` is the floor of an out-of-core merge: every shard's bytes read and written once, on the same disk,
the fastest way measured here: the kernel copies page to page (``copy_file_range``, as ``peftfx merge`` copies the
tensors it leaves as they are), starts writing each 16 MiB to the disk as soon as it is copied (``sync_file_range``),
and the files are flushed (``fsync``) at the end, as ``peftfx merge`` flushes its output before it renames it into
place: both include the disk's writes, neither the reads while the input fits in the page cache. The same copy flushed
only at the end (``shutil.copyfile``, then ``fsync``) is shown beside it. Where the benchmark runs as root, the
first and second merges and the floor run once more ``from the disk``: the page cache dropped just before each (an
out-of-core merge's model is larger than the memory, so its bytes cannot all be in the page cache). The throughput
goal (a merge within 1.5x the time to read and write the checkpoint's bytes on the same disk) is read there; from
the page cache the bytes are already in memory, the floor is a memory copy, and the merge's exact arithmetic sets
its time: those ratios are shown without a goal. On a virtual
machine that hands freed memory back to its host, reading into it costs the host's page faults too: at small sizes
these times vary with the hypervisor more than with the disk. The second merge also runs on every
core (the command line leaves one core to its writer by default: on two cores, one thread, as the other variants run
with ``--threads``). The imports (transformers'
modeling code) happen before the clock starts in every variant: PEFT's variant has its model loaded, and a
throughput is per byte.
More variants are one entry in ``VARIANTS`` and one function in ``RUNS``. At Llama 3 8B's shapes (15 GiB: too large
to load beside its merge on a 24 GB machine, so out of core only): ``--hidden 4096 --intermediate 14336 --layers 32
--vocab 128256 --shard-size 5GB --out-of-core-only --name scale_8b``.
Results: results/scale.md (or NAME.md) and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import Figure, drop_page_cache, llama, load, parser, real_size_arguments, save_real_size, table, write
from peftfx.passes.merge import _give_back_freed_memory

from peftfx.atomic import start_writeback, sync_tree

VARIANTS = {
    "peftfx compile + merge": "capture, plan, insert, merge (new merged tensors; the model untouched)",
    "peftfx compile + merge, again": "the same in a new process, its capture now in the capture cache",
    "peftfx compile + merge, inplace": "the same, merged into the model's own tensors (inplace=True)",
    "PEFT from_pretrained + merge_and_unload": "in place, on the model itself",
    "peftfx merge (out of core)": "`peftfx merge`: checkpoint folder to checkpoint folder, tensor by tensor",
    "peftfx merge, again": "the same in a new process, its capture now in the capture cache",
    "read + write": "every shard's bytes read and written once, in the kernel, written back as it goes (the floor)",
    "read + write, flushed at the end": "the same copy (`shutil.copyfile`), written to the disk only by the `fsync`",
    "peftfx merge, again, every core": "the second merge on every core (the command line leaves one to its writer)",
    "peftfx merge, from the disk": "the first merge (capture included, an empty cache), the page cache dropped first",
    "peftfx merge, again, from the disk": "the second merge, the page cache dropped first: reads from the disk",
    "read + write, from the disk": "the floor, the page cache dropped first (root only, as the lines above)",
}
FROM_DISK = {"peftfx merge, from the disk", "peftfx merge, again, from the disk", "read + write, from the disk"}
IN_MEMORY = {name for name in VARIANTS if not name.startswith(("peftfx merge", "read + write"))}
PEFT = "PEFT from_pretrained + merge_and_unload"
# (figure, variant, over: a variant (wall times) or "checkpoint" (peak RSS growth over its bytes), goal)
FIGURES = [
    ("compile + merge / PEFT load + merge (wall)", "peftfx compile + merge", PEFT, 1.0),
    ("compile + merge, capture cached / PEFT load + merge (wall)", "peftfx compile + merge, again", PEFT, 1.0),
    ("compile + merge, inplace / PEFT load + merge (wall)", "peftfx compile + merge, inplace", PEFT, 1.0),
    ("peak RSS growth, compile + merge / weights", "peftfx compile + merge", "checkpoint", None),
    ("peak RSS growth, inplace / weights", "peftfx compile + merge, inplace", "checkpoint", 0.25),
    ("peak RSS growth, peftfx merge (out of core) / checkpoint", "peftfx merge (out of core)", "checkpoint", 0.3),
    (
        "peftfx merge / read + write, both from the disk (wall)",
        "peftfx merge, from the disk",
        "read + write, from the disk",
        1.5,
    ),
    (
        "peftfx merge again / read + write, both from the disk (wall)",
        "peftfx merge, again, from the disk",
        "read + write, from the disk",
        1.5,
    ),
    (
        "peftfx merge / read + write, both from the page cache (wall)",
        "peftfx merge (out of core)",
        "read + write",
        None,
    ),
    (
        "peftfx merge again (capture cached) / read + write, from the page cache (wall)",
        "peftfx merge, again",
        "read + write",
        None,
    ),
    (
        "peftfx merge / read + write flushed at the end (wall)",
        "peftfx merge (out of core)",
        "read + write, flushed at the end",
        None,
    ),
    ("peak RSS growth, PEFT / weights", PEFT, "checkpoint", None),
    ("peftfx merge again, every core / read + write (wall)", "peftfx merge, again, every core", "read + write", None),
]


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    real_size_arguments(p, layers=8)
    p.add_argument("--shard-size", default="500MB", help="the saved checkpoint's (and the merge's) shard size")
    p.add_argument("--rounds", type=int, default=2, help="runs of every variant, in turn; the fastest is reported")
    p.add_argument("--workdir", type=Path, help="where the temporary checkpoints go (default: the system's temp)")
    p.add_argument(
        "--out-of-core-only",
        action="store_true",
        help="only `peftfx merge` and the floors (for a model too large to load: no compile, no PEFT)",
    )
    p.add_argument("--name", default="scale", help="the results' name (results/NAME.md): one per model size")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args)))
        return
    load_start = load()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as directory:
        root = Path(directory)
        checkpoint = save_real_size(args, root, args.shard_size)
        _give_back_freed_memory()
        os.sync()  # the checkpoint on the disk before any variant runs: none pays for its writeback
        for round_ in range(args.rounds):
            for variant in VARIANTS:
                if args.out_of_core_only and variant in IN_MEMORY:
                    continue
                threads = (os.cpu_count() or 1) if variant.endswith("every core") else args.threads
                command = [sys.executable, __file__, "--child", variant, "--root", directory]
                command += [f"--threads={threads}", f"--shard-size={args.shard_size}"]
                env = _environment(variant, root / f"cache-{round_}")
                if variant in FROM_DISK and not drop_page_cache():
                    continue  # not root: the page cache stays
                out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                walls = [*results.get(variant, {}).get("walls", []), result["wall"]]
                if variant not in results or result["wall"] < results[variant]["wall"]:
                    results[variant] = result
                results[variant]["walls"] = walls
                shutil.rmtree(root / "out", ignore_errors=True)
    gib, r = 2**30, results
    figures = [
        Figure(label, r[name]["wall"] / r[over]["wall"] if over in r else r[name]["peak"] / checkpoint, goal)
        for label, name, over, goal in FIGURES
        if name in r and (over in r or over == "checkpoint")
    ]
    rows = [
        (
            name,
            f"{v['wall']:.2f}",
            " / ".join(f"{w:.2f}" for w in v["walls"]),
            f"{v['cpu']:.2f}",
            f"{v['peak'] / gib:.2f}",
            f"{v['peak'] / checkpoint:.2f}",
            ", ".join(f"{k} {s:.2f}" for k, s in v.get("steps", {}).items()),
            VARIANTS[name],
        )
        for name, v in r.items()
    ]
    lines = [
        f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocabulary {args.vocab}, "
        f"bfloat16: checkpoint {checkpoint / gib:.2f} GiB in shards of {args.shard_size}; LoRA r={args.rank} on every "
        f"linear layer but the head. {args.threads} torch thread(s) ({os.cpu_count()} in the every-core run); each "
        f"variant in its own process, {args.rounds} rounds of them all, the fastest run shown (every run's wall time "
        "beside it). Peak = VmHWM "
        "above VmRSS just before the variant (the base model, where one is loaded, is already resident). The capture "
        "cache is on, as by default, in a folder that starts empty each round: the first compile and the first merge "
        "capture and store, their second runs read it; it is off for the inplace compile."
        + (" Out of core only: the model is not loaded (no compile, no PEFT)." if args.out_of_core_only else ""),
        "",
        *table(
            ["variant", "wall s", "every round", "CPU s", "peak growth GiB", "/ checkpoint", "steps (s)", "what"],
            rows,
            "-rrrrr--",
        ),
    ]
    data = {"checkpoint_gib": checkpoint / gib, "results": r}
    title = f"Real sizes: merges of a {checkpoint / gib:.1f} GiB model"
    write(args.output_dir, args.name, title, lines, figures, data, load_start)


def _child(args: Any) -> dict[str, Any]:
    root = args.root
    spec = {"adapters": {"a": {"peft": str(root / "adapter")}}, "merge": True}
    run = RUNS[args.child](root, spec, args)
    before = _reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    kept = run()  # kept alive until the peak is read
    result = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    result["peak"] = _status("VmHWM") - before
    if isinstance(kept, dict):
        result["steps"] = kept
    return result


def _compile(inplace: bool) -> Callable[..., Callable[[], Any]]:
    def prepare(root: Path, spec: dict, args: Any) -> Callable[[], Any]:
        import peftfx
        from peftfx.driver import build

        peftfx.capture(llama(64, 1, vocab=64), {"input_ids": torch.zeros(1, 4, dtype=torch.long)})  # export's warmup
        model = _load(root)
        inputs = {"input_ids": torch.randint(0, 64, (1, 16))}
        return lambda: build(model, spec, inputs, inplace=inplace).seconds

    return prepare


def _peft(root: Path, spec: dict, args: Any) -> Callable[[], Any]:
    from peft import PeftModel

    model = _load(root)
    return lambda: PeftModel.from_pretrained(model, root / "adapter").merge_and_unload()


def _out_of_core(root: Path, spec: dict, args: Any) -> Callable[[], Any]:
    """``peftfx merge``, its steps timed by wrapping the functions that do them (the merge's thread only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftfx import atomic, out_of_core

    with torch.device("meta"):  # imports transformers' modeling code, as loading the model does in PEFT's variant
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / "model"))
    steps: dict[str, float] = {}
    for owner, name, step in [
        (out_of_core, "_meta_model", "meta model"),
        (out_of_core, "capture_graph", "capture"),
        (out_of_core, "make_plan", "plan"),
        (out_of_core._Shards, "finish", "merge + write"),
        (atomic, "sync_tree", "flush"),
    ]:
        setattr(owner, name, _timed(getattr(owner, name), step, steps))

    def run() -> dict[str, float]:
        out_of_core.merge_checkpoint(spec, root / "model", root / "out", max_shard_size=args.shard_size)
        return steps

    return run


def _timed(fn: Callable[..., Any], step: str, steps: dict[str, float]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            steps[step] = steps.get(step, 0.0) + time.perf_counter() - start

    return timed


def _read_write(root: Path, spec: dict, args: Any) -> Callable[[], Any]:
    def copy() -> None:
        (root / "out").mkdir()
        for shard in sorted((root / "model").glob("*.safetensors")):
            src, dst = os.open(shard, os.O_RDONLY), os.open(root / "out" / shard.name, os.O_WRONLY | os.O_CREAT, 0o644)
            done, size = 0, os.fstat(src).st_size
            while done < size:
                n = os.copy_file_range(src, dst, min(size - done, 1 << 24), done, done)
                start_writeback(dst, done, n)
                done += n
            os.close(src)
            os.close(dst)
        sync_tree(root / "out")  # as peftfx merge flushes its output before the rename

    return copy


def _read_write_flushed_at_end(root: Path, spec: dict, args: Any) -> Callable[[], Any]:
    def copy() -> None:
        (root / "out").mkdir()
        for shard in sorted((root / "model").glob("*.safetensors")):
            shutil.copyfile(shard, root / "out" / shard.name)
        sync_tree(root / "out")

    return copy


def _environment(variant: str, cache: Path) -> dict[str, str]:
    """The child's environment: the capture cache on, as by default, in this round's folder, which the first
    compile and the first ``peftfx merge`` fill and their second runs read (the first merge from the disk has a
    folder of its own: it captures too); off for the inplace compile."""
    on = variant != "peftfx compile + merge, inplace"
    if variant == "peftfx merge, from the disk":
        cache = cache.with_name(cache.name + "-disk")
    return {**os.environ, "PEFTFX_CACHE": "1" if on else "0", "PEFTFX_CACHE_DIR": str(cache)}


RUNS: dict[str, Callable[[Path, dict, Any], Callable[[], Any]]] = {
    "peftfx compile + merge": _compile(False),
    "peftfx compile + merge, again": _compile(False),
    "peftfx compile + merge, inplace": _compile(True),
    "PEFT from_pretrained + merge_and_unload": _peft,
    "peftfx merge (out of core)": _out_of_core,
    "peftfx merge, again": _out_of_core,
    "read + write": _read_write,
    "read + write, flushed at the end": _read_write_flushed_at_end,
    "peftfx merge, again, every core": _out_of_core,
    "peftfx merge, from the disk": _out_of_core,
    "peftfx merge, again, from the disk": _out_of_core,
    "read + write, from the disk": _read_write,
}


def _load(root: Path) -> torch.nn.Module:
    """The model in anonymous memory, built in bfloat16 from the saved config (its random weights are not the saved
    ones; timings and memory do not care): from_pretrained may map the files, and writing into a private file
    mapping copies each page it touches, which would bill an in-place merge for a copy of the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    _give_back_freed_memory()
    return model


def _reset_peak() -> int:
    """Set the kernel's peak-RSS mark to the current RSS; return that, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


if __name__ == "__main__":
    main()
