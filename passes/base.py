"""The pass contract and the loop that runs passes, checking each one's contract around it.

A pass states what it ``requires`` and ``ensures`` twice: in words (the class attributes, for the reader and the
README's table) and as checks (``require`` and ``ensure``), which the loop runs before and after the pass, as
torch.fx's ``PassBase`` runs ``requires``/``ensures``. A pass that breaks its own promise is named with what it
broke, instead of a later pass or the user finding a subtly wrong graph.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from torch import fx

from ..errors import PassError, PeftfxError


class Pass(ABC):
    name: ClassVar[str]
    requires: ClassVar[str] = ""
    ensures: ClassVar[str] = ""

    @abstractmethod
    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule: ...

    def require(self, gm: fx.GraphModule) -> None:
        """Raise ``PassError`` (or a user error) when ``gm`` is not what this pass needs. Default: anything."""
        return None

    def ensure(self, gm: fx.GraphModule) -> None:
        """Raise ``PassError`` when the pass's result breaks what it promises. Default: nothing to check."""
        return None


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], *, recompile: bool = True) -> fx.GraphModule:
    """Check each pass's contract and lint after it, so a broken one is named; generate the code once, at the end
    (each ``recompile`` of a transformer's graph costs as much as a whole pass), or leave it to the caller
    (``recompile=False``: the driver's drop-in module generates it)."""
    done: list[str] = []
    for p in passes:
        before = f" (after {', '.join(done)})" if done else ""
        p.require(gm)
        try:
            gm = p(gm)
            gm.graph.lint()
        except PeftfxError:
            raise
        except Exception as error:
            raise PassError(f"pass {p.name!r}{before} left an invalid graph: {error}") from error
        try:
            p.ensure(gm)
        except PassError as error:
            raise PassError(f"pass {p.name!r}{before} broke its contract ({p.ensures}): {error}") from error
        done.append(p.name)
    if not recompile:
        return gm
    try:
        gm.recompile()
    except Exception as error:
        raise PassError(f"passes {', '.join(done)} left a graph that does not compile to Python: {error}") from error
    return gm
