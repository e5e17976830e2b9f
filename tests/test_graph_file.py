"""A capture served from the capture cache (``graph_file``) is the capture: for every exported architecture of the
matrix, the same code, nodes, module stacks, shapes, tensors (the model's own storage) and outputs, bit for bit."""

from __future__ import annotations

import gc
import pickle

import pytest
import torch
from architectures import ARCHS, run

import peftfx
from peftfx import graph_file
from peftfx.sites import MODULE_STACK

EXPORTED = [a for a in ARCHS if a.family != "diffusion"]  # diffusers models are traced symbolically: not cached


def _nodes(gm: torch.fx.GraphModule) -> list[tuple]:
    def shape(node):
        val = node.meta.get("val")
        return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None

    return [(n.name, n.op, str(n.target), str(n.args), n.meta.get(MODULE_STACK), shape(n)) for n in gm.graph.nodes]


@pytest.mark.parametrize("arch", EXPORTED, ids=[a.name for a in EXPORTED])
def test_a_capture_from_the_cache_is_the_capture(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTFX_CACHE_DIR", str(tmp_path))
    model, inputs = arch.build(), arch.inputs()
    fresh = peftfx.capture(model, inputs)
    assert len(list((tmp_path / "capture").iterdir())) == 1, "stored"

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.export, "export", no_export)
    cached = peftfx.capture(model, inputs)
    assert cached.code == fresh.code
    assert _nodes(cached) == _nodes(fresh)
    mine, theirs = cached.state_dict(keep_vars=True), fresh.state_dict(keep_vars=True)
    assert list(mine) == list(theirs)
    for name, tensor in mine.items():
        other = theirs[name]
        assert type(tensor) is type(other) and tensor.dtype == other.dtype, name
        if isinstance(tensor, torch.nn.Parameter):
            assert tensor.data_ptr() == other.data_ptr(), f"{name}: the model's own storage"
        else:
            assert torch.equal(tensor, other), f"{name}: a buffer (a copy in both)"
    assert torch.equal(run(cached, inputs, arch.output), run(fresh, inputs, arch.output))


@pytest.mark.parametrize("enabled", [True, False])
def test_loading_pauses_the_garbage_collector_and_gives_it_back_as_it_was(enabled, tmp_path, monkeypatch):
    """Unpickling a graph makes thousands of objects, none of them garbage: the collector would walk the whole heap
    (0.2 s of a 0.25 s load beside transformers and peft). It is off during a load, and as it was after, also when
    the load fails."""
    monkeypatch.setenv("PEFTFX_CACHE_DIR", str(tmp_path))
    arch = EXPORTED[0]
    model, inputs = arch.build(), arch.inputs()
    fresh = peftfx.capture(model, inputs)
    seen, build = [], graph_file._build

    def building(record, **kwargs):
        seen.append(gc.isenabled())
        return build(record, **kwargs)

    monkeypatch.setattr(graph_file, "_build", building)
    (gc.enable if enabled else gc.disable)()
    try:
        cached = peftfx.capture(model, inputs)
        assert seen == [False] and gc.isenabled() is enabled
        with pytest.raises(pickle.UnpicklingError):
            graph_file.loads(b"not a graph", lambda name: None)
        assert gc.isenabled() is enabled
    finally:
        gc.enable()
    assert _nodes(cached) == _nodes(fresh)
