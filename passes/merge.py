"""merge: fold adapters into the weights of their sites.

requires: records from ``insert`` for every adapter named.
ensures:  nothing reads those adapters' nodes or tensors (cleanup drops them); their sites read merged weight
          constants (exactly rounded to the weight's dtype, see ``rounding``, or computed in float64 and rounded once;
          written into new tensors, or with ``inplace`` into the weight's own storage when nothing else reads it);
          once cleanup has run, a fully merged graph has the base capture's node count and attribute names.
An adapter can only be folded past adapters that commute with it: a live non-additive adapter (DoRA) before
it at the same site, or any live adapter before a non-additive one, makes the fold change the result.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Sequence

import torch
from torch import fx

from ..adapters import KINDS
from ..errors import MergeError, PassError
from ..ir import Record, attr_key, nodes_by_name, records
from ..rewrite import TAG, AttrIndex, get_attr, rebind, take_name_back
from .base import Pass


class Merge(Pass):
    name = "merge"
    requires = "records for the adapters to merge"
    ensures = "nothing reads a merged adapter's nodes or tensors; merged weights in place"

    def __init__(self, adapters: Sequence[str], allow_nonfinite: Sequence[str] = (), inplace: bool = False) -> None:
        self.adapters = list(adapters)
        self.allow_nonfinite = set(allow_nonfinite)
        self.inplace = inplace  # the model was given up: its weights' storage takes the merged values

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        all_records = records(gm)
        known = {r.adapter for r in all_records}
        for name in self.adapters:
            if name not in known:
                raise MergeError(f"merge: adapter {name!r} is not in the graph (have: {', '.join(known) or 'none'})")
        renamed: list[tuple[fx.Node, fx.Node]] = []
        # once per pass, not per site: merging erases only the merged adapter's nodes and adds none a record names
        nodes, index = nodes_by_name(gm), AttrIndex(gm)
        untrimmed = 0  # bytes of weights merged since freed memory was last given back
        todo = [r for r in all_records if r.adapter in self.adapters and not r.merged]
        if self.inplace:  # refused before the model's first weight is written, not after some are
            for record in todo:
                if record.adapter not in self.allow_nonfinite:
                    tensors = {role: get_attr(gm, t) for role, t in record.tensors.items()}
                    check_finite(record.adapter, record.module, tensors)
        for record in todo:
            inplace = self.inplace and _raw_unread_after(record, all_records, gm, nodes)
            allow = record.adapter in self.allow_nonfinite
            with torch.no_grad():
                renamed += _merge(gm, record, all_records, nodes, index, allow, inplace)
                untrimmed += get_attr(gm, record.raw_weight).nbytes
                if untrimmed >= _TRIM_EVERY:
                    _give_back_freed_memory()
                    untrimmed = 0
        for new, old in reversed(renamed):
            take_name_back(gm, new, old)
        return gm

    def ensure(self, gm: fx.GraphModule) -> None:
        merged = set(self.adapters)
        live = [r for r in records(gm) if r.adapter in merged and not r.merged]
        if live:
            raise PassError(f"{live[0].adapter!r} at {live[0].module} is still live")
        # unread ones may stay (a shared tensor's get_attr that cleanup deduplicated into another site's): cleanup's
        left = [n for n in gm.graph.nodes if n.meta.get(TAG, {}).get("adapter") in merged and n.users]
        if left:
            raise PassError(f"node {left[0].name} of {left[0].meta[TAG]['adapter']!r} is still read")
        prefixes = tuple(f"peftfx.{attr_key(name)}." for name in merged)
        read = [n for n in gm.graph.nodes if n.op == "get_attr" and n.users and str(n.target).startswith(prefixes)]
        if read:
            raise PassError(f"node {read[0].name} still reads the merged adapter tensor {read[0].target}")


def check_finite(adapter: str, module: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to merge an adapter tensor holding NaN or inf (``compile`` and ``peftfx merge`` alike)."""
    for role, tensor in tensors.items():
        if not finite(tensor):
            raise MergeError(
                f"merge: adapter {adapter!r} at {module}: tensor {role} holds NaN or inf; "
                "merging it would corrupt the weights (set `allow_nonfinite: true` on the adapter to fold it anyway)"
            )


