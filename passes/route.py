"""route: per-sample adapters in one graph, chosen by the graph input ``adapter_index``.

requires: the placements of the routed adapters (on linear and embedding sites), in routing order;
          runs before ``insert``, so always-on adapters at a routed site apply first and the routed delta after.
ensures:  a keyword input ``adapter_index`` (int64 ``[batch]``: a position in the routing list, -1 the base
          model), checked by ``guard.routing_index`` (dtype, length, values: an error, never a silent base row);
          at every site some routed adapter targets, one subgraph adding, sample by sample, the delta
          ``s[k] * B[k] @ A[k] @ x`` of that sample's adapter ``k``. The factors are stacked and zero-padded to the
          largest rank at the site (parameters ``peftfx.routing.<site>.lora_A`` ``[n+1, r, in]`` and ``lora_B``
          ``[n+1, out, r]``, buffer ``scaling`` ``[n+1]``; ``lora_B_bias``, ``lora_magnitude`` and the ``dora``
          mask where an adapter there has them), gathered by index and applied with batched matmuls, as punica's
          BGMV does; DoRA rows rescale by their own ``m / ‖W + ΔW‖``, gathered the same way; any other kind is a
          dense row of ``merge(W) - W`` (buffer ``delta``). Row ``n`` and the rows of adapters that do not target
          the site are zeros, so those samples get the site's output unchanged. No loop over samples and no
          data-dependent control flow: changing the routing changes an input, never the graph.
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
from ..adapters.base import LowRank
from ..adapters.lora import dora_output, dora_scale
from ..errors import PassError, PeftfxError, SpecError
from ..guard import routing_index
from ..ir import ROUTING_INPUT, Placement, Routing, attr_key, routing, set_routing
from ..rewrite import TAG, add_input, build_after, get_attr, set_attr, tagged_get_attr, weight_device
from ..sites import Site
from .base import Pass

_TAG = {"adapter": "routing", "node": ROUTING_INPUT}


class Route(Pass):
    name = "route"
    requires = "placements of the routed adapters, before insert"
    ensures = "input adapter_index; one gathered per-sample delta per routed site"

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
                    f"{p.site_adapter.site.describe()}; a routed adapter is one adapter per site"
                )
            row[position[p.adapter]] = p.site_adapter
        try:
            placeholder = add_input(gm, ROUTING_INPUT)
        except SpecError as error:
            raise SpecError(f"routing: {error}") from None
        # checked against the routing and the batch; negative indices (the base model) pick row n, the zero row
        others = [p for p in gm.graph.find_nodes(op="placeholder") if p is not placeholder]
        with gm.graph.inserting_after(placeholder):
            index = gm.graph.call_function(routing_index, (placeholder, tuple(self.adapters), *others))
        index.meta[TAG] = dict(_TAG)
        for node, row in by_site.items():
            _route(gm, node, row, index, self.adapters)
        set_routing(gm, Routing(ROUTING_INPUT, list(self.adapters)))
        return gm

    def ensure(self, gm: fx.GraphModule) -> None:
        if routing(gm) != Routing(ROUTING_INPUT, self.adapters):
            raise PassError("the graph does not say it is routed, or by which adapters")
        if not gm.graph.find_nodes(op="placeholder", target=ROUTING_INPUT):
            raise PassError(f"the graph has no input {ROUTING_INPUT!r}")


def _check(p: Placement, i: int) -> None:
    site = p.site_adapter.site
    if site.op not in ("linear", "embedding"):
        raise SpecError(
            f"routing.adapters[{i}]: {p.adapter!r} targets {site.describe()}; routing handles linear and embedding "
            "sites"
        )


def _low_rank(a: SiteAdapter | None) -> LowRank | None:
    return None if a is None else a.kind.low_rank(a)


def _stack(row: list[SiteAdapter | None]) -> dict[str, torch.Tensor]:
    """The low-rank adapters' factors at one site as rows of one tensor each, zero-padded to the largest rank; one
    zero row more for the base model. DoRA rows are marked in ``dora``; the other rows' magnitudes are never read."""
    factors = [_low_rank(a) for a in row]
    first = next((lr for lr in factors if lr is not None), None)
    if first is None:
        return {}
    dtype, n = first.A.dtype, len(row) + 1
    rank = max(lr.rank for lr in factors if lr is not None)
    width, out = first.A.shape[1], first.B.shape[0]
    t = {
        "lora_A": torch.zeros(n, rank, width, dtype=dtype),
        "lora_B": torch.zeros(n, out, rank, dtype=dtype),
        "scaling": torch.zeros(n, dtype=dtype),
    }
    if any(lr is not None and lr.bias is not None for lr in factors):
        t["lora_B_bias"] = torch.zeros(n, out, dtype=dtype)
    if any(lr is not None and lr.magnitude is not None for lr in factors):
        t["lora_magnitude"] = torch.zeros(n, out, dtype=dtype)
        t["dora"] = torch.zeros(n, dtype=torch.bool)
    for k, lr in enumerate(factors):
        if lr is None:
            continue
        t["lora_A"][k, : lr.rank] = lr.A
        t["lora_B"][k, :, : lr.rank] = lr.B
        t["scaling"][k] = lr.scaling
        if lr.bias is not None:
            t["lora_B_bias"][k] = lr.bias
        if lr.magnitude is not None:
            t["lora_magnitude"][k] = lr.magnitude.reshape(-1)
            t["dora"][k] = True
    return t


