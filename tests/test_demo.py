"""``make demo`` runs offline to its verdict: three PEFT LoRAs, a TIES fold, merge, verify, ONNX, one table."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_the_demo_runs_and_verifies():
    done = subprocess.run([sys.executable, "-m", "peftfx.demo"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "verified: live and merged match PEFT" in out
    for row in ("live vs PEFT", "merged vs PEFT merged", "TIES fold, merged", "ONNX of the merged"):
        assert row in out
    assert "FAIL" not in out
