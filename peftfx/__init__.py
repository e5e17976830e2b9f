"""peftfx: a declarative graph-rewriting compiler for PEFT adapters, on torch.fx."""

from .capture import capture
from .driver import Build, Explanation, build, compile, explain
from .errors import (
    CaptureError,
    CheckpointError,
    GenerationError,
    InputError,
    MatchError,
    MergeError,
    PeftfxError,
    SpecError,
)
from .export import adapter_inputs, dynamic_shapes, export_onnx
from .generate import generate
from .guard import check_onnx_inputs
from .kv_cache import step_inputs
from .out_of_core import merge_checkpoint
from .save import save_adapter
from .sites import Site, find_sites
from .spec import Selector, Spec, load_spec, spec_schema
from .swap import swap_adapter
from .verify import Tolerance, VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "Build",
    "CaptureError",
    "CheckpointError",
    "Explanation",
    "GenerationError",
    "InputError",
    "MatchError",
    "MergeError",
    "PeftfxError",
    "Selector",
    "Site",
    "Spec",
    "SpecError",
    "Tolerance",
    "VerifyReport",
    "adapter_inputs",
    "build",
    "capture",
    "check_onnx_inputs",
    "compile",
    "dynamic_shapes",
    "explain",
    "export_onnx",
    "find_sites",
    "generate",
    "load_spec",
    "merge_checkpoint",
    "save_adapter",
    "spec_schema",
    "step_inputs",
    "swap_adapter",
    "verify",
]
