"""``make demo``: the user's path end to end, offline, on an embedded default.

A tiny random Llama; three LoRA adapters made and saved by PEFT (moved off their identity init, as if trained);
a spec that folds them with TIES; peftfx compiles it live and merged, verifies both against PEFT's own
``add_weighted_adapter`` and ``merge_and_unload``, exports the merged graph with ``peftfx.export_onnx`` and runs it
in onnxruntime when onnx and onnxruntime are installed, generates a few tokens with the merged graph over a KV cache
(equal to PEFT's ``generate``), and sums it up in one table.
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

import peftfx
from peftfx.model_ref import load_model
from peftfx.verify import peft_fold

ADAPTERS = ("sql", "chat", "code")
NEW_TOKENS = 8
SPEC = """\
# three PEFT LoRA checkpoints folded into one with TIES (PEFT's numbers)
adapters:
  sql:  {peft: sql}
  chat: {peft: chat}
  code: {peft: code}
  blend:
    combine: [sql, chat, code]
    weights: [1.0, 0.7, -0.4]    # a negative weight subtracts a behaviour
    method: ties
    density: 0.5                 # keep each task's largest half
model:                           # a random tiny Llama, built offline
  config: {model_type: llama, vocab_size: 128, hidden_size: 64,
           intermediate_size: 128, num_hidden_layers: 2,
           num_attention_heads: 4, num_key_value_heads: 2}
  seed: 0
  inputs: {batch: 2, seq_len: 16}
"""


def tiny_llama() -> torch.nn.Module:
    """The demo's base model: also a factory for ``--model peftfx.demo:tiny_llama``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def make_adapter(model: torch.nn.Module, directory: Path, seed: int) -> None:
    """A PEFT LoRA on the attention and MLP projections, random non-zero factors, saved as PEFT saves it."""
    import peft

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05, generator=generator)
    peft_model.save_pretrained(directory)


def generation_check(
    model: torch.nn.Module, spec: Path, merged_spec: Path, ids: torch.Tensor
) -> tuple[torch.Tensor, bool, float]:
    """Greedy tokens of the merged fold's graph, captured with a KV cache, against PEFT's own ``generate`` of the
    fold: (the new tokens, equal, seconds to compile)."""
    start = time.perf_counter()
    gm = peftfx.compile(model, merged_spec, {"input_ids": ids}, max_cache_len=ids.shape[1] + NEW_TOKENS)
    seconds = time.perf_counter() - start
    got = peftfx.generate(gm, ids, max_new_tokens=NEW_TOKENS)
    sources = {name: spec.parent / name for name in ADAPTERS}
    reference = peft_fold(model, sources, "blend", peftfx.load_spec(spec)[0].adapters["blend"])
    with torch.no_grad():
        want = reference.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    return got[:, ids.shape[1] :], torch.equal(got, want), seconds


