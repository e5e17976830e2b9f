"""What the LyCORIS kinds (LoHa, LoKr) share: PEFT's conv handling, rank checks and strict tensor reads."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import CheckpointError, SpecError
from ..sites import Site
from .base import PeftSource, SiteAdapter, adapter_dtype, pattern_value, per_module, target_modules

# The adapter_config.json fields of PEFT's LyCORIS configs that LoHa and LoKr read, or that act only in training
# (dropouts; the stored tensors say the rest).
LYCORIS_FIELDS = frozenset(
    {
        "r",
        "alpha",
        "rank_pattern",
        "alpha_pattern",
        "use_effective_conv2d",
        "init_weights",
        "rank_dropout",
        "module_dropout",
    }
)


def cp_rebuild(core: Any, w_a: Any, w_b: Any) -> Any:
    """``R[o,i,k,l] = Σ_{p,q} core[p,q,k,l] w_a[p,o] w_b[q,i]`` (a Tucker/CP rebuild of a conv kernel)."""
    return torch.einsum("pqkl,po,qi->oikl", core, w_a, w_b)


def uses_cp(site: Site, effective: bool) -> bool:
    """PEFT's rule: the effective conv form applies to convs whose kernel is not all ones."""
    return effective and site.op.startswith("conv") and math.prod(site.weight_shape[2:]) != 1


def take_rank(site: Site, source: PeftSource, role: str, cfg: Mapping[str, Any]) -> int:
    """The rank a tensor's first axis stores, checked against adapter_config.json's r / rank_pattern."""
    r = source.take(role).shape[0]
    r_cfg = pattern_value(cfg.get("rank_pattern") or {}, site.module, cfg.get("r", 8))
    if r != r_cfg:
        raise CheckpointError(
            f"{source.file}: {source.keys[role]!r} has rank {r}, but adapter_config.json gives {site.module} r={r_cfg}"
        )
    return r


def take_tensors(
    site: Site, source: PeftSource, expected: Mapping[str, tuple[int, ...]], kind: str
) -> dict[str, torch.Tensor]:
    """Exactly the expected tensors, in their expected shapes, upcast like PEFT keeps them."""
    tensors = {}
    for role, shape in expected.items():
        tensor = source.take(role)
        source.check_shape(role, tensor, shape, site)
        tensors[role] = tensor.to(adapter_dtype(site.dtype))
    source.refuse_others(expected, f"a {site.op} {kind} site with this config")
    return tensors


def add_delta_output(site: Site, x: Any, y: Any, delta: Any, dtype: torch.dtype) -> Any:
    """``y + op(x, ΔW)`` with the base op's conv arguments, computed in the adapter dtype as PEFT does."""
    xa = x.to(dtype) if dtype != site.dtype else x
    result = y + site.run(xa, delta)
    return result.to(site.dtype) if dtype != site.dtype else result


def lycoris_config(adapters: Sequence[SiteAdapter], peft_type: str, kind: str) -> dict[str, Any]:
    """The adapter_config.json fields LoHa and LoKr share: targets, rank and alpha with their patterns, conv form."""
    first = adapters[0].hyper
    return {
        "peft_type": peft_type,
        "target_modules": target_modules(adapters),
        "r": first["r"],
        "alpha": first["alpha"],
        "rank_pattern": per_module(adapters, "r", first["r"]),
        "alpha_pattern": per_module(adapters, "alpha", first["alpha"]),
        "use_effective_conv2d": effective_flag(adapters, kind),
    }


def effective_flag(adapters: Sequence[SiteAdapter], kind: str) -> bool:
    """One use_effective_conv2d for the whole adapter, as PEFT's config has (only convs with k≠1 care)."""
    flags = {a.hyper["use_effective_conv2d"] for a in adapters if uses_cp(a.site, True)}
    if len(flags) > 1:
        raise SpecError(f"save_adapter: PEFT needs one use_effective_conv2d setting for a whole {kind} adapter")
    return flags.pop() if flags else False
