"""The contract every adapter kind fulfils: create, load, forward as a graph, merge as a weight.

A kind is one small file. Its ``forward`` is written once in plain torch and runs on ``torch.fx.Proxy``
values to build the graph, so the inserted subgraph and the math are the same code.

Tensors keep PEFT's shapes and are keyed by role; ``SiteAdapter.peft_keys`` maps each role to PEFT's key
suffix, so loading and saving back a checkpoint are the same table read in both directions. Roles in
``SiteAdapter.shared`` are adapter-wide (one tensor for every site, e.g. VeRA's projections), stored once.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from ..errors import CheckpointError, SpecError
from ..sites import Site


@dataclass
class SiteAdapter:
    """One adapter on one site: the kind, the numbers its math needs, and its tensors (PEFT's names)."""

    kind: AdapterKind
    site: Site
    hyper: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    peft_keys: dict[str, str] = field(default_factory=dict)  # role -> PEFT key suffix (after the module path)
    shared: frozenset[str] = frozenset()  # adapter-wide roles (PEFT key ``base_model.<suffix>``)
    frozen: frozenset[str] = frozenset()  # roles stored and saved but never trained (PEFT's buffers)
    # where PEFT keeps the tensors when that is not the site's module: a nested ParamWrapper
    # (``experts.base_layer``), nn.MultiheadAttention's wrapped out_proj (``attn.base_layer.out_proj``)
    peft_module: str | None = None


@dataclass(frozen=True)
class PeftSource:
    """What a kind needs to build itself from a PEFT checkpoint at one site."""

    config: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]  # this module's tensors, keyed by PEFT's suffix (lora_A.weight, ...)
    keys: Mapping[str, str]  # the same suffixes mapped to the full key in the file, for error messages
    file: str
    shared: Mapping[str, torch.Tensor] = field(default_factory=dict)  # adapter-wide tensors, by PEFT name
    prepared: Any = None  # what the kind's ``prepare_peft`` computed once for the whole adapter

    def take(self, suffix: str) -> torch.Tensor:
        if suffix not in self.tensors:
            # name the full key: the module's prefix, as the keys this module does have show it
            known, key = next(iter(self.keys.items()), ("", ""))
            missing = key[: len(key) - len(known)] + suffix if key.endswith(known) else suffix
            raise CheckpointError(f"{self.file}: missing tensor {suffix!r} (key {missing!r})")
        return self.tensors[suffix]

    def check_shape(self, suffix: str, tensor: torch.Tensor, shape: Sequence[int], site: Site, note: str = "") -> None:
        """Refuse ``tensor`` (stored under ``suffix``) unless its shape is ``shape``, naming the key, the site and
        ``note`` (what set the shape, e.g. `` (r=8)``)."""
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.file}: {self.keys[suffix]!r} has shape {list(tensor.shape)}, expected {list(shape)} for "
                f"{site.describe()}{note}"
            )

    def refuse_others(self, expected: Iterable[str], what: str) -> None:
        """Refuse a tensor outside ``expected`` (PEFT suffixes): an unread tensor would be silently dropped math.
        ``what`` ends the message: "unexpected tensor <key> for <what>"."""
        extra = sorted(set(self.tensors) - set(expected))
        if extra:
            raise CheckpointError(f"{self.file}: unexpected tensor {self.keys[extra[0]]!r} for {what}")


@dataclass(frozen=True)
class LowRank:
    """An adapter's update as LoRA factors, in PEFT's shapes: ``ΔW = scaling · B A`` (``+ scaling · bias`` on the
    output), rescaled per output unit by DoRA's ``magnitude`` where it has one."""

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    scaling: float
    rslora: bool = False
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None


