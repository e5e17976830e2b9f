"""OFT against PEFT: Linear (MLP, Llama), Embedding, Conv2d; Cayley exact/Neumann, block_share, COFT; create; save."""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch
from models import conv_inputs, conv_net, embed_net, id_inputs, mlp, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import (
    Tolerance,
    adapter_parameters,
    assert_close,
    check,
    check_fresh_save,
    edit_config,
    peft_checkpoint,
    replace_tensor,
    run,
)
from safetensors.torch import load_file

import peftfx

MLP = functools.partial(mlp, sizes=(12, 16, 8))


def oft(**kw) -> peft.OFTConfig:
    kw.setdefault("target_modules", ["layers.0", "layers.1"])
    kw.setdefault("oft_block_size", 0 if "r" in kw else 4)
    return peft.OFTConfig(**kw)


CASES = {
    "neumann": (MLP, oft()),
    "exact-cayley": (MLP, oft(use_cayley_neumann=False)),
    "r-blocks": (MLP, oft(r=2, use_cayley_neumann=False)),
    "block-share": (MLP, oft(block_share=True, oft_block_size=6)),
    "coft": (MLP, oft(coft=True, eps=0.4, use_cayley_neumann=False)),
    "coft-share": (MLP, oft(coft=True, eps=0.2, block_share=True)),
    "neumann-1": (MLP, oft(num_cayley_neumann_terms=1)),
    "neumann-2": (MLP, oft(num_cayley_neumann_terms=2)),
    "neumann-3": (MLP, oft(num_cayley_neumann_terms=3)),
    "neumann-8": (MLP, oft(num_cayley_neumann_terms=8)),
    "adjusted-size": (MLP, oft(oft_block_size=5)),  # 12 and 16 are not multiples of 5: PEFT picks 4
    "dropout-bias": (MLP, oft(module_dropout=0.5, bias="all")),  # dropout acts in training only
}


@pytest.mark.parametrize("case", CASES)
def test_mlp(case, tmp_path):
    make, config = CASES[case]
    # float32, one rotation (products of 4x4 / 6x6 blocks) in front of the weight: 1e-5 holds
    check(make(), config, mlp_inputs(), tmp_path)


def test_mlp_float64(tmp_path):
    config = oft(use_cayley_neumann=False, coft=True, eps=0.4)
    check(MLP(dtype=torch.float64), config, mlp_inputs(dtype=torch.float64), tmp_path, tol=Tolerance(1e-10, 1e-12))


def test_llama_linear_and_embedding(tmp_path):
    config = peft.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    # float32 through two transformer layers: PEFT merges in float32, peftfx in float64
    check(tiny_llama(), config, token_inputs(), tmp_path, tol=Tolerance(1e-5, 1e-5))


def test_embedding(tmp_path):
    check(embed_net(), oft(target_modules=["emb"], use_cayley_neumann=False), id_inputs(), tmp_path)


def conv_check(config: peft.OFTConfig, tmp_path, dtype=torch.float32, tol=Tolerance(1e-5, 1e-6)) -> None:  # noqa: B008
    """PEFT's unmerged Conv2d forward is not its merge (see oft.py): compare everything with PEFT merged."""
    base, inputs = conv_net(2, dtype=dtype), conv_inputs(2, dtype=dtype)
    peft_model = peft_checkpoint(base, config, tmp_path / "peft")
    expected = run(copy.deepcopy(peft_model).merge_and_unload(), inputs)
    spec = {"adapters": {"a": {"peft": str(tmp_path / "peft")}}}
    gm = peftfx.compile(base, spec, inputs)
    assert_close(run(gm, inputs), expected, tol, "unmerged vs PEFT merged")
    merged = peftfx.compile(base, {**spec, "merge": True}, inputs)
    assert_close(run(merged, inputs), expected, tol, "merged vs PEFT merged")
    assert adapter_parameters(merged) == []
    peftfx.save_adapter(gm, "a", tmp_path / "saved")
    saved, original = (load_file(str(p / "adapter_model.safetensors")) for p in (tmp_path / "saved", tmp_path / "peft"))
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "saved").merge_and_unload()
    assert_close(run(reloaded, inputs), expected, tol, "saved back, merged by PEFT")


@pytest.mark.parametrize(
    "config",
    [
        oft(target_modules=["conv1", "conv2"], oft_block_size=3),
        oft(target_modules=["conv1", "conv2", "head"], r=3, use_cayley_neumann=False, coft=True, eps=0.3),
        oft(target_modules=["conv2"], oft_block_size=4, block_share=True),
    ],
    ids=["neumann", "exact-coft", "share"],
)
def test_conv2d(config, tmp_path):
    conv_check(config, tmp_path)


def test_conv2d_float64(tmp_path):
    config = oft(target_modules=["conv1", "conv2"], oft_block_size=6, use_cayley_neumann=False)
    conv_check(config, tmp_path, torch.float64, Tolerance(1e-10, 1e-12))


def test_fresh_identity_and_save(tmp_path):
    base, inputs = MLP(sizes=(32, 16, 8)), mlp_inputs(32)
    spec = {"adapters": {"f": {"type": "oft", "at": {"op": "linear"}}}}
    gm = peftfx.compile(base, spec, inputs)
    assert torch.equal(run(gm, inputs), run(base, inputs))  # zero skew vectors: every rotation is I
    params = dict(gm.named_parameters())
    trainable = [n for n in adapter_parameters(gm) if params[n].requires_grad]
    # one 32x32 block for 32 inputs; 16 inputs: PEFT's fallback turns block size 32 into 16
    assert [params[n].shape for n in trainable] == [(1, 496), (1, 120)]
    check_fresh_save(base, spec, inputs, tmp_path)


def test_fresh_variants_save(tmp_path):
    spec = {
        "adapters": {
            "f": {
                "type": "oft",
                "at": {"op": "linear"},
                "with": {"block_size": 0, "r": 4, "cayley_neumann": False, "coft": True, "eps": 0.5, "init": False},
                "seed": 0,
            }
        }
    }
    check_fresh_save(MLP(), spec, mlp_inputs(), tmp_path)


def test_errors(tmp_path):
    peft_checkpoint(MLP(), oft(), tmp_path / "c")
    key = "base_model.model.layers.0.oft_R.weight"
    original = replace_tensor(tmp_path / "c", key, lambda t: t[:, :-1].contiguous())
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_model\.safetensors.*layers\.0\.oft_R\.weight.*shape"):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())
    replace_tensor(tmp_path / "c", key, original)

    edit_config(tmp_path / "c", oft_magic=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: oft_magic=3 is not supported"):
        peftfx.compile(MLP(), {"adapters": {"a": {"peft": str(tmp_path / "c")}}}, mlp_inputs())

    # PEFT refuses GPT-2's Conv1D for OFT, so a hand-written config with it must be refused here too
    with pytest.raises(peftfx.PeftfxError, match="Conv1D"):
        peftfx.compile(
            tiny_gpt2(), {"adapters": {"a": {"type": "oft", "at": {"module": "re:.*c_attn"}}}}, token_inputs()
        )
    with pytest.raises(peftfx.PeftfxError, match="r and block_size"):
        peftfx.compile(
            MLP(), {"adapters": {"a": {"type": "oft", "at": {"op": "linear"}, "with": {"r": 2}}}}, mlp_inputs()
        )