def _dense(gm: fx.GraphModule, row: list[SiteAdapter | None], adapters: list[str]) -> dict[str, torch.Tensor]:
    """Any other kind as its merged weight's difference from the base (``merge(W) - W``, logical layout), one dense
    row per adapter: what the kind computes, in ``out x in`` numbers per adapter rather than its own few."""
    if all(a is None or _low_rank(a) for a in row):
        return {}
    site = next(a for a in row if a is not None).site
    t = {"delta": torch.zeros(len(row) + 1, *site.weight_shape, dtype=site.dtype)}  # embeddings: [vocab, dim]
    for k, a in enumerate(row):
        if a is None or _low_rank(a):
            continue
        try:
            delta, bias_delta = a.kind.dense_delta(a)
        except PeftfxError as error:
            raise SpecError(f"routing.adapters[{k}]: {adapters[k]!r} cannot be expressed per sample: {error}") from None
        t["delta"][k] = delta.to(site.dtype)
        if bias_delta is not None:
            t.setdefault("delta_bias", torch.zeros(len(row) + 1, site.out_features, dtype=site.dtype))
            t["delta_bias"][k] = bias_delta.to(site.dtype)
    return t


def _route(
    gm: fx.GraphModule, node: fx.Node, row: list[SiteAdapter | None], index: fx.Node, adapters: list[str]
) -> None:
    site = next(a for a in row if a is not None).site
    stacked = {**_stack(row), **_dense(gm, row, adapters)}
    prefix = f"peftfx.routing.{attr_key(site.module)}"
    cursor, attrs, device = node, [], weight_device(gm, site.weight)
    for role, tensor in stacked.items():
        tensor = tensor.to(device)
        target = f"{prefix}.{role}"
        try:
            get_attr(gm, target)  # a module called at several sites has one set of tensors
        except AttributeError:
            # PEFT's scalings are numbers, not weights; a dense delta is a result, not the kind's parameters
            trainable = role not in ("scaling", "dora", "delta", "delta_bias")
            set_attr(gm, target, nn.Parameter(tensor) if trainable else tensor)
        with gm.graph.inserting_after(cursor):
            cursor = tagged_get_attr(gm.graph, target, _TAG)
        attrs.append(cursor)
    roles = list(stacked)
    dtype = stacked["lora_A"].dtype if "lora_A" in stacked else site.dtype
    embedding, cast = site.op == "embedding", dtype != site.dtype
    width = site.weight_shape[0] if embedding else site.in_features
    rank = stacked["lora_A"].shape[1] if "lora_A" in stacked else 0

    def forward(x, y, weight, bias, i, *tensors):
        t = dict(zip(roles, tensors, strict=True))
        batch = i.shape[0]
        rows = x.reshape(batch, -1) + (i * width).reshape(-1, 1) if embedding else x.reshape(batch, -1, width)
        out = y.reshape(batch, -1, site.out_features)
        if "lora_A" in t:
            delta = _low_rank_delta(t, rows, i, rank, embedding, dtype if cast else None)
            delta = delta.to(site.dtype) if cast else delta
            if "dora" in t:
                g = torch.index_select(_dora_scale(site, weight, t, cast), 0, i).unsqueeze(1)
                out = dora_output(out, out if bias is None else out - bias, g, delta)
            else:
                out = out + delta
        if "delta" in t:
            out = out + _dense_delta(t, rows, i, embedding, site.out_features)
        return out.view_as(y)

    inputs = [site.live_input, node, site.weight, site.bias, index, *attrs]
    out, created = build_after(cursor, forward, inputs, _TAG)
    created_set = set(created)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in created_set)


def _low_rank_delta(t: dict[str, Any], rows: Any, i: Any, rank: int, embedding: bool, cast: torch.dtype | None) -> Any:
    """``s[k] (B[k] A[k] x + b[k])`` for each sample's adapter ``k``: gathers, then two batched matmuls."""
    A, B = t["lora_A"], t["lora_B"]
    if embedding:  # ids, offset into one table of every adapter's rows of A
        xa = F.embedding(rows, A.transpose(1, 2).reshape(-1, rank))
    else:
        xa = torch.bmm(rows.to(cast) if cast else rows, torch.index_select(A, 0, i).transpose(1, 2))
    s = torch.index_select(t["scaling"], 0, i).reshape(-1, 1, 1)
    delta = torch.bmm(xa * s, torch.index_select(B, 0, i).transpose(1, 2))  # scaled at rank r: the fewest numbers
    if "lora_B_bias" in t:
        delta = delta + torch.index_select(t["lora_B_bias"], 0, i).unsqueeze(1) * s
    return delta


def _dense_delta(t: dict[str, Any], rows: Any, i: Any, embedding: bool, out: int) -> Any:
    if embedding:
        return F.embedding(rows, t["delta"].reshape(-1, out))
    delta = torch.bmm(rows, torch.index_select(t["delta"], 0, i).transpose(1, 2))
    if "delta_bias" in t:
        delta = delta + torch.index_select(t["delta_bias"], 0, i).unsqueeze(1)
    return delta


def _dora_scale(site: Site, weight: Any, t: dict[str, Any], cast: bool) -> Any:
    """DoRA's ``m / ‖W + ΔW‖`` per output unit for every row (detached norm, as PEFT), 1 for the other rows."""
    lead = weight.t() if site.transposed or site.op == "embedding" else weight  # [out, in]; embeddings [dim, vocab]
    low_rank = torch.bmm(t["lora_B"], t["lora_A"]) * t["scaling"].reshape(-1, 1, 1)
    g = dora_scale(t["lora_magnitude"], lead, low_rank.to(site.dtype) if cast else low_rank, 2)
    return torch.where(t["dora"].unsqueeze(1), g, 1.0)
