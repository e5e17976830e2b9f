"""The adapter registry: one entry per kind, looked up by spec ``type`` or by PEFT ``peft_type``.

Every module in this package that defines a concrete ``AdapterKind`` subclass is registered on import, so
adding a kind is adding one file.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from .base import AdapterKind, PeftSource, SiteAdapter

KINDS: dict[str, AdapterKind] = {}
PEFT_TYPES: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    KINDS[kind.name] = kind
    for peft_type in kind.peft_types:
        PEFT_TYPES[peft_type] = kind
    return kind


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for cls in vars(module).values():
            if (
                inspect.isclass(cls)
                and issubclass(cls, AdapterKind)
                and cls.__module__ == module.__name__
                and not inspect.isabstract(cls)
            ):
                register(cls())


_discover()

__all__ = ["KINDS", "PEFT_TYPES", "AdapterKind", "PeftSource", "SiteAdapter", "register"]
