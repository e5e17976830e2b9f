"""Why a capture failed, in one message: where torch.export stopped and what to try.

torch.export's own messages bury the cause under logging advice; what a user needs is the first line, the
line of the model's code it stopped at, and what to change — ``dynamic_shapes`` bounds in peftfx's terms (from
torch's suggested fixes), ``capture: symbolic_trace``, or a wrapper module. With ``capture: auto`` the
symbolic_trace failure comes last: when example inputs are given, export is the tracer that matters.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

_CALL = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)\n\s*(?P<code>[^\n]*)')
_FIX = re.compile(r"(\w+) = Dim\('(\w+)'(?P<args>[^)]*)\)")
_BOUND = re.compile(r"(min|max)=(\d+)")


def export_failure(name: str, error: BaseException, dynamic: bool, trace_error: BaseException | None) -> str:
    """The CaptureError message for a failed ``torch.export`` of model class ``name``."""
    text = str(error) or type(error).__name__  # a MemoryError says nothing else
    lines = [f"torch.export could not capture {name}: {_headline(text)}"]
    where = _stopped_at(text, error)
    if where:
        lines.append(f"  stopped at {where}")
    fixes = _fixes(text)
    if fixes:
        lines.append(f"  the model limits dynamic dims: {fixes}")
    lines.append(f"  try: {'; '.join(_hints(text, dynamic, fixes is not None))}")
    if trace_error is not None:
        lines.append(
            f"  (capture: auto tried symbolic_trace first: {_headline(str(trace_error) or type(trace_error).__name__)})"
        )
    return "\n".join(lines)


def _headline(text: str) -> str:
    first = next((line.strip() for line in text.splitlines() if line.strip()), "unknown error")
    return first if len(first) <= 300 else first[:297] + "..."


def _stopped_at(text: str, error: BaseException) -> str | None:
    """The model's source line: the last call torch names in its message, else the innermost frame of the
    traceback outside torch (and peftfx)."""
    calls = list(_CALL.finditer(text))
    if calls:
        m = calls[-1]
        return f"{_short(m['file'])}:{m['line']} in {m['fn']}: {m['code'].strip()}"
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if "/torch/" not in f.filename and "/peftfx/" not in f.filename and "<" not in f.filename
    ]
    if not frames:
        return None
    f = frames[-1]
    return f"{_short(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _short(file: str) -> str:
    """A library file from its package folder on (``diffusers/models/...``), any other file as given."""
    parts = Path(file).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    return file


def _fixes(text: str) -> str | None:
    """torch's suggested ``Dim`` fixes as ``bounds=`` of ``peftfx.dynamic_shapes``."""
    bounds = {}
    for m in _FIX.finditer(text):
        found = dict(_BOUND.findall(m["args"]))
        bounds[m[2]] = (int(found["min"]) if "min" in found else None, int(found["max"]) if "max" in found else None)
    if not bounds:
        return None
    return f"peftfx.dynamic_shapes(example_inputs, ..., bounds={bounds!r})"


def _hints(text: str, dynamic: bool, bounded: bool) -> list[str]:
    hints = []
    if bounded:
        hints.append("the bounds above")
    elif dynamic:
        hints.append("static shapes (no dynamic_shapes), or fewer dynamic dims")
    if "data-dependent" in text:
        hints.append("a wrapper module whose forward fixes the value-dependent branch (or passes it as a constant)")
    hints.append("capture: symbolic_trace (plain modules without value-dependent control flow)")
    if not any("wrapper" in h for h in hints):
        hints.append("a wrapper module whose forward calls the model the way it can be traced")
    return hints
