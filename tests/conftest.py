"""The suite runs on two shared CPU cores: one thread per test process, a fixed seed per test."""

from __future__ import annotations

import warnings

import pytest
import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