def _merge(
    gm: fx.GraphModule,
    record: Record,
    all_records: list[Record],
    nodes: dict[str, fx.Node],
    index: AttrIndex,
    allow_nonfinite: bool,
    inplace: bool = False,
) -> list[tuple[fx.Node, fx.Node]]:
    """Fold one record; return the (new, old) get_attr pairs of weights that had to take a new name.

    ``inplace`` writes the merged weight and bias into their own storage where only this site reads them (a tied
    weight gets a new tensor, as without it)."""
    a = record.site_adapter(gm, nodes)
    _check_order(record, a.kind.additive(a), all_records, gm, nodes)
    if not allow_nonfinite:
        check_finite(record.adapter, record.module, a.tensors)
    site = a.site
    raw = get_attr(gm, record.raw_weight)
    weight = site.base_weight()
    bias = site.base_bias()
    raw_bias = get_attr(gm, record.raw_bias) if record.raw_bias is not None else None
    mine = {site.node, *(nodes[n] for n in record.nodes if n in nodes)}
    own = inplace and set(index.users(weight)) <= mine
    merged = a.kind.merge_into(a, weight if own else torch.empty_like(weight), weight, bias, a.tensors)
    new_weight, new_bias = merged or a.kind.merge(a, weight, raw, bias, raw_bias, a.tensors)
    if own and new_weight is not weight and new_weight.shape == weight.shape:  # a grouped conv merges to a dense one
        new_weight = weight.copy_(new_weight)
    if inplace and new_bias is not None and new_bias is not bias and set(index.users(bias)) <= mine:
        new_bias = bias.copy_(new_bias)
    if not allow_nonfinite and not finite(new_weight):
        raise MergeError(f"merge: adapter {record.adapter!r} at {record.module}: the merged weight is not finite")
    nodes[record.output].replace_all_uses_with(nodes[record.input])
    for other in all_records:
        if other.input == record.output:
            other.input = record.input
    for name in reversed(record.nodes):
        node = nodes.get(name)
        if node is not None and not node.users:  # an adapter-wide tensor's get_attr may serve other sites too
            gm.graph.erase_node(node)
    if new_weight.shape != weight.shape and site.op.startswith("conv"):
        _ungroup(site.node)  # a grouped conv's delta reaches across groups: merged, it is a dense conv
    renamed = []
    for old, new_value, value in ((site.weight, new_weight, weight), (site.bias, new_bias, bias)):
        if old is not None and new_value is not value:
            new = rebind(
                gm, site.weight_readers if old is site.weight else [site.node], old, new_value, "merged", index
            )
            if new is not None:
                renamed.append((new, old))
    record.merged = True
    return renamed


def _ungroup(node: fx.Node) -> None:
    """Make a conv node compute with ``groups=1`` (its weight is now the dense, block-diagonal one)."""
    if "groups" in node.kwargs:
        node.update_kwarg("groups", 1)
    else:  # groups > 1 was given positionally, after stride, padding and dilation
        node.args = (*node.args[:6], 1)


_TRIM_EVERY = 32 * 2**20
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _give_back_freed_memory() -> None:
    """Return the merges' freed float64 temporaries to the OS (glibc only; elsewhere nothing to do).

    glibc keeps freed heap memory resident when later allocations sit above it: site after site, the peak
    grew to about twice the merged weights. A trim costs tens of milliseconds on a large heap (the pages are
    faulted in again), so it runs once per ``_TRIM_EVERY`` bytes merged, which bounds what stays resident.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def finite(tensor: torch.Tensor) -> bool:
    """``isfinite(tensor).all()`` without its boolean copy: a NaN or an infinity shows in the min or the max.

    On CPU this is some 40 times faster; the check of every merged weight had been a third of a merge's time.
    """
    if tensor.is_complex():
        return bool(torch.isfinite(tensor).all())
    if tensor.numel() == 0 or not tensor.is_floating_point() or tensor.is_meta:
        return True  # a meta tensor (a graph for planning) has no values to check
    low, high = torch.aminmax(tensor.detach())
    return math.isfinite(low) and math.isfinite(high)


def _raw_unread_after(record: Record, all_records: list[Record], gm: fx.GraphModule, nodes: dict) -> bool:
    """Whether the adapters after ``record`` at its site only add (never read the raw weight, as DoRA's norm does),
    so ``record`` may merge into the weight's own storage."""
    after = all_records[all_records.index(record) + 1 :]
    return all(KINDS[r.kind].additive(r.site_adapter(gm, nodes)) for r in after if r.site_node == record.site_node)


def _check_order(record: Record, additive: bool, all_records: list[Record], gm: fx.GraphModule, nodes: dict) -> None:
    for other in all_records:
        if other is record:
            return
        if other.site_node != record.site_node or other.merged:
            continue
        other_additive = KINDS[other.kind].additive(other.site_adapter(gm, nodes))
        if not (additive and other_additive):
            raise MergeError(
                f"merge: cannot fold {record.adapter!r} into {record.module} while {other.adapter!r}, applied "
                "before it there, stays live: they do not commute. Merge both, or neither."
            )
