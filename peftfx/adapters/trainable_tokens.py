"""Trainable tokens: new values for a few rows of an embedding matrix (or of a bias-free Linear, e.g. a head).

``token_indices`` names the rows; ``trainable_tokens_delta`` (``[len(indices), dim]``, despite its name) holds
their new values, which *replace* the base rows: ``W' = W`` with ``W'[idx[j]] = delta[j]``. The site's own op
runs on ``W'`` (as PEFT's forward does), and merge writes the rows into a copy of ``W``.

Not supported, and refused rather than computed differently:

* a weight tied to another site (GPT-2's ``lm_head`` is ``wte``): PEFT also puts the rows into the tied layer,
  which a per-site adapter cannot express;
* a Linear with a bias: PEFT's live forward drops the bias (``F.linear(x, W')``) while its merge keeps it;
* repeated indices (which row wins is up to ``index_copy``).

It replaces values, so there is no scaling factor, and a ``scale`` other than 1 is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import fx

from ..errors import CheckpointError, SpecError
from ..sites import Site, find_sites, signature_of
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules, uniform

_KEY = "trainable_tokens_delta"


class TrainableTokensParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    token_indices: list[int] = Field(
        min_length=1,
        description='rows (token ids) whose values are trained: a list, one id, or a string such as "3, 9, 20-23"',
    )
    init: bool = Field(True, description="true: start from the base rows (identity); false: N(0, 1), as PEFT")

    @field_validator("token_indices", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if not isinstance(value, str):
            return value
        out = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            first, dash, last = part.partition("-")
            if not (first.isdigit() and (not dash or last.isdigit())):
                raise ValueError(f"{part!r} is not a token id or a range a-b")
            out += range(int(first), int(last) + 1) if dash else [int(first)]
        return out


class TrainableTokens(AdapterKind):
    name = "trainable_tokens"
    peft_types = ("TRAINABLE_TOKENS",)
    peft_prefix = "trainable_tokens_"
    ops = frozenset({"embedding", "linear"})
    Params = TrainableTokensParams
    scalable = False

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: TrainableTokensParams = params
        weight = _check_site(site, p.token_indices, SpecError, "")
        if p.init:
            delta = weight.detach()[p.token_indices].double()
        else:
            delta = torch.randn(len(p.token_indices), weight.shape[1], generator=generator, dtype=torch.float64)
        hyper = {"token_indices": list(p.token_indices), "scale": 1.0}
        return SiteAdapter(self, site, hyper, {"delta": delta.to(adapter_dtype(site.dtype))}, {"delta": _KEY})

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        indices = source.config["token_indices"]
        weight = _check_site(site, indices, CheckpointError, source.file)
        delta = source.take(_KEY)
        source.refuse_others({_KEY}, "trainable tokens")
        expected = (len(indices), weight.shape[1])
        if tuple(delta.shape) != expected:
            raise CheckpointError(
                f"{source.file}: {source.keys[_KEY]!r} has shape {list(delta.shape)}, expected {list(expected)} "
                f"({len(indices)} token_indices of {site.describe()})"
            )
        hyper = {"token_indices": list(indices), "scale": scale}
        return SiteAdapter(self, site, hyper, {"delta": delta.to(adapter_dtype(site.dtype))}, {"delta": _KEY})

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        new_weight = _replace_rows(
            weight, t["delta"].to(a.site.dtype), a.hyper["token_indices"], a.site.weight_shape[0]
        )
        node = a.site.node
        signature = signature_of(node)
        args = list(fx.node.map_arg(node.args, lambda n: fx.Proxy(n, x.tracer)))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: fx.Proxy(n, x.tracer))
        args[signature.input] = x
        args[signature.weight] = new_weight
        return node.target(*args, **kwargs)  # the site's own op (padding_idx and all) on the new rows

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        merged = weight.detach().clone()
        merged[a.hyper["token_indices"]] = t["delta"].detach().to(weight.dtype)
        return merged, bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "trainable tokens", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        indices = uniform(adapters, ("token_indices",), "trainable tokens")["token_indices"]
        return {
            "peft_type": "TRAINABLE_TOKENS",
            "target_modules": target_modules(adapters),
            "token_indices": list(indices),
            "init_weights": True,
        }


_HANDLED = frozenset({"token_indices", "init_weights"})


def _check_site(site: Site, indices: list[int], error: type[Exception], where: str) -> torch.Tensor:
    """The site's weight, after refusing what PEFT computes differently live and merged, or per-site cannot."""
    prefix = f"{where}: " if where else ""
    gm = site.weight.graph.owning_module
    weight = site.base_weight()
    if site.op == "linear" and (site.bias is not None or site.transposed):
        raise error(
            f"{prefix}trainable tokens on {site.describe()}: only a bias-free nn.Linear is supported (PEFT's live "
            "forward drops the bias, so its unmerged and merged outputs differ)"
        )
    tied = [s.module for s in find_sites(gm) if s.node is not site.node and s.base_weight() is weight]
    if tied:
        raise error(
            f"{prefix}trainable tokens on {site.describe()}: its weight is tied to {tied[0]}, and PEFT puts the rows "
            "into the tied layer too; untie the weights (or adapt an untied model)"
        )
    rows = weight.shape[0]
    bad = [i for i in indices if not 0 <= i < rows]
    if bad:
        raise error(f"{prefix}token index {bad[0]} is out of range for {site.describe()} ({rows} rows)")
    if len(set(indices)) != len(indices):
        raise error(f"{prefix}token_indices {indices} repeat an index; which value would win is undefined")
    return weight


def _replace_rows(weight: Any, delta: Any, indices: list[int], rows: int) -> Any:
    """``weight`` with row ``indices[j]`` replaced by ``delta[j]``, from slices only (no index tensor to carry)."""
    order = sorted(range(len(indices)), key=lambda j: indices[j])
    pieces, start = [], 0
    for j in order:
        row = indices[j]
        if row > start:
            pieces.append(weight[start:row])
        pieces.append(delta[j : j + 1])
        start = row + 1
    if start < rows:
        pieces.append(weight[start:])
    return torch.cat(pieces, dim=0)