def onnx_check(gm: torch.fx.GraphModule, inputs: dict[str, torch.Tensor]) -> tuple[float, int] | str:
    """Export ``gm`` with ``peftfx.export_onnx`` and run it in onnxruntime: (max |Δ| vs the graph, ONNX nodes), or
    why not. The file goes to a temporary folder: the demo shows the export works, it ships nothing."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return "onnx or onnxruntime not installed (pip install peftfx[onnx])"
    with tempfile.TemporaryDirectory() as tmp:
        path = peftfx.export_onnx(gm, inputs, Path(tmp) / "model.onnx")
        nodes = len(onnx.load(str(path)).graph.node)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits, *_) = session.run(None, {name: value.numpy() for name, value in inputs.items()})
    with torch.no_grad():
        expected = gm(**inputs).logits
    return (torch.from_numpy(logits) - expected).abs().max().item(), nodes


def main() -> None:
    warnings.filterwarnings("ignore")  # deprecation chatter of transformers, torch.onnx and onnxscript, not ours
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    console = Console() if sys.stdout.isatty() else Console(width=100)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(SPEC)
        model, inputs = load_model(peftfx.load_spec(spec)[0].model)
        with console.status("PEFT: making three LoRA adapters for a tiny random Llama"):
            for i, name in enumerate(ADAPTERS):
                make_adapter(model, Path(tmp) / name, seed=i + 1)
        console.print("[bold]spec.yaml[/] (merged: the same with [bold]merge: true[/])")
        console.print(Syntax(SPEC, "yaml", theme="ansi_dark", background_color="default"))

        merged_spec = Path(tmp) / "merged.yaml"
        merged_spec.write_text(SPEC + "merge: true\n")
        builds = []
        for label, variant in (("the base model", {}), ("the fold, live", spec), ("the fold, merged", merged_spec)):
            with console.status(f"peftfx: compiling {label}"):
                builds.append(peftfx.build(model, variant, inputs))
        with console.status("peftfx verify: live and merged against PEFT's add_weighted_adapter"):
            report = peftfx.verify(model, spec, inputs)
        with console.status("ONNX: exporting the merged graph, running it in onnxruntime"):
            onnx = onnx_check(builds[-1].gm, inputs)
        with console.status("peftfx generate: the merged graph over a KV cache, against PEFT's generate"):
            generated = generation_check(model, spec, merged_spec, inputs["input_ids"])

    console.print(_verify_table(report))
    console.print(_summary_table(builds, report, onnx, generated))
    console.print(f"generated by the merged graph: {generated[0].tolist()}")
    seconds = time.perf_counter() - start
    if not generated[1]:
        console.print("[red]MISMATCH[/]: the merged graph generated other tokens than PEFT's generate")
        raise SystemExit(1)
    if report.ok:
        worst = max(r.max_abs for r in report.rows if r.ok is not None)
        console.print(f"[green]verified[/]: live and merged match PEFT (worst |Δ| {worst:.1e}) in {seconds:.0f} s")
    else:
        console.print(f"[red]MISMATCH[/]: {len(report.failures)} checks failed")
        raise SystemExit(1)


def _verify_table(report: peftfx.VerifyReport) -> Table:
    table = Table(title="peftfx verify (float32 logits; tolerance rtol 1e-4, atol 1e-5)")
    for column in ("adapter", "check", "max |Δ|", "max |Δ| / max |ref|", "verdict"):
        table.add_column(column, justify="left" if column in ("adapter", "check") else "right")
    for r in report.rows:
        verdict = "[dim]info[/]" if r.ok is None else ("[green]ok[/]" if r.ok else "[red]FAIL[/]")
        table.add_row(r.adapter, r.check, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", verdict)
    return table


def _summary_table(
    builds: list[peftfx.Build], report: peftfx.VerifyReport, onnx: Any, generated: tuple[torch.Tensor, bool, float]
) -> Table:
    measured = {r.check: r.max_abs for r in report.rows}
    table = Table(
        title="peftfx on a tiny Llama: the graphs it made",
        caption="nodes: FX graph nodes (ONNX nodes in the ONNX row); params: live adapter numbers; generate: greedy "
        "tokens over a KV cache",
    )
    for column in ("graph", "nodes", "params", "compile s", "max |Δ|", "against"):
        left = column in ("graph", "against")
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    labels = ("base (spec {})", "TIES fold, live", "TIES fold, merged")
    references = [
        (None, ""),
        (measured.get("live vs PEFT"), "PEFT add_weighted_adapter"),
        (measured.get("merged vs PEFT merged"), "PEFT merge_and_unload"),
    ]
    for label, built, (diff, against) in zip(labels, builds, references, strict=True):
        summary = built.to_dict()
        table.add_row(
            label,
            str(summary["nodes"]),
            f"{summary['adapter_parameters']:,}",
            f"{sum(built.seconds.values()):.2f}",
            "—" if diff is None else f"{diff:.1e}",
            against,
        )
    if isinstance(onnx, str):
        table.add_row("ONNX of the merged", "", "", "", "", f"[dim]skipped: {onnx}[/]")
    else:
        diff, nodes = onnx
        table.add_row("ONNX of the merged", f"{nodes}", "0", "", f"{diff:.1e}", "merged graph (onnxruntime)")
    tokens, equal, seconds = generated
    verdict = "[green]equal[/]" if equal else "[red]differ[/]"
    against = f"PEFT generate ({tokens.shape[1]} tokens x {tokens.shape[0]})"
    table.add_row("merged, generate", "", "0", f"{seconds:.2f}", verdict, against)
    return table


if __name__ == "__main__":
    main()
