"""causal: SDPA's own causal flag in place of a constant causal mask (see ``peftfx.causal``).

requires: nothing (runs first, on the base capture).
ensures:  no SDPA call is left whose mask is the constant causal triangle; every other mask is untouched.
"""

from __future__ import annotations

from torch import fx

from ..causal import restore_is_causal
from ..errors import PassError
from .base import Pass


class Causal(Pass):
    name = "causal"
    ensures = "no SDPA reads a constant causal-triangle mask"

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        restore_is_causal(gm)
        return gm

    def ensure(self, gm: fx.GraphModule) -> None:
        left = restore_is_causal(gm)  # idempotent: a second run finds what the first one missed, if anything
        if left:
            raise PassError(f"{left} SDPA calls still read a constant causal mask")
