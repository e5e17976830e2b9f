"""Tiny models with random weights and their inputs: every test builds from these, nothing is downloaded."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn


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
    """Two convs of one dimension (padded, then strided) and a linear head: three sites."""

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


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(**kwargs).to(dtype).eval()


def conv_net(dims: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet(dims).to(dtype).eval()


def embed_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return EmbedNet().to(dtype).eval()


def mlp_inputs(in_features: int = 12, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor]:
    return (torch.randn(3, in_features, generator=torch.Generator().manual_seed(seed), dtype=dtype),)


def conv_inputs(dims: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor]:
    shape = (2, 3, *[7 if dims < 3 else 5] * dims)
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype),)


def id_inputs(vocab: int = 20, seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(seed)),)


def token_inputs(vocab: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(seed))}


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> nn.Module:
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
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return BertForSequenceClassification(config).to(dtype).eval()