class AdapterKind(ABC):
    """An adapter family: PEFT's math for it, as a graph builder and a closed-form merge.

    What other parts may ask of an adapter goes through capabilities, never through its kind's name:
    ``low_rank`` (its LoRA factors, if it has them), ``dense_delta`` (PEFT's ``get_delta_weight``),
    ``additive`` (it only adds to its site's output) and ``folds_by_vector`` (IA³'s fold).
    """

    name: ClassVar[str]
    peft_types: ClassVar[tuple[str, ...]] = ()
    peft_prefix: ClassVar[str] = ""  # the attribute prefix of this kind's tensors in PEFT (lora_, hada_, ...)
    ops: ClassVar[frozenset[str]]
    Params: ClassVar[type[BaseModel]]
    # forward reads a runtime multiplier of its scaling, t["lora_scale"], when the graph has that input
    # (diffusers' LoRA scale, applied as PEFT's scale_layer does)
    runtime_scale: ClassVar[bool] = False
    folds_by_vector: ClassVar[bool] = False  # a fold is the weighted sum of its vectors (IA³), not of its deltas
    conv1d: ClassVar[bool] = True  # PEFT's tuner also takes transformers' Conv1D (a transposed Linear)
    grouped_conv: ClassVar[bool] = True  # PEFT's tuner also takes convs with groups > 1
    scalable: ClassVar[bool] = True  # it has a scaling factor a checkpoint's ``scale`` multiplies (else it must be 1)

    def site_problem(self, site: Site) -> str | None:
        """Why PEFT's tuner cannot adapt ``site``, one of this kind's ``ops`` (None: it can). The planner raises it
        as the spec's or the checkpoint's error, so kinds carry no error classes or message prefixes for it."""
        if site.transposed and not self.conv1d:
            return f"PEFT's {self.name} does not adapt transformers' Conv1D ({site.describe()})"
        if site.op.startswith("conv") and site.conv_args["groups"] != 1 and not self.grouped_conv:
            return f"PEFT's {self.name} does not adapt grouped convs ({site.describe()})"
        return None

    def prepare(self, sites: Sequence[Site], params: Sequence[BaseModel]) -> Any:
        """What every site of one fresh adapter shares, computed once before ``create`` runs on each site.

        PEFT sizes some adapter-wide tensors over all of an adapter's targets (VeRA's projections, RandLoRA's
        bases, FRoD's per-category bases) or numbers the targets (TinyLoRA); ``create`` sees one site, so that
        knowledge is computed here, per adapter, and handed to each ``create`` as ``prepared``.
        """
        return None

    def prepare_peft(self, sites: Sequence[Site], config: Mapping[str, Any], file: str) -> Any:
        """The checkpoint counterpart of ``prepare``: handed to ``from_peft`` as ``source.prepared``."""
        return None

    @abstractmethod
    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        """A fresh adapter initialised as PEFT initialises it. ``params`` is an instance of ``Params``, validated
        by the planner; ``prepared`` is what ``prepare`` returned for the adapter."""

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
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged (weight, bias), storage layout, from the current ``weight``/``bias`` (earlier adapters at
        the site may have merged into them) and the ``raw_weight``/``raw_bias`` the live adapter reads."""

    def merge_into(
        self,
        a: SiteAdapter,
        out: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``merge`` written into ``out`` (storage layout, ``weight``'s dtype; may be ``weight`` itself) a block of
        rows at a time, exactly rounded, so no temporary the size of a weight is made; returns (``out``, new bias).
        None where the kind or this site has no such form: the caller then uses ``merge``."""
        return None

    @abstractmethod
    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        """Refuse config fields this kind does not implement, rather than silently computing something else."""

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        """The adapter_config.json PEFT needs to rebuild these (fresh) adapters, for ``save_adapter``."""
        raise SpecError(f"save_adapter: PEFT has no format for a {self.name} adapter")

    def low_rank(self, a: SiteAdapter) -> LowRank | None:
        """The adapter's LoRA factors, for kinds that are a low-rank product (routing stacks them, folds merge
        them); None for the others, which are handled through ``dense_delta``."""
        return None

    def dense_delta(self, a: SiteAdapter) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PEFT's ``get_delta_weight``: ``merge(W) - W`` at the site's base weight, float64, logical layout
        (``[out, in, *k]``; embeddings ``[num, dim]``), and the bias change (None where the bias is untouched)."""
        site = a.site
        weight = site.base_weight().double()
        bias = site.base_bias().double() if site.bias is not None else None
        merged, new_bias = self.merge(a, weight, weight, bias, bias, a.tensors)
        delta = merged.double() - weight
        bias_delta = None
        if new_bias is not None and bias is not None and not torch.equal(new_bias, bias):
            bias_delta = new_bias.double() - bias
        return site.logical(delta), bias_delta

    def additive(self, a: SiteAdapter) -> bool:
        """True when the adapter only adds to the output, so it commutes with other additive adapters."""
        return False

    def pad(self, a: SiteAdapter, max_rank: int) -> SiteAdapter:
        """``a`` with its rank padded to ``max_rank`` and its scaling held as a tensor, exactly as it computes.

        Fixed shapes and tensor scalings let ``swap_adapter`` load another adapter into a compiled graph without
        a recompile. Kinds without a rank to pad refuse.
        """
        raise SpecError(f"{self.name} has no rank to pad: max_rank is for the LoRA family (lora, dora)")

    def runtime_hyper(self, a: SiteAdapter) -> frozenset[str]:
        """The ``hyper`` keys the graph reads from tensors rather than constants: a swap may change only these."""
        return frozenset()

    def saved_tensor(self, a: SiteAdapter, role: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as PEFT stores it (a padded rank trimmed back)."""
        return tensor


