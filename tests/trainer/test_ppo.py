"""GAE, the PPO loss and the learning-rate schedule, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from trainer.ppo import Batch, RunningMeanStd, compute_gae, decayed_lr_factor, ppo_loss
from trainer.rollout import Rollout
from trmrl.model import ModelConfig, TrMRL, log_prob


def _rollout(
    rewards: list[list[float]], values: list[list[float]], lengths: list[int], last: list[float]
) -> Rollout:
    r = torch.tensor(rewards).T  # given per env, stored [T, E]
    v = torch.tensor(values).T
    steps, envs = r.shape
    valid = torch.arange(steps).unsqueeze(1) < torch.tensor(lengths).unsqueeze(0)
    z = torch.zeros(steps, envs)
    return Rollout(
        windows=torch.zeros(steps, envs, 1, 1),
        newest=torch.zeros(steps, envs, dtype=torch.long),
        actions=torch.zeros(steps, envs, 1),
        log_probs=z,
        values=v,
        rewards=r,
        valid=valid,
        lengths=torch.tensor(lengths),
        last_values=torch.tensor(last),
        episode=torch.zeros(steps, envs, dtype=torch.long),
        episode_step=torch.zeros(steps, envs, dtype=torch.long),
        success=torch.zeros(envs, 1),
    )


def _reference_gae(
    rewards: list[float], values: list[float], last: float, gamma: float, lam: float
) -> list[float]:
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else last
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


def test_gae_over_whole_trials_with_bootstrap_and_ragged_ends() -> None:
    gamma, lam = 0.9, 0.8
    rewards = [[1.0, 0.5, -1.0, 2.0], [0.3, 0.1, 0.0, 0.0]]
    values = [[0.2, 0.4, 0.1, 0.3], [1.0, -0.5, 9.0, 9.0]]
    lengths, last = [4, 2], [0.7, 0.0]  # env 0 cut by the time limit (bootstrap), env 1 terminated early
    adv, ret = compute_gae(_rollout(rewards, values, lengths, last), gamma, lam)
    for e in range(2):
        n = lengths[e]
        expected = _reference_gae(rewards[e][:n], values[e][:n], last[e], gamma, lam)
        torch.testing.assert_close(adv[:n, e], torch.tensor(expected))
        torch.testing.assert_close(ret[:n, e], torch.tensor(expected) + torch.tensor(values[e][:n]))
        assert torch.count_nonzero(adv[n:, e]) == 0  # nothing leaks past an env's trial end


def test_reward_scale_credits_scaled_rewards() -> None:
    gamma, lam, scale = 0.9, 0.8, 0.1
    rewards = [[1.0, 0.5, -1.0, 2.0], [0.3, 0.1, 0.0, 0.0]]
    values = [[0.2, 0.4, 0.1, 0.3], [1.0, -0.5, 9.0, 9.0]]
    lengths, last = [4, 2], [0.7, 0.0]
    adv, ret = compute_gae(_rollout(rewards, values, lengths, last), gamma, lam, reward_scale=scale)
    for e in range(2):
        n = lengths[e]
        scaled = [scale * r for r in rewards[e][:n]]
        expected = _reference_gae(scaled, values[e][:n], last[e], gamma, lam)
        torch.testing.assert_close(adv[:n, e], torch.tensor(expected))
        torch.testing.assert_close(ret[:n, e], torch.tensor(expected) + torch.tensor(values[e][:n]))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_a_reward_scale_that_is_not_positive_is_refused(scale: float) -> None:
    from trainer.config import TrainConfig

    with pytest.raises(ValueError, match="reward_scale must be a finite number > 0"):
        TrainConfig(reward_scale=scale)


def test_bootstrap_value_matters_only_at_the_cut() -> None:
    a, _ = compute_gae(_rollout([[1.0, 1.0]], [[0.0, 0.0]], [2], [0.0]), 0.9, 1.0)
    b, _ = compute_gae(_rollout([[1.0, 1.0]], [[0.0, 0.0]], [2], [10.0]), 0.9, 1.0)
    torch.testing.assert_close(b[1] - a[1], torch.tensor([9.0]))
    torch.testing.assert_close(b[0] - a[0], torch.tensor([8.1]))


def test_ppo_loss_is_the_clipped_objective() -> None:
    cfg = ModelConfig.from_preset("small", obs_dim=2, act_dim=1)
    net = TrMRL(cfg)
    windows = torch.randn(6, cfg.window, cfg.token_dim)
    newest = torch.full((6,), cfg.window - 1)
    with torch.no_grad():
        out = net(windows, newest)
    actions = out.mean + torch.randn(6, 1) * 0.3
    old = log_prob(out, actions).detach() + torch.tensor([0.5, -0.5, 0.0, 0.05, -0.05, 0.3])
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0, -2.0, -1.0])
    ret = torch.randn(6)
    loss, stats = ppo_loss(net, Batch(windows, newest, actions, old, adv, ret), 0.2, 0.5, False)
    with torch.no_grad():
        ratio = torch.exp(log_prob(net(windows, newest), actions) - old)
        surrogate = torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        value_loss = 0.5 * (net(windows, newest).value - ret).pow(2).mean()
    torch.testing.assert_close(loss, -surrogate.mean() + 0.5 * value_loss)
    assert stats["clip_fraction"].item() == pytest.approx(((ratio - 1).abs() > 0.2).float().mean().item())


def test_lr_decay_is_geometric_between_the_updates() -> None:
    assert decayed_lr_factor(0, 0.1, 100, 750) == 1.0
    assert decayed_lr_factor(100, 0.1, 100, 750) == 1.0
    assert decayed_lr_factor(425, 0.1, 100, 750) == pytest.approx(0.1**0.5)
    assert decayed_lr_factor(750, 0.1, 100, 750) == pytest.approx(0.1)
    assert decayed_lr_factor(5000, 0.1, 100, 750) == pytest.approx(0.1)


def test_running_mean_std_merges_batches_exactly() -> None:
    data = torch.randn(1000, 3, dtype=torch.float64) * 3 + 1
    stats = RunningMeanStd(3)
    for chunk in data.split(137):
        stats.update(chunk.mean(0), chunk.var(0, unbiased=False), len(chunk))
    torch.testing.assert_close(stats.mean, data.mean(0))
    torch.testing.assert_close(stats.var, data.var(0, unbiased=False))
