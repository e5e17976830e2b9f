"""Saving an adapter back in PEFT's format, so one trained inside a peftfx graph ships to anyone using PEFT.

The tensors are read from the graph (so training shows), keyed by the table each kind declares
(``SiteAdapter.peft_keys``), and written beside the config PEFT needs: the one the adapter was loaded from,
or one the kind derives from its fresh sites. The folder is written beside its destination and replaces an
existing adapter folder in one step (``atomic.replaced_folder``), so a failure leaves the previous adapter whole,
never new weights beside an old config. Files of an existing adapter folder that are not the adapter (a README,
other adapters' subfolders) are carried over; a folder that is not an adapter's is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import fx

from .adapters import KINDS
from .atomic import check_destination, replaced_folder
from .checkpoint import CONFIG, PICKLE, PREFIX, SHARED_PREFIX, WEIGHTS
from .errors import PeftfxError, SpecError
from .ir import adapters, nodes_by_name, records
from .rewrite import get_attr


def save_adapter(gm: fx.GraphModule, name: str, directory: str | Path) -> Path:
    """Write adapter ``name`` of ``gm`` as ``adapter_config.json`` + ``adapter_model.safetensors``."""
    out = check_destination(directory, "folder", "save_adapter")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG).is_file():
        raise PeftfxError(f"save_adapter: {out} is not an adapter folder (no {CONFIG}); remove it or pick another")
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
    with replaced_folder(out) as staged:
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(staged / WEIGHTS))
        (staged / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.is_dir():
            _carry_over(out, staged)
    return out


def _carry_over(old: Path, new: Path) -> None:
    """What an adapter folder holds besides the adapter (a README, other adapters' subfolders) stays: hard links
    where the file system has them (free, and the old folder is deleted after), copies otherwise."""
    for entry in old.iterdir():
        if entry.name in (CONFIG, WEIGHTS, PICKLE):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    if Path(source).is_symlink():
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
