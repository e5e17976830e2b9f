"""An on-disk cache of captures, so compiling the same model again skips ``torch.export``.

torch.export is most of a compile's time, and its result depends on the model's code and structure and on the input
signature, not on the weights. A capture is stored (``graph_file``: the unlifted graph, no weights) under a key that
digests all of that: the model's class, its transformers config, every module's class, mode, hooks and plain
attributes, every tensor's name, shape, dtype and device (and which are tied), where every method of the module
classes comes from (a method patched at run time, or a class redefined in a notebook, is another key), the inputs'
structure, shapes and dtypes, the dynamic shapes, transformers' and torch's environment variables, and the versions
of torch, transformers, peftfx and Python. Beside the graph, a manifest lists the source files the capture could
have run, with their size and modification time (the rule Python's own bytecode cache uses): every loaded module of
the packages defining the model's classes (all of transformers' loaded modules for a transformers model), every
module those reference, and every module outside site-packages and the standard library (your own code, editable
installs). A stored capture is served only while all of them are unchanged, so a stale graph is never served for an
edited model. What the key cannot see is other state outside the model that its code reads at run time (a global
flag flipped after import, say): ``cache=False`` / ``PEFTFX_CACHE=0`` turns the cache off.

The current model's own tensors are bound in by name (checked against the stored shapes and dtypes). Files are
written to a temporary file renamed into place, so concurrent compiles never read a partial file; one that cannot
be read is a miss, replaced by the next capture. On by default; where: ``$PEFTFX_CACHE_DIR``, else
``$XDG_CACHE_HOME/peftfx``, else ``~/.cache/peftfx``, created private to the user (its files are code, as a
``.pyc`` is); the least recently used files beyond ``KEEP`` (or ``KEEP_BYTES`` in all) are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import marshal
import os
import pickle
import platform
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from . import graph_file
from .atomic import replaced_file

FORMAT = 2  # bumped when what is stored, or how the key is made, changes
KEEP = 512  # files kept in the cache folder, at most ``KEEP_BYTES`` in all; the least recently used beyond go
KEEP_BYTES = 1 << 30


def enabled(cache: bool | None) -> bool:
    """``cache`` as asked; None leaves it to ``$PEFTFX_CACHE`` (on unless set to 0)."""
    return cache if cache is not None else os.environ.get("PEFTFX_CACHE", "1") != "0"


def directory() -> Path:
    """The cache's folder."""
    if os.environ.get("PEFTFX_CACHE_DIR"):
        return Path(os.environ["PEFTFX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peftfx"


def summary() -> dict[str, Any]:
    """Where the cache is, whether it is on, and what it holds (``peftfx cache``)."""
    files = [f for f in (directory() / "capture").glob("*.fx")]
    return {
        "folder": str(directory()),
        "enabled": enabled(None),
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
    }


def clear() -> int:
    """Remove every stored capture (files being written by other processes aside); return how many went."""
    folder = directory() / "capture"
    removed = 0
    for file in folder.glob("*") if folder.is_dir() else []:
        if file.is_file() and not file.name.startswith("."):
            file.unlink(missing_ok=True)
            removed += 1
    return removed


def captured(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic_shapes: Any,
    capture: Callable[[], fx.GraphModule],
    *,
    cache: bool | None = None,
) -> fx.GraphModule:
    """``capture()``'s GraphModule for ``model`` on inputs like ``args``/``kwargs``, from the cache when it holds one.

    ``capture`` must unlift its program with ``graph_file.unlifted`` (so its input checks can be stored)."""
    folder = directory() if enabled(cache) else None
    key = _key(model, args, kwargs, dynamic_shapes) if folder is not None else None
    if folder is None or key is None:
        return capture()
    file = folder / "capture" / f"{key}.fx"
    gm = _load(file, model)
    if gm is None:
        gm = capture()
        _store(gm, model, file)
    return gm


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
            "code": _code(model),
            "inputs": _inputs((args, kwargs)),
            "dynamic_shapes": _dynamic(dynamic_shapes),
            "environment": {k: v for k, v in os.environ.items() if k.startswith(_SWITCHES)},
        }
        text = json.dumps(parts, sort_keys=True)
    except (_Uncacheable, TypeError, ValueError, OSError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


_SWITCHES = ("TRANSFORMERS_", "TORCH_", "PYTORCH_")
"""Environment variables that may switch what transformers and torch trace (``TRANSFORMERS_SDPA_FORCE_GQA``)."""


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


def _code(model: nn.Module) -> list[Any]:
    """Where each method of each module class (and its bases, torch's aside) comes from: a method replaced at run
    time, or a class redefined under the same name, is another key. Code with no file (``python -c``, a notebook
    cell) is digested whole, as no manifest can watch it."""
    classes: dict[type, None] = {}
    for m in model.modules():
        for cls in type(m).__mro__:
            if cls is not object and not cls.__module__.startswith("torch."):
                classes[cls] = None
    described = []
    for cls in classes:
        methods = []
        for name, value in vars(cls).items():
            function = getattr(value, "__func__", getattr(value, "fget", value))
            code = getattr(function, "__code__", None)
            if code is None:
                continue
            where: list[Any] = [name, code.co_filename, code.co_firstlineno]
            if not os.path.isfile(code.co_filename):
                where.append(hashlib.sha256(marshal.dumps(code)).hexdigest())
            methods.append(where)
        described.append([_qualified(cls), methods])
    return described


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


_INSTALLED = tuple(
    {str(Path(p).resolve()) for key in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_path(key))}
)


def _manifest(model: nn.Module) -> dict[str, list[int]]:
    """(size, mtime_ns) of each source file the model's code could run (see the module's docstring)."""
    packages = {cls.__module__.split(".")[0] for cls in (type(m) for m in model.modules())} - {"torch"}
    modules: dict[str, Any] = {}
    folders: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not isinstance(file, str):
            continue
        if name.split(".")[0] in packages:
            modules[name] = module
            for value in list(vars(module).values()):  # what the model's packages reference directly
                referenced = sys.modules.get(getattr(value, "__module__", None) or getattr(value, "__name__", ""))
                if referenced is not None:
                    modules.setdefault(referenced.__name__, referenced)
        elif not _real(file, folders).startswith(_INSTALLED):
            modules[name] = module
    files = {}
    for module in modules.values():
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and not module.__name__.startswith("torch"):
            stat = os.stat(file)
            files[file] = [stat.st_size, stat.st_mtime_ns]
    return files


def _real(file: str, folders: dict[str, str]) -> str:
    """``os.path.realpath(file)``, each folder resolved once (``folders``): thousands of modules share a few
    hundred folders, and resolving every path component of each was most of a capture's store."""
    folder, name = os.path.split(file)
    if os.path.islink(file):
        return os.path.realpath(file)
    if folder not in folders:
        folders[folder] = os.path.realpath(folder)
    return os.path.join(folders[folder], name)


def _unchanged(manifest: dict[str, list[int]]) -> bool:
    for file, (size, mtime) in manifest.items():
        try:
            stat = os.stat(file)
        except OSError:
            return False
        if stat.st_size != size or stat.st_mtime_ns != mtime:
            return False
    return True


def _store(gm: fx.GraphModule, model: nn.Module, file: Path) -> None:
    """Save ``gm`` and the manifest; best effort: a capture that cannot be saved is simply not cached."""
    lent = {id(t): name for name, t in reversed(list(_named_tensors(model)))}
    try:
        data = pickle.dumps((_manifest(model), graph_file.dumps(gm, lent)), protocol=pickle.HIGHEST_PROTOCOL)
        file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with replaced_file(file, durable=False) as tmp:  # a lost or torn file is a miss
            Path(tmp).write_bytes(data)
        _trim(file.parent)
    except Exception:  # the cache is an optimisation: a failed write leaves no file and no error
        pass


def _trim(folder: Path) -> None:
    """Remove the least recently used files beyond ``KEEP`` or ``KEEP_BYTES``, and any of an older format."""
    kept, size = 0, 0
    for file in sorted(folder.iterdir(), key=lambda f: f.stat().st_mtime, reverse=True):
        if file.name.startswith("."):  # another process's file being written
            continue
        kept, size = kept + 1, size + file.stat().st_size
        if file.suffix != ".fx" or kept > KEEP or size > KEEP_BYTES:
            file.unlink(missing_ok=True)


def _load(file: Path, model: nn.Module) -> fx.GraphModule | None:
    """The cached capture with the model's own tensors bound in, or None (no file, an unreadable one, a changed
    source file, a file another user wrote, or a stored tensor the model lacks or holds with another shape or
    dtype)."""
    try:
        if hasattr(os, "getuid") and file.stat().st_uid != os.getuid():
            return None  # its pickles would run as code: only the user's own files are read
        manifest, data = pickle.loads(file.read_bytes())
        if not _unchanged(manifest):
            return None
        current = dict(_named_tensors(model))
        gm = graph_file.loads(data, current.get)
    except Exception:  # absent, partial (a disk error) or from another torch: a miss
        return None
    with contextlib.suppress(OSError):  # recently used: kept by _trim (a read-only cache still serves)
        os.utime(file)
    return gm
