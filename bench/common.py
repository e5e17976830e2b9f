"""What every benchmark shares: the models, interleaved timing, the machine's description and the result files.

Each script writes ``results/<name>.md`` (its tables) and ``results/<name>.json`` (its figures against their
goals, and the data ``report.py`` plots); ``report.py`` assembles ``RESULTS.md`` from them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

RESULTS = Path(__file__).parent / "results"

# PEFT calls a transformers method deprecated in 5.x on every load: one warning a call would bury the tables.
warnings.filterwarnings("ignore", category=FutureWarning)


@dataclass(frozen=True)
class Figure:
    """One measured ratio and its goal (``value <= goal``); ``goal`` None for a figure reported for context."""

    figure: str
    value: float
    goal: float | None = None

    @property
    def meets(self) -> bool | None:
        return None if self.goal is None else self.value <= self.goal


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--output-dir", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one: the machine is shared)")
    return p


def llama(
    hidden: int,
    layers: int,
    *,
    vocab: int = 1024,
    intermediate: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A random Llama (float32 by default, made in ``dtype``): 32-wide heads, a quarter of them for keys and values
    (grouped-query attention)."""
    torch.manual_seed(seed)
    heads = max(hidden // 32, 2)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        vocab_size=vocab,
        max_position_embeddings=512,
        use_cache=False,  # a captured graph returns no cache (torch.export rejects it): nor do the eager models
    )
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def save_lora(
    base: torch.nn.Module,
    directory: Path,
    rank: int,
    seed: int = 1,
    targets: str | list[str] = "all-linear",
    *,
    consume: bool = False,
) -> Path:
    """A PEFT LoRA on ``targets`` (default: every linear layer but the head), random (non-identity) factors, saved.
    ``consume``: wrap ``base`` itself (it is left with the adapter in it), not a copy, where a copy would not fit."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    get_peft_model(base if consume else copy.deepcopy(base), config).save_pretrained(directory)
    return directory


def real_size_arguments(p: argparse.ArgumentParser, layers: int) -> None:
    """The dimensions of the real-size benchmarks' Llama (1.6 GiB in bfloat16 at 16 layers) and its LoRA's rank."""
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=16)


def save_real_size(args: argparse.Namespace, root: Path, shard_size: str) -> int:
    """That Llama, random, saved in bfloat16 as a sharded checkpoint in ``root/model`` and its LoRA in
    ``root/adapter``; returns the checkpoint's bytes of weights. Made in bfloat16 and never copied: one model's
    memory (16 GB at Llama 3 8B's size)."""
    base = llama(args.hidden, args.layers, vocab=args.vocab, intermediate=args.intermediate, dtype=torch.bfloat16)
    base.save_pretrained(root / "model", max_shard_size=shard_size)
    save_lora(base, root / "adapter", args.rank, consume=True)
    del base
    gc.collect()  # the model and its adapter hold each other: freed now, not while the variants run
    return sum(f.stat().st_size for f in (root / "model").glob("*.safetensors"))


def drop_page_cache() -> bool:
    """Write every dirty page and drop the clean ones, so the next reads come from the disk; False where that needs
    a privilege this process lacks (root, on Linux)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def interleave(
    variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, tuple[list[float], list[float]]]:
    """(wall, CPU) seconds per call of each variant, one call of each per round, so load hits all alike.

    Each round starts one variant later than the one before, so none always runs right after the same one
    (which had made identical models differ by several percent). With one torch thread a call's CPU time is
    its latency on an idle machine: other jobs' time slices add to the wall clock but not to it, which makes
    it the steadier measure on a shared machine.
    """
    names = list(variants)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            times[name][1].append(time.process_time() - cpu)
            times[name][0].append(time.perf_counter() - wall)
    return times


def timed(times: dict[Any, tuple[list[float], list[float]]], key: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn(*args)``, appending its (wall, CPU) seconds to ``times[key]``; return what it returns."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    walls, cpus = times.setdefault(key, ([], []))
    cpus.append(time.process_time() - cpu)
    walls.append(time.perf_counter() - wall)
    return out


def median(values: Iterable[float]) -> float:
    return statistics.median(values)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, Python {platform.python_version()}"
    )


def load() -> float:
    """The 1-minute load average: above the core count, other jobs were competing for the CPU."""
    return os.getloadavg()[0]


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    align = align or "-" + "r" * (len(header) - 1)
    rule = ["---" if a == "-" else "---:" for a in align]
    return [f"| {' | '.join(header)} |", f"| {' | '.join(rule)} |", *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def write(
    output_dir: Path,
    name: str,
    title: str,
    lines: list[str],
    figures: Sequence[Figure],
    data: dict[str, Any],
    load_start: float,
) -> None:
    """``<name>.md``: title, machine and load, the script's lines; ``<name>.json``: figures and plot data."""
    load_end = load()
    head = [
        f"# {title}",
        "",
        f"Machine: {machine()}. Load average {load_start:.1f} at the start, {load_end:.1f} at the end "
        f"({os.cpu_count()} cores, shared with other jobs: ratios from one interleaved run are steadier than times).",
        "",
    ]
    if figures:
        head += table(
            ["figure", "value", "goal", "meets"],
            [(f.figure, f"{f.value:.3f}", _goal(f), _verdict(f)) for f in figures],
            "-rr-",
        )
        head.append("")
    text = "\n".join(head + lines) + "\n"
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.md").write_text(text)
    record = {
        "name": name,
        "title": title,
        "machine": machine(),
        "load": [load_start, load_end],
        "figures": [asdict(f) | {"meets": f.meets} for f in figures],
        "data": data,
    }
    (output_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)


def _goal(f: Figure) -> str:
    return "" if f.goal is None else f"≤ {f.goal:g}"


def _verdict(f: Figure) -> str:
    return {None: "", True: "yes", False: "**no**"}[f.meets]
