"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MUJOCO_GL", "disable")


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    import torch

    torch.manual_seed(0)
