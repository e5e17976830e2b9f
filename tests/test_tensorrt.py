"""TensorRT engines built from peftfx's static ONNX files give the graph's numbers, merged and with adapters as inputs.

Runs only where the ``tensorrt`` package and a CUDA GPU are present; it skips elsewhere (CI has neither yet, so
this path is written but not proven on a GPU).

Tolerance: rtol 1e-4 / atol 1e-5: TensorRT picks its own float32 kernels (TF32 is switched off here), which sum
in other orders than the CPU graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from models import conv_inputs, conv_net, tiny_llama, token_inputs
from oracle import Tolerance, assert_close, run

import peftfx

trt = pytest.importorskip("tensorrt")
if not torch.cuda.is_available():
    pytest.skip("TensorRT needs a CUDA GPU", allow_module_level=True)

pytestmark = pytest.mark.slow

TOL = Tolerance(1e-4, 1e-5)
LLAMA_AT = {"module": ["q_proj", "v_proj"]}


def lora(at: dict, r: int, alpha: float, seed: int, **fields) -> dict:
    return {"type": "lora", "at": at, "with": {"r": r, "alpha": alpha, "init": False}, "seed": seed, **fields}


def engine(path: Path):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(path.read_bytes()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None, "TensorRT could not build an engine"
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def trt_run(path: Path, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ONNX graph's first output, as a TensorRT engine built from the file computes it."""
    built = engine(path)
    context = built.create_execution_context()
    buffers = {}
    names = [built.get_tensor_name(i) for i in range(built.num_io_tensors)]
    for name in names:
        if built.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            buffers[name] = feeds[name].cuda().contiguous()
            context.set_input_shape(name, tuple(buffers[name].shape))
    for name in names:
        if name not in buffers:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(built.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
    for name, tensor in buffers.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return buffers[onnx.load(str(path)).graph.output[0].name].cpu()


def test_conv_net_live(tmp_path):
    model, inputs = conv_net(), conv_inputs()
    gm = peftfx.compile(model, {"adapters": {"a": lora({"op": ["conv2d", "linear"]}, 2, 4.0, 0)}}, inputs)
    path = peftfx.export_onnx(gm, inputs, tmp_path / "m.onnx")
    assert_close(trt_run(path, {"input_0": inputs[0]}), run(gm, inputs), TOL, "TensorRT, live conv net")


def test_llama_merged(tmp_path):
    model, inputs = tiny_llama(), token_inputs()
    gm = peftfx.compile(model, {"adapters": {"a": lora(LLAMA_AT, 4, 8.0, 0)}, "merge": True}, inputs)
    path = peftfx.export_onnx(gm, inputs, tmp_path / "m.onnx")
    assert_close(trt_run(path, dict(inputs)), run(gm, inputs), TOL, "TensorRT, merged Llama")


def test_llama_two_adapters_as_inputs(tmp_path):
    model, inputs = tiny_llama(), token_inputs()
    spec = {"adapters": {"a": lora(LLAMA_AT, 2, 4.0, 0, max_rank=8, as_inputs=True)}}
    gm = peftfx.compile(model, spec, inputs)
    path = peftfx.export_onnx(gm, inputs, tmp_path / "m.onnx")
    assert_close(trt_run(path, {**inputs, **peftfx.adapter_inputs(gm)}), run(gm, inputs), TOL, "TensorRT, adapter a")
    peftfx.swap_adapter(gm, "a", {"adapters": {"b": lora(LLAMA_AT, 6, 3.0, 1)}})
    assert_close(trt_run(path, {**inputs, **peftfx.adapter_inputs(gm)}), run(gm, inputs), TOL, "TensorRT, adapter b")
