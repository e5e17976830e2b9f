"""PVeRA on Linear and transformers Conv1D: VeRA whose A has 2r rows, read as a mean and a log-variance.

``h = λ_d ⊙ (A_s x)`` splits into ``μ`` (the first r entries) and ``log σ²``. At inference PEFT uses ``z = μ`` (no
sampling), so ``y += s · λ_b ⊙ (B_s μ)``: VeRA with ``A[:r]`` and ``λ_d[:r]``, and that is also PEFT's merge. The
log-variance half is kept (and saved back) untouched.

``sample_at_inference: true`` draws noise on every call, which a deterministic graph or a merge cannot express,
so it is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from ..errors import CheckpointError
from .base import SiteAdapter, refuse_unknown
from .vera import HANDLED as VERA_HANDLED
from .vera import Vera, VeraParams


class PveraParams(VeraParams):
    r: int = Field(256, gt=0, description="rank: A has 2r rows (mean and log-variance), B has r columns")


class Pvera(Vera):
    name = "pvera"
    peft_types = ("PVERA",)
    peft_prefix = "pvera_lambda_"
    Params = PveraParams
    _shared = ("pvera_A", "pvera_B")
    _rows = 2

    def _factors(self, a: SiteAdapter, t: Mapping[str, Any]) -> tuple[Any, Any, Any]:
        r = a.hyper["r"]  # the mean half only: z = μ at inference
        return t["A"][:r, : a.site.in_features], t["B"][: a.site.out_features, :], t["lambda_d"][:r]

    def check_peft_config(self, config: Mapping[str, Any], file: str) -> None:
        if config.get("sample_at_inference"):
            raise CheckpointError(
                f"{file}: sample_at_inference=true draws fresh noise on every call; peftfx builds a deterministic "
                "graph (and PEFT cannot merge it either), so it is refused"
            )
        refuse_unknown(config, _HANDLED, self.name, file)


# As VeRA's (its dropout named for PVeRA), plus the sampling fields, neutral when sample_at_inference is false
# (checked above).
_HANDLED = VERA_HANDLED - {"vera_dropout"} | {"pvera_dropout", "sample_at_inference", "generator_seed"}
