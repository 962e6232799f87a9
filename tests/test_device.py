"""Device resolution, the one rule the trainer and the service share."""

from __future__ import annotations

import pytest
import torch

from trmrl.device import resolve_device


def test_cuda_is_refused_where_there_is_none() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu")


def test_a_named_device_is_taken_as_it_is() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
