"""Rollouts with early terminations: ragged trials, restarts within a trial, no bootstrap at a true end."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from trainer.ppo import compute_gae
from trainer.rollout import TrialSampler
from trmrl.model import ModelConfig, TrMRL
from trmrl.tasks import Task, TaskEnv, TaskFamily
from trmrl.tasks.point_nav import PointNavEnv

Obs = NDArray[np.float32]


class _FallEnv(TaskEnv):
    """Point-nav dynamics that terminate after ``params[0]`` steps (a robot that falls over)."""

    env: PointNavEnv

    def step(self, action: NDArray[Any]) -> tuple[NDArray[np.float32], float, bool, bool, dict[str, Any]]:
        truncated = self._tick()
        obs, _, _, _, info = self.env.step(action)
        terminated = self.elapsed_steps >= self.task.params[0]
        return obs, 1.0, terminated, truncated and not terminated, info

    def _apply_task(self, task: Task) -> None:
        self.env.goal = (0.0, 1.0)

    def _reset_sim(
        self, seed: int | None, options: dict[str, Any] | None
    ) -> tuple[NDArray[np.float32], dict]:
        return self.env.reset(seed=seed, options=options)


class _FallFamily(TaskFamily):
    def _sample_tasks(self, split: str, n: int, rng: np.random.Generator) -> list[Task]:
        return [Task(self.name, split, i, (3.0 + 2 * i,), f"falls@{3 + 2 * i}") for i in range(n)]

    def _make_env(self, task: Task) -> TaskEnv:
        return _FallEnv(PointNavEnv(), self, task)


FAMILY = _FallFamily(
    name="fall-test",
    obs_dim=2,
    act_dim=2,
    action_low=(-1.0, -1.0),
    action_high=(1.0, 1.0),
    episode_length=6,
    task_param_dim=1,
    has_success=False,
    splits=("train", "test"),
    description="terminates after params[0] steps",
)


def test_terminated_episodes_restart_within_the_trial_and_end_it_without_bootstrap() -> None:
    net = TrMRL(ModelConfig.from_preset("small", obs_dim=2, act_dim=2, window=3))
    sampler = TrialSampler(FAMILY, net, n_envs=3, episodes_per_trial=2)
    tasks = FAMILY.sample_tasks("train", 3, seed=0)  # fall after 3, 5 and 7 (>= 6: time limit) steps
    try:
        rollout = sampler.run(tasks, seed=0, generator=torch.Generator().manual_seed(0))
    finally:
        sampler.close()
    assert rollout.lengths.tolist() == [6, 10, 12]
    assert rollout.episode[:6, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert rollout.episode_step[:10, 1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert rollout.valid[:, 0].tolist() == [True] * 6 + [False] * 6
    # env 0 and 1 ended by termination: no bootstrap; env 2 was cut by the time limit: V(s_T)
    assert rollout.last_values[:2].tolist() == [0.0, 0.0]
    assert rollout.last_values[2] != 0.0
    # the restart inside the trial begins a fresh window (episode memory scope)
    assert rollout.newest[3, 0] == 0
    advantages, _ = compute_gae(rollout, 0.9, 0.8)
    assert torch.count_nonzero(advantages[6:, 0]) == 0


class _SuccessEnv(_FallEnv):
    """Reports ``info["success"]`` from the third step of every second episode on."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.episodes = 0

    def _reset_sim(self, seed: int | None, options: dict[str, Any] | None) -> tuple[Obs, dict[str, Any]]:
        self.episodes += 1
        return super()._reset_sim(seed, options)

    def step(self, action: NDArray[Any]) -> tuple[Obs, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        success = self.episodes == 2 and self.elapsed_steps >= 3
        return obs, reward, terminated, truncated, {**info, "success": success}


class _SuccessFamily(_FallFamily):
    def _make_env(self, task: Task) -> TaskEnv:
        return _SuccessEnv(PointNavEnv(), self, task)


def test_success_is_recorded_per_episode_of_the_trial() -> None:
    family = _SuccessFamily(**{**FAMILY.__dict__, "name": "success-test", "has_success": True})
    net = TrMRL(ModelConfig.from_preset("small", obs_dim=2, act_dim=2, window=3))
    sampler = TrialSampler(family, net, n_envs=2, episodes_per_trial=2)
    try:
        tasks = [Task("success-test", "train", i, (10.0,), "never falls") for i in range(2)]
        rollout = sampler.run(tasks, seed=0, generator=torch.Generator().manual_seed(0))
    finally:
        sampler.close()
    assert rollout.success.tolist() == [[0.0, 1.0], [0.0, 1.0]]
