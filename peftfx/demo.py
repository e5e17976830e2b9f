"""``make demo``: the main job on an embedded default, end to end and offline.

A tiny random Llama is built from a transformers config, PEFT makes a LoRA adapter for it (moved off its
identity init, as if trained) and saves it; peftfx compiles the model with that checkpoint live and merged,
and both are compared with PEFT's own outputs.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import peftfx

SPEC = """\
adapters:
  default: {peft: %s}
"""


def tiny_llama() -> torch.nn.Module:
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


def make_adapter(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """A PEFT LoRA on every linear layer, with random non-zero factors, saved as PEFT saves it."""
    import peft

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05, generator=generator)
    peft_model.save_pretrained(directory)
    return peft_model


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations, not ours
    console = Console()
    model = tiny_llama()
    inputs = {"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "adapter"
        with console.status("PEFT: making a LoRA adapter for a tiny random Llama"):
            peft_model = make_adapter(model, ckpt)
            with torch.no_grad():
                expected = peft_model(**inputs).logits
                expected_merged = peft_model.merge_and_unload()(**inputs).logits
        spec_file = Path(tmp) / "spec.yaml"
        spec_file.write_text(SPEC % ckpt)
        console.print(f"[bold]spec[/] ({spec_file.name}):\n{spec_file.read_text()}")

        table = Table(title="peftfx vs PEFT on a tiny Llama (float32)")
        for column in ("graph", "compile s", "graph nodes", "adapter tensors", "max |Δ| vs PEFT"):
            table.add_column(column, justify="right" if column != "graph" else "left")
        rows = [("base (spec {})", {}, None), ("LoRA live", spec_file, expected)]
        rows.append(("LoRA merged", {"adapters": {"default": {"peft": str(ckpt)}}, "merge": True}, expected_merged))
        worst = 0.0
        for label, spec, reference in rows:
            start = time.perf_counter()
            with console.status(f"peftfx: compiling {label}"):
                gm = peftfx.compile(model, spec, inputs)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                logits = gm(**inputs).logits
            adapter_tensors = sum(1 for name, _ in gm.named_parameters() if name.startswith("peftfx."))
            diff = "—" if reference is None else f"{(logits - reference).abs().max().item():.2e}"
            if reference is not None:
                worst = max(worst, (logits - reference).abs().max().item())
            table.add_row(label, f"{seconds:.2f}", str(len(gm.graph.nodes)), str(adapter_tensors), diff)
        console.print(table)
    verdict = "[green]match[/]" if worst < 1e-4 else "[red]MISMATCH[/]"
    console.print(f"peftfx live and merged graphs vs PEFT: {verdict} (worst |Δ| {worst:.2e}, logits of size ~1)")
    if worst >= 1e-4:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
