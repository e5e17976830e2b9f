"""Saving an adapter back in PEFT's format, so one trained inside a peftfx graph ships to anyone using PEFT.

The tensors are read from the graph (so training shows), keyed by the table each kind declares
(``SiteAdapter.peft_keys``), and written beside the config PEFT needs: the one the adapter was loaded from,
or one the kind derives from its fresh sites. Files are written to a temporary directory that is renamed into
place (or whose files replace those of an existing directory, one rename each), so a failure leaves nothing
half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import fx

from .adapters import KINDS
from .checkpoint import CONFIG, PREFIX, SHARED_PREFIX, WEIGHTS
from .errors import SpecError
from .ir import adapters, nodes_by_name, records
from .rewrite import get_attr


def save_adapter(gm: fx.GraphModule, name: str, directory: str | Path) -> Path:
    """Write adapter ``name`` of ``gm`` as ``adapter_config.json`` + ``adapter_model.safetensors``."""
    info = adapters(gm).get(name)
    mine = [r for r in records(gm) if r.adapter == name]
    if info is None or not mine:
        live = ", ".join(sorted({r.adapter for r in records(gm)})) or "none"
        raise SpecError(f"save_adapter: no live adapter {name!r} in this graph (live: {live}; merged ones are gone)")
    state: dict[str, torch.Tensor] = {}
    nodes = nodes_by_name(gm)
    for record in mine:
        if record.hyper.get("scale", 1.0) != 1.0:
            raise SpecError(f"save_adapter: {name!r} was loaded with `scale`, which PEFT's format cannot express")
        a = record.site_adapter(gm, nodes)
        for role, target in record.tensors.items():
            if role not in record.peft_keys:  # held for the graph only, e.g. a padded adapter's scaling
                continue
            prefix = SHARED_PREFIX if role in record.shared else f"{PREFIX}{record.module}."
            state[prefix + record.peft_keys[role]] = a.kind.saved_tensor(a, role, get_attr(gm, target).detach())
    for key, tensor in info.overrides.items():
        state[key] = tensor
    config = info.config
    if config is None:
        config = KINDS[info.kind].peft_config([r.site_adapter(gm, nodes) for r in mine])
    config = {**config, "inference_mode": True}
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.exists():  # each file replaced in one step; the weights first, so the config never runs ahead
            for file in (WEIGHTS, CONFIG):
                os.replace(tmp / file, out / file)
        else:
            _as_if_created(tmp, 0o777)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def written_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it becomes ``path`` in one step, only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(name)
        _as_if_created(Path(name), 0o666)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def _as_if_created(path: Path, mode: int) -> None:
    """Temporary files and folders are private (0600, 0700); what they become gets the mode ``open`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)
