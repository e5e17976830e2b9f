"""Peak memory of a merge, relative to the base weights: peftfx beside PEFT, one fresh process per variant.

    .venv/bin/python bench/bench_memory.py [--hidden 1024 --layers 8 --rank 16]

Each variant runs in its own process, so no allocator state carries over: the child builds the model,
resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs the variant, and reports the peak
resident set (VmHWM) above the resident set just before. PEFT merges into the model it loaded onto (in place);
peftfx never writes into the model's tensors, so its merged weights are new ones, made site by site: its
floor is the size of the merged weights (every linear layer's), plus one site's float64 temporaries.
Results: results/memory.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import Figure, llama, load, parser, save_lora, table, write

VARIANTS = {
    "peftfx compile + merge": "capture, insert, merge, cleanup",
    "peftfx merge on a captured graph": "compile minus the capture (the capture done before the mark is reset)",
    "PEFT from_pretrained + merge_and_unload": "in place, on the model itself",
    "PEFT on a deep copy": "deepcopy of the model, then from_pretrained + merge_and_unload: leaves the model as it was",
}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args)))
        return
    load_start = load()
    base = _model(args)
    weights = sum(t.numel() * t.element_size() for t in base.parameters())
    linear = sum(m.weight.numel() * m.weight.element_size() for n, m in base.named_modules() if _merged(n, m))
    del base
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        save_lora(_model(args), Path(directory), args.rank)
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--child", variant, "--checkpoint", directory]
            command += [f"--{k}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "vocab", "threads")]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
    mib = 2**20
    rows = [
        (name, f"{r['peak'] / mib:.0f}", f"{r['peak'] / weights:.2f}", f"{r['before'] / mib:.0f}", VARIANTS[name])
        for name, r in results.items()
    ]
    fx = results["peftfx compile + merge"]["peak"]
    figures = [
        Figure("peak RSS growth of compile + merge / base weights", fx / weights, 1.1),
        Figure(
            "peak RSS growth of the merge on a captured graph / base weights",
            results["peftfx merge on a captured graph"]["peak"] / weights,
            1.1,
        ),
        Figure("peftfx compile + merge / its floor (the merged weights)", fx / linear),
        Figure("peftfx compile + merge / PEFT on a deep copy", fx / results["PEFT on a deep copy"]["peak"]),
    ]
    lines = [
        f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocabulary {args.vocab}, "
        f"float32: base weights {weights / mib:.0f} MiB, of which the merged linear layers' {linear / mib:.0f} MiB; "
        f"LoRA r={args.rank} on every linear layer but the head. Peak = VmHWM above VmRSS before the call.",
        "",
        *table(["variant", "peak growth MiB", "/ base weights", "RSS before MiB", "what"], rows, "-rrr-"),
    ]
    data = {
        "weights_mib": weights / mib,
        "merged_mib": linear / mib,
        "peak_mib": {n: r["peak"] / mib for n, r in results.items()},
    }
    write(args.output_dir, "memory", "Peak memory of a merge", lines, figures, data, load_start)


def _model(args) -> torch.nn.Module:
    return llama(args.hidden, args.layers, vocab=args.vocab, intermediate=args.intermediate)


def _merged(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and name != "lm_head"


def _child(args) -> dict[str, int]:
    from peft import PeftModel

    import peftfx
    from peftfx.driver import apply
    from peftfx.spec import load_spec

    peftfx.capture(
        llama(64, 1, vocab=64), {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    )  # export's first-call costs
    base = _model(args)
    inputs = {"input_ids": torch.randint(0, args.vocab, (1, 16))}
    spec = {"adapters": {"a": {"peft": str(args.checkpoint)}}, "merge": True}
    run = {
        "peftfx compile + merge": lambda: peftfx.compile(base, spec, inputs),
        "PEFT from_pretrained + merge_and_unload": lambda: PeftModel.from_pretrained(
            base, args.checkpoint
        ).merge_and_unload(),
        "PEFT on a deep copy": lambda: PeftModel.from_pretrained(
            copy.deepcopy(base), args.checkpoint
        ).merge_and_unload(),
    }
    if args.child == "peftfx merge on a captured graph":
        gm = peftfx.capture(base, inputs)
        parsed = load_spec(spec)[0]
        run[args.child] = lambda: apply(gm, parsed)
    before = _reset_peak()
    kept = run[args.child]()  # kept alive until the peak is read
    peak = _status("VmHWM") - before
    del kept
    return {"before": before, "peak": peak}


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
