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
    done: list[str] = []
    for p in passes:
        try:
            gm = p(gm)
            gm.graph.lint()
            gm.recompile()
        except PeftfxError:
            raise
        except Exception as error:
            after = f" (after {', '.join(done)})" if done else ""
            raise PassError(f"pass {p.name!r}{after} left an invalid graph: {error}") from error
        done.append(p.name)
    return gm
