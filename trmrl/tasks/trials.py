"""What a trial on a task family measures, and the loop that runs one, for every place that reports it.

The trainer's meta-evaluation (``trainer/evaluate.py``), the simulator client (``trmrl-sim``), the demo
and the plots all report the same figures -- the return of each episode of a trial, the return over the
first :data:`EARLY_STEPS` steps of an episode against the rest (how fast the policy adapts), success
where the family defines it -- so they are defined here once, torch-free, next to the task families.

:func:`trial_flow` is the trial loop without a policy: it yields what the policy must answer and takes
the actions back, so a local network (the plots) and a remote service (the simulator client) drive the
same loop.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trmrl.tasks.base import Task, TaskEnv, TaskFamily

EARLY_STEPS = 20
"""Steps of an episode counted as "early": a meta-learned policy should have adapted by then."""


def policy_observation(observation: np.ndarray, params: np.ndarray | None) -> np.ndarray:
    """What the policy reads: the observation, with the task's parameters appended for an oracle.

    ``observation`` is ``[obs_dim]`` or ``[envs, obs_dim]``; ``params`` the matching ``[task_param_dim]``
    or ``[envs, task_param_dim]`` (``None``: not an oracle).

    >>> policy_observation(np.zeros((2, 3), np.float32), np.ones((2, 1), np.float32)).tolist()
    [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    """
    if params is None:
        return observation
    return np.concatenate([observation, np.asarray(params, observation.dtype)], -1)


def policy_obs_dim(family: TaskFamily, oracle: bool) -> int:
    """Width of what the policy reads (:func:`policy_observation`) in ``family``.

    >>> from trmrl.tasks import get_family
    >>> policy_obs_dim(get_family("point-nav"), oracle=True)
    4
    """
    return family.obs_dim + (family.task_param_dim if oracle else 0)


@dataclass(frozen=True)
class TrialReturns:
    """Returns of a set of trials, one task each.

    >>> TrialReturns(["a"], np.array([[1.0, 3.0]]), np.array([[0.5, 1.0]]), None).summary("test/")
    {'test/return': 2.0, 'test/return_ep1': 1.0, 'test/return_ep2': 3.0, 'test/return_first20': 0.75, \
'test/return_after20': 1.25}
    """

    labels: list[str]
    """Task labels, one per row."""
    returns: np.ndarray
    """``[tasks, episodes]`` undiscounted return of each episode of the trial."""
    early_returns: np.ndarray
    """``[tasks, episodes]`` return over the first :data:`EARLY_STEPS` steps of each episode."""
    success: np.ndarray | None
    """``[tasks, episodes]`` 1 where the episode succeeded; ``None`` for families without success."""

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Scalar figures, keys prefixed by ``prefix`` (e.g. ``test/``): mean return (all, per episode,
        early, late) and success."""
        out = {f"{prefix}return": float(self.returns.mean())}
        for e in range(self.returns.shape[1]):
            out[f"{prefix}return_ep{e + 1}"] = float(self.returns[:, e].mean())
        out[f"{prefix}return_first{EARLY_STEPS}"] = float(self.early_returns.mean())
        out[f"{prefix}return_after{EARLY_STEPS}"] = float((self.returns - self.early_returns).mean())
        if self.success is not None:
            out[f"{prefix}success"] = float(self.success.mean())
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "returns": self.returns.tolist(),
            "early_returns": self.early_returns.tolist(),
            "success": None if self.success is None else self.success.tolist(),
        }


@dataclass(frozen=True)
class Tick:
    """What the policy must answer in one step of :func:`trial_flow`: the running envs ``rows``, their
    policy observations, the reward each received for its previous action, and episode starts."""

    rows: np.ndarray
    observations: np.ndarray
    rewards: np.ndarray
    episode_starts: np.ndarray


#: Called after every env step: env index, episode index, reward and the step's ``info``.
OnStep = Callable[[int, int, float, dict[str, Any]], None]


def trial_flow(
    family: TaskFamily,
    envs: Sequence[TaskEnv],
    tasks: Sequence[Task],
    episodes: int,
    *,
    oracle: bool,
    seed: int,
    on_step: OnStep | None = None,
) -> Generator[Tick, np.ndarray, TrialReturns]:
    """Run a trial of ``episodes`` episodes in each env (env ``i`` set to task ``i``); returns its returns.

    Yields a :class:`Tick` per step of the envs still running and takes back their actions,
    ``[len(rows), act_dim]``. Env ``i`` is first reset with seed ``seed * 1000 + i``, as the trainer's
    rollouts do, so figures are comparable across the places that run trials.
    """
    k = len(envs)
    params = np.asarray([t.params for t in tasks], np.float32) if oracle else None
    obs = np.stack([env.reset(seed=seed * 1000 + i)[0] for i, env in enumerate(envs)])
    returns = np.zeros((k, episodes))
    early = np.zeros((k, episodes))
    success = np.zeros((k, episodes)) if family.has_success else None
    episode = np.zeros(k, np.int64)
    episode_step = np.zeros(k, np.int64)
    start = np.ones(k, bool)
    prev_reward = np.zeros(k, np.float64)
    active = np.ones(k, bool)
    while active.any():
        rows = np.flatnonzero(active)
        seen = policy_observation(obs, params)
        actions = yield Tick(rows, seen[rows], prev_reward[rows], start[rows])
        for j, i in enumerate(rows.tolist()):
            next_obs, reward, terminated, truncated, info = envs[i].step(actions[j])
            e = episode[i]
            returns[i, e] += reward
            if episode_step[i] < EARLY_STEPS:
                early[i, e] += reward
            if success is not None and info.get("success"):
                success[i, e] = 1.0
            if on_step is not None:
                on_step(i, int(e), float(reward), info)
            episode_step[i] += 1
            prev_reward[i] = reward
            start[i] = False
            obs[i] = next_obs
            if terminated or truncated:
                episode[i] += 1
                if episode[i] >= episodes:
                    active[i] = False
                else:
                    obs[i] = envs[i].reset()[0]
                    episode_step[i] = 0
                    prev_reward[i] = 0.0
                    start[i] = True
    return TrialReturns([t.label for t in tasks], returns, early, success)
