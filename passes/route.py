"""route: per-sample adapters in one graph, chosen by the graph input ``adapter_index``.

requires: the placements of the routed adapters (LoRA on linear and embedding sites), adapters in routing order;
          runs before ``insert``, so always-on adapters at a routed site apply first and the routed delta after.
ensures:  a keyword input ``adapter_index`` (int64 ``[batch]``: a position in the routing list, -1 the base
          model); at every site some routed adapter targets, one subgraph adding, sample by sample, the delta
          ``s[k] * B[k] @ A[k] @ x`` of that sample's adapter ``k``. The factors are stacked and zero-padded to the
          largest rank at the site (parameters ``peftfx.routing.<site>.lora_A`` ``[n+1, r, in]`` and ``lora_B``
          ``[n+1, out, r]``, buffer ``scaling`` ``[n+1]``), gathered by index and applied with batched matmuls,
          as punica's BGMV does. Row ``n`` and the rows of adapters that do not target the site are zeros, so
          those samples get the site's output unchanged. No loop over samples and no data-dependent control flow:
          changing the routing changes an input, never the graph.
The first dim of a routed site's input is taken as the batch (rows ``[batch, ...]``, or ``[batch * seq, ...]``
for transformers' Conv1D): true of every batch-first model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..adapters import SiteAdapter
from ..errors import SpecError
from ..rewrite import add_input, build_after, get_attr, set_attr, tagged_get_attr
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
    kind, site = a.kind.name, a.site
    what = None
    if kind not in ("lora", "dora"):
        what = f"is a {kind} adapter"
    elif a.hyper["dora"]:
        what = "is a DoRA adapter (its output is rescaled per weight, not added)"
    elif a.hyper["lora_bias"]:
        what = "has a lora_bias"
    elif site.op not in ("linear", "embedding"):
        what = f"targets {site.describe()}"
    if what is not None:
        raise SpecError(
            f"routing.adapters[{i}]: {p.adapter!r} {what}; routing handles plain LoRA on linear and embedding sites"
        )


def _route(gm: fx.GraphModule, node: fx.Node, row: list[SiteAdapter | None], index: fx.Node) -> None:
    first = next(a for a in row if a is not None)
    site, dtype = first.site, first.tensors["lora_A"].dtype
    rank = max(a.hyper["r"] for a in row if a is not None)
    A = torch.zeros(len(row) + 1, rank, first.tensors["lora_A"].shape[1], dtype=dtype)
    B = torch.zeros(len(row) + 1, first.tensors["lora_B"].shape[0], rank, dtype=dtype)
    scaling = torch.zeros(len(row) + 1, dtype=dtype)
    for k, a in enumerate(row):
        if a is not None:
            r = a.hyper["r"]
            A[k, :r] = a.tensors["lora_A"].to(dtype)
            B[k, :, :r] = a.tensors["lora_B"].to(dtype)
            scaling[k] = a.hyper["scaling"]
    prefix = f"peftfx.routing.{_key(site.module)}"
    cursor, attrs = node, []
    for role, tensor in (("lora_A", A), ("lora_B", B), ("scaling", scaling)):
        target = f"{prefix}.{role}"
        try:
            get_attr(gm, target)  # a module called at several sites has one set of tensors
        except AttributeError:
            set_attr(gm, target, nn.Parameter(tensor) if role != "scaling" else tensor)
        with gm.graph.inserting_after(cursor):
            cursor = tagged_get_attr(gm.graph, target, _TAG)
        attrs.append(cursor)
    embedding, cast, width = site.op == "embedding", dtype != site.dtype, A.shape[2]

    def forward(x, y, i, A, B, s):
        batch = i.shape[0]
        if embedding:  # look up row x of the sample's own A: one table of all adapters' rows
            table = A.transpose(1, 2).reshape(-1, rank)
            xa = F.embedding(x.reshape(batch, -1) + (i * width).reshape(-1, 1), table)
        else:
            x3 = x.reshape(batch, -1, width)
            xa = torch.bmm(x3.to(dtype) if cast else x3, torch.index_select(A, 0, i).transpose(1, 2))
        xa = xa * torch.index_select(s, 0, i).reshape(-1, 1, 1)
        delta = torch.bmm(xa, torch.index_select(B, 0, i).transpose(1, 2))
        return y + (delta.to(site.dtype) if cast else delta).view_as(y)

    out, created = build_after(cursor, forward, [site.live_input, node, index, *attrs], _TAG)
    created_set = set(created)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in created_set)
