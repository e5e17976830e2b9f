"""max_rank and swap_adapter, eagerly on a small MLP: padding is exact, a swap gives the new adapter's numbers, and a
swap that cannot fit raises before anything is written. Compiled graphs (no recompiles) are in test_compile.py.

Tolerance: float32, rtol 1e-5 / atol 1e-6: padding adds zero terms to the rank sums and turns the scaling into
a float32 tensor, which moves the last bits (measured ~2e-7 on outputs of size ~1).
"""

from __future__ import annotations

import re

import peft
import pytest
import torch
from models import mlp, mlp_inputs
from oracle import Tolerance, assert_close, peft_checkpoint, run

import peftfx

TOL = Tolerance(1e-5, 1e-6)


def lora(r: int, alpha: float, seed: int, max_rank: int | None = 8, **with_) -> dict:
    fields = {"r": r, "alpha": alpha, "init": False, **with_}
    adapter = {"type": "lora", "at": {"op": "linear"}, "with": fields, "seed": seed}
    return adapter if max_rank is None else {**adapter, "max_rank": max_rank}


@pytest.fixture
def model():
    return mlp()


def live(model, adapter: dict, name: str = "a"):
    return peftfx.compile(model, {"adapters": {name: adapter}}, mlp_inputs())


def adapter_state(gm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gm.named_parameters() if k.startswith("peftfx.")}


def test_padding_is_exact_and_holds_the_scaling_as_a_tensor(model):
    padded, plain = live(model, lora(3, 5.0, 0)), live(model, lora(3, 5.0, 0, max_rank=None))
    tensors = dict(padded.named_parameters())
    assert tensors["peftfx.a.layers__0.lora_A"].shape == (8, 12)
    assert tensors["peftfx.a.layers__0.lora_B"].shape == (16, 8)
    scaling = tensors["peftfx.a.layers__0.scaling"]
    assert scaling.shape == () and not scaling.requires_grad and scaling.item() == pytest.approx(5.0 / 3)
    assert_close(run(padded, mlp_inputs()), run(plain, mlp_inputs()), TOL, "padded vs plain")


@pytest.mark.parametrize(
    "new",
    [lora(6, 3.0, 1), lora(2, 16.0, 2, rslora=True), lora(8, 1.0, 3, max_rank=None)],
    ids=["larger rank, other alpha", "smaller rank, rslora", "max_rank itself"],
)
def test_swap_gives_the_new_adapters_outputs(model, new):
    gm = live(model, lora(4, 8.0, 0))
    peftfx.swap_adapter(gm, "a", {"adapters": {"b": new}})
    fresh = live(model, {**new, "max_rank": None}, "b")
    assert_close(run(gm, mlp_inputs()), run(fresh, mlp_inputs()), TOL, "swapped vs fresh")
    assert not torch.allclose(run(gm, mlp_inputs()), run(live(model, lora(4, 8.0, 0)), mlp_inputs()), atol=1e-3)


def test_dora_swap_reads_the_scaling_tensor_in_its_norm_too(model):
    gm = live(model, lora(4, 8.0, 0, dora=True))
    new = lora(2, 3.0, 1, max_rank=None, dora=True)
    peftfx.swap_adapter(gm, "a", {"adapters": {"b": new}})
    assert_close(run(gm, mlp_inputs()), run(live(model, new, "b"), mlp_inputs()), TOL, "swapped DoRA vs fresh")


def test_swap_from_a_peft_checkpoint_and_save_back_trims_the_padding(model, tmp_path):
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["layers.0", "layers.1"], use_rslora=True)
    peft_model = peft_checkpoint(model, config, tmp_path / "ckpt")
    gm = live(model, lora(5, 8.0, 0))
    peftfx.swap_adapter(gm, "a", tmp_path / "ckpt")
    assert_close(run(gm, mlp_inputs()), run(peft_model, mlp_inputs()), TOL, "swapped vs PEFT")
    peftfx.save_adapter(gm, "a", tmp_path / "saved")
    reloaded = peft.PeftModel.from_pretrained(mlp(), tmp_path / "saved").eval()
    assert reloaded.base_model.model.layers[0].lora_A["default"].weight.shape == (3, 12)
    assert_close(run(reloaded, mlp_inputs()), run(peft_model, mlp_inputs()), TOL, "saved back, PEFT")


def test_swap_from_a_fold_of_checkpoints(model, tmp_path):
    for i, r in enumerate((2, 3)):
        config = peft.LoraConfig(r=r, lora_alpha=4, target_modules=["layers.0", "layers.1"])
        peft_checkpoint(model, config, tmp_path / f"c{i}", lambda m, i=i: _perturb(m, i))
    fold = {
        "adapters": {
            "x": {"peft": str(tmp_path / "c0")},
            "y": {"peft": str(tmp_path / "c1")},
            "mix": {"combine": ["x", "y"], "weights": [1.0, -0.5], "method": "cat"},
        }
    }
    gm = live(model, lora(4, 8.0, 0))
    peftfx.swap_adapter(gm, "a", fold)
    assert_close(run(gm, mlp_inputs()), run(peftfx.compile(model, fold, mlp_inputs()), mlp_inputs()), TOL, "fold")


def test_a_fold_pads_to_max_rank_and_a_dense_fold_refuses(model):
    sources = {"x": lora(2, 4.0, 1, max_rank=None), "y": lora(3, 4.0, 2, max_rank=None)}
    mix = {"combine": ["x", "y"], "weights": [1.0, -0.5], "method": "cat"}
    plain = peftfx.compile(model, {"adapters": {**sources, "mix": mix}}, mlp_inputs())
    padded = peftfx.compile(model, {"adapters": {**sources, "mix": {**mix, "max_rank": 8}}}, mlp_inputs())
    assert dict(padded.named_parameters())["peftfx.mix.layers__0.lora_A"].shape == (8, 12)
    assert_close(run(padded, mlp_inputs()), run(plain, mlp_inputs()), TOL, "padded fold vs fold")
    dense = {**mix, "method": "ties_delta", "density": 0.5, "max_rank": 8}
    with pytest.raises(peftfx.SpecError, match=r"adapters\.mix\.max_rank: delta has no rank to pad"):
        peftfx.compile(model, {"adapters": {**sources, "mix": dense}}, mlp_inputs())


