"""An ONNX export past protobuf's 2 GiB: ``export_onnx`` writes external data by itself, and onnxruntime runs it.

    .venv/bin/python bench/bench_onnx_large.py [--width 16384 --layers 2 --rank 8]

A wide, shallow float32 stack of linear layers (by default two 16384 x 16384 layers: 2 GiB and a bit of
weights, the least memory and time a >2 GiB file costs) with a live LoRA on every layer, exported with
``external_data`` left automatic, loaded in onnxruntime (CPU) and compared with the graph on a random batch. It
times the export (capture for ONNX, writing the graph and its data), onnxruntime's load and one run; peak memory
is about three times the weights (the model, onnxruntime's copy, one weight's bytes hashed). Too slow for the
test suite (a minute on a shared 2-core machine); ``tests/test_bench.py`` runs it at a tiny width with
``--external-data``. Results: results/onnx_large.md and .json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from common import Figure, load, parser, table, write
from torch import nn

import peftfx

GIB = 2**30


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--external-data", action="store_true", help="ask for external data (default: automatic)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = load()

    torch.manual_seed(0)
    with torch.no_grad():
        model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)]).eval()
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    x = torch.randn(2, args.width, generator=torch.Generator().manual_seed(1))
    lora = {"type": "lora", "at": {"op": "linear"}, "with": {"r": args.rank, "init": False}, "seed": 0}
    gm = peftfx.compile(model, {"adapters": {"a": lora}}, (x,))
    with torch.no_grad():
        want = gm(x)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        path = peftfx.export_onnx(gm, (x,), Path(directory) / "wide.onnx", external_data=args.external_data or None)
        seconds["export_onnx"] = time.perf_counter() - start
        files = {f.name: f.stat().st_size for f in Path(directory).iterdir()}
        data = sum(size for name, size in files.items() if name != path.name)
        start = time.perf_counter()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        seconds["onnxruntime load"] = time.perf_counter() - start
        start = time.perf_counter()
        (got,) = session.run(None, {"input_0": x.numpy()})
        seconds["onnxruntime run"] = time.perf_counter() - start
    if not data:
        raise SystemExit(f"no external data was written for {weights / GIB:.2f} GiB of weights")
    error = (torch.from_numpy(got) - want).abs().max().item() / want.abs().max().item()
    figures = [
        Figure("weights / 2 GiB (above 1: past protobuf's limit)", weights / (2 * GIB)),
        # float32, onnxruntime's own matmul kernels summing 16k products in another order
        Figure("onnxruntime vs graph: max abs error, relative to the largest output", error, 1e-5),
    ]
    lines = [
        f"{args.layers} linear layers of {args.width} x {args.width}, float32 ({weights:,} bytes of weights: "
        f"{weights / GIB:.4f} GiB), "
        f"a live LoRA r={args.rank} on each; `external_data` {'asked' if args.external_data else 'automatic'}.",
        "",
        *table(["file", "MiB"], [(name, f"{size / 2**20:.1f}") for name, size in sorted(files.items())]),
        "",
        *table(["step", "s"], [(name, f"{s:.2f}") for name, s in seconds.items()]),
    ]
    write(
        args.output_dir,
        "onnx_large",
        "ONNX past 2 GiB: external data, run in onnxruntime",
        lines,
        figures,
        {"seconds": seconds, "files": files, "weights": weights},
        load_start,
    )


if __name__ == "__main__":
    main()
