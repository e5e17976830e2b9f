"""Rewrite passes. Each takes a GraphModule and returns it rewritten; each states what it requires and ensures.

The driver lints the graph after every pass, so a broken pass is caught where it happened, and recompiles it once.
"""

from __future__ import annotations

from .base import Pass, run_passes
from .causal import Causal
from .cleanup import Cleanup
from .insert import Insert
from .merge import Merge
from .route import Route

__all__ = ["Causal", "Cleanup", "Insert", "Merge", "Pass", "Route", "run_passes"]
