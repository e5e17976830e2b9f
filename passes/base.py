"""The pass contract and the loop that runs passes with a graph check after each."""

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


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass]) -> fx.GraphModule:
    """Lint after every pass, so a broken one is named; generate the code once, at the end (each
    ``recompile`` of a transformer's graph costs as much as a whole pass)."""
    done: list[str] = []
    for p in passes:
        try:
            gm = p(gm)
            gm.graph.lint()
        except PeftfxError:
            raise
        except Exception as error:
            after = f" (after {', '.join(done)})" if done else ""
            raise PassError(f"pass {p.name!r}{after} left an invalid graph: {error}") from error
        done.append(p.name)
    try:
        gm.recompile()
    except Exception as error:
        raise PassError(f"passes {', '.join(done)} left a graph that does not compile to Python: {error}") from error
    return gm
