"""route: per-sample adapters in one graph, chosen by the graph input ``adapter_index``.

requires: the placements of the routed adapters (LoRA or DoRA on linear and embedding sites), in routing order;
          runs before ``insert``, so always-on adapters at a routed site apply first and the routed delta after.
ensures:  a keyword input ``adapter_index`` (int64 ``[batch]``: a position in the routing list, -1 the base
          model); at every site some routed adapter targets, one subgraph adding, sample by sample, the delta
          ``s[k] * B[k] @ A[k] @ x`` of that sample's adapter ``k``. The factors are stacked and zero-padded to the
          largest rank at the site (parameters ``peftfx.routing.<site>.lora_A`` ``[n+1, r, in]`` and ``lora_B``
          ``[n+1, out, r]``, buffer ``scaling`` ``[n+1]``; ``lora_B_bias``, ``lora_magnitude`` and the ``dora``
          mask where an adapter there has them), gathered by index and applied with batched matmuls, as punica's
          BGMV does; DoRA rows rescale by their own ``m / ‖W + ΔW‖``, gathered the same way. Row ``n`` and the
          rows of adapters that do not target the site are zeros, so those samples get the site's output
          unchanged. No loop over samples and no data-dependent control flow: changing the routing changes an
          input, never the graph.
The first dim of a routed site's input is taken as the batch (rows ``[batch, ...]``, or ``[batch * seq, ...]``
for transformers' Conv1D): true of every batch-first model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..adapters import SiteAdapter
from ..errors import SpecError
from ..rewrite import add_input, build_after, get_attr, set_attr, tagged_get_attr
from ..sites import Site
from .base import Pass
from .insert import Placement, _key

INPUT = "adapter_index"
_TAG = {"adapter": "routing", "node": INPUT}


class Route(Pass):
    name = "route"
    requires = "placements of the routed adapters, before insert"
    ensures = "input adapter_index; one gathered low-rank delta per routed site"

    def __init__(self, adapters: Sequence[str], placements: Sequence[Placement]) -> None:
        self.adapters = list(adapters)
        self.placements = placements

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        position = {name: i for i, name in enumerate(self.adapters)}
        by_site: dict[fx.Node, list[SiteAdapter | None]] = {}
        for p in self.placements:
            _check(p, position[p.adapter])
            row = by_site.setdefault(p.site_adapter.site.node, [None] * len(self.adapters))
            if row[position[p.adapter]] is not None:
                raise SpecError(
                    f"routing.adapters[{position[p.adapter]}]: {p.adapter!r} is several adapters at "
                    f"{p.site_adapter.site.describe()}; a routed adapter is one LoRA per site"
                )
            row[position[p.adapter]] = p.site_adapter
        placeholder = add_input(gm, INPUT)
        n = len(self.adapters)
        # negative indices (the base model) pick row n, the zero row
        index, _ = build_after(placeholder, lambda i: torch.where(i < 0, n, i), [placeholder], _TAG)
        for node, row in by_site.items():
            _route(gm, node, row, index)
        gm.meta.setdefault("peftfx", {})["routing"] = {"input": INPUT, "adapters": list(self.adapters)}
        return gm


def _check(p: Placement, i: int) -> None:
    a = p.site_adapter
    if a.kind.name not in ("lora", "dora") or a.site.op not in ("linear", "embedding"):
        what = f"is a {a.kind.name} adapter" if a.kind.name not in ("lora", "dora") else f"targets {a.site.describe()}"
        raise SpecError(
            f"routing.adapters[{i}]: {p.adapter!r} {what}; routing handles LoRA and DoRA on linear and embedding sites"
        )


def _stack(row: list[SiteAdapter | None]) -> dict[str, torch.Tensor]:
    """Every adapter's tensors at one site as rows of one tensor each, zero-padded to the largest rank; one zero
    row more for the base model. DoRA rows are marked in ``dora``; the other rows' magnitudes are never read."""
    first = next(a for a in row if a is not None)
    dtype, n = first.tensors["lora_A"].dtype, len(row) + 1
    rank = max(a.hyper["r"] for a in row if a is not None)
    width, out = first.tensors["lora_A"].shape[1], first.tensors["lora_B"].shape[0]
    t = {
        "lora_A": torch.zeros(n, rank, width, dtype=dtype),
        "lora_B": torch.zeros(n, out, rank, dtype=dtype),
        "scaling": torch.zeros(n, dtype=dtype),
    }
    if any(a is not None and a.hyper["lora_bias"] for a in row):
        t["lora_B_bias"] = torch.zeros(n, out, dtype=dtype)
    if any(a is not None and a.hyper["dora"] for a in row):
        t["lora_magnitude"] = torch.zeros(n, out, dtype=dtype)
        t["dora"] = torch.zeros(n, dtype=torch.bool)
    for k, a in enumerate(row):
        if a is None:
            continue
        r = a.hyper["r"]
        t["lora_A"][k, :r] = a.tensors["lora_A"]
        t["lora_B"][k, :, :r] = a.tensors["lora_B"]
        t["scaling"][k] = a.hyper["scaling"]
        if a.hyper["lora_bias"]:
            t["lora_B_bias"][k] = a.tensors["lora_B_bias"]
        if a.hyper["dora"]:
            t["lora_magnitude"][k] = a.tensors["lora_magnitude"].reshape(-1)
            t["dora"][k] = True
    return t


