"""The ``peftfx`` command: schema, validate, explain, compile, verify, export, merge.

Exit codes: 0 success; 1 verification failed (``verify`` found an output past the tolerance); 2 bad input (a
bad spec, checkpoint, model reference or inputs file), reported in one line naming the culprit. An unexpected
exception (a bug) prints its traceback and also exits 1. ``--format json`` prints machine-readable results on
stdout; progress and errors go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from . import __version__, capture_cache, model_ref
from .atomic import check_destination, check_owned, replaced_file, replaced_folder, write_marker
from .driver import Build, build, format_params
from .driver import explain as explain_spec
from .errors import PeftfxError, SpecError
from .inputs import with_index
from .spec import load_spec, spec_schema
from .verify import Tolerance, default_tolerance
from .verify import verify as verify_spec

EPILOG = "Exit codes: 0 ok, 1 verification failed, 2 bad input (spec, checkpoint, model, inputs)."
app = typer.Typer(
    name="peftfx",
    help="Declarative graph-rewriting compiler for PEFT adapters, on torch.fx.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


@app.callback()
def _options(
    cache: Annotated[
        bool | None, typer.Option("--cache/--no-cache", help="reuse captures from the capture cache ($PEFTFX_CACHE)")
    ] = None,
) -> None:
    if cache is not None:
        os.environ["PEFTFX_CACHE"] = "1" if cache else "0"


class Format(StrEnum):
    text = "text"
    json = "json"


SpecArg = Annotated[Path, typer.Argument(help="spec file (.yaml, .yml or .json)", show_default=False)]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="the base model, overriding the spec's `model:` block: a local transformers directory, a "
        "transformers config.json (a random model), or 'package.module:factory' returning a model or "
        "(model, example_inputs)",
        show_default=False,
    ),
]
InputsOpt = Annotated[
    Path | None,
    typer.Option(help="a .safetensors file of named example inputs (input_ids, ...)", show_default=False),
]
SeqOpt = Annotated[
    int | None,
    typer.Option(min=1, help="sequence length of the random token ids made for a transformers model (default 8)"),
]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="output format")]
FactoryOpt = Annotated[
    bool,
    typer.Option(
        "--factory/--no-factory",
        help="allow a model factory ('package.module:function', in --model or the spec's model.factory), which "
        "imports and runs code: --no-factory for specs you do not trust",
    ),
]


def _fail(error: PeftfxError) -> NoReturn:
    err.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _emit(data: Any, fmt: Format, text: str) -> None:
    if fmt is Format.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        _out().print(text, highlight=False, soft_wrap=True)


def _out() -> Console:
    """stdout; 120 columns when it is not a terminal (CI logs, pipes) so tables are not squeezed to 80."""
    return Console() if sys.stdout.isatty() else Console(width=120)


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int | None], None]]:
    """Progress on stderr (nothing when it is not a terminal): a spinner per step, a bar where the total is known.

    Yields the callback ``(what, done, total)``: a new ``what`` starts a line, the same one advances it.
    """
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=err, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def report(what: str, done: int = 0, total: int | None = None) -> None:
            for other in tasks.values():
                bar.stop_task(other)
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)
            bar.start_task(tasks[what])

        yield report


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


class CacheAction(StrEnum):
    info = "info"
    clear = "clear"


@app.command()
def cache(
    action: Annotated[CacheAction, typer.Argument(help="info: where it is and what it holds; clear: empty it")] = (
        CacheAction.info
    ),
    fmt: FormatOpt = Format.text,
) -> None:
    """The capture cache (torch.export captures reused by later compiles; $PEFTFX_CACHE_DIR, $PEFTFX_CACHE=0)."""
    if action is CacheAction.clear:
        removed = capture_cache.clear()
        _emit({"removed": removed, "folder": str(capture_cache.directory())}, fmt, f"removed {removed} captures")
        return
    info = capture_cache.summary()
    state = "on" if info["enabled"] else "off ($PEFTFX_CACHE=0)"
    _emit(info, fmt, f"{info['folder']}: {info['files']} captures, {info['bytes'] / 2**20:.1f} MiB; {state}")


@app.command()
def validate(spec: SpecArg, fmt: FormatOpt = Format.text) -> None:
    """Check a spec file without loading a model."""
    try:
        parsed, _ = load_spec(spec)
        active, merged, routed = parsed.active_adapters(), parsed.merged_adapters(), parsed.routed_adapters()
    except PeftfxError as e:
        if fmt is Format.json:
            _emit({"valid": False, "error": str(e)}, fmt, "")
            raise typer.Exit(2) from None
        _fail(e)
    _emit(
        {"valid": True, "adapters": sorted(parsed.adapters), "active": active, "merged": merged, "routed": routed},
        fmt,
        f"{spec}: valid ({len(parsed.adapters)} adapters; active: {', '.join(active) or '-'}; "
        f"merged: {', '.join(merged) or '-'}; routed: {', '.join(routed) or '-'})",
    )


@app.command()
def explain(
    spec: SpecArg,
    model: ModelOpt = None,
    inputs: InputsOpt = None,
    seq_len: SeqOpt = None,
    factory: FactoryOpt = True,
    fmt: FormatOpt = Format.text,
) -> None:
    """Show, per site, which adapter selects it (with its values there) or the first predicate that failed."""
    try:
        module, example = _model(spec, model, inputs, seq_len, factory)
        explanation = explain_spec(module, spec, example)
    except PeftfxError as e:
        _fail(e)
    if fmt is Format.json:
        _emit(explanation.to_dict(), fmt, "")
    else:
        table = Table("adapter", "op", "module", "verdict", title=f"peftfx explain {spec}")
        for column in table.columns[:3]:
            column.no_wrap = True
        for row in explanation.rows:
            verdict = (
                f"[green]match[/] {escape(format_params(row.params))}"
                if row.matched
                else f"[dim]no: {escape(row.reason)}[/]"
            )
            table.add_row(escape(row.adapter), row.op, escape(row.module), verdict)
        _out().print(table)
    for name, error in explanation.errors.items():
        err.print(
            f"[red]error:[/] compiling {escape(name)} would fail: {escape(error)}", highlight=False, soft_wrap=True
        )
    if explanation.errors:
        raise typer.Exit(2)


@app.command(name="compile")
def compile_(
    spec: SpecArg,
    model: ModelOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="save the result: a directory (program.pt2 from torch.export, the graph's code as graph.py, "
            "summary.json), or a single .pt2 file",
            show_default=False,
        ),
    ] = None,
    inputs: InputsOpt = None,
    seq_len: SeqOpt = None,
    factory: FactoryOpt = True,
    fmt: FormatOpt = Format.text,
    inplace: Annotated[
        bool, typer.Option("--inplace", help="merge into the loaded model's own weights (no second copy in memory)")
    ] = False,
) -> None:
    """Compile a model with a spec; print what each adapter added or merged, and save the result."""
    try:
        if output is not None:
            _check_output_folder(output)
        module, example = _model(spec, model, inputs, seq_len, factory)
        with _progress() as step:
            result = build(module, spec, example, progress=step, inplace=inplace)
            if output is not None:
                step(f"saving {output}")
                _save(result, example, output)
    except PeftfxError as e:
        _fail(e)
    summary = result.to_dict()
    if output is not None:
        summary["output"] = str(output)
    if fmt is Format.json:
        _emit(summary, fmt, "")
        return
    table = Table("adapter", "kind", "sites", "parameters", "state", title=f"peftfx compile {spec}")
    for a in result.adapters:
        table.add_row(escape(a.name), a.kind, str(a.sites), f"{a.parameters:,}", "merged" if a.merged else "live")
    console = _out()
    if result.adapters:
        console.print(table)
    seconds = ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items())
    saved = f"; saved to {output}" if output is not None else ""
    console.print(f"{summary['nodes']} graph nodes; {seconds}{saved}", highlight=False)


@app.command()
def verify(
    spec: SpecArg,
    model: ModelOpt = None,
    inputs: InputsOpt = None,
    seq_len: SeqOpt = None,
    factory: FactoryOpt = True,
    rtol: Annotated[float | None, typer.Option(help="relative tolerance (default by dtype; float32: 1e-4)")] = None,
    atol: Annotated[float | None, typer.Option(help="absolute tolerance (default by dtype; float32: 1e-5)")] = None,
    peft: Annotated[bool, typer.Option(help="also compare with PEFT's own model of PEFT checkpoints")] = True,
    perturb: Annotated[
        bool, typer.Option(help="move fresh adapters off their init (as if trained) before comparing")
    ] = True,
    fmt: FormatOpt = Format.text,
) -> None:
    """Check that merged graphs match live ones, and PEFT, per adapter and output; exit 1 past the tolerance."""
    try:
        module, example = _model(spec, model, inputs, seq_len, factory)
        default = default_tolerance(module)
        tolerance = Tolerance(default.rtol if rtol is None else rtol, default.atol if atol is None else atol)
        with _progress() as step:
            report = verify_spec(module, spec, example, tolerance=tolerance, peft=peft, perturb=perturb, progress=step)
    except PeftfxError as e:
        _fail(e)
    if fmt is Format.json:
        _emit(report.to_dict(), fmt, "")
    else:
        table = Table("adapter", "check", "output", "max abs", "max rel", "verdict", title=f"peftfx verify {spec}")
        for r in report.rows:
            verdict = "[dim]info[/]" if r.ok is None else ("[green]ok[/]" if r.ok else "[red bold]FAIL[/]")
            numbers = f"{r.max_abs:.2e}", f"{r.max_rel:.2e}"
            table.add_row(escape(r.adapter), r.check, escape(r.output), *numbers, verdict)
        console = _out()
        console.print(table)
        for note in report.notes:
            console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
        checked = sum(r.ok is not None for r in report.rows)
        bound = f"rtol={tolerance.rtol:g}, atol={tolerance.atol:g}"
        if report.ok:
            console.print(f"[green]verified[/]: {checked} checks within {bound}", highlight=False)
        else:
            console.print(f"[red]FAILED[/]: {len(report.failures)} of {checked} checks past {bound}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


def _model(
    spec: Path, reference: str | None, inputs: Path | None, seq_len: int | None, factory: bool = True
) -> tuple[torch.nn.Module, Any]:
    """The base model: ``--model`` if given, else the spec's ``model:`` block; ``--inputs`` wins over both."""
    if reference is not None:
        module, example = load_model(reference, 8 if seq_len is None else seq_len, factory)
    else:
        parsed, base_dir = load_spec(spec)
        if parsed.model is None:
            raise SpecError(f"{spec}: no model to compile: give --model, or a `model:` block in the spec")
        ref = parsed.model
        if seq_len is not None:
            ref = ref.model_copy(update={"inputs": ref.inputs.model_copy(update={"seq_len": seq_len})})
        module, example = model_ref.load_model(ref, base_dir, allow_factory=factory)
    if inputs is not None:
        example = model_ref.read_inputs(inputs, "--inputs")
    return module, example


