"""The pass loop runs each pass's contract: a pass that breaks what it ensures is named, with what it broke."""

from __future__ import annotations

import copy

import pytest
from models import mlp, mlp_inputs
from peftfx.passes import Cleanup, Merge, run_passes
from torch import fx

import peftfx
from peftfx.errors import PassError
from peftfx.ir import records

SPEC = {"adapters": {"a": {"type": "lora", "at": {"op": "linear"}, "with": {"r": 2}, "seed": 0}}}


@pytest.fixture(scope="module")
def live() -> fx.GraphModule:
    return peftfx.compile(mlp(), SPEC, mlp_inputs())


class SkippedMerge(Merge):
    """Claims to merge, does nothing."""

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        return gm


class SkippedCleanup(Cleanup):
    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        return gm


def test_a_merge_that_merges_nothing_fails_its_ensures(live):
    with pytest.raises(PassError, match=r"pass 'merge' broke its contract .*'a' at layers\.0 is still live"):
        run_passes(copy.deepcopy(live), [SkippedMerge(["a"])])


def test_a_cleanup_that_leaves_merged_tensors_fails_its_ensures(live):
    with pytest.raises(PassError, match=r"pass 'cleanup' \(after merge\) broke its contract .*read by no node"):
        run_passes(copy.deepcopy(live), [Merge(["a"]), SkippedCleanup()])


def test_the_real_passes_keep_their_contracts(live):
    merged = run_passes(copy.deepcopy(live), [Merge(["a"]), Cleanup()])
    assert not records(merged) and not hasattr(merged, "peftfx")
