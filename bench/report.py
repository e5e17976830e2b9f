"""Assemble bench/RESULTS.md and its plot from what the benchmarks wrote to bench/results/.

    .venv/bin/python bench/report.py [--results bench/results --output bench/RESULTS.md]

Every ``results/<name>.json`` gives figures against goals (the summary table) and plot data; every
``results/<name>.md`` is included as a section, whichever script wrote it. ``analysis.md`` (written by hand:
why a figure misses its goal) follows the summary. The plot is written beside the output, as ``results.png``.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent
ORDER = ["lora", "compile", "fold", "scaling", "memory", "routing", "generate", "scale", "memory_cap"]  # then the rest
GPU_MISSING = "GPU figures: not measured yet (no GPU was lent to the session that ran these)."


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--analysis", type=Path, default=HERE / "analysis.md")
    args = p.parse_args(argv)

    names = sorted(
        {f.stem for f in args.results.glob("*.md")},
        key=lambda n: (n not in ORDER, ORDER.index(n) if n in ORDER else 0, n),
    )
    records = {
        n: json.loads((args.results / f"{n}.json").read_text()) for n in names if (args.results / f"{n}.json").exists()
    }
    plot = args.output.with_name("results.png")
    _plot(records, plot)
    machine = next((r["machine"] for r in records.values()), "not recorded")
    lines = [
        "# Benchmarks: peftfx beside PEFT and the base model",
        "",
        f"Assembled {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `bench/report.py` from `bench/results/` "
        "(`make bench` runs every script, then this). CPU, float32, random models built from transformers configs.",
        "",
        f"Machine: {machine}.",
        "",
        "## Figures against goals",
        "",
        "| figure | value | goal | meets | from |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for name, record in records.items():
        for f in record["figures"]:
            goal = "" if f["goal"] is None else f"≤ {f['goal']:g}"
            meets = {None: "", True: "yes", False: "**no**"}[f["meets"]]
            lines.append(
                f"| {f['figure']} | {f['value']:.3f} | {goal} | {meets} | [{name}](#{_anchor(record['title'])}) |"
            )
    lines += [
        "",
        GPU_MISSING if not (args.results / "gpu.md").exists() else "GPU figures: see the GPU section below.",
        "",
    ]
    lines += [f"![benchmark plot]({plot.name})", ""]
    if args.analysis.exists():
        lines += [_demote(args.analysis.read_text()).rstrip(), ""]
    for name in names:
        lines += [_demote((args.results / f"{name}.md").read_text()).rstrip(), ""]
    args.output.write_text("\n".join(lines))
    print(f"wrote {args.output} and {plot}")


def _demote(markdown: str) -> str:
    """One heading level down, so each included file is a section of RESULTS.md."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def _anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def _plot(records: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for ax, (name, draw) in zip(axes.flat, PLOTS.items(), strict=True):
        if name in records:
            draw(ax, records[name]["data"])
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{name}: not run", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _latency(ax: Any, data: dict[str, Any]) -> None:
    ms = data["latency_ms"]
    base = ms["base (eager)"]
    ax.barh(list(ms), [v / base for v in ms.values()], color="tab:blue")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("forward CPU time / base model (eager)")
    ax.set_title("LoRA r=16 on all linear layers")


def _compile(ax: Any, data: dict[str, Any]) -> None:
    seconds = data["seconds"]
    ax.barh(list(seconds), [v * 1e3 for v in seconds.values()], color="tab:orange")
    ax.invert_yaxis()
    ax.set_xlabel("CPU ms (median)")
    ax.set_title(f"to a merged model ({data['layers']} layers, hidden {data['hidden']})")


def _scaling(ax: Any, data: dict[str, Any]) -> None:
    for stage, ms in data["ms"].items():
        ax.plot(data["layers"], ms, marker="o", label=stage)
    first = data["ms"]["compile"][0]
    ax.plot(data["layers"], [first * n / data["layers"][0] for n in data["layers"]], "k:", label="linear")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("layers")
    ax.set_ylabel("CPU ms (median)")
    ax.set_title("compile with merge against depth")
    ax.legend(fontsize=8)


def _memory(ax: Any, data: dict[str, Any]) -> None:
    peaks = data["peak_mib"]
    ax.barh(list(peaks), list(peaks.values()), color="tab:green")
    ax.axvline(data["weights_mib"], color="k", ls="--", lw=0.8, label="base weights")
    ax.axvline(data["merged_mib"], color="k", ls=":", lw=0.8, label="merged weights")
    ax.invert_yaxis()
    ax.set_xlabel("peak RSS growth, MiB")
    ax.set_title("memory of a merge")
    ax.legend(fontsize=8)


PLOTS = {"lora": _latency, "compile": _compile, "scaling": _scaling, "memory": _memory}


if __name__ == "__main__":
    main()