def load_model(reference: str, seq_len: int = 8, factory: bool = True) -> tuple[torch.nn.Module, Any]:
    """A model and example inputs from ``--model``: a transformers directory or config, or ``module:factory``."""
    ref = model_ref.parse_reference(reference, seq_len)
    return model_ref.load_model(ref, where=f"--model {reference}", allow_factory=factory)


def _save(result: Build, inputs: Any, output: Path) -> None:
    """Export the graph and write it whole or not at all; a folder is signed, so only it is ever replaced."""
    args, kwargs = with_index(result.gm, inputs)
    program = torch.export.export(result.gm, args, kwargs, strict=False)
    if output.suffix == ".pt2":
        with replaced_file(output) as tmp:
            torch.export.save(program, tmp)
        return
    _check_output_folder(output)  # again: something may have been written there while compiling
    with replaced_folder(output) as staged:
        torch.export.save(program, staged / "program.pt2")
        (staged / "graph.py").write_text(result.gm.code)
        (staged / "summary.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        write_marker(staged, __version__)


def _check_output_folder(output: Path) -> None:
    """``--output`` of compile, refused before any work when it could not be written or is not peftfx's."""
    if output.suffix == ".pt2":
        check_destination(output, "file", f"--output {output}")
    else:
        check_owned(check_destination(output, "folder", f"--output {output}"), f"--output {output}")


class ExportFormat(StrEnum):
    onnx = "onnx"


@app.command(name="merge")
def merge_(
    spec: SpecArg,
    model: Annotated[
        Path, typer.Option("--model", "-m", help="a transformers checkpoint folder (safetensors)", show_default=False)
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="a new folder", show_default=False)],
    max_shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 500MB, 5GB")] = "2GB",
    threads: Annotated[
        int | None,
        typer.Option(
            min=1, max=1024, help="torch threads for the merge [default: torch's own count but one, for the writer]"
        ),
    ] = None,
) -> None:
    """Merge a spec's adapters into a checkpoint out of core: tensor by tensor, the output a transformers checkpoint."""
    from .out_of_core import merge_checkpoint

    before = torch.get_num_threads()
    # a thread of the merge's own writes the output: its core left to it (on two, one torch thread runs the merge's
    # fused C pass, 1.75 s against 2.27 s on both at 1.6 GiB; bench/analysis.md)
    torch.set_num_threads(threads or max(1, before - 1))
    try:
        with _progress() as step:
            merge_checkpoint(spec, model, output, max_shard_size=max_shard_size, progress=step)
    except PeftfxError as e:
        _fail(e)
    finally:
        torch.set_num_threads(before)
    _out().print(f"merged checkpoint written to {output}", highlight=False)


