"""The contract every adapter kind fulfils: create, load, forward as a graph, merge as a weight.

A kind is one small file. Its ``forward`` is written once in plain torch and runs on ``torch.fx.Proxy``
values to build the graph, so the inserted subgraph and the math are the same code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from ..sites import Site


@dataclass
class SiteAdapter:
    """One adapter on one site: the kind, the numbers its math needs, and its tensors (PEFT's names)."""

    kind: AdapterKind
    site: Site
    hyper: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class PeftSource:
    """What a kind needs to build itself from a PEFT checkpoint at one site."""

    config: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]  # this module's tensors, keyed by PEFT's suffix (lora_A.weight, ...)
    keys: Mapping[str, str]  # the same suffixes mapped to the full key in the file, for error messages
    file: str


class AdapterKind(ABC):
    """An adapter family: PEFT's math for it, as a graph builder and a closed-form merge."""

    name: ClassVar[str]
    peft_types: ClassVar[tuple[str, ...]] = ()
    ops: ClassVar[frozenset[str]]
    Params: ClassVar[type[BaseModel]]

    @abstractmethod
    def create(self, site: Site, params: BaseModel, generator: torch.Generator) -> SiteAdapter:
        """A fresh adapter initialised as PEFT initialises it."""

    @abstractmethod
    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        """The adapter a PEFT checkpoint stores for this site."""

    @abstractmethod
    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        """The site's new output from its input ``x``, base output ``y``, base weight/bias and tensors ``t``."""

    @abstractmethod
    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged (weight, bias), storage layout. ``raw_weight`` is the weight the live adapter reads."""

    @abstractmethod
    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        """Refuse config fields this kind does not implement, rather than silently computing something else."""

    def additive(self, a: SiteAdapter) -> bool:
        """True when the adapter only adds to the output, so it commutes with other additive adapters."""
        return False


def adapter_dtype(site_dtype: torch.dtype) -> torch.dtype:
    """PEFT keeps adapters in the base dtype, upcasting half precisions to float32."""
    return torch.float32 if site_dtype in (torch.float16, torch.bfloat16) else site_dtype
