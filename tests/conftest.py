"""The suite runs on two shared CPU cores: one thread per test process, fixed seeds, reproducible examples."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(1)
# the capture cache of the suite's processes (xdist workers inherit it) is one temporary folder, never the user's home
if "PEFTFX_CACHE_DIR" not in os.environ:
    os.environ["PEFTFX_CACHE_DIR"] = tempfile.mkdtemp(prefix="peftfx-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PEFTFX_CACHE_DIR"], ignore_errors=True)
# CI gates on this suite: property tests draw the same examples every run, so a run is reproducible
settings.register_profile("peftfx", derandomize=True)
settings.load_profile("peftfx")
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
