"""AdaMSS (PEFT ``adamss``) on nn.Linear: low-rank updates inside groups of output rows found from the base weight.

Math (``W`` is ``[out, in]``; with a bias, ``W' = [W | b]`` and ``x' = [x, 1]``, else ``W' = W``, ``x' = x``):

* ``U, _, V = svd_lowrank(W' in float32, q=R, niter=2)`` right after ``manual_seed(random_seed)``, with
  ``R = min(r, out, in')``; KMeans (scikit-learn, ``init="random"``, one run, 10 iterations, PEFT's fixed
  ``random_state``) on the rows of ``U`` splits the output rows into ``K = min(num_subspaces, out)`` groups
  ``g_k`` (ascending row numbers). ``newB = Vᵀ`` (``[R, in']``) is frozen.
* ``y[..., g_k] += B_k A_k newB x'`` for every group (``A_k``: ``[r_k, R]``, ``B_k``: ``[|g_k|, r_k]``).
  Merge: ``W'[g_k] += B_k A_k newB``, i.e. the weight and, through the last column, the bias.

The checkpoint holds ``A_k``, ``B_k`` and ``newB`` but not the groups: PEFT recomputes them when it loads the
adapter, from the base weight, so this kind does the same (and so needs scikit-learn). A checkpoint whose
group sizes differ from that recomputation (other base weights, another scikit-learn) is refused, where
PEFT would silently add each row's update to other rows.

Fresh adapters start like PEFT's: ``A_k = Qᵀ`` from the QR of ``U[g_k]ᵀ`` times the top singular vectors of
``U[g_k] U[g_k]ᵀ``, ``B_k = 0`` (so the adapter is the identity), or ``B_k ~ 0.01 N(0, 1)`` with ``init: false``.

Divergence from PEFT, on purpose: for float16/bfloat16 models the adapter tensors are kept in float32 (PEFT
keeps them, and computes, in the base dtype).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CheckpointError, SpecError
from ..sites import Site
from ..sizes import Seed
from .base import AdapterKind, PeftSource, SiteAdapter, adapter_dtype, refuse_unknown, target_modules, uniform

_KMEANS_SEED = 123456789  # PEFT's fixed KMeans random_state
_KMEANS_ITERATIONS = 10


class AdamssParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(100, gt=0, description="total SVD rank R (clamped to min(out, in + bias) per site)")
    num_subspaces: int = Field(5, gt=0, description="number K of output-row groups (clamped to out)")
    subspace_rank: int = Field(1, gt=0, description="rank of each group's update (B_k A_k)")
    random_seed: Seed = Field(0, description="seed of the randomized SVD the groups are found from")
    dynamic_rank: bool = Field(
        False, description="rank per group from its singular values (PEFT's use_dynamic_rank), capped by subspace_rank"
    )
    svd_threshold: float = Field(0.1, description="dynamic_rank keeps singular values above this times the largest")
    init: bool = Field(True, description="true: B = 0 (identity at init); false: B ~ 0.01 N(0, 1)")


class Adamss(AdapterKind):
    name = "adamss"
    peft_types = ("ADAMSS",)
    peft_prefix = "adamss_"
    ops = frozenset({"linear"})
    Params = AdamssParams

    def site_problem(self, site: Site) -> str | None:
        return _site_problem(site)

    # -- construction -------------------------------------------------------------------------------------------

    def create(self, site: Site, params: BaseModel, generator: torch.Generator, prepared: Any = None) -> SiteAdapter:
        p: AdamssParams = params
        U, V, groups = _decompose(site, p.r, p.num_subspaces, p.random_seed, SpecError)
        dtype = adapter_dtype(site.dtype)
        tensors = {"newB": V.t().contiguous().to(dtype)}
        ranks = []
        with _seeded(generator):
            for k, rows in enumerate(groups):
                S = U[rows]  # [|g_k|, R], float32 as in PEFT
                gram = S @ S.t()
                rank = min(len(rows), p.subspace_rank)
                if p.dynamic_rank:
                    _, s, _ = torch.svd_lowrank(gram, q=min(gram.shape), niter=2)
                    rank = min(int((s > p.svd_threshold * s[0]).sum()), p.subspace_rank, len(s))
                rank = max(rank, 1)
                top, _, _ = torch.svd_lowrank(gram, q=min(len(rows), rank), niter=2)
                Q, _ = torch.linalg.qr(S.t() @ top[:, :rank], mode="reduced")
                if p.init:
                    B = torch.zeros(len(rows), rank, dtype=torch.float64)
                else:
                    B = torch.randn(len(rows), rank, generator=generator, dtype=torch.float64) * 0.01
                tensors[f"A_{k}"] = Q.t().contiguous().to(dtype)
                tensors[f"B_{k}"] = B.to(dtype)
                ranks.append(rank)
        hyper = _hyper(site, p.r, p.num_subspaces, p.random_seed, groups, ranks, 1.0)
        hyper |= {"subspace_rank": p.subspace_rank, "dynamic_rank": p.dynamic_rank, "svd_threshold": p.svd_threshold}
        return SiteAdapter(self, site, hyper, tensors, _peft_keys(len(groups)), frozen=frozenset({"newB"}))

    def from_peft(self, site: Site, source: PeftSource, scale: float) -> SiteAdapter:
        cfg, file = source.config, source.file
        r, num_subspaces = int(cfg.get("r", 100)), int(cfg.get("num_subspaces", 5))
        seed = int(cfg.get("random_seed", 0))
        _, V, groups = _decompose(site, r, num_subspaces, seed, CheckpointError, file)
        roles = _peft_keys(len(groups))
        tensors = {role: source.take(key) for role, key in roles.items()}
        extra = set(source.tensors) - set(roles.values())
        if extra:
            key = source.keys[sorted(extra)[0]]
            raise CheckpointError(
                f"{file}: unexpected tensor {key!r} for an AdaMSS site with {len(groups)} subspaces ({site.describe()})"
            )

        def bad(role: str, expected: str) -> CheckpointError:
            shape = list(tensors[role].shape)
            return CheckpointError(
                f"{file}: {source.keys[roles[role]]!r} has shape {shape}, expected {expected} for {site.describe()}"
            )

        R, width = V.shape[1], V.shape[0]
        if tuple(tensors["newB"].shape) != (R, width):
            raise bad("newB", str([R, width]))
        ranks = []
        for k, rows in enumerate(groups):
            A, B = tensors[f"A_{k}"], tensors[f"B_{k}"]
            if A.ndim != 2 or A.shape[1] != R or A.shape[0] < 1:
                raise bad(f"A_{k}", f"[rank, {R}]")
            rank = A.shape[0]
            if B.ndim != 2 or B.shape[1] != rank:
                raise bad(f"B_{k}", f"[rows, {rank}]")
            if B.shape[0] != len(rows):
                raise CheckpointError(
                    f"{file}: {source.keys[roles[f'B_{k}']]!r} has {B.shape[0]} rows, but PEFT's clustering of "
                    f"{site.describe()} (KMeans on its SVD, recomputed at load) puts {len(rows)} output rows in "
                    f"subspace {k}: the adapter was made for other base weights or with another scikit-learn "
                    f"({_sklearn_version()})"
                )
            ranks.append(rank)
        dtype = adapter_dtype(site.dtype)
        hyper = _hyper(site, r, num_subspaces, seed, groups, ranks, scale)
        hyper |= {
            "subspace_rank": int(cfg.get("subspace_rank", 1)),
            "dynamic_rank": bool(cfg.get("use_dynamic_rank", False)),
            "svd_threshold": float(cfg.get("svd_threshold", 0.1)),
        }
        tensors = {role: tensor.to(dtype) for role, tensor in tensors.items()}
        return SiteAdapter(self, site, hyper, tensors, roles, frozen=frozenset({"newB"}))

    # -- graph ----------------------------------------------------------------------------------------------

    def forward(self, a: SiteAdapter, x: Any, y: Any, weight: Any, bias: Any, t: Mapping[str, Any]) -> Any:
        h, dtype = a.hyper, a.tensors["newB"].dtype
        cast = dtype != a.site.dtype
        xa = x.to(dtype) if cast else x
        newB, n_in = t["newB"], a.site.in_features
        projected = F.linear(xa, newB[:, :n_in], newB[:, n_in]) if h["bias_column"] else F.linear(xa, newB)
        chunks = [F.linear(F.linear(projected, t[f"A_{k}"]), t[f"B_{k}"]) for k in range(len(h["ranks"]))]
        delta = torch.cat(chunks, dim=-1)  # columns in group order
        if h["order"] != list(range(len(h["order"]))):
            delta = delta.index_select(-1, x.new_tensor(h["order"], dtype=torch.long))  # back to row order
        if h["scale"] != 1.0:
            delta = delta * h["scale"]
        if cast:
            delta = delta.to(a.site.dtype)
        return y + delta

    def merge(
        self,
        a: SiteAdapter,
        weight: torch.Tensor,
        raw_weight: torch.Tensor,
        bias: torch.Tensor | None,
        raw_bias: torch.Tensor | None,
        t: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, n_in = a.hyper, a.site.in_features
        newB = t["newB"].detach().double()
        factors = [(t[f"B_{k}"].detach().double(), t[f"A_{k}"].detach().double()) for k in range(len(h["ranks"]))]
        rows = torch.cat([B @ A for B, A in factors])
        delta = (rows @ newB)[torch.tensor(h["order"], device=newB.device)] * h["scale"]  # [out, in'], row order
        merged = (weight.double() + delta[:, :n_in].to(weight.device)).to(weight.dtype)
        if h["bias_column"]:
            bias = (bias.double() + delta[:, n_in].to(bias.device)).to(bias.dtype)
        return merged, bias

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        refuse_unknown(config, _HANDLED, "AdaMSS", file)

    def peft_config(self, adapters: Sequence[SiteAdapter]) -> dict[str, Any]:
        fields = ("r", "num_subspaces", "subspace_rank", "random_seed", "dynamic_rank", "svd_threshold")
        first = uniform(adapters, fields, "AdaMSS", " (it has no patterns)")
        return {
            "peft_type": "ADAMSS",
            "target_modules": target_modules(adapters),
            "r": first["r"],
            "num_subspaces": first["num_subspaces"],
            "subspace_rank": first["subspace_rank"],
            "random_seed": first["random_seed"],
            "use_dynamic_rank": first["dynamic_rank"],
            "svd_threshold": first["svd_threshold"],
            "init_weights": "orthogonal",
            "use_asa": False,
        }

    def additive(self, a: SiteAdapter) -> bool:
        return True


# Fields read here; ASA and the init fields shape training only (the stored tensors say everything inference needs;
# with use_dynamic_rank the ranks are read from the tensors).
_HANDLED = frozenset(
    {
        "r",
        "num_subspaces",
        "subspace_rank",
        "random_seed",
        "init_weights",
        "use_dynamic_rank",
        "svd_threshold",
        "use_asa",
        "asa_target_subspaces",
        "init_warmup",
        "final_warmup",
        "mask_interval",
        "asa_importance_beta",
        "asa_uncertainty_beta",
        "asa_schedule_exponent",
    }
)


# -- helpers ---------------------------------------------------------------------------------------------------


def _site_problem(site: Site) -> str | None:
    if site.op != "linear" or site.transposed:
        return f"AdaMSS supports torch.nn.Linear only, as PEFT does ({site.describe()})"
    if site.bias is not None and site.bias.op != "get_attr":
        return f"AdaMSS needs the bias of {site.describe()} as a constant (it is clustered with W)"
    return None


def _hyper(
    site: Site, r: int, num_subspaces: int, seed: int, groups: list[list[int]], ranks: list[int], scale: float
) -> dict[str, Any]:
    order = [0] * site.out_features  # output row -> its column in the concatenation of the groups
    for j, row in enumerate(row for rows in groups for row in rows):
        order[row] = j
    return {
        "r": r,
        "num_subspaces": num_subspaces,
        "random_seed": seed,
        "ranks": ranks,
        "sizes": [len(rows) for rows in groups],
        "order": order,
        "bias_column": site.bias is not None,
        "scale": scale,
    }


def _peft_keys(count: int) -> dict[str, str]:
    keys = {"newB": "adamss_newB"}
    for k in range(count):
        keys[f"A_{k}"] = f"adamss_A.{k}"
        keys[f"B_{k}"] = f"adamss_B.{k}"
    return keys


def _sklearn_version() -> str:
    try:
        import sklearn
    except ImportError:
        return "scikit-learn not installed"
    return f"scikit-learn {sklearn.__version__} here"


def _decompose(
    site: Site, r: int, num_subspaces: int, seed: int, error: type[Exception], where: str = ""
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """PEFT's load-time recomputation: ``U`` ([out, R]) and ``V`` ([in', R]) of ``[W | b]``, and the row groups."""
    prefix = f"{where}: " if where else ""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise error(
            f"{prefix}AdaMSS at {site.describe()} needs scikit-learn: PEFT recomputes its subspaces with KMeans when "
            "it loads the adapter, and so does peftfx (pip install scikit-learn, or pip install peftfx[adamss])"
        ) from None
    weight = site.base_weight().detach()
    if site.bias is not None:
        weight = torch.cat((weight, site.base_bias().detach().unsqueeze(1)), dim=1)
    weight = weight.to(torch.float32).contiguous()
    out, width = weight.shape
    R = min(r, out, width)
    device = weight.device
    fork: dict[str, Any] = {"devices": []}
    if device.type != "cpu":
        fork = {"devices": [device], "device_type": device.type}
    with torch.random.fork_rng(**fork):  # PEFT seeds the RNG of the weight's device, then restores it
        if device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        U, _, V = torch.svd_lowrank(weight, q=R, niter=2)
    U, V = U[:, :R].contiguous(), V[:, :R]
    k = min(num_subspaces, out)
    kmeans = KMeans(n_clusters=k, init="random", n_init=1, max_iter=_KMEANS_ITERATIONS, random_state=_KMEANS_SEED)
    labels = kmeans.fit_predict(U.cpu().numpy().astype("float32")).tolist()
    groups = [[row for row, label in enumerate(labels) if label == i] for i in range(k)]
    if any(not rows for rows in groups):
        empty = next(i for i, rows in enumerate(groups) if not rows)
        raise error(
            f"{prefix}AdaMSS at {site.describe()}: KMeans left subspace {empty} of {k} empty, which PEFT cannot load "
            "either; use fewer num_subspaces"
        )
    return U, V, groups


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None) -> Iterator[None]:
    """PEFT draws its init's randomized SVDs from the global RNG; drawn here from ``generator`` when one is given."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
