"""What the trial-context tests share: a cached step checked against a full causal re-encode."""

from __future__ import annotations

import torch

from trmrl.model import TrMRL
from trmrl.slot_pool import PoolStep


def assert_step_equals_full_re_encode(
    net: TrMRL, context: list[torch.Tensor], result: PoolStep, row: int
) -> None:
    """Row ``row`` of a pool step (its policy mean and value) equals ``net`` run over the whole
    ``context`` -- every working memory the session's context holds, the newest last -- to float
    tolerance."""
    window = torch.stack(context).unsqueeze(0)
    with torch.no_grad():
        full = net(window, torch.tensor([window.shape[1] - 1]))
    torch.testing.assert_close(result.output.mean[row], full.mean[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.output.value[row], full.value[0], atol=1e-5, rtol=1e-5)
