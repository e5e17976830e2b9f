"""AdaMSS against PEFT: MLP (with and without bias) and Llama, config variants, float64, fresh adapters, errors.

PEFT does not store AdaMSS's assignment of output rows to subspaces: it reruns the randomized SVD and scikit-learn's
KMeans on the base weight when it loads the adapter, and peftfx reruns them the same way.
"""

from __future__ import annotations

import copy
import sys

import peft
import pytest
import torch
from models import mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, check, check_fresh_save, edit_config, peft_checkpoint, run

import peftfx

pytest.importorskip("sklearn")


def adamss(**kw) -> peft.AdamssConfig:
    return peft.AdamssConfig(
        **{"r": 4, "num_subspaces": 3, "subspace_rank": 2, "target_modules": ["layers.0", "layers.1"], **kw}
    )


@pytest.mark.parametrize(
    "config",
    [
        adamss(),
        adamss(r=100, num_subspaces=5, subspace_rank=1, random_seed=7),  # r clamped to the weight's rank
        adamss(use_dynamic_rank=True, svd_threshold=0.3, subspace_rank=3),  # ranks per subspace, read from the file
        adamss(init_weights=None, use_asa=True, asa_target_subspaces=2, init_warmup=1, final_warmup=9),  # training only
    ],
    ids=["default", "full-rank", "dynamic-rank", "random-init-asa"],
)
def test_mlp(config, tmp_path):
    check(mlp(), config, mlp_inputs(), tmp_path)


def test_mlp_without_bias(tmp_path):
    check(mlp(bias=False), adamss(num_subspaces=4), mlp_inputs(), tmp_path)


def test_llama(tmp_path):
    config = adamss(r=16, num_subspaces=4, target_modules=["q_proj", "v_proj", "down_proj"])
    check(tiny_llama(), config, token_inputs(), tmp_path)


def test_float64(tmp_path):
    tol = Tolerance(rtol=1e-10, atol=1e-12)
    check(mlp(dtype=torch.float64), adamss(), mlp_inputs(dtype=torch.float64), tmp_path, tol=tol)


def test_subspaces_are_peft_s(tmp_path):
    """The recomputed row groups are PEFT's, and they are not contiguous (the scatter is exercised)."""
    model = tiny_llama()
    config = adamss(r=16, num_subspaces=4, target_modules=["q_proj", "down_proj"])
    peft_model = peft_checkpoint(model, config, tmp_path)
    gm = peftfx.compile(model, {"adapters": {"a": {"peft": str(tmp_path)}}}, token_inputs())
    records = gm.meta["peftfx"]["records"]
    assert len(records) == 4
    for record in records:
        layer = peft_model.base_model.model.get_submodule(record.module)
        scatter = layer.scatter_index["default"].tolist()
        order = record.hyper["order"]
        assert [scatter[j] for j in order] == list(range(len(order)))  # order inverts PEFT's scatter index
        assert order != sorted(order)


def test_scale_scales_the_update(tmp_path):
    model, inputs = mlp(), mlp_inputs()
    peft_model = peft_checkpoint(model, adamss(target_modules=["layers.1"]), tmp_path)
    spec = {"adapters": {"a": {"peft": str(tmp_path), "scale": 0.5}}}
    halfway = (run(peft_model, inputs) + run(model, inputs)) / 2  # the last layer: the update shows linearly
    for merge in (False, True):
        out = run(peftfx.compile(model, {**spec, "merge": merge}, inputs), inputs)
        torch.testing.assert_close(out, halfway, rtol=1e-5, atol=1e-6)


FRESH = {"type": "adamss", "at": {"op": "linear"}, "with": {"r": 4, "num_subspaces": 3, "subspace_rank": 2}}


def test_fresh_is_identity_like_peft_and_saves(tmp_path):
    model, inputs = mlp(), mlp_inputs()
    spec = {"adapters": {"f": FRESH}}
    gm = peftfx.compile(model, spec, inputs)
    assert torch.equal(run(gm, inputs), run(model, inputs))
    peft_layer = peft.get_peft_model(copy.deepcopy(model), adamss()).base_model.model.layers[0]
    newB = gm.get_parameter("peftfx.f.layers__0.newB")
    assert not newB.requires_grad  # a buffer in PEFT
    torch.testing.assert_close(newB, peft_layer.adamss_newB["default"], rtol=0, atol=0)
    for k, (A, B) in enumerate(zip(peft_layer.adamss_A["default"], peft_layer.adamss_B["default"], strict=True)):
        ours_A = gm.get_parameter(f"peftfx.f.layers__0.A_{k}").detach()
        assert ours_A.shape == A.shape and gm.get_parameter(f"peftfx.f.layers__0.B_{k}").shape == B.shape
        # A = Qᵀ from randomized SVDs of PEFT's global RNG, so only its kind is compared: orthonormal rows
        torch.testing.assert_close(ours_A @ ours_A.t(), torch.eye(A.shape[0]), rtol=0, atol=1e-5)
    gm(*inputs).sum().backward()
    assert gm.get_parameter("peftfx.f.layers__0.B_0").grad.abs().sum() > 0
    check_fresh_save(model, spec, inputs, tmp_path)


def test_fresh_random_init_and_dynamic_rank_save(tmp_path):
    spec = {"adapters": {"f": {**FRESH, "seed": 3, "with": {**FRESH["with"], "init": False, "dynamic_rank": True}}}}
    model, inputs = tiny_llama(), token_inputs()
    spec["adapters"]["f"]["at"] = {"op": "linear", "module": "re:.*(q|v)_proj"}
    assert not torch.allclose(run(peftfx.compile(model, spec, inputs), inputs), run(model, inputs))
    check_fresh_save(model, spec, inputs, tmp_path)


def _saved(tmp_path, **config) -> str:
    peft_checkpoint(mlp(), adamss(), tmp_path)
    if config:
        edit_config(tmp_path, **config)
    return str(tmp_path)


def test_wrong_shape_names_the_key(tmp_path):
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.adamss_newB.*shape"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": _saved(tmp_path, r=3)}}}, mlp_inputs())


def test_other_clustering_is_refused(tmp_path):
    """Other base weights cluster otherwise: PEFT would add each row's update to other rows; peftfx refuses."""
    ckpt = _saved(tmp_path)
    other = mlp(seed=1)
    with pytest.raises(peftfx.PeftfxError, match=r"adamss_B\.\d.*has \d+ rows, but PEFT's clustering"):
        peftfx.compile(other, {"adapters": {"a": {"peft": ckpt}}}, mlp_inputs())


def test_unknown_config_field_and_conv1d_are_refused(tmp_path):
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: use_magic=True"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": _saved(tmp_path, use_magic=True)}}}, mlp_inputs())
    spec = {"adapters": {"f": {**FRESH, "at": {"op": "linear", "module": "re:.*c_fc"}}}}
    with pytest.raises(peftfx.PeftfxError, match=r"nn\.Linear only"):
        peftfx.compile(tiny_gpt2(), spec, token_inputs())


def test_missing_scikit_learn_says_how_to_install(tmp_path, monkeypatch):
    ckpt = _saved(tmp_path)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)  # import fails as if not installed
    with pytest.raises(peftfx.PeftfxError, match=r"pip install scikit-learn.*peftfx\[adamss\]"):
        peftfx.compile(mlp(), {"adapters": {"a": {"peft": ckpt}}}, mlp_inputs())
