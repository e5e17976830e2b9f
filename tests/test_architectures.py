"""The architecture matrix (tests/architectures.py): each model's PEFT LoRA, live and merged, from one capture.

Tolerance: the issue's bar, the largest difference within 1e-5 of the reference's largest magnitude (float32;
the merged weights are rounded once from float64 where PEFT adds in float32, a few ulps apart).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from architectures import ARCHS, measure, readme_rows

README = (Path(__file__).parent.parent / "README.md").read_text()
REL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert error <= REL * scale, f"{what}: max abs error {error:.3g} > {REL} x {scale:.3g}"


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_architecture_matches_peft(arch, tmp_path):
    row, out = measure(arch, tmp_path / "peft")
    assert float((out.peft_live - out.base).abs().max()) > 1e-3 * float(out.base.abs().max()), "the LoRA moves nothing"
    _close(out.live, out.peft_merged if arch.live_oracle == "merged" else out.peft_live, f"{arch.name} live vs PEFT")
    _close(out.merged, out.peft_merged, f"{arch.name} merged vs PEFT merged")
    stated = readme_rows(README).get(arch.name)
    assert stated == (arch.family, row.sites, row.adapted), (
        f"README's row for {arch.name} is stale: run python tests/architectures.py --write README.md"
    )


def test_readme_lists_exactly_the_matrix():
    assert list(readme_rows(README)) == [a.name for a in ARCHS]
    families = {a.family for a in ARCHS}
    assert {"decoder", "MoE decoder", "encoder", "encoder-decoder", "vision", "speech", "state-space"} <= families
    assert sum(a.family != "diffusion" for a in ARCHS) >= 30
