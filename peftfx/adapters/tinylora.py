"""TinyLoRA on Linear, transformers Conv1D and Embedding: a frozen SVD pair steered by a tiny shared vector.

Math (``W`` in logical ``[out, in]`` layout; embeddings ``[num, dim]``): ``A = √S_r V_rᵀ`` (``r x in``) and
``B = U_r √S_r`` (``out x r``) are the truncated SVD of the base weight, taken when the adapter is made;
``P ∈ R^{u x r x r}`` are fixed normal projections (std ``1/√r``) drawn from seed ``projection_seed + i``, ``i`` the
site's index among the adapter's targets; ``v ∈ R^u`` is the trained vector, shared by a group of sites
(``weight_tying``). With ``R = Σ_k v_k P_k``:

    Linear / Conv1D  ``y += s · B R A x``;   Embedding  ``y += s · (B[ids] R A)``;   merge  ``W += s · B R A``.

PEFT has no scaling factor (``s = 1``); ``scale`` multiplies the delta, as it would a LoRA's. ``v`` is an
adapter-wide tensor per group (``base_model.tinylora_v.<g>``); A, B and P are per site.

Site order: PEFT numbers its targets in ``named_modules`` order. A loaded checkpoint is numbered here by the order
of the targets' weights in the captured graph (parameter registration order under torch.export, which is the
same for modules that own their weights), a fresh adapter by the order its sites are selected (call order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

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
)

_KEYS = {"A": "tinylora_A", "B": "tinylora_B", "P": "tinylora_P"}


class TinyLoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(2, gt=0, description="rank of the frozen SVD pair (capped at min(out, in))")
    u: int = Field(64, gt=0, description="length of the trained vector v")
    projection_seed: int = Field(  # 63 bits: seed + i must still fit torch's 64
        42, ge=-(2**63), lt=2**63, description="site i draws its projections P from seed projection_seed + i"
    )
    init: bool | Literal["uniform"] = Field(
        True, description="true: v = 0 (identity at init); uniform: v ~ U(-init_v_bound, init_v_bound)"
    )
    init_v_bound: float = Field(0.02, gt=0, description="bound of the uniform init of v")


class TinyLora(AdditiveKind):
    name = "tinylora"
    peft_types = ("TINYLORA",)
    peft_prefix = "tinylora_"
    ops = frozenset({"linear", "embedding"})
    Params = TinyLoraParams

    # -- construction -------------------------------------------------------------------------------------------

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: TinyLoraParams = params
        dtype = adapter_dtype(site.dtype)
        index = prepared[p].index(site.module)
        weight = site.base_weight()
        A, B = _svd_pair(site, weight, p.r)
        r = A.shape[0]
        if p.init == "uniform":
            v = torch.empty(p.u, dtype=torch.float64).uniform_(-p.init_v_bound, p.init_v_bound, generator=generator)
        elif p.init:
            v = torch.zeros(p.u, dtype=torch.float64)
        else:
            raise SpecError("tinylora: init false leaves v uninitialised in PEFT; use true or uniform")
        P = _projections(p.u, r, p.projection_seed + index)
        hyper = {"r": r, "u": p.u, "group": index, "seed": p.projection_seed, "scale": 1.0}
        tensors = {"A": A.to(dtype), "B": B.to(dtype), "P": P.to(dtype), _v_role(index): v.to(dtype)}
        return _adapter(self, site, hyper, tensors)

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        u, r_cfg, seed = int(cfg.get("u", 64)), int(cfg.get("r", 2)), int(cfg.get("projection_seed", 42))
        order = source.prepared
        index, count = order.index(site.module), len(order)
        groups = max(1, round(count * (1.0 - float(cfg.get("weight_tying", 0.0)))))
        group = min(index // max(1, count // groups), groups - 1)
        roles = ["A", "B"] + (["P"] if _KEYS["P"] in source.tensors else [])
        source.refuse_others({_KEYS[role] for role in roles}, "a TinyLoRA site")
        tensors = {role: source.take(_KEYS[role]) for role in roles}
        out_f, in_f = site.weight_shape[:2]  # embeddings: [num, dim], and B is num x r
        r = min(r_cfg, out_f, in_f)
        if "P" not in tensors:
            tensors["P"] = _projections(u, r, seed + index)
        v_name = f"tinylora_v.{group}"
        if v_name not in source.shared:
            raise CheckpointError(f"{source.file}: no tensor 'base_model.{v_name}' (the vector of {site.module})")
        tensors[_v_role(group)] = source.shared[v_name]
        expected = {"A": (r, in_f), "B": (out_f, r), "P": (u, r, r), _v_role(group): (u,)}
        for role, tensor in tensors.items():
            if tuple(tensor.shape) != expected[role]:
                key = source.keys.get(_KEYS.get(role, ""), f"base_model.{v_name}")
                raise CheckpointError(
                    f"{source.file}: {key!r} has shape {list(tensor.shape)}, expected {list(expected[role])} for "
                    f"{site.describe()} (r={r_cfg}, u={u} in adapter_config.json)"
                )
        dtype = adapter_dtype(site.dtype)
        hyper = {"r": r, "u": u, "group": group, "seed": seed, "scale": scale}
        return _adapter(self, site, hyper, {role: t.to(dtype) for role, t in tensors.items()})

    def prepare(self, sites: Sequence[Site], params: Sequence[BaseModel]) -> dict[BaseModel, list[str]]:
        """Each site's index among the adapter's sites of the same settings, in the order they are selected."""
        order: dict[BaseModel, list[str]] = {}
        for site, p in zip(sites, params, strict=True):
            seen = order.setdefault(p, [])
            if site.module not in seen:
                seen.append(site.module)
        return order

    def prepare_peft(self, sites: Sequence[Site], config: Mapping[str, Any], file: str) -> list[str]:
        """The adapter's target modules in weight-registration order: PEFT's index of each (see the module doc)."""
        if not sites:
            return []
        position = {node: i for i, node in enumerate(sites[0].weight.graph.nodes)}
        first: dict[str, int] = {}
        for s in sites:
            first[s.module] = min(first.get(s.module, len(position)), position[s.weight])
        return sorted(first, key=first.__getitem__)

    # -- graph ----------------------------------------------------------------------------------------------

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        R = torch.einsum("i,ijk->jk", t[_v_role(a.hyper["group"])], t["P"])
        if a.site.op == "embedding":
            delta = F.embedding(x, t["B"]) @ R @ t["A"]
        else:
            delta = F.linear(F.linear(F.linear(x.to(a.tensors["A"].dtype), t["A"]), R), t["B"])
        return y + (delta * a.hyper["scale"]).to(a.site.dtype)

    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        R = torch.einsum("i,ijk->jk", t[_v_role(a.hyper["group"])].double(), t["P"].double())
        return t["B"].double() @ R @ t["A"].double() * a.hyper["scale"]

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "TinyLoRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = adapters[0].hyper
        if any(a.hyper["u"] != first["u"] or a.hyper["seed"] != first["seed"] for a in adapters):
            raise SpecError("save_adapter: PEFT needs one u and one projection_seed for a whole TinyLoRA adapter")
        groups = sorted(a.hyper["group"] for a in adapters)
        if groups != list(range(len(adapters))):
            raise SpecError("save_adapter: a fresh TinyLoRA adapter is saved with one vector per site, numbered 0..n-1")
        return {
            "peft_type": "TINYLORA",
            "target_modules": target_modules(adapters),
            "r": max(a.hyper["r"] for a in adapters),
            "u": first["u"],
            "weight_tying": 0.0,
            "projection_seed": first["seed"],
            "save_projection": True,
            "fan_in_fan_out": any(a.site.transposed for a in adapters),
        }


# Fields read here, and ones that only shape training or init (the stored tensors say everything).
_HANDLED = frozenset(
    {
        "r",
        "u",
        "weight_tying",
        "projection_seed",
        "save_projection",
        "init_v_bound",
        "init_weights",
        "fan_in_fan_out",
        "tinylora_dropout",
        "bias",
    }
)


def _v_role(group: int) -> str:
    return f"v_{group}"


def _adapter(kind: TinyLora, site: Site, hyper: dict, tensors: dict) -> SiteAdapter:
    v = _v_role(hyper["group"])
    keys = {**{role: _KEYS[role] for role in ("A", "B", "P")}, v: f"tinylora_v.{hyper['group']}"}
    return SiteAdapter(kind, site, hyper, tensors, keys, frozenset({v}), frozen=frozenset({"A", "B", "P"}))


def _svd_pair(site: Site, weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's split of the truncated SVD: √S on both sides, computed in float32 and cast back, as PEFT does."""
    logical = weight.detach().t() if site.transposed else weight.detach()
    U, S, Vh = torch.linalg.svd(logical.float(), full_matrices=False)
    r = min(r, *logical.shape)
    root = torch.sqrt(S[:r].to(weight.dtype))
    return (root[:, None] * Vh[:r].to(weight.dtype)).contiguous(), (U[:, :r].to(weight.dtype) * root).contiguous()


def _projections(u: int, r: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.normal(0.0, 1.0 / r**0.5, size=(u, r, r), generator=generator)