class AdditiveKind(AdapterKind):
    """A kind whose adapter only adds ``ΔW x`` to its site's output: it states ``delta``, and its merge, its dense
    delta and its commuting with other additive adapters follow."""

    @abstractmethod
    def delta(self, a: SiteAdapter, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``ΔW`` in float64, logical layout (``[out, in, *k]``; embeddings ``[num, dim]``), from the tensors ``t``."""

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return add_to_weight(weight, self.delta(a, t), a.site), bias

    def dense_delta(self, a: SiteAdapter) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.delta(a, a.tensors).double(), None

    def additive(self, a: SiteAdapter) -> bool:
        return True


def adapter_dtype(site_dtype: torch.dtype) -> torch.dtype:
    """PEFT keeps adapters in the base dtype, upcasting half precisions to float32."""
    return torch.float32 if site_dtype in (torch.float16, torch.bfloat16) else site_dtype


def add_linear_delta(site: Site, x: Any, y: Any, delta: Any, dtype: torch.dtype) -> Any:
    """``y + x ΔWᵀ`` for a linear site: computed in the adapter ``dtype`` (as PEFT does), cast back to the site's
    before the add. Works on tensors and fx proxies alike."""
    cast = dtype != site.dtype
    out = F.linear(x.to(dtype) if cast else x, delta)
    return y + (out.to(site.dtype) if cast else out)


def kaiming_factors(
    shapes: Mapping[str, Sequence[int]], zero: str | None, generator: torch.Generator | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Fresh factors as PEFT initialises them: nn.Linear's kaiming-uniform (a = √5), drawn in float64 in ``shapes``'
    order from one ``generator``, except the ``zero`` role, left at zero (so the adapter starts as the identity)
    and drawing nothing; cast to ``dtype``."""
    tensors = {}
    for role, shape in shapes.items():
        t = torch.zeros(shape, dtype=torch.float64)
        if role != zero:
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
        tensors[role] = t.to(dtype)
    return tensors


def target_modules(adapters: Sequence[SiteAdapter]) -> list[str]:
    """Exact module paths: under PEFT's list rule (exact name or dotted suffix) they select just these."""
    return sorted({a.site.module for a in adapters})


def per_module(adapters: Sequence[SiteAdapter], key: str, default: Any) -> dict[str, Any]:
    """A PEFT ``*_pattern`` dict for the sites whose ``hyper[key]`` differs from ``default``.

    Keys are full module paths, which PEFT's pattern rule (``(.*\\.)?key$``) matches exactly.
    """
    return {a.site.qualified_name: a.hyper[key] for a in adapters if a.hyper[key] != default}


def uniform(adapters: Sequence[SiteAdapter], keys: Sequence[str], kind: str, note: str = "") -> dict[str, Any]:
    """The first adapter's hyper, once every ``hyper[key]`` is the same across ``adapters``.

    For ``peft_config`` fields PEFT keeps one value of per adapter (no ``*_pattern``); a key that differs raises
    ``SpecError("save_adapter: PEFT's <kind> needs one <key> for a whole adapter<note>")``.
    """
    first = adapters[0].hyper
    for key in keys:
        if any(a.hyper[key] != first[key] for a in adapters):
            raise SpecError(f"save_adapter: PEFT's {kind} needs one {key} for a whole adapter{note}")
    return first


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup (``get_pattern_key``): the first key, in file order, that
    matches a dotted suffix of the module path (``(.*\\.)?key$``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def strict_suffix_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The older lookup some tuners keep (FourierFT's ``n_frequency_pattern``, C3A's ``block_size_pattern``): the
    first key matching a dotted suffix with at least one dot before it (``.*\\.key$``), else the exact path."""
    for key, value in patterns.items():
        if re.match(rf".*\.{key}$", module):
            return value
    return patterns.get(module, default)


def add_to_weight(weight: torch.Tensor, delta: torch.Tensor, site: Site) -> torch.Tensor:
    """``weight + delta`` in ``weight``'s dtype: ``delta`` is float64 in the logical ``[out, in, ...]`` layout,
    ``weight`` in storage layout (transposed for transformers' Conv1D sites)."""
    return (weight.double() + (delta.t() if site.transposed else delta)).to(weight.dtype)


def refuse_unknown(config: Mapping[str, Any], handled: frozenset[str], kind: str, file: str) -> None:
    """Refuse a config field that would change the math, rather than silently ignoring it.

    Fields at their neutral value (None, False, empty) are accepted, and so are the bookkeeping fields every
    PEFT config has.
    """
    for key, value in config.items():
        if key in handled or key in COMMON_FIELDS or value in (None, False, {}, [], ""):
            continue
        raise CheckpointError(
            f"{file}: {key}={value!r} is not supported by peftfx's {kind} (it would change the math, so it is "
            "refused rather than ignored)"
        )


# Fields every PEFT config has that shape training, targeting (read elsewhere) or bookkeeping only.
COMMON_FIELDS = frozenset(
    {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "target_modules",
        "target_parameters",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "ensure_weight_tying",
    }
)
