"""Per-site parameter values: a scalar, a gradient across layers, or cases chosen by selector."""

from __future__ import annotations

from typing import Any

from .errors import SpecError
from .pattern import Matcher
from .sites import Site
from .spec import Cases, Gradient, ParamValue


def resolve(value: ParamValue, site: Site, span: tuple[int, int] | None, matcher: Matcher, field: str) -> Any:
    """The value ``value`` takes at ``site``; ``span`` is the (first, last) layer of the selected sites."""
    if isinstance(value, Cases):
        for i, case in enumerate(value.cases):
            if case.when is None or matcher.test(case.when, site):
                return resolve(case.value, site, span, matcher, f"{field}.cases[{i}].value")
        raise SpecError(f"{field}: no case matches {site.describe()} and there is no default case (one without `when`)")
    if isinstance(value, Gradient):
        return _interpolate(value.gradient, site, span, field)
    return value


def _interpolate(points: list[float], site: Site, span: tuple[int, int] | None, field: str) -> float:
    if len(points) == 1:
        return points[0]
    if site.layer is None or span is None:
        raise SpecError(f"{field}: a gradient needs a layer index, and {site.describe()} has none")
    lo, hi = span
    t = 0.0 if hi == lo else (site.layer - lo) / (hi - lo)
    position = t * (len(points) - 1)
    i = min(int(position), len(points) - 2)
    frac = position - i
    return points[i] + (points[i + 1] - points[i]) * frac


def layer_span(sites: list[Site]) -> tuple[int, int] | None:
    layers = [s.layer for s in sites if s.layer is not None]
    return (min(layers), max(layers)) if layers else None
