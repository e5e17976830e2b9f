"""PEFT as the oracle for one adapter on one model: unmerged, merged and saved back, in one call.

Every tuner test builds a tiny model and a PEFT config and calls ``check``; the tuner's own file states its
tolerances and why.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftfx

Inputs = tuple | dict


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-5
    atol: float = 1e-6


def perturb(model: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every trainable tensor off its initial value, so no adapter is an identity under test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                p.add_((scale * noise).to(p.dtype))


def run(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Call like the model; the main output tensor (logits for transformers models)."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if isinstance(out, dict) else out[0]


def peft_checkpoint(
    base: nn.Module, config: peft.PeftConfig, directory: Path, prepare: Callable[[nn.Module], None] = perturb
) -> nn.Module:
    """PEFT wraps a copy of ``base``, ``prepare`` moves the adapter off its init, and it is saved to ``directory``."""
    peft_model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config)).eval()
    prepare(peft_model)
    peft_model.save_pretrained(directory)
    return peft_model


def saved_peft(model: nn.Module, config: peft.PeftConfig, directory: Path) -> Path:
    """PEFT wraps ``model`` itself (no copy) and saves the adapter as initialised to ``directory``, returned."""
    peft.get_peft_model(model, config).save_pretrained(directory)
    return directory


def edit_config(checkpoint_dir: Path, config: dict[str, Any] | None = None, /, **fields: Any) -> dict[str, Any]:
    """Rewrite the checkpoint's adapter_config.json as ``{**config, **fields}``.

    ``config`` defaults to the file's own; it is returned, so later edits can start again from it.
    """
    file = Path(checkpoint_dir) / "adapter_config.json"
    base = json.loads(file.read_text()) if config is None else config
    file.write_text(json.dumps({**base, **fields}))
    return base


def replace_tensor(
    checkpoint_dir: Path, key: str, tensor: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor | None:
    """Rewrite one tensor of the checkpoint's adapter_model.safetensors.

    ``tensor`` may be a function of the one stored; None removes the key. Returns the tensor it replaced (None for
    a new key), so a test can put it back.
    """
    file = Path(checkpoint_dir) / "adapter_model.safetensors"
    tensors = load_file(file)
    old = tensors.get(key)
    if tensor is None:
        del tensors[key]
    else:
        tensors[key] = tensor(old) if callable(tensor) else tensor
    save_file(tensors, file)
    return old


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(state[key], value), f"the input model was mutated ({key})"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{what}: {m}")


def adapter_parameters(gm: torch.fx.GraphModule) -> list[str]:
    return [name for name, _ in gm.named_parameters() if name.startswith("peftfx.")] + [
        name for name, _ in gm.named_buffers() if name.startswith("peftfx.")
    ]


def check(
    base: nn.Module,
    config: peft.PeftConfig,
    inputs: Inputs,
    tmp_path: Path,
    *,
    tol: Tolerance = Tolerance(),
    merged_tol: Tolerance | None = None,
    prepare: Callable[[nn.Module], None] = perturb,
    merge: bool = True,
    save: bool = True,
) -> dict[str, Any]:
    """peftfx unmerged == PEFT unmerged, peftfx merged == PEFT merged, saved back == PEFT loading it."""
    base = base.eval()
    before = snapshot(base)
    ckpt = tmp_path / "peft"
    peft_model = peft_checkpoint(base, config, ckpt, prepare)
    expected = run(peft_model, inputs)

    spec = {"adapters": {"a": {"peft": str(ckpt)}}}
    gm = peftfx.compile(base, spec, inputs)
    assert_close(run(gm, inputs), expected, tol, "unmerged vs PEFT")
    result: dict[str, Any] = {"unmerged": gm}

    if merge:
        merged_expected = run(copy.deepcopy(peft_model).merge_and_unload(), inputs)
        merged = peftfx.compile(base, {**spec, "merge": True}, inputs)
        assert_close(run(merged, inputs), merged_expected, merged_tol or tol, "merged vs PEFT merged")
        assert adapter_parameters(merged) == [], "merged graph still holds adapter tensors"
        plain = peftfx.compile(base, {}, inputs)
        assert len(merged.graph.nodes) == len(plain.graph.nodes), "merged graph differs from the base capture"
        result["merged"] = merged

    if save:
        out = tmp_path / "saved"
        peftfx.save_adapter(gm, "a", out)
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        assert_close(run(reloaded, inputs), expected, tol, "saved back, loaded by PEFT")

    assert_unchanged(base, before)
    return result


def check_fresh_save(
    base: nn.Module, spec: dict[str, Any], inputs: Inputs, tmp_path: Path, tol: Tolerance = Tolerance()
) -> None:
    """A fresh adapter from a spec, saved in PEFT's format, gives PEFT the same outputs."""
    gm = peftfx.compile(base, spec, inputs)
    (name,) = spec["adapters"]
    with torch.no_grad():
        for param_name, p in gm.named_parameters():
            if param_name.startswith("peftfx.") and p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # as if trained
    out = tmp_path / "fresh"
    peftfx.save_adapter(gm, name, out)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert_close(run(reloaded, inputs), run(gm, inputs), tol, "fresh adapter saved, loaded by PEFT")
