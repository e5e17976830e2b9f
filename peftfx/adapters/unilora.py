"""UniLoRA on Linear and transformers Conv1D: every LoRA entry is a scaled entry of one shared trained vector.

Math (``θ = unilora_theta_d``, shared by every site): ``A[i, j] = θ[indices_A[i, j]] * scales_A[i, j]`` (``[r, in]``),
``B[o, i] = θ[indices_B[o, i]] * scales_B[o, i]`` (``[out, r]``); ``y += B A x``, no scaling; merge ``W += B A``
(transposed into Conv1D storage).

PEFT draws the indices for all targeted modules at once (a balanced, shuffled assignment from numpy's generator
seeded with ``proj_seed``, handed out in the model's module order) and sets each scale to ``1/√(uses of that
index across the whole adapter)``. With ``save_indices: true`` it saves indices and scales per module, and those
checkpoints are read here exactly. With ``save_indices: false`` (PEFT's default) the file holds ``θ`` alone, and
rebuilding the indices needs every targeted module of the original model in ``model.modules()`` order, which a
per-site loader does not see: such checkpoints are refused with that explanation.

The scales are constants in PEFT (buffers); here they are stored as adapter tensors so they save back, and the
forward detaches them so training never moves them. A fresh adapter draws each site's indices uniformly from the
spec's generator and scales them by ``1/√(uses within the site)``, and is saved with ``save_indices: true``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError
from ..sites import Site
from .base import (
    AdditiveKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    refuse_unknown,
    target_modules,
    uniform,
)

THETA = "unilora_theta_d"
KEYS = {
    "theta": THETA,
    "indices_A": "unilora_indices_A",
    "indices_B": "unilora_indices_B",
    "scales_A": "unilora_scales_A",
    "scales_B": "unilora_scales_B",
}


class UniLoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(4, gt=0, description="rank of the LoRA factors built from θ")
    theta_d_length: int = Field(256, gt=0, description="length of the shared trained vector θ (one per adapter)")
    init_theta_d_bound: float = Field(0.02, ge=0, description="θ init U(-bound, bound) when init_weights is true")
    init_weights: bool = Field(True, description="true: θ ~ U(±init_theta_d_bound); false: θ ~ N(0, 1)")


class UniLoRA(AdditiveKind):
    name = "unilora"
    peft_types = ("UNILORA",)
    peft_prefix = "unilora_"
    ops = frozenset({"linear"})
    Params = UniLoRAParams
    scalable = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: UniLoRAParams = params
        dtype = adapter_dtype(site.dtype)
        # Every site draws a θ; the first one placed is the adapter's (insert keeps one tensor per shared role).
        theta = torch.empty(p.theta_d_length, dtype=torch.float64)
        if p.init_weights:
            theta.uniform_(-p.init_theta_d_bound, p.init_theta_d_bound, generator=generator)
        else:
            theta.normal_(generator=generator)
        tensors = {"theta": theta.to(dtype)}
        shapes = _shapes(site, p.r)
        for side, shape in shapes.items():
            tensors[f"indices_{side}"] = torch.randint(0, p.theta_d_length, shape, generator=generator)
        counts = torch.bincount(
            torch.cat([tensors["indices_A"].flatten(), tensors["indices_B"].flatten()]), minlength=p.theta_d_length
        )
        inv_sqrt = counts.clamp(min=1).double().rsqrt()
        for side in shapes:
            tensors[f"scales_{side}"] = inv_sqrt[tensors[f"indices_{side}"]].to(dtype)
        hyper = {"r": p.r, "theta_d_length": p.theta_d_length, "scale": 1.0}
        return SiteAdapter(
            self, site, hyper, tensors, dict(KEYS), frozenset({"theta"}), frozenset({"scales_A", "scales_B"})
        )

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        r, length = int(cfg.get("r", 4)), int(cfg.get("theta_d_length", 256))
        module_keys = {role: key for role, key in KEYS.items() if role != "theta"}
        source.refuse_others(module_keys.values(), "a UniLoRA site")
        if THETA not in source.shared:
            raise CheckpointError(f"{source.file}: missing the shared tensor 'base_model.{THETA}'")
        theta = source.shared[THETA]
        if tuple(theta.shape) != (length,):
            raise CheckpointError(
                f"{source.file}: 'base_model.{THETA}' has shape {list(theta.shape)}, expected [{length}] "
                "(theta_d_length of adapter_config.json)"
            )
        dtype = adapter_dtype(site.dtype)
        tensors = {"theta": theta.to(dtype)}
        shapes = _shapes(site, r)
        for role, key in module_keys.items():
            tensor = source.take(key)
            shape = shapes[role[-1]]
            source.check_shape(key, tensor, shape, site, f" (r={r})")
            if role.startswith("indices"):
                if tensor.is_floating_point() or bool((tensor < 0).any() or (tensor >= length).any()):
                    raise CheckpointError(f"{source.file}: {source.keys[key]!r} holds indices outside 0..{length - 1}")
                tensors[role] = tensor.long()
            else:
                tensors[role] = tensor.to(dtype)
        hyper = {"r": r, "theta_d_length": length, "scale": 1.0}
        return SiteAdapter(
            self, site, hyper, tensors, dict(KEYS), frozenset({"theta"}), frozenset({"scales_A", "scales_B"})
        )

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        dtype = a.tensors["theta"].dtype
        cast = dtype != a.site.dtype
        A, B = _factors(t, detach=True)
        out = F.linear(F.linear(x.to(dtype) if cast else x, A), B)
        return y + (out.to(a.site.dtype) if cast else out)

    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        A, B = _factors({role: v if role.startswith("indices") else v.double() for role, v in t.items()}, detach=False)
        return B @ A

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        if not config.get("save_indices", False):
            raise CheckpointError(
                f"{file}: save_indices=false: the file holds only unilora_theta_d, and PEFT rebuilds each module's "
                "indices and scales from proj_seed over all targeted modules in the original model's module order, "
                "which peftfx does not reproduce; save the adapter with UniLoraConfig(save_indices=True)"
            )
        refuse_unknown(config, _HANDLED, "UniLoRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("r", "theta_d_length"), "UniLoRA")
        return {
            "peft_type": "UNILORA",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "theta_d_length": first["theta_d_length"],
            "save_indices": True,
            "fan_in_fan_out": any(a.site.transposed for a in adapters),
            "bias": "none",
        }


# Read here, or not needed once indices and scales are stored (proj_seed, the init fields; dropout is off).
_HANDLED = frozenset(
    {
        "r",
        "theta_d_length",
        "save_indices",
        "proj_seed",
        "fan_in_fan_out",
        "bias",
        "unilora_dropout",
        "init_theta_d_bound",
        "init_weights",
    }
)


def _shapes(site: Site, r: int) -> dict[str, tuple[int, int]]:
    out, inp = site.weight_shape
    return {"A": (r, inp), "B": (out, r)}


def _factors(t: Mapping[str, Any], detach: bool) -> tuple[Any, Any]:
    theta = t["theta"]
    factors = []
    for side in ("A", "B"):
        scales = t[f"scales_{side}"]
        factors.append(torch.take(theta, t[f"indices_{side}"]) * (scales.detach() if detach else scales))
    return factors[0], factors[1]
