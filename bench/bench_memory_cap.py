"""A merge in less memory than the model: ``peftfx merge`` in a memory cgroup capped below the checkpoint's size.

    .venv/bin/python bench/bench_memory_cap.py [--layers 16 --fraction 0.3]   (as root)

The 1-2 GB bfloat16 Llama of ``bench_scale.py`` is saved with its LoRA. ``peftfx merge`` (the command line, as a user
runs it) then runs in a memory cgroup whose limit is ``--fraction`` of the checkpoint, after the page cache is
dropped: its anonymous memory and every page of the files it reads and writes count against the limit, so the
machine it sees is smaller than the model and the input comes from the disk. Its output is compared byte for byte
with an uncapped run's. PEFT's load + merge + save runs under the same cap beside it. Each run gets a cgroup of its
own (its peak is the cgroup's). Needs root and a memory cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``);
elsewhere it says so and writes nothing.
Llama 3 8B's shapes (8.0 B parameters, 15 GiB; 16 GB of memory to make the model, twice that on the disk):
``--hidden 4096 --intermediate 14336 --layers 32 --vocab 128256 --name memory_cap_8b``.
Results: results/memory_cap.md (or NAME.md) and .json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from common import Figure, drop_page_cache, load, parser, real_size_arguments, save_real_size, table, write

CGROUP = Path("/sys/fs/cgroup")
PEFT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3], max_shard_size="500MB")
"""


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    real_size_arguments(p, layers=16)
    p.add_argument("--fraction", type=float, default=0.3, help="the memory limit, as a fraction of the checkpoint")
    p.add_argument("--name", default="memory_cap", help="the results' name (results/NAME.md): one per model size")
    p.add_argument("--workdir", type=Path, help="where the temporary checkpoints go (default: the system's temp)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = _unsupported()
    if missing:
        print(f"memory_cap: not measured: {missing}")  # not a failure: `make bench` goes on
        return
    load_start = load()
    with tempfile.TemporaryDirectory(dir=args.workdir) as directory:
        root = Path(directory)
        checkpoint = save_real_size(args, root, "500MB")
        spec = root / "spec.json"
        spec.write_text(json.dumps({"adapters": {"a": {"peft": str(root / "adapter")}}, "merge": True}))
        limit = int(args.fraction * checkpoint)
        merge = [sys.executable, "-m", "peftfx", "merge", str(spec), "--model", str(root / "model")]
        merge += ["--max-shard-size", "500MB", "--output"]
        env = {**os.environ, "PEFTFX_CACHE": "0", "OMP_NUM_THREADS": str(args.threads)}
        runs = {"peftfx merge, no limit": _run([*merge, str(root / "reference")], None, env)}
        reference = _digests(root / "reference")  # then gone: a model the size of the disk's room fits once, not twice
        runs["peftfx merge"] = _run([*merge, str(root / "capped")], limit, env)
        equal = runs["peftfx merge"]["exit"] == 0 and _digests(root / "capped") == reference
        runs["PEFT from_pretrained + merge_and_unload + save_pretrained"] = _run(
            [sys.executable, "-c", PEFT, str(root / "model"), str(root / "adapter"), str(root / "peft")], limit, env
        )
    gib = 2**30
    rows = [
        (
            name,
            "none" if run["limit"] is None else f"{run['limit'] / gib:.2f} GiB ({run['limit'] / checkpoint:.2f}x)",
            f"{run['wall']:.2f}",
            run["exit"],
            "" if run["peak"] is None else f"{run['peak'] / gib:.2f}",
        )
        for name, run in runs.items()
    ]
    lines = [
        f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocabulary {args.vocab}, "
        f"bfloat16: checkpoint {checkpoint / gib:.2f} GiB in shards of 500MB; LoRA r={args.rank} on every linear "
        f"layer but the head; {args.threads} torch thread(s). Each capped run in a memory cgroup of its own limited to "
        f"{args.fraction}x the checkpoint (anonymous memory and page cache together), the page cache dropped first. "
        f"The capped merge's output {'equals' if equal else 'DIFFERS FROM'} the uncapped one's, byte for byte. Exit "
        "-9: killed by the kernel's out-of-memory killer at the limit.",
        "",
        *table(["run", "memory limit", "wall s", "exit", "peak (cgroup) GiB"], rows, "--rrr"),
    ]
    done = equal and runs["peftfx merge"]["exit"] == 0
    figures = [
        Figure("memory limit peftfx merge completes under / checkpoint", args.fraction if done else float("inf"), 1.0)
    ]
    data = {"checkpoint_gib": checkpoint / gib, "fraction": args.fraction, "equal": equal, "runs": runs}
    title = f"A merge in less memory than the model: {checkpoint / gib:.1f} GiB"
    write(args.output_dir, args.name, title, lines, figures, data, load_start)


def _unsupported() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a cgroup of its own and dropping the page cache)"
    if not ((CGROUP / "cgroup.controllers").is_file() or (CGROUP / "memory").is_dir()):
        return f"no memory cgroup under {CGROUP}"
    return None


def _run(command: list[str], limit: int | None, env: dict[str, str]) -> dict:
    """``command`` in a fresh cgroup limited to ``limit`` bytes (None: none), the page cache dropped first."""
    with _cgroup(limit) as group:
        drop_page_cache()
        enter = f'echo $$ > {group / "cgroup.procs"} && exec "$@"' if group is not None else 'exec "$@"'
        start = time.perf_counter()
        done = subprocess.run(["sh", "-c", enter, "sh", *command], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak = None if group is None else _peak(group)
    if done.returncode not in (0, -9, 137):
        print(done.stderr[-3000:], file=sys.stderr)
    return {"limit": limit, "wall": wall, "exit": -9 if done.returncode == 137 else done.returncode, "peak": peak}


@contextlib.contextmanager
def _cgroup(limit: int | None) -> Iterator[Path | None]:
    if limit is None:
        yield None
        return
    v2 = (CGROUP / "cgroup.controllers").is_file()
    group = (CGROUP if v2 else CGROUP / "memory") / f"peftfx-bench-{os.getpid()}"
    if v2:
        with contextlib.suppress(OSError):  # the memory controller handed down to the new group
            (CGROUP / "cgroup.subtree_control").write_text("+memory\n")
    group.mkdir()
    try:
        (group / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(f"{limit}\n")
        if not v2:
            with contextlib.suppress(OSError):
                (group / "memory.memsw.limit_in_bytes").write_text(f"{limit}\n")  # no escape into swap
        yield group
    finally:
        group.rmdir()


def _peak(group: Path) -> int | None:
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            return int((group / name).read_text())
    return None


def _digests(folder: Path) -> dict[str, str] | None:
    """Each file's SHA-256, and the folder removed; None where the run left no folder."""
    if not folder.is_dir():
        return None
    digests = {}
    for file in sorted(folder.iterdir()):
        with open(file, "rb") as f:
            digests[file.name] = hashlib.file_digest(f, "sha256").hexdigest()
    shutil.rmtree(folder)
    return digests


if __name__ == "__main__":
    main()