def _route(gm: fx.GraphModule, node: fx.Node, row: list[SiteAdapter | None], index: fx.Node) -> None:
    site = next(a for a in row if a is not None).site
    stacked = _stack(row)
    prefix = f"peftfx.routing.{_key(site.module)}"
    cursor, attrs = node, []
    for role, tensor in stacked.items():
        target = f"{prefix}.{role}"
        try:
            get_attr(gm, target)  # a module called at several sites has one set of tensors
        except AttributeError:
            trainable = role not in ("scaling", "dora")  # PEFT's scalings are numbers, not weights
            set_attr(gm, target, nn.Parameter(tensor) if trainable else tensor)
        with gm.graph.inserting_after(cursor):
            cursor = tagged_get_attr(gm.graph, target, _TAG)
        attrs.append(cursor)
    roles = list(stacked)
    dtype = stacked["lora_A"].dtype
    embedding, cast = site.op == "embedding", dtype != site.dtype
    rank, width = stacked["lora_A"].shape[1:]

    def forward(x, y, weight, bias, i, *tensors):
        t = dict(zip(roles, tensors, strict=True))
        A, B, s = t["lora_A"], t["lora_B"], t["scaling"]
        batch = i.shape[0]
        if embedding:  # look up row x of the sample's own A: one table of all adapters' rows
            xa = F.embedding(x.reshape(batch, -1) + (i * width).reshape(-1, 1), A.transpose(1, 2).reshape(-1, rank))
        else:
            x3 = x.reshape(batch, -1, width)
            xa = torch.bmm(x3.to(dtype) if cast else x3, torch.index_select(A, 0, i).transpose(1, 2))
        delta = torch.bmm(xa, torch.index_select(B, 0, i).transpose(1, 2))
        if "lora_B_bias" in t:
            delta = delta + torch.index_select(t["lora_B_bias"], 0, i).unsqueeze(1)
        delta = delta * torch.index_select(s, 0, i).reshape(-1, 1, 1)
        delta = delta.to(site.dtype) if cast else delta
        if "dora" not in t:
            return y + delta.view_as(y)
        y3 = y.reshape(batch, -1, delta.shape[-1])
        g = torch.index_select(_dora_scale(site, weight, t, cast), 0, i).unsqueeze(1)
        base = y3 if bias is None else y3 - bias
        return (y3 + (g - 1) * base + g * delta).view_as(y)

    inputs = [site.live_input, node, site.weight, site.bias, index, *attrs]
    out, created = build_after(cursor, forward, inputs, _TAG)
    created_set = set(created)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in created_set)


def _dora_scale(site: Site, weight: Any, t: dict[str, Any], cast: bool) -> Any:
    """DoRA's ``m / ‖W + ΔW‖`` per output unit for every row (detached norm, as PEFT), 1 for the other rows."""
    lead = weight.t() if site.transposed or site.op == "embedding" else weight  # [out, in]; embeddings [dim, vocab]
    low_rank = torch.bmm(t["lora_B"], t["lora_A"]) * t["scaling"].reshape(-1, 1, 1)
    norm = torch.linalg.vector_norm(lead + (low_rank.to(site.dtype) if cast else low_rank), dim=2).detach()
    return torch.where(t["dora"].unsqueeze(1), t["lora_magnitude"] / norm, 1.0)
