"""Every example spec in specs/ runs on its own model and gives what it promises.

The compiled graph, live and merged, must match PEFT on the spec's checkpoints (and folds of them); fresh
adapters must be the identity at init. A routed spec's graph runs a batch mixing its adapters and the base model,
against PEFT's ``adapter_names``. ``peftfx.verify`` must pass on every spec, as a user's CI would run it. The
serving spec's ONNX file serves its checkpoint and another one swapped in, in one onnxruntime session.
"""

from __future__ import annotations

import functools

import peft
import pytest
import torch
from examples import SPECS, example
from oracle import Tolerance, assert_close, peft_checkpoint, perturb, run

import peftfx
from peftfx.spec import CombineAdapter
from peftfx.verify import load_peft, peft_fold

TOL = Tolerance(1e-5, 2e-6)  # float32 logits of size ~1: a few ulps of reordering between peftfx and PEFT


def test_there_are_example_specs():
    assert len(SPECS) >= 9


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_example_spec(path, tmp_path):
    ex = example(path, tmp_path)
    gm = peftfx.compile(ex.model, ex.spec, ex.inputs)
    routed = (ex.data.get("routing") or {}).get("adapters", [])
    picks = [r % (len(routed) + 1) for r in range(len(ex.inputs["input_ids"]))]  # len(routed): the base model
    assert not routed or set(picks) == set(range(len(routed) + 1)), "a batch too small to mix them all"
    index = {"adapter_index": torch.tensor([k if k < len(routed) else -1 for k in picks])} if routed else {}
    names = {"adapter_names": [[*routed, "__base__"][k] for k in picks]} if routed else {}
    out = run(gm, {**ex.inputs, **index})
    assert torch.isfinite(out).all()
    if not ex.peft_models:  # fresh adapters start at the identity, and are trainable
        assert_close(out, run(ex.model, ex.inputs), TOL, f"{path.name}: fresh adapters at init")
        assert any(p.requires_grad for n, p in gm.named_parameters() if n.startswith("peftfx."))
        return
    combines = {n: a for n, a in ex.data["adapters"].items() if "combine" in a}
    if combines:
        ((name, combine),) = combines.items()
        sources = {s: tmp_path / ex.data["adapters"][s]["peft"] for s in combine["combine"]}
        reference = peft_fold(ex.model, sources, name, CombineAdapter.model_validate(combine))
    elif routed:  # one PEFT model holding every routed checkpoint
        reference = load_peft(ex.model, tmp_path / ex.data["adapters"][routed[0]]["peft"], routed[0])
        for name in routed[1:]:
            reference.load_adapter(tmp_path / ex.data["adapters"][name]["peft"], adapter_name=name)
    else:
        ((name, reference),) = ex.peft_models.items()
    if ex.data.get("merge"):
        assert not [n for n, _ in gm.named_parameters() if n.startswith("peftfx.")]
        reference = reference.merge_and_unload()
    assert_close(out, run(reference, {**ex.inputs, **names}), TOL, f"{path.name} vs PEFT")
    assert not torch.allclose(out, run(ex.model, ex.inputs), atol=1e-3), "the adapter changed nothing"


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_example_spec_verifies(path, tmp_path):
    ex = example(path, tmp_path)
    report = peftfx.verify(ex.model, ex.spec, ex.inputs)
    assert report.ok, str(report)
    checks = {r.check for r in report.rows}
    assert "merged vs live" in checks
    if ex.peft_models:  # checkpoints and their folds are compared with PEFT, live and merged
        assert {"live vs PEFT", "merged vs PEFT merged"} <= checks, str(report)
    moved = [r for r in report.rows if r.check == "live vs base"]
    assert all(r.max_abs > 1e-3 for r in moved), "an adapter left the outputs unchanged: the checks proved nothing"


def test_peft_fold_folds_ia3_too(tmp_path):
    """The shared oracle also folds IA3 checkpoints, as PEFT's IA3 add_weighted_adapter does."""
    ex = example(next(p for p in SPECS if p.stem == "ia3"), tmp_path)
    combine = CombineAdapter(combine=["ia3"], weights=[0.5])
    folded = peft_fold(ex.model, {"ia3": tmp_path / "ia3_adapter"}, "scaled", combine)
    assert isinstance(folded, peft.PeftModel) and folded.active_adapter == "scaled"
    spec = {"adapters": {"ia3": {"peft": str(tmp_path / "ia3_adapter")}, "scaled": combine.model_dump()}}
    assert_close(run(peftfx.compile(ex.model, spec, ex.inputs), ex.inputs), run(folded, ex.inputs), TOL, "IA3 fold")


@pytest.mark.slow
def test_serving_spec_one_onnx_session_serves_two_adapters(tmp_path):
    """The spec's checkpoint (r=4) and a smaller one (r=2, another alpha) swapped in, fed to one session.

    Tolerance: float32, rtol 1e-5 / atol 2e-6: onnxruntime's fused float32 ops (~1e-7, as tests/test_export.py)
    on top of a few ulps between peftfx and PEFT.
    """
    ort = pytest.importorskip("onnxruntime")
    ex = example(next(p for p in SPECS if p.stem == "serving_onnx"), tmp_path)
    ((name, first),) = ex.peft_models.items()
    small = peft.LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])  # the same sites
    second = peft_checkpoint(ex.model, small, tmp_path / "small", functools.partial(perturb, seed=7))
    gm = peftfx.compile(ex.model, ex.spec, ex.inputs)
    session = ort.InferenceSession(str(peftfx.export_onnx(gm, ex.inputs, tmp_path / "m.onnx")))
    outs = []
    for reference in (first, second):
        if reference is second:
            peftfx.swap_adapter(gm, name, tmp_path / "small")
        feeds = {k: v.numpy() for k, v in {**ex.inputs, **peftfx.adapter_inputs(gm)}.items()}
        outs.append(torch.from_numpy(session.run(None, feeds)[0]))
        assert_close(outs[-1], run(reference, ex.inputs), TOL, f"onnxruntime, adapter {len(outs)} vs PEFT")
    assert not torch.allclose(outs[0], outs[1], atol=1e-3), "the second adapter changed nothing"
