"""The benchmark scripts keep working: each runs at the smallest sizes and writes its results (no timing is checked)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"

TINY = {
    "bench_lora": [
        "--hidden",
        "32",
        "--layers",
        "1",
        "--batch",
        "1",
        "--seq",
        "4",
        "--rank",
        "2",
        "--repeats",
        "1",
        "--tiny-repeats",
        "1",
        "--no-compile",
    ],
    "bench_compile": ["--hidden", "32", "--layers", "1", "--rank", "2", "--repeats", "1"],
    "bench_fold": ["--hidden", "32", "--layers", "1", "--rank", "2", "--repeats", "1"],
    "bench_scaling": ["--hidden", "32", "--layers", "1", "2", "--rank", "2", "--repeats", "1"],
    "bench_memory": ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--vocab", "64", "--rank", "2"],
    "bench_onnx_large": ["--width", "64", "--layers", "1", "--rank", "2", "--external-data"],
    "bench_scale": [
        "--hidden",
        "32",
        "--intermediate",
        "64",
        "--layers",
        "1",
        "--vocab",
        "64",
        "--rank",
        "2",
        "--shard-size",
        "20KB",
    ],
    "bench_routing": [
        "--hidden",
        "32",
        "--layers",
        "1",
        "--batch",
        "3",
        "--seq",
        "4",
        "--adapters",
        "2",
        "--repeats",
        "1",
        "--no-compile",
    ],
    "bench_generate": [
        "--hidden",
        "32",
        "--layers",
        "1",
        "--prompt",
        "3",
        "--new",
        "2",
        "--batches",
        "2",
        "--adapters",
        "2",
        "--rank",
        "2",
        "--repeats",
        "1",
        "--no-compile",
    ],
}


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    yield lambda name: importlib.import_module(name)
    sys.path.remove(str(BENCH))


@pytest.mark.slow
def test_every_script_writes_its_results_and_the_report_assembles_them(bench, tmp_path):
    for name, argv in TINY.items():
        bench(name).main([*argv, "--output-dir", str(tmp_path)])
        short = name.removeprefix("bench_")
        assert (tmp_path / f"{short}.md").read_text().startswith("# ")
        record = json.loads((tmp_path / f"{short}.json").read_text())
        assert record["figures"] and all(isinstance(f["value"], float) for f in record["figures"])
    (tmp_path / "other.md").write_text("# Another script's results\n\nno JSON: included as it is\n")
    bench("report").main(["--results", str(tmp_path), "--output", str(tmp_path / "RESULTS.md")])
    report = (tmp_path / "RESULTS.md").read_text()
    assert "## Figures against goals" in report and "GPU figures" in report
    assert "## Another script's results" in report
    assert (tmp_path / "results.png").stat().st_size > 0
