"""Evaluating selectors over the site table, with a reason for every answer.

Each predicate returns a ``Verdict``; a selector's verdict is the first failing predicate (in the order
op, module_type, module, param, layers, weight, fed_by, feeds, all_of, any_of, not, exclude), so ``explain`` can
say exactly why a site was left out. Parameter sites are candidates only for selectors that ask for them
(``op: parameter`` or ``param:``, outside ``not``/``exclude``/``feeds``/``fed_by``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from torch import fx

from .errors import MatchError
from .sites import PARAMETER, SIGNATURES, OpView, Site, consumers, producers, view_of
from .spec import Selector, WeightPredicate, suggest


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


YES = Verdict(True, "matched")
_NOT_ASKED = Verdict(False, "op: a parameter site, and this selector names no `param` or `op: parameter`")


class Matcher:
    """Answers 'does this selector hold here, and if not, why' for one captured graph."""

    def __init__(self, gm: fx.GraphModule, sites: Iterable[Site]) -> None:
        self.gm = gm
        self.sites = list(sites)
        self._views: dict[fx.Node, OpView] = {site.node: site for site in self.sites}

    def view(self, node: fx.Node) -> OpView:
        if node not in self._views:
            self._views[node] = view_of(node, self.gm)
        return self._views[node]

    def layer(self, selector: Selector, view: OpView) -> int | None:
        """The layer index ``selector`` sees: its ``module`` regex's group named ``layer``, else the path's."""
        if selector.module is not None:
            verdict, named = _module(selector.module, view.module)
            if verdict and named is not None:
                return named
        return view.layer

    def test(self, selector: Selector, view: OpView) -> Verdict:
        layer = view.layer
        if selector.op is not None:
            ops = _as_list(selector.op)
            if view.op not in ops:
                return Verdict(False, f"op: {view.op!r} is not {_one_of(ops)}")
        if selector.module_type is not None:
            types = _as_list(selector.module_type)
            if view.module_type not in types:
                return Verdict(False, f"module_type: {view.module_type or 'unknown'!r} is not {_one_of(types)}")
        if selector.module is not None:
            verdict, named_layer = _module(selector.module, view.module)
            if not verdict:
                return verdict
            layer = named_layer if named_layer is not None else layer
        if selector.param is not None:
            if view.op != PARAMETER:
                return Verdict(False, f"param: {view.op!r} is not a parameter site")
            assert isinstance(view, Site)
            verdict, _ = _module(selector.param, view.qualified_name, "param")
            if not verdict:
                return verdict
        if selector.layers is not None:
            wanted = _layers(selector.layers)
            if layer is None:
                return Verdict(False, f"layers: {view.module or view.node.name!r} has no layer index")
            if layer not in wanted:
                return Verdict(False, f"layers: layer {layer} is not in {_ranges(wanted)}")
        if selector.weight is not None:
            verdict = _weight(selector.weight, view)
            if not verdict:
                return verdict
        for key, nodes in (("fed_by", producers), ("feeds", consumers)):
            inner = getattr(selector, key)
            if inner is not None and not any(self.test(inner, self.view(n)) for n in nodes(view.node, self.gm)):
                return Verdict(False, f"{key}: no {'producer' if key == 'fed_by' else 'consumer'} matches")
        for i, inner in enumerate(selector.all_of or ()):
            verdict = self.test(inner, view)
            if not verdict:
                return Verdict(False, f"all_of[{i}].{verdict.reason}")
        if selector.any_of is not None:  # each alternative stands alone: it picks parameter sites only if it asks
            verdicts = [
                self.test(inner, view) if view.op != PARAMETER or asks_for_parameters(inner) else _NOT_ASKED
                for inner in selector.any_of
            ]
            if not any(verdicts):
                return Verdict(False, "any_of: none holds (" + "; ".join(v.reason for v in verdicts) + ")")
        if selector.not_ is not None and self.test(selector.not_, view):
            return Verdict(False, "not: the negated selector holds")
        if selector.exclude is not None and self.test(selector.exclude, view):
            return Verdict(False, "exclude: excluded")
        return YES

    def candidates(self, selector: Selector) -> list[Site]:
        """The sites ``selector`` is tested on: parameter sites only if it asks for them."""
        if asks_for_parameters(selector):
            return self.sites
        return [site for site in self.sites if site.op != PARAMETER]

    def select(self, selector: Selector, field: str) -> list[Site]:
        """The sites ``selector`` matches; raises if their number breaks ``expect``."""
        chosen = [site for site in self.candidates(selector) if self.test(selector, site)]
        low, high = _expect(selector.expect)
        if not low <= len(chosen) <= high:
            wanted = f"at least {low}" if high == _MANY else (f"exactly {low}" if low == high else f"{low}-{high}")
            near = "" if chosen else self._nearest(selector)
            raise MatchError(f"{field}: selector matched {len(chosen)} sites, expected {wanted}{near}")
        return chosen

    def _nearest(self, selector: Selector) -> str:
        reasons: dict[str, int] = {}
        for site in self.candidates(selector):
            reason = self.test(selector, site).reason
            reasons[reason] = reasons.get(reason, 0) + 1
        if not reasons:
            return " (the graph has no weight-owning ops)"
        common = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        site_ops = sorted({signature.kind for signature in SIGNATURES.values()} | {PARAMETER})
        unknown = [op for op in _as_list(selector.op or []) if op not in site_ops]
        typos = "".join(f"; {op!r} is no site op{suggest(op, site_ops, 'site ops')}" for op in unknown)
        return "; most common reasons: " + "; ".join(f"{r} ({n} sites)" for r, n in common) + typos


def asks_for_parameters(selector: Selector) -> bool:
    """Whether a selector can pick parameter sites: it names them (``param``, ``op: parameter``) somewhere that
    selects, i.e. not only inside ``not``, ``exclude``, ``feeds`` or ``fed_by``."""
    if selector.param is not None or (selector.op is not None and PARAMETER in _as_list(selector.op)):
        return True
    return any(asks_for_parameters(inner) for inner in (*(selector.all_of or ()), *(selector.any_of or ())))


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _one_of(items: list[str]) -> str:
    return repr(items[0]) if len(items) == 1 else "one of " + ", ".join(map(repr, items))


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _module(pattern: str | list[str], path: str, key: str = "module") -> tuple[Verdict, int | None]:
    if isinstance(pattern, list):
        if any(path == name or path.endswith("." + name) for name in pattern):
            return YES, None
        return Verdict(False, f"{key}: {path!r} is none of {pattern} (exact name or dotted suffix)"), None
    if pattern.startswith("re:"):
        match = _compile(pattern[3:]).fullmatch(path)
        if match is None:
            return Verdict(False, f"{key}: {path!r} does not match {pattern}"), None
        named = match.groupdict().get("layer")
        if named is not None and not named.isdigit():
            return Verdict(False, f"{key}: group 'layer' of {pattern} captured {named!r}, not a layer index"), None
        return YES, int(named) if named is not None else None
    if fnmatch.fnmatchcase(path, pattern):
        return YES, None
    return Verdict(False, f"{key}: {path!r} does not match glob {pattern!r}"), None


def _layers(spec: int | str | list[int | str]) -> frozenset[int]:
    out: set[int] = set()
    for item in spec if isinstance(spec, list) else [spec]:
        if isinstance(item, int):
            out.add(item)
        else:
            lo, hi = map(int, item.split("-"))
            out.update(range(lo, hi + 1))
    return frozenset(out)


def _ranges(values: frozenset[int]) -> str:
    return "[" + ", ".join(map(str, sorted(values))) + "]"


def _weight(pred: WeightPredicate, view: OpView) -> Verdict:
    if not isinstance(view, Site):
        return Verdict(False, "weight: not a weight-owning op")
    shape = view.weight_shape
    shown = list(shape)
    if pred.ndim is not None and len(shape) != pred.ndim:
        return Verdict(False, f"weight: ndim {len(shape)} is not {pred.ndim}")
    if pred.shape is not None and (
        len(pred.shape) != len(shape) or any(w is not None and w != s for w, s in zip(pred.shape, shape, strict=False))
    ):
        return Verdict(False, f"weight: shape {shown} does not fit {pred.shape}")
    if pred.in_features is not None and view.in_features != pred.in_features:
        return Verdict(False, f"weight: in_features {view.in_features} is not {pred.in_features}")
    if pred.out_features is not None and view.out_features != pred.out_features:
        return Verdict(False, f"weight: out_features {view.out_features} is not {pred.out_features}")
    if pred.dtype is not None:
        names = _as_list(pred.dtype)
        if str(view.dtype).removeprefix("torch.") not in names:
            return Verdict(False, f"weight: dtype {view.dtype} is not {_one_of(names)}")
    if pred.divisible_by is not None:
        divisors = pred.divisible_by if isinstance(pred.divisible_by, list) else [pred.divisible_by] * len(shape)
        for dim, (size, k) in enumerate(zip(shape, divisors, strict=False)):
            if k is not None and size % k:
                return Verdict(False, f"weight: dim {dim} ({size}) is not divisible by {k}")
    return YES


_MANY = 1 << 62


def _expect(expect: int | str | None) -> tuple[int, int]:
    if expect is None:
        return 1, _MANY
    if isinstance(expect, int):
        return expect, expect
    text = expect.strip()
    if text == "any":
        return 0, _MANY
    if text.startswith(">="):
        return int(text[2:]), _MANY
    if text.startswith("<="):
        return 0, int(text[2:])
    if "-" in text:
        lo, hi = text.split("-")
        return int(lo), int(hi)
    return int(text), int(text)
