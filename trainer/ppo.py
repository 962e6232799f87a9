"""PPO as TrMRL trains it: GAE over whole trials, the clipped objective, minibatches of stored windows.

There is no backpropagation through time: every stored step carries the window the policy read, so a
minibatch is just a set of windows re-evaluated independently.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from trainer.rollout import Rollout
from trmrl.model import TrMRL, log_prob


class Batch(NamedTuple):
    """Flattened valid steps of a rollout, ready for minibatching."""

    windows: Tensor
    newest: Tensor
    actions: Tensor
    old_log_probs: Tensor
    advantages: Tensor
    returns: Tensor

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def take(self, index: Tensor) -> Batch:
        return Batch(*(t[index] for t in self))


class UpdateStats(NamedTuple):
    policy_loss: float
    value_loss: float
    approx_kl: float
    clip_fraction: float
    grad_norm: float
    """Mean gradient norm of the policy parameters before clipping."""


def compute_gae(rollout: Rollout, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns over each whole trial.

    A trial is one sequence: the episodes of a trial are concatenated (RL²), so credit flows from a
    later episode back into the exploration of an earlier one. After an env's last valid step the
    continuation value is ``rollout.last_values`` -- ``V(s_T)`` when a time limit cut the episode, 0
    when it terminated. With ``delta_t = r_t + gamma * V_{t+1} - V_t``,
    ``A_t = delta_t + gamma * lam * A_{t+1}``, and ``A`` is zero past the end.
    """
    values, valid = rollout.values, rollout.valid
    steps = values.shape[0]
    time = torch.arange(steps, device=values.device).unsqueeze(1)
    is_last = time == (rollout.lengths - 1).unsqueeze(0)
    next_values = torch.cat([values[1:], torch.zeros_like(values[:1])])
    next_values = torch.where(is_last, rollout.last_values.unsqueeze(0), next_values)
    deltas = (rollout.rewards + gamma * next_values - values) * valid
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[0])
    for t in range(steps - 1, -1, -1):
        running = deltas[t] + gamma * lam * running * valid[t]
        advantages[t] = running
    return advantages, (advantages + values) * valid


def flatten(rollout: Rollout, advantages: Tensor, returns: Tensor) -> Batch:
    """Keep the valid steps only, as one flat batch."""
    mask = rollout.valid
    return Batch(
        rollout.windows[mask],
        rollout.newest[mask],
        rollout.actions[mask],
        rollout.log_probs[mask],
        advantages[mask],
        returns[mask],
    )


def ppo_loss(
    model: nn.Module, mb: Batch, clip: float, vf_coef: float, normalize_advantages: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate objective plus the value regression, on one minibatch."""
    out = model(mb.windows, mb.newest)
    advantages = mb.advantages
    if normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    log_ratio = log_prob(out, mb.actions) - mb.old_log_probs
    ratio = log_ratio.exp()
    policy_loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()
    value_loss = 0.5 * (out.value - mb.returns).pow(2).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
            "clip_fraction": ((ratio - 1).abs() > clip).float().mean(),
            "policy_loss": policy_loss.detach(),
            "value_loss": value_loss.detach(),
        }
    return policy_loss + vf_coef * value_loss, stats


def make_optimizer(model: TrMRL, policy_lr: float, value_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the value head in its own parameter group (TrMRL uses separate learning rates)."""
    value_ids = {id(p) for p in model.value.parameters()}
    policy_params = [p for p in model.parameters() if id(p) not in value_ids]
    return torch.optim.AdamW(
        [
            {"params": policy_params, "lr": policy_lr, "base_lr": policy_lr},
            {"params": list(model.value.parameters()), "lr": value_lr, "base_lr": value_lr},
        ],
        weight_decay=weight_decay,
    )


def decayed_lr_factor(update: int, factor: float, start: int, end: int) -> float:
    """Geometric decay from 1 at update ``start`` to ``factor`` at update ``end``, constant outside."""
    progress = min(max((update - start) / (end - start), 0.0), 1.0)
    return float(factor**progress)


def ppo_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    *,
    epochs: int,
    minibatch_size: int,
    clip: float,
    vf_coef: float,
    max_grad_norm: float,
    normalize_advantages: bool,
    generator: torch.Generator,
) -> UpdateStats:
    """``epochs`` passes of shuffled minibatches over ``batch``."""
    totals = {"approx_kl": 0.0, "clip_fraction": 0.0, "policy_loss": 0.0, "value_loss": 0.0}
    grad_norm, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(batch), generator=generator).to(batch.windows.device)
        for start in range(0, len(batch), minibatch_size):
            mb = batch.take(order[start : start + minibatch_size])
            loss, stats = ppo_loss(model, mb, clip, vf_coef, normalize_advantages)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                # Each parameter group (policy, value head) is clipped on its own: a large value-loss
                # gradient must not shrink the policy's step.
                norms = [nn.utils.clip_grad_norm_(g["params"], max_grad_norm) for g in optimizer.param_groups]
                grad_norm += float(norms[0])
            optimizer.step()
            for key, value in stats.items():
                totals[key] += float(value)
            count += 1
    return UpdateStats(
        policy_loss=totals["policy_loss"] / count,
        value_loss=totals["value_loss"] / count,
        approx_kl=totals["approx_kl"] / count,
        clip_fraction=totals["clip_fraction"] / count,
        grad_norm=grad_norm / count,
    )


class RunningMeanStd:
    """Running mean and variance of observations (parallel-merge formula), for the network's statistics."""

    def __init__(self, dim: int) -> None:
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.var = torch.ones(dim, dtype=torch.float64)
        self.count = 0.0

    def update(self, batch_mean: Tensor, batch_var: Tensor, batch_count: float) -> None:
        """Merge the moments of a new batch."""
        if batch_count <= 0:
            return
        delta = batch_mean.double() - self.mean
        total = self.count + batch_count
        m2 = (
            self.var * self.count
            + batch_var.double() * batch_count
            + delta**2 * self.count * batch_count / total
        )
        self.mean = self.mean + delta * batch_count / total
        self.var = m2 / total
        self.count = total

    def apply_to(self, model: TrMRL) -> None:
        """Write the statistics into the network (used by every path that evaluates it).

        An oracle's observation ends with the task parameters; those keep identity statistics.
        """
        n = self.mean.shape[0]
        model.obs_mean[:n] = self.mean.float()
        model.obs_std[:n] = self.var.sqrt().clamp(min=1e-4).float()

    def state_dict(self) -> dict[str, Tensor | float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Tensor | float]) -> None:
        mean, var, count = state["mean"], state["var"], state["count"]
        assert isinstance(mean, Tensor) and isinstance(var, Tensor)
        self.mean, self.var, self.count = mean.double(), var.double(), float(count)
