"""Adapter-wide state belongs to one adapter: two fresh adapters of a kind whose sites share tensors (VeRA's
projections, RandLoRA's bases) keep their own, sized over their own sites, whatever else the spec holds."""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch
from models import mlp, mlp_inputs
from oracle import Tolerance, assert_close, run

import peftfx

# float32 MLP outputs of magnitude ~1 (RandLoRA's default alpha scales them to ~100): PEFT adds float32 deltas in
# another order than the graph does, a few ulps apart.
TOL = Tolerance(rtol=1e-5, atol=1e-5)
mlp3 = functools.partial(mlp, sizes=(12, 16, 20, 8))

KINDS = {
    "vera": {"r": 3, "init": False},
    "randlora": {"r": 3, "alpha": 6.0, "init_weights": False},
}


@pytest.mark.parametrize("kind", KINDS)
def test_two_fresh_adapters_keep_their_own_shared_tensors(kind, tmp_path):
    model, inputs = mlp3(), mlp_inputs()
    names = ["p", "q"]  # on layers.0 (12 -> 16) and layers.1 (16 -> 20): same r and key, other shapes
    spec = {
        "adapters": {
            name: {"type": kind, "at": {"module": f"layers.{i}"}, "with": KINDS[kind], "seed": i}
            for i, name in enumerate(names)
        }
    }
    gm = peftfx.compile(model, spec, inputs)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith("peftfx.") and p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # as if trained
    for name in names:
        peftfx.save_adapter(gm, name, tmp_path / name)
    for name, other in (names, names[::-1]):
        alone = copy.deepcopy(gm)  # the other adapter switched off: its delta is a product of its trained tensors
        with torch.no_grad():
            for param_name, p in alone.named_parameters():
                if param_name.startswith(f"peftfx.{other}.") and p.requires_grad:
                    p.zero_()
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / name).eval()
        assert_close(run(reloaded, inputs), run(alone, inputs), TOL, f"fresh {kind} {name!r} saved, loaded by PEFT")
