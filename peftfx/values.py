"""Per-site parameter values: a scalar, a gradient across layers, or cases chosen by selector."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import SpecError
from .pattern import Matcher
from .sites import Site
from .spec import Cases, Gradient, ParamValue


@dataclass(frozen=True)
class Span:
    """The layer of every selected site, as its selector sees it, and the first and last of them."""

    layers: dict[Site, int | None]

    @property
    def bounds(self) -> tuple[int, int] | None:
        known = [layer for layer in self.layers.values() if layer is not None]
        return (min(known), max(known)) if known else None


def layer_span(sites: list[Site], layer_of: Callable[[Site], int | None] | None = None) -> Span:
    """``layer_of`` gives a site's layer (default: from its module path; a selector's named group may say more)."""
    return Span({site: (layer_of or (lambda s: s.layer))(site) for site in sites})


def resolve(value: ParamValue, site: Site, span: Span, matcher: Matcher, field: str) -> Any:
    """The value ``value`` takes at ``site``, one of the sites ``span`` covers."""
    if isinstance(value, Cases):
        for i, case in enumerate(value.cases):
            if case.when is None or matcher.test(case.when, site):
                return resolve(case.value, site, span, matcher, f"{field}.cases[{i}].value")
        raise SpecError(f"{field}: no case matches {site.describe()} and there is no default case (one without `when`)")
    if isinstance(value, Gradient):
        return _interpolate(value.gradient, site, span, field)
    return value


def _interpolate(points: list[float], site: Site, span: Span, field: str) -> float:
    if len(points) == 1:
        return points[0]
    layer, bounds = span.layers.get(site, site.layer), span.bounds
    if layer is None or bounds is None:
        raise SpecError(f"{field}: a gradient needs a layer index, and {site.describe()} has none")
    lo, hi = bounds
    t = 0.0 if hi == lo else (layer - lo) / (hi - lo)
    position = t * (len(points) - 1)
    i = min(int(position), len(points) - 2)
    frac = position - i
    return points[i] + (points[i + 1] - points[i]) * frac
