"""An on-disk cache of ``torch.export`` captures, so compiling the same model again skips the export.

torch.export is most of a compile's time, and its result depends only on the model's code and structure and the
input signature, not on the weights. A capture is stored (``torch.export.save``) under a key that digests all of
it: the model's class, its transformers config, every module's class, mode, hooks and plain attributes, every
tensor's name, shape, dtype and device (and which are tied), the source files of its module classes, the inputs'
structure, shapes and dtypes, the dynamic shapes, and the versions of torch, transformers, peftfx and Python. Any
change is another key: a stale graph is never served. The cache holds no weights: every tensor the model holds is
stored as a ``meta`` tensor, and on load the current model's own tensors are bound in by name (checked against
the stored shapes and dtypes). Files are written to a temporary file renamed into place, so concurrent compiles
never read a partial file; one that cannot be read is a miss, replaced by the next capture.

Opt-in (``cache=True``, ``PEFTFX_CACHE=1`` or ``peftfx --cache``): the key cannot see code the model calls outside
its module classes' files, and a graph served stale would be silently wrong, for a saving of about a quarter of a
compile. Where: ``$PEFTFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/peftfx``, else ``~/.cache/peftfx``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.utils._pytree import tree_flatten, tree_map

from .atomic import replaced_file

FORMAT = 1  # bumped when what is stored, or how the key is made, changes


def enabled(cache: bool | None) -> bool:
    """``cache`` as asked; None leaves it to ``$PEFTFX_CACHE`` (off unless set to something other than 0)."""
    return cache if cache is not None else os.environ.get("PEFTFX_CACHE", "") not in ("", "0")


def directory() -> Path:
    """The cache's folder."""
    if os.environ.get("PEFTFX_CACHE_DIR"):
        return Path(os.environ["PEFTFX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peftfx"


def exported(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic_shapes: Any,
    export: Callable[[], ExportedProgram],
    *,
    cache: bool | None = None,
) -> ExportedProgram:
    """``export()``'s program for ``model`` on inputs like ``args``/``kwargs``, from the cache when it holds one."""
    folder = directory() if enabled(cache) else None
    key = _key(model, args, kwargs, dynamic_shapes) if folder is not None else None
    if folder is None or key is None:
        return export()
    file = folder / "capture" / f"{key}.pt2"
    program = _load(file, model)
    if program is None:
        program = export()
        _store(program, model, file)
    return program


class _Uncacheable(Exception):
    """Something in the model or inputs has no stable description: capture it without the cache."""


def _key(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any) -> str | None:
    try:
        parts = {
            "format": FORMAT,
            "versions": _versions(),
            "class": _qualified(type(model)),
            "config": _config(model),
            "modules": [_module(name, m) for name, m in model.named_modules(remove_duplicate=False)],
            "tensors": _tensors(model),
            "sources": _sources(model),
            "inputs": _inputs((args, kwargs)),
            "dynamic_shapes": _dynamic(dynamic_shapes),
        }
        text = json.dumps(parts, sort_keys=True)
    except (_Uncacheable, TypeError, ValueError, OSError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _versions() -> dict[str, str]:
    from . import __version__

    versions = {"torch": torch.__version__, "peftfx": __version__, "python": platform.python_version()}
    if "transformers" in sys.modules:
        versions["transformers"] = sys.modules["transformers"].__version__
    return versions


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if not hasattr(config, "to_json_string"):
        raise _Uncacheable("a config that is not a transformers config")
    return [config.to_json_string(use_diff=False), str(getattr(config, "_attn_implementation", None))]


_PRIMITIVE = (bool, int, float, str, type(None))


def _module(name: str, m: nn.Module) -> list[Any]:
    """A module's class, mode, hooks and plain attributes (what ``forward`` may branch on beside the config): values
    by their ``repr``, configs as JSON; an object whose ``repr`` is its address makes the model uncacheable."""
    attrs = {}
    for attr, value in vars(m).items():
        if attr.startswith("_") or attr == "config":
            continue
        if isinstance(value, _PRIMITIVE) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, _PRIMITIVE) for v in value)
        ):
            attrs[attr] = repr(value)
        elif isinstance(value, (torch.Tensor, nn.Module)) or callable(value):
            attrs[attr] = type(value).__name__  # tensors are listed by _tensors; methods and modules by their class
        elif hasattr(value, "to_json_string"):  # transformers configs (generation_config, ...)
            attrs[attr] = value.to_json_string(use_diff=False)
        elif " at 0x" not in repr(value):
            attrs[attr] = repr(value)
        else:
            raise _Uncacheable(f"{name}.{attr}")
    hooks = [len(h) for h in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._state_dict_hooks)]
    return [name, _qualified(type(m)), m.training, attrs, hooks]


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor the model holds, by name: parameters, buffers (non-persistent ones too), plain attributes."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)
    for prefix, m in model.named_modules(remove_duplicate=False):
        for attr, value in vars(m).items():
            if isinstance(value, torch.Tensor) and not attr.startswith("_"):
                yield f"{prefix}.{attr}" if prefix else attr, value


