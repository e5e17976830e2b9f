"""Forward latency of peftfx graphs against PEFT's eager model, side by side in one run.

    .venv/bin/python bench/bench_lora.py [--hidden 256 --layers 4 --batch 4 --seq 64 --rank 16 --repeats 30]

Runs are interleaved (one call of each variant per round) and reported as medians and as ratios to the
base model, with the machine noted, to bench/results/lora.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peftfx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "lora.md")
    args = parser.parse_args()

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
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
    with tempfile.TemporaryDirectory() as directory:
        get_peft_model(copy.deepcopy(base), lora).save_pretrained(directory)
        peft_live = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
        t = time.perf_counter()
        peft_merged = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval().merge_and_unload()
        peft_merge_s = time.perf_counter() - t
        inputs = {"input_ids": ids}
        fx_live = peftfx.compile(base, {"adapters": {"a": {"peft": directory}}}, inputs)
        t = time.perf_counter()
        fx_merged = peftfx.compile(base, {"adapters": {"a": {"peft": directory}}, "merge": True}, inputs)
        fx_merge_s = time.perf_counter() - t

    variants = {
        "base (eager)": base,
        "PEFT unmerged": peft_live,
        "peftfx unmerged": fx_live,
        "PEFT merged": peft_merged,
        "peftfx merged": fx_merged,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for model in variants.values():
            model(**inputs)
        for _ in range(args.repeats):
            for name, model in variants.items():
                t = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - t)
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    lines = [
        "# LoRA forward latency: peftfx vs PEFT",
        "",
        f"Machine: {machine}. Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}, "
        f"LoRA r={args.rank} on all linear layers; medians of {args.repeats} interleaved runs.",
        "",
        "| variant | median ms | ratio to base |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {ms:.2f} | {ms / medians['base (eager)']:.3f} |" for name, ms in medians.items()),
        "",
        f"peftfx unmerged / PEFT unmerged: {medians['peftfx unmerged'] / medians['PEFT unmerged']:.3f}; "
        f"peftfx merged / PEFT merged: {medians['peftfx merged'] / medians['PEFT merged']:.3f}.",
        f"Load+merge: PEFT from_pretrained+merge_and_unload {peft_merge_s * 1e3:.0f} ms; "
        f"peftfx compile (capture+merge) {fx_merge_s * 1e3:.0f} ms "
        f"(ratio {fx_merge_s / peft_merge_s:.2f}; peftfx's includes the torch.export capture).",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
