"""Meta-evaluation: deterministic trials on fixed held-out task sets, and trajectory replay.

The figures every report uses come from here: return per episode of the trial, return over the first
steps of an episode against the rest (how fast the policy adapts), the mean reward by step index (the
adaptation curve) and the success rate where a family defines one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer.rollout import TrialSampler
from trmrl.networks import Network, make_pool
from trmrl.policy import act
from trmrl.tasks import Task, TaskFamily
from trmrl.tasks.trials import EARLY_STEPS, TrialReturns


@dataclass(frozen=True)
class EvalResult(TrialReturns):
    """Deterministic evaluation of one policy on a fixed task set: its returns, and by step index."""

    curve: np.ndarray
    """``[episodes, horizon]`` mean reward by step index (NaN where no episode lasted that long)."""
    lengths: np.ndarray
    """``[tasks, episodes]`` episode lengths."""

    def to_json(self) -> dict[str, Any]:
        return {
            **super().to_json(),
            "curve": [[None if np.isnan(x) else float(x) for x in row] for row in self.curve],
            "lengths": self.lengths.tolist(),
        }


class Evaluator:
    """Evaluates a network on one fixed task set, reusing its environments between calls."""

    def __init__(
        self,
        family: TaskFamily,
        model: Network,
        tasks: list[Task],
        episodes: int,
        *,
        oracle: bool = False,
        vector: str = "sync",
        seed: int = 0,
        deterministic: bool = True,
    ) -> None:
        self.tasks = tasks
        self.seed = seed
        self.deterministic = deterministic
        self.sampler = TrialSampler(family, model, len(tasks), episodes, oracle=oracle, vector=vector)

    def close(self) -> None:
        self.sampler.close()

    def run(self) -> EvalResult:
        was_training = self.sampler.model.training
        self.sampler.model.eval()
        try:
            # Sampled actions draw their noise from a generator of the task-set seed: the same
            # evaluation gives the same figures.
            generator = None if self.deterministic else torch.Generator().manual_seed(self.seed)
            rollout = self.sampler.run(
                self.tasks, seed=self.seed, deterministic=self.deterministic, generator=generator
            )
        finally:
            self.sampler.model.train(was_training)
        k, horizon = self.sampler.episodes, self.sampler.family.episode_length
        rewards = rollout.rewards.cpu().numpy()
        valid = rollout.valid.cpu().numpy()
        episode = rollout.episode.cpu().numpy()
        step = rollout.episode_step.cpu().numpy()
        n = len(self.tasks)
        returns = np.zeros((n, k))
        early = np.zeros((n, k))
        lengths = np.zeros((n, k), np.int64)
        curve_sum = np.zeros((k, horizon))
        curve_count = np.zeros((k, horizon))
        t_idx, e_idx = np.nonzero(valid)
        ep, st, r = episode[t_idx, e_idx], step[t_idx, e_idx], rewards[t_idx, e_idx]
        np.add.at(returns, (e_idx, ep), r)
        np.add.at(early, (e_idx, ep), r * (st < EARLY_STEPS))
        np.add.at(lengths, (e_idx, ep), 1)
        np.add.at(curve_sum, (ep, st), r)
        np.add.at(curve_count, (ep, st), 1)
        with np.errstate(invalid="ignore"):
            curve = np.where(curve_count > 0, curve_sum / np.maximum(curve_count, 1), np.nan)
        success = rollout.success.cpu().numpy() if self.sampler.family.has_success else None
        return EvalResult([t.label for t in self.tasks], returns, early, success, curve, lengths)


def evaluate(
    model: Network,
    family: TaskFamily,
    tasks: list[Task],
    episodes: int,
    *,
    oracle: bool = False,
    seed: int = 0,
    deterministic: bool = True,
) -> EvalResult:
    """One evaluation of ``model`` on ``tasks``, ``episodes`` per trial: the policy's mean actions, or
    with ``deterministic=False`` actions drawn from it (noise seeded by ``seed``)."""
    evaluator = Evaluator(
        family, model, tasks, episodes, oracle=oracle, seed=seed, deterministic=deterministic
    )
    try:
        return evaluator.run()
    finally:
        evaluator.close()


@torch.no_grad()
def replay_actions(
    model: Network,
    observations: np.ndarray,
    rewards: np.ndarray,
    episode_starts: np.ndarray,
    action_low: np.ndarray,
    action_high: np.ndarray,
) -> np.ndarray:
    """Deterministic actions of the evaluation path along a recorded trajectory.

    ``rewards[t]`` is the reward received for the action taken at ``t - 1``. Returns ``[T, act_dim]``
    clipped actions, exactly as :class:`Evaluator` would have chosen them.
    """
    device = next(model.parameters()).device
    pool = make_pool(model, 1, device)
    slot = torch.zeros(1, dtype=torch.long, device=device)
    low = torch.as_tensor(action_low, dtype=torch.float32, device=device)
    high = torch.as_tensor(action_high, dtype=torch.float32, device=device)
    actions = []
    for obs, reward, start in zip(observations, rewards, episode_starts, strict=True):
        result = act(
            pool,
            slot,
            torch.as_tensor(obs, dtype=torch.float32, device=device).unsqueeze(0),
            torch.tensor([float(reward)], device=device),
            torch.tensor([bool(start)], device=device),
            low=low,
            high=high,
            deterministic=True,
            noise=None,
        )
        actions.append(result.actions[0].cpu().numpy())
    return np.stack(actions)