@app.command(name="export")
def export_(
    spec: SpecArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="the file to write", show_default=False)],
    model: ModelOpt = None,
    inputs: InputsOpt = None,
    seq_len: SeqOpt = None,
    factory: FactoryOpt = True,
    export_format: Annotated[ExportFormat, typer.Option("--format", "-f", help="export format")] = ExportFormat.onnx,
    dynamic: Annotated[
        bool, typer.Option("--dynamic", help="let the batch dim (and the sequence dim of token inputs) vary")
    ] = False,
) -> None:
    """Compile a model with a spec and export it; adapters declared as_inputs become graph inputs."""
    from .export import adapter_inputs, dynamic_shapes, export_onnx

    try:
        check_destination(output, "file", f"--output {output}")
        module, example = _model(spec, model, inputs, seq_len, factory)
        if dynamic:  # torch.export fixes dims of size 1: capture a batch of two
            example = _batch_of_two(example)
        gm = build(module, spec, example, dynamic_shapes=dynamic_shapes(example) if dynamic else None).gm
        path = export_onnx(gm, example, output, dynamic=dynamic)
    except PeftfxError as e:
        _fail(e)
    _out().print(f"exported {export_format}: {path} ({len(adapter_inputs(gm))} adapter inputs)", highlight=False)


def _batch_of_two(inputs: Any) -> Any:
    def two(x: Any) -> Any:
        return x.expand(2, *x.shape[1:]).contiguous() if isinstance(x, torch.Tensor) and x.shape[:1] == (1,) else x

    return {k: two(v) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(map(two, inputs))


if __name__ == "__main__":
    app()