def _perturb(m, seed):
    from oracle import perturb

    perturb(m, seed=seed)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (lora(9, 8.0, 1, max_rank=None), "layers.0 has rank 9, more than max_rank 8, declared for 'a'"),
        ({"type": "loha", "at": {"op": "linear"}, "with": {"r": 2}}, "is a loha adapter, 'a' a lora"),
        ({**lora(2, 8.0, 1), "at": {"module": "layers.0"}}, "does not adapt layers.1, which 'a' adapts"),
        (lora(2, 8.0, 1, dora=True), "dora=True, but the graph holds dora=False as a constant"),
    ],
    ids=["rank above max_rank", "another kind", "other sites", "lora to dora"],
)
def test_a_swap_that_cannot_fit_is_refused_and_changes_nothing(model, source, message):
    gm = live(model, lora(4, 8.0, 0))
    before = adapter_state(gm)
    with pytest.raises(peftfx.SpecError, match=re.escape(message)):
        peftfx.swap_adapter(gm, "a", {"adapters": {"b": source}})
    for key, value in adapter_state(gm).items():
        assert torch.equal(value, before[key]), key


def test_new_sites_are_refused(model):
    gm = live(model, {**lora(4, 8.0, 0), "at": {"module": "layers.0"}})
    with pytest.raises(peftfx.SpecError, match=r"adapts layers\.1, which 'a' does not: a swap cannot add sites"):
        peftfx.swap_adapter(gm, "a", {"adapters": {"b": lora(2, 8.0, 1)}})


def test_without_max_rank_the_scaling_is_a_constant(model):
    gm = live(model, lora(4, 8.0, 0, max_rank=None))
    peftfx.swap_adapter(gm, "a", {"adapters": {"b": lora(4, 8.0, 1, max_rank=None)}})  # same shapes and constants
    assert_close(run(gm, mlp_inputs()), run(live(model, lora(4, 8.0, 1, None)), mlp_inputs()), TOL, "same hyper")
    message = "alpha=2.0, but the graph holds alpha=8.0 as a constant; declare max_rank"
    with pytest.raises(peftfx.SpecError, match=re.escape(message)):
        peftfx.swap_adapter(gm, "a", {"adapters": {"b": lora(4, 2.0, 1, max_rank=None)}})


def test_unknown_adapter_and_source_spec_errors(model):
    gm = live(model, lora(4, 8.0, 0))
    with pytest.raises(peftfx.SpecError, match="no live adapter 'b' in this graph"):
        peftfx.swap_adapter(gm, "b", {"adapters": {"b": lora(4, 8.0, 1)}})
    two = {"adapters": {"b": lora(4, 8.0, 1), "c": lora(4, 8.0, 2)}}
    with pytest.raises(peftfx.SpecError, match="exactly one active adapter, it has 2"):
        peftfx.swap_adapter(gm, "a", two)


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ({"type": "ia3", "at": {"op": "linear"}, "max_rank": 4}, r"adapters\.a\.max_rank: ia3 has no rank to pad"),
        (lora(6, 8.0, 0, max_rank=4), r"adapters\.a\.max_rank: layers\.0 has rank 6, more than max_rank 4"),
        ({**lora(2, 8.0, 0), "max_rank": 0}, r"adapters\.a\.max_rank"),
    ],
)
def test_max_rank_errors_name_the_field(model, adapter, message):
    with pytest.raises(peftfx.PeftfxError, match=message):
        live(model, adapter)


@pytest.mark.parametrize("field", ["max_rank", "as_inputs"])
def test_deployment_fields_only_apply_to_live_adapters(model, field):
    value = {"max_rank": 8, "as_inputs": True}[field]
    merged = {"adapters": {"a": {**lora(2, 8.0, 0, None), field: value}}, "merge": True}
    with pytest.raises(peftfx.SpecError, match=rf"adapters\.a\.{field}: 'a' is merged"):
        peftfx.compile(model, merged, mlp_inputs())
    folded = {"adapters": {"a": {**lora(2, 8.0, 0, None), field: value}, "mix": {"combine": ["a"], "method": "cat"}}}
    with pytest.raises(peftfx.SpecError, match=rf"adapters\.a\.{field}: 'a' is not active"):
        peftfx.compile(model, folded, mlp_inputs())


def test_an_adapter_that_replaced_base_tensors_is_not_swappable(model, tmp_path):
    """Its trained biases would stay in the graph beside the new adapter's weights: a mix of two adapters."""
    config = peft.LoraConfig(r=2, target_modules=["layers.0"], bias="all")
    peft_checkpoint(model, config, tmp_path / "biased")
    gm = peftfx.compile(model, {"adapters": {"a": {"peft": str(tmp_path / "biased")}}}, mlp_inputs())
    before = adapter_state(gm)
    with pytest.raises(peftfx.SpecError, match=r"swap_adapter: 'a' replaced base tensors when compiled \(.*bias"):
        peftfx.swap_adapter(
            gm,
            "a",
            {
                "adapters": {
                    "b": lora(
                        2,
                        8.0,
                        1,
                        max_rank=None,
                    )
                }
            },
        )
    assert all(torch.equal(v, before[k]) for k, v in adapter_state(gm).items())
