"""The adapter registry: one entry per kind, looked up by spec ``type`` or by PEFT ``peft_type``."""

from __future__ import annotations

from .base import AdapterKind, PeftSource, SiteAdapter
from .lora import Dora, Lora

KINDS: dict[str, AdapterKind] = {}
PEFT_TYPES: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    KINDS[kind.name] = kind
    for peft_type in kind.peft_types:
        PEFT_TYPES[peft_type] = kind
    return kind


for _kind in (Lora(), Dora()):
    register(_kind)

__all__ = ["KINDS", "PEFT_TYPES", "AdapterKind", "PeftSource", "SiteAdapter", "register"]
