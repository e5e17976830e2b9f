"""PEFT as the oracle for one adapter on one model: unmerged, merged and saved back, in one call.

Every tuner test builds a tiny model and a PEFT config and calls ``check``; the tuner's own file states its
tolerances and why.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn

import peftfx

Inputs = tuple | dict


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-5
    atol: float = 1e-6


def perturb(model: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every trainable tensor off its initial value, so no adapter is an identity under test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                p.add_((scale * noise).to(p.dtype))


def run(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out.logits if hasattr(out, "logits") else out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{what}: {m}")


def adapter_parameters(gm: torch.fx.GraphModule) -> list[str]:
    return [name for name, _ in gm.named_parameters() if name.startswith("peftfx.")] + [
        name for name, _ in gm.named_buffers() if name.startswith("peftfx.")
    ]


def check(
    base: nn.Module,
    config: peft.PeftConfig,
    inputs: Inputs,
    tmp_path: Path,
    *,
    tol: Tolerance = Tolerance(),
    merged_tol: Tolerance | None = None,
    prepare: Callable[[nn.Module], None] = perturb,
    merge: bool = True,
    save: bool = True,
) -> dict[str, Any]:
    """peftfx unmerged == PEFT unmerged, peftfx merged == PEFT merged, saved back == PEFT loading it."""
    base = base.eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    prepare(peft_model)
    ckpt = tmp_path / "peft"
    peft_model.save_pretrained(ckpt)
    expected = run(peft_model, inputs)

    spec = {"adapters": {"a": {"peft": str(ckpt)}}}
    gm = peftfx.compile(base, spec, inputs)
    assert_close(run(gm, inputs), expected, tol, "unmerged vs PEFT")
    result: dict[str, Any] = {"unmerged": gm}

    if merge:
        merged_expected = run(copy.deepcopy(peft_model).merge_and_unload(), inputs)
        merged = peftfx.compile(base, {**spec, "merge": True}, inputs)
        assert_close(run(merged, inputs), merged_expected, merged_tol or tol, "merged vs PEFT merged")
        assert adapter_parameters(merged) == [], "merged graph still holds adapter tensors"
        plain = peftfx.compile(base, {}, inputs)
        assert len(merged.graph.nodes) == len(plain.graph.nodes), "merged graph differs from the base capture"
        result["merged"] = merged

    if save:
        out = tmp_path / "saved"
        peftfx.save_adapter(gm, "a", out)
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        assert_close(run(reloaded, inputs), expected, tol, "saved back, loaded by PEFT")

    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), f"the input model was mutated ({key})"
    return result


def check_fresh_save(
    base: nn.Module, spec: dict[str, Any], inputs: Inputs, tmp_path: Path, tol: Tolerance = Tolerance()
) -> None:
    """A fresh adapter from a spec, saved in PEFT's format, gives PEFT the same outputs."""
    gm = peftfx.compile(base, spec, inputs)
    (name,) = spec["adapters"]
    with torch.no_grad():
        for param_name, p in gm.named_parameters():
            if param_name.startswith("peftfx."):
                p.add_(0.05 * torch.randn_like(p))  # as if trained
    out = tmp_path / "fresh"
    peftfx.save_adapter(gm, name, out)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert_close(run(reloaded, inputs), run(gm, inputs), tol, "fresh adapter saved, loaded by PEFT")


# -- tiny models ------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (12, 16, 8), bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in itertools.pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class ConvNet(nn.Module):
    def __init__(self, dims: int = 2, channels: int = 4) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv1 = conv(3, channels, 3, padding=1)
        self.conv2 = conv(channels, channels, 3, stride=2)
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.conv2(x)
        return self.head(x.flatten(2).mean(-1))


class EmbedNet(nn.Module):
    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.emb(ids)))


def mlp_inputs(in_features: int = 12, seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randn(3, in_features, generator=torch.Generator().manual_seed(seed)),)


def conv_inputs(dims: int = 2, seed: int = 0) -> tuple[torch.Tensor]:
    shape = (2, 3, *[7] * dims)
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def token_inputs(vocab: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(seed))}
