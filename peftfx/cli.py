"""The ``peftfx`` command: schema, validate, explain, compile.

Exit codes: 0 success, 1 an unexpected failure, 2 a user error (bad spec, checkpoint, model reference),
reported in one line naming the culprit. ``--format json`` prints machine-readable results on stdout.
"""

from __future__ import annotations

import importlib
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import torch
import typer
from rich.console import Console
from rich.table import Table

from .driver import compile as compile_spec
from .driver import explain as explain_spec
from .errors import PeftfxError
from .save import written_atomically
from .spec import load_spec, spec_schema

app = typer.Typer(
    name="peftfx",
    help="Declarative graph-rewriting compiler for PEFT adapters, on torch.fx.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


class Format(StrEnum):
    text = "text"
    json = "json"


SpecArg = Annotated[Path, typer.Argument(help="spec file (.yaml, .yml or .json)", show_default=False)]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="a local transformers model directory, or 'package.module:factory' returning a model or "
        "(model, example_inputs)",
        show_default=False,
    ),
]
SeqOpt = Annotated[int, typer.Option(help="sequence length of the token inputs made for a transformers model")]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="output format")]


def _fail(error: PeftfxError) -> NoReturn:
    err.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _emit(data: Any, fmt: Format, text: str) -> None:
    if fmt is Format.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        Console().print(text, highlight=False, soft_wrap=True)


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout")] = None,
) -> None:
    """Print the JSON Schema of a spec (for editors and validators)."""
    text = json.dumps(spec_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


@app.command()
def validate(spec: SpecArg, fmt: FormatOpt = Format.text) -> None:
    """Check a spec file without loading a model."""
    try:
        parsed, _ = load_spec(spec)
    except PeftfxError as e:
        if fmt is Format.json:
            _emit({"valid": False, "error": str(e)}, fmt, "")
            raise typer.Exit(2) from None
        _fail(e)
    active = parsed.active_adapters()
    merged = parsed.merged_adapters()
    _emit(
        {"valid": True, "adapters": sorted(parsed.adapters), "active": active, "merged": merged},
        fmt,
        f"{spec}: valid ({len(parsed.adapters)} adapters; active: {', '.join(active) or '-'}; "
        f"merged: {', '.join(merged) or '-'})",
    )


@app.command()
def explain(spec: SpecArg, model: ModelOpt, seq_len: SeqOpt = 8, fmt: FormatOpt = Format.text) -> None:
    """Show, per site, which adapter selects it or the first predicate that failed."""
    try:
        module, inputs = load_model(model, seq_len)
        explanation = explain_spec(module, spec, inputs)
    except PeftfxError as e:
        _fail(e)
    if fmt is Format.json:
        _emit(explanation.to_dict(), fmt, "")
        return
    table = Table("adapter", "op", "module", "verdict")
    for row in explanation.rows:
        verdict = "[green]match[/]" if row.matched else f"no: {row.reason}"
        table.add_row(row.adapter, row.op, row.module, verdict)
    Console().print(table)


@app.command(name="compile")
def compile_(
    spec: SpecArg,
    model: ModelOpt,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="save the result with torch.export (.pt2) for deployment"),
    ] = None,
    seq_len: SeqOpt = 8,
    fmt: FormatOpt = Format.text,
) -> None:
    """Compile a model with a spec; print a summary and optionally save the exported program."""
    try:
        module, inputs = load_model(model, seq_len)
        gm = compile_spec(module, spec, inputs)
    except PeftfxError as e:
        _fail(e)
    adapter_tensors = [name for name, _ in gm.named_parameters() if name.startswith("peftfx.")]
    summary: dict[str, Any] = {
        "nodes": len(gm.graph.nodes),
        "adapter_tensors": len(adapter_tensors),
        "adapter_parameters": sum(p.numel() for name, p in gm.named_parameters() if name in set(adapter_tensors)),
    }
    if output is not None:
        args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), dict(inputs))
        program = torch.export.export(gm, args, kwargs, strict=False)
        with written_atomically(output) as tmp:
            torch.export.save(program, tmp)
        summary["output"] = str(output)
    text = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in summary.items())
    _emit(summary, fmt, f"compiled: {text}")


def load_model(reference: str, seq_len: int = 8) -> tuple[torch.nn.Module, Any]:
    """A model and example inputs from a local transformers directory or a ``module:factory`` reference."""
    if ":" in reference and not Path(reference).exists():
        module_name, _, attr = reference.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise PeftfxError(f"--model {reference}: cannot import it ({e})") from None
        made = factory()
        model, inputs = made if isinstance(made, tuple) else (made, None)
    else:
        path = Path(reference)
        if not (path / "config.json").is_file():
            raise PeftfxError(f"--model {reference}: not a transformers model directory (no config.json)")
        from transformers import AutoModel, AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path)
        except ValueError:
            model = AutoModel.from_pretrained(path)
        inputs = None
    if not isinstance(model, torch.nn.Module):
        raise PeftfxError(f"--model {reference}: the factory returned {type(model).__name__}, not an nn.Module")
    if inputs is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None:
            raise PeftfxError(f"--model {reference}: return (model, example_inputs) from the factory")
        inputs = {"input_ids": torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))}
    return model.eval(), inputs


if __name__ == "__main__":
    app()
