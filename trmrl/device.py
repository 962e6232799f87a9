"""Which device a run or a service uses: the one rule for ``auto``, ``cpu`` and ``cuda``."""

from __future__ import annotations

import torch


def resolve_device(choice: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; asking for CUDA without one is an error.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {choice!r} asked for, but no CUDA device is available")
    return device
