"""Python's cyclic garbage collector held off while peftfx builds many objects that are not garbage.

A capture, a plan and a rewrite make hundreds of thousands of objects (nodes, proxies, fake tensors) that all live
on, and a loaded model already has as many: each full collection these trigger walks the whole heap (0.2 s beside
a 1.6 GiB Llama, one or more per compile). What little cyclic garbage they make waits for the next collection after
the pause. Nested and concurrent pauses (threads) share one: the collector runs again when the last one ends, and
only if it ran before the first began.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_LOCK = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _LOCK:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _LOCK:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
