"""Mixed-adapter batches: peftfx's routed graph against PEFT's ``adapter_names`` eager loop, side by side.

    .venv/bin/python bench/bench_routing.py [--hidden 256 --layers 4 --batch 16 --seq 64 --adapters 4 --repeats 20]

Each sample of the batch picks one of the adapters (LoRA, ranks 8 and 16 alternating, targets alternating between
all linear layers and attention only) or the base model. Runs are interleaved (one call of each variant per
round) and reported as medians and as ratios to PEFT, with the machine noted, to bench/results/routing.md.
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

BASE = "__base__"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile (Inductor) variant")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "routing.md")
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
    names = [f"a{i}" for i in range(args.adapters)]
    choices = [*names, BASE]
    picks = [choices[i % len(choices)] for i in torch.randperm(args.batch).tolist()]
    index = torch.tensor([-1 if p == BASE else names.index(p) for p in picks])
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for i, name in enumerate(names):
            targets = "all-linear" if i % 2 == 0 else ["q_proj", "k_proj", "v_proj", "o_proj"]
            r = 8 if i % 2 == 0 else 16
            lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
            get_peft_model(copy.deepcopy(base), lora).save_pretrained(root / name)
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
    if not args.no_compile:
        compiled = torch.compile(routed)
        t = time.perf_counter()
        with torch.inference_mode():
            compiled(input_ids=ids, adapter_index=index)
        inductor_s = time.perf_counter() - t
        variants["peftfx routed (torch.compile)"] = lambda: compiled(input_ids=ids, adapter_index=index)

    with torch.inference_mode():
        want = peft_model(input_ids=ids, adapter_names=picks).logits
        worst = max((fn().logits - want).abs().max().item() for fn in list(variants.values())[2:])
        times: dict[str, list[float]] = {name: [] for name in variants}
        for fn in variants.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    fastest = {name: min(ts) * 1e3 for name, ts in times.items()}
    peft_ms = medians["PEFT adapter_names (eager)"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = (
        f"{_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load} (1/5/15 min) at the end"
    )
    lines = [
        "# Mixed-adapter batches: peftfx routing vs PEFT adapter_names",
        "",
        f"Machine: {machine}. Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}; "
        f"{args.adapters} LoRA adapters (r 8 on all linear layers / r 16 on attention, alternating) and the base "
        f"model, each sample picking one (picks: {' '.join(p.replace(BASE, 'base') for p in picks)}); medians of "
        f"{args.repeats} interleaved runs.",
        "",
        "| variant | median ms | min ms | median ratio to PEFT |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {ms:.2f} | {fastest[name]:.2f} | {ms / peft_ms:.3f} |" for name, ms in medians.items()),
        "",
        "The machine was shared with other engineers' test runs (see the load average): absolute times are noisy, "
        "the ratios of interleaved runs less so.",
        f"Largest difference from PEFT's logits: {worst:.1e}. peftfx compile (capture + route) "
        f"{compile_s * 1e3:.0f} ms"
        + (f"; first torch.compile call (Inductor) {inductor_s:.1f} s." if inductor_s is not None else "."),
        "PEFT runs each adapter's layers on its sub-batch in a Python loop; the routed graph gathers every "
        "sample's factors (zero-padded to the largest rank) and applies them with two batched matmuls per site.",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
