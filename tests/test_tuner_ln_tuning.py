"""LN tuning against PEFT: a trained copy of LayerNorm / RMSNorm (and other layers') tensors, live, merged, saved."""

from __future__ import annotations

import functools

import peft
import pytest
import torch
from models import conv_inputs, conv_net, embed_net, id_inputs, mlp_inputs, tiny_gpt2, tiny_llama, token_inputs
from oracle import Tolerance, assert_close, check, check_fresh_save, edit_config, peft_checkpoint, replace_tensor, run
from torch import nn

import peftfx
from peftfx.sites import find_sites

# The copy is run through the site's own op, so live and merged outputs are the base computation with other
# numbers: float32 agrees to a few ulps (atol 2e-6 at outputs of magnitude ~1), float64 to rounding.
TOL = Tolerance(1e-5, 2e-6)
TOL64 = Tolerance(1e-10, 1e-12)


class TorchNorms(nn.Module):
    """torch's own norms (one op each, lowered from the leaf module under symbolic_trace), one without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 8)
        self.rms = nn.RMSNorm(8, eps=1e-5)
        self.ln = nn.LayerNorm(8, bias=False)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(self.rms(self.fc(x))))


def torch_norms(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return TorchNorms().to(dtype).eval()


LLAMA_NORMS = ["input_layernorm", "post_attention_layernorm", "model.norm"]
llama = functools.partial(tiny_llama, num_hidden_layers=1)  # one block holds every norm kind; keeps it fast
CASES = {
    "llama-rmsnorm": (llama, lambda: token_inputs(), LLAMA_NORMS),
    "gpt2-layernorm-and-conv1d": (tiny_gpt2, lambda: token_inputs(), ["ln_1", "ln_f", "h.0.attn.c_attn"]),
    "embed-layernorm-embedding-linear": (embed_net, id_inputs, ["norm", "emb", "out"]),
    "torch-rmsnorm-and-bias-free-layernorm": (torch_norms, mlp_inputs, ["rms", "ln"]),
    **{
        f"conv{d}d": (functools.partial(conv_net, d), functools.partial(conv_inputs, d), ["conv1", "conv2"])
        for d in (1, 2, 3)
    },
}


@pytest.mark.parametrize(("make", "inputs", "targets"), CASES.values(), ids=CASES.keys())
def test_matches_peft(make, inputs, targets, tmp_path):
    check(make(), peft.LNTuningConfig(target_modules=targets), inputs(), tmp_path, tol=TOL)


def test_matches_peft_float64(tmp_path):
    model = llama(dtype=torch.float64)
    check(model, peft.LNTuningConfig(target_modules=LLAMA_NORMS), token_inputs(), tmp_path, tol=TOL64)


def test_rms_norm_sites():
    gm = peftfx.compile(llama(), {}, token_inputs())
    norms = sorted(s.module for s in find_sites(gm) if s.op == "rms_norm")
    assert norms == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm"]


def test_fresh_is_identity_trainable_and_saves(tmp_path):
    model, inputs = llama(), token_inputs()
    spec = {"adapters": {"f": {"type": "ln_tuning", "at": {"op": "rms_norm", "module": "re:.*layers\\.0\\..*"}}}}
    gm = peftfx.compile(model, spec, inputs)
    assert_close(run(gm, inputs), run(model, inputs), Tolerance(0, 0), "identity at init")
    params = [n for n, p in gm.named_parameters() if n.startswith("peftfx.f.") and p.requires_grad]
    assert len(params) == 2  # input_layernorm and post_attention_layernorm: a weight each, no bias
    check_fresh_save(model, spec, inputs, tmp_path / "llama")
    layer_norm = {"adapters": {"f": {"type": "ln_tuning", "at": {"op": "layer_norm"}}}}
    check_fresh_save(embed_net(), layer_norm, id_inputs(), tmp_path / "embed")


def test_errors_name_the_file_and_key(tmp_path):
    model, inputs = embed_net(), id_inputs()
    ckpt = tmp_path / "peft"
    peft_checkpoint(model, peft.LNTuningConfig(target_modules=["norm"]), ckpt)
    key = "base_model.model.norm.ln_tuning_layers.weight"
    good = replace_tensor(ckpt, key, torch.ones(5))
    with pytest.raises(
        peftfx.PeftfxError, match=r"safetensors: 'base_model\.model\.norm\.ln_tuning_layers\.weight'.*\[5\]"
    ):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt)}}}, inputs)
    replace_tensor(ckpt, key, good)
    config = edit_config(ckpt, some_new_field=3)
    with pytest.raises(peftfx.PeftfxError, match=r"adapter_config\.json: some_new_field=3"):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt)}}}, inputs)
    edit_config(ckpt, config)
    with pytest.raises(peftfx.PeftfxError, match="no scaling factor"):
        peftfx.compile(model, {"adapters": {"a": {"peft": str(ckpt), "scale": 2.0}}}, inputs)


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_torch_rms_norm_is_a_site_under_both_tracers(capture):
    gm = peftfx.compile(torch_norms(), {"capture": capture}, mlp_inputs())
    assert [(s.op, s.module) for s in find_sites(gm)] == [
        ("linear", "fc"),
        ("rms_norm", "rms"),
        ("layer_norm", "ln"),
        ("linear", "out"),
    ]
