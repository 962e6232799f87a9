"""point-nav: a 2-D point mass that must find an unobserved goal on a unit half-circle.

The classic sparse-information meta-RL probe (as in PEARL / variBAD): the agent starts at the origin,
observes only its own position and has to infer the goal from the dense reward ``-‖pos - goal‖₂``.
"""

from __future__ import annotations

import math
from typing import Any, Final

import gymnasium
import numpy as np
from gymnasium.spaces import Box
from numpy.typing import NDArray

from trmrl.tasks.base import SPLITS, ObsArray, Task, TaskEnv, TaskFamily

__all__ = ["FAMILIES", "MAX_STEP", "PointNavEnv", "PointNavFamily"]

MAX_STEP: Final = 0.1
"""Largest displacement per axis and step: an action in ``[-1, 1]`` moves ``MAX_STEP`` times as far.

Unit action bounds keep exploration noise on the same scale as the MuJoCo families'."""

_GOAL_RADIUS: Final = 1.0


class PointNavEnv(gymnasium.Env[ObsArray, NDArray[Any]]):
    """The bare point-mass MDP (no time limit, no task bookkeeping).

    State and observation are the position; the action, clipped per axis to ``[-1, 1]``, is a
    displacement in units of :data:`MAX_STEP`; the reward is the negative Euclidean distance to
    :attr:`goal` after the move. The episode never terminates.
    """

    def __init__(self, goal: tuple[float, float] = (_GOAL_RADIUS, 0.0)) -> None:
        self.observation_space = Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.goal = goal
        # Plain floats: for a 2-vector Python arithmetic is several times cheaper than numpy calls.
        self._x = 0.0
        self._y = 0.0

    @property
    def position(self) -> tuple[float, float]:
        """Current position of the point."""
        return (self._x, self._y)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsArray, dict[str, Any]]:
        """Put the point back at the origin (the start state is fixed, so ``seed`` changes nothing)."""
        super().reset(seed=seed)
        self._x = 0.0
        self._y = 0.0
        return np.zeros(2, dtype=np.float32), {}

    def step(self, action: NDArray[Any]) -> tuple[ObsArray, float, bool, bool, dict[str, Any]]:
        """Move by the clipped ``action`` and return ``-‖pos - goal‖₂`` as reward."""
        dx = MAX_STEP * min(max(float(action[0]), -1.0), 1.0)
        dy = MAX_STEP * min(max(float(action[1]), -1.0), 1.0)
        if math.isnan(dx) or math.isnan(dy):
            # min/max let NaN through; refusing here keeps a NaN from silently poisoning the state.
            raise ValueError(f"point-nav action must not be NaN, got {action!r}")
        self._x += dx
        self._y += dy
        gx, gy = self.goal
        distance = math.hypot(self._x - gx, self._y - gy)
        obs = np.array((self._x, self._y), dtype=np.float32)
        return obs, -distance, False, False, {"distance": distance}


class _PointNavTaskEnv(TaskEnv):
    """:class:`PointNavEnv` with the time limit and task switching of :class:`TaskEnv`."""

    env: PointNavEnv

    def step(self, action: NDArray[Any]) -> tuple[ObsArray, float, bool, bool, dict[str, Any]]:
        truncated = self._tick()
        obs, reward, _, _, info = self.env.step(action)
        return obs, reward, False, truncated, info

    def _apply_task(self, task: Task) -> None:
        self.env.goal = (task.params[0], task.params[1])

    def _reset_sim(self, seed: int | None, options: dict[str, Any] | None) -> tuple[ObsArray, dict[str, Any]]:
        return self.env.reset(seed=seed, options=options)


class PointNavFamily(TaskFamily):
    """Goals on the unit circle: angle ~ U[0, π] for train/test, U[π, 2π] for ood."""

    def _sample_tasks(self, split: str, n: int, rng: np.random.Generator) -> list[Task]:
        low, high = (math.pi, 2.0 * math.pi) if split == "ood" else (0.0, math.pi)
        angles = rng.uniform(low, high, size=n)
        tasks = []
        for i, angle in enumerate(angles):
            gx, gy = _GOAL_RADIUS * math.cos(angle), _GOAL_RADIUS * math.sin(angle)
            tasks.append(Task(self.name, split, i, (gx, gy), f"goal=({gx:.2f},{gy:.2f})"))
        return tasks

    def _make_env(self, task: Task) -> TaskEnv:
        return _PointNavTaskEnv(PointNavEnv(), self, task)


FAMILIES: Final[tuple[TaskFamily, ...]] = (
    PointNavFamily(
        name="point-nav",
        obs_dim=2,
        act_dim=2,
        action_low=(-1.0, -1.0),
        action_high=(1.0, 1.0),
        episode_length=100,
        task_param_dim=2,
        has_success=False,
        splits=SPLITS,
        description="2-D point mass from the origin to an unobserved goal on the unit half-circle; "
        "reward -‖pos - goal‖₂; ood goals lie on the other half.",
    ),
)
