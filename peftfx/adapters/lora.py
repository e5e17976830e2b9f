"""LoRA, rsLoRA and DoRA on Linear, transformers Conv1D, Conv1d/2d/3d and Embedding; LoRA on parameters.

Math (``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; ``W`` in logical ``[out, in, *k]`` layout):

* LoRA   ``y += s * B(A(x))``;  ``ΔW = s * B @ A`` (conv: ``ΔW[o,i,k] = s Σ_r B[o,r] A[r,i,k]``;
  embedding: ``ΔW = s (B @ A)ᵀ``, looked up by row). Merge: ``W += ΔW`` (and ``b += s * B.bias`` with lora_bias).
* on a parameter (PEFT's ``target_parameters``): ``W' = W + ΔW`` before the parameter's uses. A 2-D parameter
  ``[out, in]`` has Linear's ``ΔW``. A 3-D stack of ``E`` experts ``[E, out, in]`` has one rank-``r`` delta per
  expert, with PEFT's layout: ``A`` is ``[E·r, in]`` (expert-major rows: ``A.reshape(E, r, in)``), ``B`` is
  ``[out, r·E]`` (expert-minor columns: ``B.reshape(out, r, E)``), and ``ΔW[e] = s · B[:, :, e] @ A[e]``;
  experts stored ``[E, in, out]`` (``is_transposed``) get ``ΔW[e]ᵀ``. No DoRA, lora_bias or dropout there (PEFT
  refuses them too).
* DoRA   with ``n = ‖W + ΔW‖`` per output unit (over the vocabulary for embeddings), detached, and
  ``g = m / n``: ``y = y + (g - 1)(y - b) + g * s * B(A(x))``, i.e. ``g ⊙ (W + ΔW) x + b``.
  Merge: ``W ← g ⊙ (W + ΔW)`` with ``n`` taken against the raw base weight, as PEFT does.

With ``max_rank`` the factors are padded with zero rows of ``A`` and zero columns of ``B`` (``BA`` is unchanged)
and ``s`` is a 0-d tensor role ``scaling``: a compiled graph then serves any rank up to ``max_rank`` and any
alpha or rsLoRA setting, so ``swap_adapter`` never recompiles it.

Divergence from PEFT, on purpose: PEFT's conv ``lora_A`` ignores the base conv's dilation, so its unmerged
forward crashes on dilated convs; here ``lora_A`` uses the base's dilation and unmerged == merged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
from ..rounding import add_low_rank
from ..sites import PARAMETER, Site
from .base import (
    AdapterKind,
    LowRank,
    PeftSource,
    SiteAdapter,
    adapter_dtype,
    pattern_value,
    per_module,
    refuse_unknown,
    target_modules,
    uniform,
)

_CONV = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


class LoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, gt=0, description="rank")
    alpha: float = Field(8.0, description="scaling numerator (PEFT's lora_alpha)")
    rslora: bool = Field(False, description="scale by alpha/sqrt(r) instead of alpha/r")
    dora: bool = Field(False, description="weight-decomposed LoRA (a magnitude per output unit)")
    lora_bias: bool = Field(False, description="give B a bias (PEFT's lora_bias)")
    init: bool | Literal["gaussian"] = Field(
        True, description="true: B = 0 (identity at init); gaussian: A ~ N(0, 1/r); false: random A and B"
    )


class DoraParams(LoraParams):
    dora: bool = True


class Lora(AdapterKind):
    name = "lora"
    peft_types = ("LORA",)
    peft_prefix = "lora_"
    ops = frozenset({"linear", "conv1d", "conv2d", "conv3d", "embedding", PARAMETER})
    Params = LoraParams
    runtime_scale = True

    # -- construction -------------------------------------------------------------------------------------------

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: LoraParams = params
        _check_site(site, p.dora, p.lora_bias, SpecError)
        dtype = adapter_dtype(site.dtype)
        a_shape, b_shape = _factor_shapes(site, p.r)
        A = torch.empty(a_shape, dtype=torch.float64)
        B = torch.zeros(b_shape, dtype=torch.float64)
        if site.op == "embedding":  # PEFT inverts the roles here: A starts at zero, B is normal
            A.zero_()
            B.normal_(generator=generator)
            if p.init is False:
                A.normal_(generator=generator)
        else:
            if p.init == "gaussian":
                A.normal_(0.0, 1.0 / p.r, generator=generator)
            else:
                torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            if p.init is False:
                torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=generator)
        tensors = {"lora_A": A.to(dtype), "lora_B": B.to(dtype)}
        if p.lora_bias:
            tensors["lora_B_bias"] = torch.zeros(site.out_features, dtype=dtype)
        hyper = _hyper(site, p.r, p.alpha, p.rslora, p.dora, p.lora_bias, 1.0)
        a = SiteAdapter(self, site, hyper, tensors, _peft_keys(site, p.dora, p.lora_bias))
        if p.dora:
            a.tensors["lora_magnitude"] = _initial_magnitude(a, site.base_weight()).to(dtype)
        return a

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg = source.config
        dora, lora_bias = bool(cfg.get("use_dora")), bool(cfg.get("lora_bias"))
        _check_site(site, dora, lora_bias, CheckpointError, source.file)
        roles = _peft_keys(site, dora, lora_bias)
        tensors = {role: source.take(key) for role, key in roles.items()}
        source.refuse_others(roles.values(), f"a {site.op} LoRA site")
        r = tensors["lora_A"].shape[0] // site.experts  # a stack of experts: one rank-r block per expert
        r_cfg = pattern_value(cfg.get("rank_pattern") or {}, site.qualified_name, cfg.get("r", 8))
        if r != r_cfg:
            raise CheckpointError(
                f"{source.file}: {source.keys[roles['lora_A']]!r} has rank {r}, but adapter_config.json gives "
                f"{site.qualified_name} r={r_cfg}"
            )
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, site.qualified_name, cfg.get("lora_alpha", 8))
        hyper = _hyper(site, r, alpha, bool(cfg.get("use_rslora")), dora, lora_bias, scale)
        a = SiteAdapter(self, site, hyper, peft_keys=roles)
        expected = dict(zip(("lora_A", "lora_B"), _factor_shapes(site, r), strict=True))
        if lora_bias:
            expected["lora_B_bias"] = (site.out_features,)
        if dora:
            expected["lora_magnitude"] = _magnitude_shape(site)
        dtype = adapter_dtype(site.dtype)
        for role, tensor in tensors.items():
            source.check_shape(roles[role], tensor, expected[role], site)
            a.tensors[role] = tensor.to(dtype)
        return a

    # -- graph ----------------------------------------------------------------------------------------------

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        h, dtype = a.hyper, a.tensors["lora_A"].dtype
        if a.site.op == PARAMETER:  # the parameter as its uses will read it; the delta in its dtype, as PEFT
            return y + _delta(a, t, a.site.dtype, t.get("scaling", h["scaling"]))
        cast = dtype != a.site.dtype
        xa = x.to(dtype) if cast and a.site.op != "embedding" else x
        scaling = t.get("scaling", h["scaling"])  # a tensor once padded to max_rank, so a swap can change it
        if "lora_scale" in t:  # PEFT's scale_layer multiplies the scaling, so DoRA's norm sees it too
            scaling = scaling * t["lora_scale"]
        lora = _low_rank_path(a.site, xa, t["lora_A"], t["lora_B"], t.get("lora_B_bias")) * scaling
        if not h["dora"]:  # as PEFT: a half-precision output is added in float32 and rounded once
            return (y + lora).to(a.site.dtype) if cast else y + lora
        if cast:
            lora = lora.to(a.site.dtype)
        delta = _delta(a, t, a.site.dtype, scaling)
        g = dora_scale(t["lora_magnitude"].reshape(-1), a.site.logical(weight), delta, _norm_dims(a.site))
        g = g.reshape(_broadcast_shape(a.site))
        return dora_output(y, y if bias is None else y - bias.reshape(_broadcast_shape(a.site)), g, lora)

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        site = a.site
        delta = _delta(a, t, torch.float64)
        merged = _dense(site, site.logical(weight.double())) + delta  # a grouped conv merges as a dense one
        if a.hyper["dora"]:
            g = dora_scale(
                t["lora_magnitude"].double().reshape(-1), site.logical(raw_weight.double()), delta, _norm_dims(site)
            )
            merged = merged * g.reshape(_weight_broadcast(site))
        new_bias = bias
        changed = bias is not None and raw_bias is not None and not bias.is_meta and not torch.equal(bias, raw_bias)
        if a.hyper["dora"] and changed:
            # live, DoRA scales all of the bias but the raw one: so also what earlier adapters here added to it
            new_bias = (raw_bias.double() + g * (bias.double() - raw_bias.double())).to(bias.dtype)
        if a.hyper["lora_bias"]:
            new_bias = (bias.double() + a.hyper["scaling"] * t["lora_B_bias"].double()).to(bias.dtype)
        return _storage(site, merged).to(weight.dtype), new_bias

    def merge_into(
        self,
        a: SiteAdapter,
        out: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if a.hyper["dora"] or weight.is_meta or not (weight.is_contiguous() and out.is_contiguous()):
            return None  # DoRA's norm spans whole rows (or columns); a meta weight has nothing to write
        if a.site.experts > 1 or (a.site.op.startswith("conv") and a.site.conv_args["groups"] != 1):
            return None  # per-expert deltas, and a grouped conv's dense result, are no one low-rank product
        left, right = _storage_factors(a.site, t["lora_A"], t["lora_B"])
        add_low_rank(out.view(left.shape[0], -1), weight.view(left.shape[0], -1), left, right, a.hyper["scaling"])
        new_bias = bias
        if a.hyper["lora_bias"]:
            new_bias = (bias.double() + a.hyper["scaling"] * t["lora_B_bias"].double()).to(bias.dtype)
        return out, new_bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith(_BASE_MUTATING_INITS):
            raise CheckpointError(
                f"{file}: init_lora_weights={init!r} rewrites the base weights when loaded; convert the adapter "
                "to plain LoRA first (PEFT: save_pretrained(path_initial_model_for_weight_conversion=...))"
            )
        refuse_unknown(config, _HANDLED, "LoRA", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        first = uniform(adapters, ("rslora", "lora_bias"), "LoRA")
        dora = {a.hyper["dora"] for a in adapters}
        if len(dora) > 1:
            raise SpecError("save_adapter: PEFT cannot mix DoRA and plain LoRA sites in one adapter")
        modules = [a for a in adapters if a.site.op != PARAMETER]
        parameters = sorted(a.site.qualified_name for a in adapters if a.site.op == PARAMETER)
        return {
            "peft_type": "LORA",
            "target_modules": target_modules(modules) if modules else None,
            "target_parameters": parameters or None,
            "r": first["r"],
            "lora_alpha": first["alpha"],
            "rank_pattern": per_module(adapters, "r", first["r"]),
            "alpha_pattern": per_module(adapters, "alpha", first["alpha"]),
            "use_rslora": first["rslora"],
            "use_dora": dora.pop(),
            "lora_bias": first["lora_bias"],
            "bias": "none",
            "fan_in_fan_out": any(a.site.transposed for a in modules),
        }

    def additive(self, a: SiteAdapter) -> bool:
        return not a.hyper["dora"]

    def low_rank(self, a: SiteAdapter) -> LowRank:
        h, t = a.hyper, a.tensors
        return LowRank(
            t["lora_A"], t["lora_B"], h["r"], h["scaling"], h["rslora"], t.get("lora_B_bias"), t.get("lora_magnitude")
        )

    def from_factors(self, site: Site, A: torch.Tensor, B: torch.Tensor, scaling: float, rslora: bool) -> SiteAdapter:
        """A plain LoRA at ``site`` from matrix-form factors (``A [r, in·Πk]``, ``B [out, r]``; embeddings
        ``A [r, num]``, ``B [dim, r]``) with the given scaling; ``alpha`` is chosen so that PEFT's rule
        (``alpha/r``, or ``alpha/√r``) gives it back, so the adapter saves as an ordinary PEFT LoRA."""
        r = A.shape[0]
        a_shape, b_shape = _factor_shapes(site, r)
        alpha = scaling * (math.sqrt(r) if rslora else r)
        hyper = {**_hyper(site, r, alpha, rslora, False, False, 1.0), "scaling": scaling}
        tensors = {"lora_A": A.reshape(a_shape).contiguous(), "lora_B": B.reshape(b_shape).contiguous()}
        return SiteAdapter(self, site, hyper, tensors, _peft_keys(site, False, False))

    def pad(self, a: SiteAdapter, max_rank: int) -> SiteAdapter:
        r = a.hyper["r"]
        if r > max_rank:
            raise SpecError(f"{a.site.qualified_name} has rank {r}, more than max_rank {max_rank}")
        E = a.site.experts  # a stack pads each expert's block of ranks
        A, B = _ranks(a, "lora_A", a.tensors["lora_A"], r), _ranks(a, "lora_B", a.tensors["lora_B"], r)
        if E > 1:
            A = torch.cat([A.reshape(E, r, -1), A.new_zeros((E, max_rank - r, A.shape[1]))], 1).reshape(
                E * max_rank, -1
            )
            B = torch.cat([B.reshape(len(B), r, E), B.new_zeros((len(B), max_rank - r, E))], 1).reshape(len(B), -1)
        else:
            A = torch.cat([A, A.new_zeros((max_rank - r, *A.shape[1:]))])
            B = torch.cat([B, B.new_zeros((B.shape[0], max_rank - r, *B.shape[2:]))], 1)
        tensors = {**a.tensors, "lora_A": A, "lora_B": B, "scaling": torch.tensor(a.hyper["scaling"], dtype=A.dtype)}
        hyper = {**a.hyper, "max_rank": max_rank}
        return dataclasses.replace(a, hyper=hyper, tensors=tensors, frozen=a.frozen | {"scaling"})

    def runtime_hyper(self, a: SiteAdapter) -> frozenset[str]:
        return _RUNTIME if "max_rank" in a.hyper else frozenset()

    def saved_tensor(self, a: SiteAdapter, role: str, tensor: torch.Tensor) -> torch.Tensor:
        if "max_rank" not in a.hyper or role not in ("lora_A", "lora_B"):
            return tensor
        return _ranks(a, role, tensor, a.hyper["r"])


def _ranks(a: SiteAdapter, role: str, tensor: torch.Tensor, r: int) -> torch.Tensor:
    """The first ``r`` ranks of a factor (of each expert's block in a stack): a padded adapter trimmed back."""
    E = a.site.experts
    if E == 1:
        return tensor[:r] if role == "lora_A" else tensor[:, :r]
    if role == "lora_A":  # expert-major rows
        return tensor.reshape(E, -1, tensor.shape[1])[:, :r].reshape(E * r, -1)
    return tensor.reshape(len(tensor), -1, E)[:, :r].reshape(len(tensor), r * E)  # expert-minor columns


_RUNTIME = frozenset({"r", "alpha", "rslora", "scaling", "scale"})  # what a padded adapter holds in tensors


# Fields read here, and fields that shape training only (the stored tensors say everything inference needs).
_HANDLED = frozenset(
    {
        "r",
        "lora_alpha",
        "use_rslora",
        "use_dora",
        "lora_bias",
        "rank_pattern",
        "alpha_pattern",
        "bias",
        "fan_in_fan_out",
        "init_lora_weights",
        "lora_dropout",
        "megatron_core",
        "qalora_group_size",
        "runtime_config",
        "eva_config",
        "velora_config",
        "monteclora_config",
        "loftq_config",
    }
)
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class Dora(Lora):
    """``type: dora`` is LoRA with ``dora: true``."""

    name = "dora"
    peft_types = ()
    Params = DoraParams


# -- helpers ---------------------------------------------------------------------------------------------------


def _hyper(site: Site, r: int, alpha: float, rslora: bool, dora: bool, lora_bias: bool, scale: float) -> dict:
    scaling = (alpha / math.sqrt(r) if rslora else alpha / r) * scale
    return {
        "r": r,
        "alpha": alpha,
        "rslora": rslora,
        "dora": dora,
        "lora_bias": lora_bias,
        "scaling": scaling,
        "scale": scale,
    }


def _check_site(site: Site, dora: bool, lora_bias: bool, error: type[Exception], where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    if site.op == PARAMETER and (dora or lora_bias or len(site.weight_shape) not in (2, 3)):
        raise error(
            f"{prefix}LoRA on a parameter takes a 2-D or 3-D one, without DoRA or lora_bias ({site.describe()})"
        )
    if site.op.startswith("conv") and site.conv_args["groups"] != 1 and dora:
        raise error(f"{prefix}DoRA on a grouped conv ({site.describe()}) is not supported (nor by PEFT)")
    if lora_bias and (dora or site.op == "embedding"):
        raise error(f"{prefix}lora_bias is not supported with DoRA or on embeddings ({site.describe()})")


def _factor_shapes(site: Site, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if site.op == PARAMETER:
        return (r * site.experts, site.in_features), (site.out_features, r * site.experts)
    if site.op == "embedding":
        num, dim = site.weight_shape
        return (r, num), (dim, r)
    out, inp, *kernel = site.weight_shape
    groups = site.conv_args["groups"] if site.op.startswith("conv") else 1
    if r % groups:
        raise SpecError(f"rank {r} is not divisible by the {groups} groups of {site.describe()} (PEFT needs it too)")
    # a grouped conv: A reads every input channel, B maps each group's r/groups ranks to that group's outputs
    return (r, inp * groups, *kernel), (out, r // groups, *[1] * len(kernel))


def _magnitude_shape(site: Site) -> tuple[int, ...]:
    if site.op.startswith("conv"):
        return (1, site.out_features, *[1] * (len(site.weight_shape) - 2))
    return (site.out_features,)


def _peft_keys(site: Site, dora: bool, lora_bias: bool) -> dict[str, str]:
    if site.op == "embedding":
        keys = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
    else:
        keys = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    if lora_bias:
        keys["lora_B_bias"] = "lora_B.bias"
    if dora:
        keys["lora_magnitude"] = "lora_magnitude_vector"
    return keys


def _low_rank_path(site: Site, x: Any, A: Any, B: Any, B_bias: Any) -> Any:
    if site.op == "linear":
        return F.linear(F.linear(x, A), B, B_bias)
    if site.op == "embedding":
        return F.embedding(x, A.t()) @ B.t()
    conv, c = _CONV[site.op], site.conv_args
    return conv(conv(x, A, None, c["stride"], c["padding"], c["dilation"]), B, B_bias, groups=c["groups"])


def _delta(a: SiteAdapter, t: Mapping[str, Any], dtype: torch.dtype, scaling: Any = None) -> Any:
    """ΔW in logical layout (``[out, in, *k]``; embeddings ``[num, dim]``), scaled by ``scaling`` (default: the
    exact float; the live graph passes the tensor a padded adapter reads, so a swap changes it)."""
    A, B = t["lora_A"].to(dtype), t["lora_B"].to(dtype)
    s = a.hyper["scaling"] if scaling is None else scaling
    if a.site.op == "embedding":
        return (B @ A).t() * s
    if a.site.op == "linear" or (a.site.op == PARAMETER and len(a.site.weight_shape) == 2):
        return (B @ A) * s
    if a.site.op == PARAMETER:  # per expert: A [E·r, in] expert-major, B [out, r·E] expert-minor
        experts = a.site.experts
        per_expert = torch.einsum(
            "ore,eri->eoi", B.reshape(B.shape[0], -1, experts), A.reshape(experts, -1, A.shape[1])
        )
        return (per_expert.transpose(1, 2) if a.site.transposed else per_expert) * s
    groups = a.site.conv_args["groups"]
    if groups == 1:
        return (B.flatten(1) @ A.flatten(1)).reshape(a.site.weight_shape) * s
    # grouped: output o of group g sums its group's ranks of A, which reads all input channels (a dense delta)
    out, _, *kernel = a.site.weight_shape
    per_group = torch.einsum(
        "goj,gjk->gok", B.reshape(groups, out // groups, -1), A.reshape(groups, A.shape[0] // groups, -1)
    )
    return per_group.reshape(out, A.shape[1], *kernel) * s


def _dense(site: Site, weight: torch.Tensor) -> torch.Tensor:
    """A grouped conv's weight as the block-diagonal dense one (``groups=1``) that computes the same."""
    groups = site.conv_args["groups"] if site.op.startswith("conv") else 1
    if groups == 1:
        return weight
    out, per_group, *kernel = weight.shape
    dense = weight.new_zeros((out, per_group * groups, *kernel))
    rows = out // groups
    for g in range(groups):
        dense[g * rows : (g + 1) * rows, g * per_group : (g + 1) * per_group] = weight[g * rows : (g + 1) * rows]
    return dense


def _storage_factors(site: Site, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``L``, ``R`` with ``ΔW / s = L @ R`` in the weight's storage layout, flattened to 2-D (rows of storage)."""
    if site.op == "embedding" or site.transposed:  # storage [num, dim] = (B @ A)ᵀ; Conv1D stores Wᵀ
        return A.flatten(1).t(), B.flatten(1).t()
    return B.flatten(1), A.flatten(1)


def _storage(site: Site, weight: torch.Tensor) -> torch.Tensor:
    return weight.t().contiguous() if site.transposed and site.op != PARAMETER else weight


def _norm_dims(site: Site) -> int | tuple[int, ...]:
    if site.op == "embedding":
        return 0
    return 1 if site.op == "linear" else tuple(range(1, len(site.weight_shape)))


def _broadcast_shape(site: Site) -> tuple[int, ...]:
    """Shape that lines a per-output vector up with the site's output."""
    if site.op.startswith("conv"):
        return (1, -1, *[1] * (len(site.weight_shape) - 2))
    return (-1,)


def _weight_broadcast(site: Site) -> tuple[int, ...]:
    if site.op == "embedding":
        return (1, -1)
    return (-1, *[1] * (len(site.weight_shape) - 1))


def dora_scale(magnitude: Any, weight: Any, delta: Any, dim: Any) -> Any:
    """DoRA's rescale of each output unit, ``m / ‖W + ΔW‖`` (``weight`` and ``delta`` in one layout, the norm over
    ``dim``). The norm is detached, as in PEFT: training does not differentiate through it."""
    return magnitude / torch.linalg.vector_norm(weight + delta, dim=dim).detach()


def dora_output(y: Any, base: Any, g: Any, lora: Any) -> Any:
    """DoRA's live output from the base output ``y``, the same without the bias ``base``, the scale ``g`` and the
    LoRA path ``lora``: ``g · (base + lora)`` plus the bias, written as an update of ``y``."""
    return y + (g - 1) * base + g * lora


def _initial_magnitude(a: SiteAdapter, weight: torch.Tensor) -> torch.Tensor:
    delta = _delta(a, a.tensors, torch.float64).to(weight.device)
    norm = torch.linalg.vector_norm(a.site.logical(weight.double()) + delta, dim=_norm_dims(a.site))
    return norm.reshape(_magnitude_shape(a.site))
