"""What the sequence-model tests share: a cached step checked against a full causal re-encode, and
one PPO update over whole sequences."""

from __future__ import annotations

import torch

from trainer.config import TrainConfig
from trainer.ppo import SequenceBatch, make_optimizers, ppo_update, update_settings
from trmrl.model import TrMRL
from trmrl.networks import Network
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


def parameters_moved_by_update(net: Network, batch: SequenceBatch, minibatch_size: int) -> set[str]:
    """The names of ``net``'s parameters and buffers one PPO update on ``batch`` changed (two epochs,
    normalised advantages), after checking that its statistics are sane."""
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stats = ppo_update(
        net,
        make_optimizers(net, 3e-4, 1e-3, 0.0),
        batch,
        generator=torch.Generator().manual_seed(0),
        **update_settings(TrainConfig(normalize_advantages=True), epochs=2, minibatch_size=minibatch_size),
    )
    assert stats.approx_kl >= 0 and stats.value_loss > 0
    return {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