def _tensors(model: nn.Module) -> list[Any]:
    first: dict[int, str] = {}
    out = []
    for name, t in _named_tensors(model):
        tied = first.setdefault(id(t), name)
        kind = type(t).__name__
        out.append([name, kind, list(t.shape), str(t.dtype), str(t.device), t.requires_grad, tied])
    return out


def _sources(model: nn.Module) -> dict[str, str]:
    """A digest of each file defining a module class of the model (an edited ``forward`` is another graph)."""
    digests = {}
    for cls in {type(m) for m in model.modules()}:
        try:
            file = inspect.getsourcefile(cls)
        except TypeError:
            continue
        if file is not None and file not in digests:
            digests[file] = hashlib.sha256(Path(file).read_bytes()).hexdigest()
    return digests


def _inputs(inputs: Any) -> list[Any]:
    leaves, spec = tree_flatten(inputs)
    described: list[Any] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            described.append([list(leaf.shape), str(leaf.dtype), str(leaf.device), leaf.requires_grad])
        elif isinstance(leaf, _PRIMITIVE):
            described.append(repr(leaf))
        else:
            raise _Uncacheable(f"an input of type {type(leaf).__name__}")
    return described


def _dynamic(shapes: Any) -> Any:
    if shapes is None or isinstance(shapes, (bool, int, str)):
        return shapes
    if isinstance(shapes, dict):
        return {str(k): _dynamic(v) for k, v in shapes.items()}
    if isinstance(shapes, (tuple, list)):
        return [_dynamic(v) for v in shapes]
    if isinstance(shapes, type):  # a torch.export.Dim
        return ["Dim", shapes.__name__, getattr(shapes, "min", None), getattr(shapes, "max", None)]
    if type(shapes).__module__.startswith("torch.export"):  # Dim.AUTO, Dim.STATIC, Dim.DYNAMIC
        return str(shapes)
    raise _Uncacheable(f"a dynamic shape of type {type(shapes).__name__}")


def _store(program: ExportedProgram, model: nn.Module, file: Path) -> None:
    """Save ``program`` with the model's tensors and the example inputs' values left out; best effort: a capture
    that cannot be saved is simply not cached."""
    own = {id(t) for _, t in _named_tensors(model)}
    state, constants, examples = program._state_dict, program._constants, program._example_inputs
    program._state_dict = {k: _meta(v) if id(v) in own else v for k, v in state.items()}
    program._constants = {k: _meta(v) if id(v) in own else v for k, v in constants.items()}
    program._example_inputs = tree_map(_meta, examples)  # their structure names the inputs of the shape checks
    try:
        with replaced_file(file) as tmp:
            torch.export.save(program, tmp, extra_files={_GUARDS: json.dumps(program._guards_code)})
    except Exception:  # the cache is an optimisation: a failed write leaves no file and no error
        pass
    finally:
        program._state_dict, program._constants, program._example_inputs = state, constants, examples


_GUARDS = "peftfx/guards.json"
"""The input shape checks of the program's module (``_guards_fn``): torch derives them from the export's shape
environment, which a loaded program lacks, so they are stored beside it."""


def _meta(t: Any) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    empty = torch.empty_like(t, device="meta")
    return nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty


def _load(file: Path, model: nn.Module) -> ExportedProgram | None:
    """The cached program with the model's own tensors bound in, or None (no file, an unreadable one, or a
    stored tensor the model lacks or holds with another shape or dtype)."""
    if not file.is_file():
        return None
    extra = {_GUARDS: ""}
    try:
        program = torch.export.load(file, extra_files=extra)
        guards = json.loads(extra[_GUARDS])
    except Exception:  # partial (a disk error) or from another torch: a miss
        return None
    program._guards_code = guards
    current = dict(_named_tensors(model))
    for table in (program._state_dict, program._constants):
        for name, stored in table.items():
            if isinstance(stored, torch.Tensor) and stored.device.type == "meta":
                mine = current.get(name)
                if mine is None or mine.shape != stored.shape or mine.dtype != stored.dtype:
                    return None
                table[name] = mine
    return program
