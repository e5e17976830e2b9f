"""VB-LoRA on Linear and transformers Conv1D: LoRA factors assembled from a shared bank of vectors.

Math (bank ``V`` ``[num_vectors, L]``, shared by every site; ``k = topk``): each length-``L`` piece of a factor is
``Σ_j softmax(top-k logits)_j V[top-k index_j]``. ``vblora_logits_A`` ``[r, in/L, num_vectors]`` gives
``A`` ``[r, in]`` (pieces laid along ``in``); ``vblora_logits_B`` ``[out/L, r, num_vectors]`` gives pieces
``[out/L, r, L]``, transposed to ``[out/L, L, r]`` and flattened to ``B`` ``[out, r]``. ``y += B A x``, no
scaling; merge ``W += B A`` (transposed into Conv1D storage).

With PEFT's ``save_only_topk_weights`` the file holds, per factor, the top-k indices and the first ``k - 1``
softmax weights instead of the logits (the last weight is one minus their sum); such checkpoints are read as
they are (indices as a non-trainable integer tensor) and written back the same way.

VB-LoRA has no scaling factor, so a spec ``scale`` other than 1 is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
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

BANK = "vblora_vector_bank"
LOGITS = {"A": "vblora_logits_A", "B": "vblora_logits_B"}


class VBLoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(4, gt=0, description="rank of the assembled LoRA factors")
    num_vectors: int = Field(256, gt=0, description="vectors in the shared bank (one bank for the whole adapter)")
    vector_length: int = Field(256, gt=0, description="length of a bank vector; must divide in and out")
    topk: int = Field(2, gt=0, description="bank vectors mixed per piece")
    init_vector_bank_bound: float = Field(0.02, ge=0, description="bank init: U(-bound, bound)")
    init_logits_std: float = Field(0.1, ge=0, description="logits init: N(0, std²)")


class VBLoRA(AdditiveKind):
    name = "vblora"
    peft_types = ("VBLORA",)
    peft_prefix = "vblora_"
    ops = frozenset({"linear"})
    Params = VBLoRAParams
    scalable = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: VBLoRAParams = params
        if p.topk > p.num_vectors:
            raise SpecError(f"VB-LoRA topk={p.topk} exceeds num_vectors={p.num_vectors} ({site.describe()})")
        shapes = _logit_shapes(site, p.r, p.num_vectors, p.vector_length, SpecError, "")
        dtype = adapter_dtype(site.dtype)
        # Every site draws a bank; the first one placed is the adapter's (insert keeps one tensor per shared role).
        bank = torch.empty(p.num_vectors, p.vector_length, dtype=torch.float64)
        bank.uniform_(-p.init_vector_bank_bound, p.init_vector_bank_bound, generator=generator)
        tensors = {"bank": bank.to(dtype)}
        for role, shape in shapes.items():
            tensors[role] = torch.empty(shape, dtype=torch.float64).normal_(0, p.init_logits_std, generator=generator)
            tensors[role] = tensors[role].to(dtype)
        hyper = _hyper(p.r, p.num_vectors, p.vector_length, p.topk, False)
        keys = {"bank": BANK, **LOGITS}
        return SiteAdapter(self, site, hyper, tensors, keys, frozenset({"bank"}))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        r, nv, length, k = (
            int(cfg.get(f, d)) for f, d in (("r", 4), ("num_vectors", 256), ("vector_length", 256), ("topk", 2))
        )
        topk_only = bool(cfg.get("save_only_topk_weights"))
        shapes = _logit_shapes(site, r, nv, length, CheckpointError, source.file)
        keys: dict[str, str] = {}
        expected: dict[str, tuple[int, ...]] = {}
        for role, shape in shapes.items():
            if topk_only:
                keys[f"{role}_indices"] = f"{LOGITS[role]}_topk_indices"
                keys[f"{role}_weights"] = f"{LOGITS[role]}_topk_weights"
                expected[f"{role}_indices"] = (*shape[:-1], k)
                expected[f"{role}_weights"] = (*shape[:-1], k - 1)
            else:
                keys[role] = LOGITS[role]
                expected[role] = shape
        source.refuse_others(keys.values(), "a VB-LoRA site")
        if BANK not in source.shared:
            raise CheckpointError(f"{source.file}: missing the shared tensor 'base_model.{BANK}'")
        bank = source.shared[BANK]
        if tuple(bank.shape) != (nv, length):
            raise CheckpointError(
                f"{source.file}: 'base_model.{BANK}' has shape {list(bank.shape)}, expected [{nv}, {length}] "
                "(num_vectors, vector_length of adapter_config.json)"
            )
        dtype = adapter_dtype(site.dtype)
        tensors = {"bank": bank.to(dtype)}
        for role, key in keys.items():
            tensor = source.take(key)
            source.check_shape(key, tensor, expected[role], site, f" (r={r}, vector_length={length}, topk={k})")
            if role.endswith("_indices"):
                if tensor.is_floating_point() or bool((tensor.long() < 0).any() or (tensor.long() >= nv).any()):
                    raise CheckpointError(f"{source.file}: {source.keys[key]!r} holds indices outside 0..{nv - 1}")
                tensors[role] = tensor
            else:
                tensors[role] = tensor.to(dtype)
        return SiteAdapter(
            self, site, _hyper(r, nv, length, k, topk_only), tensors, {"bank": BANK, **keys}, frozenset({"bank"})
        )

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        dtype = a.tensors["bank"].dtype
        cast = dtype != a.site.dtype
        A, B = _factors(a, t)
        out = F.linear(F.linear(x.to(dtype) if cast else x, A), B)
        return y + (out.to(a.site.dtype) if cast else out)

    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        A, B = _factors(a, {role: v if role.endswith("_indices") else v.double() for role, v in t.items()})
        return B @ A

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "VB-LoRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("r", "num_vectors", "vector_length", "topk"), "VB-LoRA")
        return {
            "peft_type": "VBLORA",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "num_vectors": first["num_vectors"],
            "vector_length": first["vector_length"],
            "topk": first["topk"],
            "save_only_topk_weights": first["topk_only"],
            "fan_in_fan_out": any(a.site.transposed for a in adapters),
            "bias": "none",
        }


# Read here, or training-only (the init fields: the bank and logits are stored; dropout is off in inference).
_HANDLED = frozenset(
    {
        "r",
        "num_vectors",
        "vector_length",
        "topk",
        "save_only_topk_weights",
        "fan_in_fan_out",
        "bias",
        "vblora_dropout",
        "init_vector_bank_bound",
        "init_logits_std",
    }
)


def _hyper(r: int, nv: int, length: int, k: int, topk_only: bool) -> dict[str, Any]:
    return {"r": r, "num_vectors": nv, "vector_length": length, "topk": k, "topk_only": topk_only, "scale": 1.0}


def _logit_shapes(
    site: Site, r: int, nv: int, length: int, error: type[Exception], where: str
) -> dict[str, tuple[int, int, int]]:
    out, inp = site.weight_shape
    if out % length or inp % length:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}VB-LoRA vector_length={length} must divide in={inp} and out={out} of {site.describe()}")
    return {"A": (r, inp // length, nv), "B": (out // length, r, nv)}


def _pieces(a: SiteAdapter, t: Mapping[str, Any], role: str) -> Any:
    """The factor's length-L pieces: softmax-weighted sums of the top-k bank vectors."""
    if a.hyper["topk_only"]:
        first = t[f"{role}_weights"]
        weights = torch.cat([first, 1 - first.sum(-1, keepdim=True)], dim=-1)
        weights = torch.softmax(torch.log(weights), dim=-1)  # as PEFT, which turns them back into logits
        index = t[f"{role}_indices"].long()
    else:
        top = t[role].topk(a.hyper["topk"], dim=-1)
        weights, index = torch.softmax(top[0], dim=-1), top[1]
    return (weights.unsqueeze(-1) * F.embedding(index, t["bank"])).sum(-2)


def _factors(a: SiteAdapter, t: Mapping[str, Any]) -> tuple[Any, Any]:
    out, inp = a.site.weight_shape
    r = a.hyper["r"]
    A = _pieces(a, t, "A").reshape(r, inp)
    B = _pieces(a, t, "B").transpose(1, 2).reshape(out, r)
    return A, B
