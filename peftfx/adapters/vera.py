"""VeRA on Linear and transformers Conv1D: one frozen random pair shared by every site, two trained vectors each.

Math: ``A ∈ R^{r x max_in}`` and ``B ∈ R^{max_out x r}`` are drawn once (kaiming-uniform, A then B, from a CPU
generator seeded with ``projection_prng_key``; the max is over the adapter's sites). A site of ``in``/``out``
features uses ``A_s = A[:, :in]``, ``B_s = B[:out, :]`` and its own ``λ_d ∈ R^r``, ``λ_b ∈ R^out``:

    y += s · λ_b ⊙ (B_s (λ_d ⊙ (A_s x)));   merge  ``ΔW = s · (λ_b ⊙ B_s)(λ_d ⊙ A_s)``  (transposed for Conv1D).

PEFT has no scaling factor (``s = 1``); ``scale`` multiplies the delta, as it would a LoRA's. The projections are
read from the checkpoint (``base_model.vera_A/B``) or, with ``save_projection: false``, drawn again from the key
over the sites the config targets, as PEFT does. They are adapter-wide tensors, stored once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
from ..sites import Site
from ..sizes import Seed
from .base import (
    AdditiveKind,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    refuse_unknown,
    target_modules,
)


class VeraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(256, gt=0, description="rank of the shared random projections")
    d_initial: float = Field(0.1, description="initial value of every λ_d entry (λ_b starts at 0: identity)")
    projection_prng_key: Seed = Field(0, description="seed of the CPU generator that draws the shared A and B")
    init: bool = Field(True, description="true: λ_b = 0, λ_d = d_initial (identity); false: λ_b = 1, λ_d ~ N(0, 1)")


class Vera(AdditiveKind):
    name = "vera"
    peft_types = ("VERA",)
    peft_prefix = "vera_lambda_"
    ops = frozenset({"linear"})
    Params = VeraParams
    _shared = ("vera_A", "vera_B")  # PEFT names of the projections
    _rows = 1  # rows of A per rank (PVeRA: 2)

    # -- construction -------------------------------------------------------------------------------------------

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: Any = params
        dtype = adapter_dtype(site.dtype)
        A, B = (t.to(dtype) for t in prepared[p.r, p.projection_prng_key])
        if p.init:
            lambda_b = torch.zeros(site.out_features, dtype=dtype)
            lambda_d = torch.full((p.r * self._rows,), p.d_initial, dtype=dtype)
        else:  # PEFT draws λ_d from the global generator; a seeded spec draws it from its own
            lambda_b = torch.ones(site.out_features, dtype=dtype)
            lambda_d = torch.randn(p.r * self._rows, generator=generator, dtype=torch.float64).to(dtype)
        hyper = {"r": p.r, "prng_key": p.projection_prng_key, "d_initial": p.d_initial, "scale": 1.0}
        tensors = {"A": A, "B": B, "lambda_b": lambda_b, "lambda_d": lambda_d}
        return self._adapter(site, hyper, tensors)

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        r = int(cfg.get("r", 256))
        key_b, key_d = f"{self.peft_prefix}b", f"{self.peft_prefix}d"
        source.refuse_others({key_b, key_d}, f"a {self.name} site")
        lambda_b, lambda_d = source.take(key_b), source.take(key_d)
        dtype = adapter_dtype(site.dtype)
        name_a, name_b = self._shared
        if cfg.get("save_projection", True):
            for name in (name_a, name_b):
                if name not in source.shared:
                    raise CheckpointError(
                        f"{source.file}: save_projection is true, but the file has no tensor 'base_model.{name}'"
                    )
            A, B = source.shared[name_a], source.shared[name_b]
        else:
            A, B = source.prepared
        checks = [
            (lambda_b, (site.out_features,), source.keys[key_b]),
            (lambda_d, (r * self._rows,), source.keys[key_d]),
        ]
        for tensor, shape, key in checks:
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{source.file}: {key!r} has shape {list(tensor.shape)}, expected {list(shape)} for "
                    f"{site.describe()} (r={r} in adapter_config.json)"
                )
        needed = {name_a: (r * self._rows, site.in_features), name_b: (site.out_features, r)}
        for name, tensor in ((name_a, A), (name_b, B)):
            rows, cols = needed[name]
            exact_dim = 0 if name == name_a else 1  # the rank dimension must match; the other must cover the site
            ok = tensor.ndim == 2 and tensor.shape[exact_dim] == needed[name][exact_dim]
            ok = ok and tensor.shape[0] >= rows and tensor.shape[1] >= cols
            if not ok:
                raise CheckpointError(
                    f"{source.file}: 'base_model.{name}' has shape {list(tensor.shape)}, which does not cover "
                    f"{site.describe()} at r={r} (needs {'rows' if exact_dim == 0 else 'columns'} = "
                    f"{needed[name][exact_dim]} and at least {[rows, cols]})"
                )
        hyper = {"r": r, "prng_key": int(cfg.get("projection_prng_key", 0)), "d_initial": None, "scale": scale}
        tensors = {"A": A.to(dtype), "B": B.to(dtype), "lambda_b": lambda_b.to(dtype), "lambda_d": lambda_d.to(dtype)}
        return self._adapter(site, hyper, tensors)

    def prepare(self, sites: Sequence[Site], params: Sequence[BaseModel]) -> dict[tuple[int, int], tuple]:
        """PEFT's projections for each (r, key) of the adapter, sized over every site that uses them."""
        groups: dict[tuple[int, int], list[Site]] = {}
        for site, p in zip(sites, params, strict=True):
            groups.setdefault((p.r, p.projection_prng_key), []).append(site)
        return {(r, key): self._draw(members, r, key) for (r, key), members in groups.items()}

    def prepare_peft(self, sites: Sequence[Site], config: Mapping[str, Any], file: str) -> tuple | None:
        """save_projection false: PEFT draws A and B again from the key, sized over every site the config targets."""
        if config.get("save_projection", True) or not sites:
            return None
        return self._draw(sites, int(config.get("r", 256)), int(config.get("projection_prng_key", 0)))

    def _draw(self, sites: Sequence[Site], r: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        max_in = max(s.in_features for s in sites)
        max_out = max(s.out_features for s in sites)
        return draw_projections(r * self._rows, r, max_in, max_out, key)

    def _adapter(self, site: Site, hyper: dict, tensors: dict) -> SiteAdapter:
        keys = {
            "A": self._shared[0],
            "B": self._shared[1],
            "lambda_b": f"{self.peft_prefix}b",
            "lambda_d": f"{self.peft_prefix}d",
        }
        return SiteAdapter(self, site, hyper, tensors, keys, frozenset({"A", "B"}), frozenset({"A", "B"}))

    # -- graph ----------------------------------------------------------------------------------------------

    def _factors(self, a: SiteAdapter, t: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        """The site's slices of A and B, and the λ_d that goes with A's rows (overridden by PVeRA)."""
        rows = a.hyper["r"] * self._rows
        return t["A"][:rows, : a.site.in_features], t["B"][: a.site.out_features, :], t["lambda_d"]

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        dtype = a.tensors["lambda_d"].dtype
        A, B, lambda_d = self._factors(a, t)
        delta = t["lambda_b"] * F.linear(lambda_d * F.linear(x.to(dtype), A), B)
        return y + (delta * a.hyper["scale"]).to(a.site.dtype)

    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        A, B, lambda_d = (f.double() for f in self._factors(a, t))
        return (t["lambda_b"].double()[:, None] * B) @ (lambda_d[:, None] * A) * a.hyper["scale"]

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, HANDLED, self.name, file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = adapters[0].hyper
        if any(a.hyper["r"] != first["r"] or a.hyper["prng_key"] != first["prng_key"] for a in adapters):
            raise SpecError(
                f"save_adapter: PEFT needs one r and one projection_prng_key for a whole {self.name} adapter"
            )
        return {
            "peft_type": self.peft_types[0],
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "projection_prng_key": first["prng_key"],
            "save_projection": True,
            "d_initial": first["d_initial"] if first["d_initial"] is not None else 0.1,
            "fan_in_fan_out": any(a.site.transposed for a in adapters),
        }


# Fields read here, and ones that only shape training (dropout, init: the stored tensors say everything).
HANDLED = frozenset(
    {
        "r",
        "projection_prng_key",
        "save_projection",
        "fan_in_fan_out",
        "init_weights",
        "d_initial",
        "vera_dropout",
        "bias",
    }
)


def draw_projections(rows: int, r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's draw: A (rows x max_in), then B (max_out x r), kaiming-uniform (gain √2, fan_in), one CPU stream."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    out = []
    for shape in ((rows, max_in), (max_out, r)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        out.append(torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))
    return out[0], out[1]
