"""Any gymnasium environment as a task family: an env id plus two functions.

>>> import numpy as np
>>> from trmrl.tasks.gym_family import gym_task_family
>>> def draw(rng: np.random.Generator, split: str, n: int) -> np.ndarray:
...     low, high = (12.0, 14.0) if split == "ood" else (8.0, 12.0)
...     return rng.uniform(low, high, size=(n, 1))
>>> def apply(env, params):
...     env.unwrapped.g = params[0]
>>> pendulum = gym_task_family(
...     "pendulum-gravity", "Pendulum-v1", draw, apply, task_param_dim=1, episode_length=100,
...     splits=("train", "validation", "test", "ood"),
... )
>>> pendulum.obs_dim, pendulum.act_dim, pendulum.sample_tasks("ood", 1, seed=0)[0].split
(3, 1, 'ood')

``draw(rng, split, n)`` returns ``n`` rows of task parameters for a split (``train``, ``validation``
and ``test`` must draw from one distribution; ``ood`` from another); ``apply(env, params)`` makes a
task's parameters those of ``env`` (the environment ``gymnasium.make`` built, wrappers included) and is
called before the reset that starts each of the task's episodes. Observations must be a flat ``Box``,
actions a bounded ``Box``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium
import numpy as np
from gymnasium.spaces import Box
from numpy.typing import ArrayLike, NDArray

from trmrl.tasks.base import ObsArray, Task, TaskEnv, TaskFamily, TaskFamilyError

__all__ = ["GymTaskFamily", "ParamApplier", "ParamSampler", "gym_task_family"]

ParamSampler = Callable[[np.random.Generator, str, int], ArrayLike]
"""``draw(rng, split, n)``: ``n`` rows of task parameters."""
ParamApplier = Callable[[gymnasium.Env[Any, Any], tuple[float, ...]], None]
"""``apply(env, params)``: make ``params`` the task of ``env`` (before a reset)."""


@dataclass(frozen=True)
class GymTaskFamily(TaskFamily):
    """A task family over a gymnasium environment id; build it with :func:`gym_task_family`."""

    env_id: str = ""
    draw: ParamSampler = field(default=lambda rng, split, n: np.zeros((n, 0)), repr=False)
    apply: ParamApplier = field(default=lambda env, params: None, repr=False)
    env_kwargs: tuple[tuple[str, Any], ...] = ()

    def _sample_tasks(self, split: str, n: int, rng: np.random.Generator) -> list[Task]:
        rows = _task_rows(self.name, self.draw(rng, split, n), n, self.task_param_dim)
        return [
            Task(self.name, split, i, tuple(row), "(" + ", ".join(f"{p:.3g}" for p in row) + ")")
            for i, row in enumerate(rows)
        ]

    def _make_env(self, task: Task) -> TaskEnv:
        return _GymTaskEnv(_make(self.env_id, dict(self.env_kwargs)), self, task)


def _task_rows(name: str, drawn: object, n: int, dim: int) -> NDArray[np.float64]:
    """``draw()``'s answer as ``n`` rows of ``dim`` numbers, or a :class:`TaskFamilyError` saying what it
    gave and what it must give (one column of ``n`` numbers is taken for ``dim`` 1)."""
    must = f"draw(rng, split, n) must return an array of numbers of shape (n, task_param_dim) = ({n}, {dim})"
    try:
        rows = np.asarray(drawn, dtype=np.float64)
    except (TypeError, ValueError):
        raise TaskFamilyError(f"{name}: {must}; it returned {_describe(drawn)}") from None
    if rows.shape == (n,) and dim == 1:
        rows = rows.reshape(n, 1)
    if rows.shape != (n, dim):
        raise TaskFamilyError(f"{name}: {must}; it returned {_describe(drawn)} of shape {rows.shape}")
    return rows


def _describe(value: object) -> str:
    """What a sampler returned, for a message: ``a list of dict``, ``a numpy array``."""
    if isinstance(value, np.ndarray):
        return "a numpy array"
    kind = type(value).__name__
    if isinstance(value, list | tuple) and value:
        return f"a {kind} of {type(value[0]).__name__}"
    return f"a {kind}"


def _make(env_id: str, kwargs: dict[str, Any]) -> gymnasium.Env[Any, Any]:
    # The family owns the time limit (TaskEnv): gymnasium's own would cut episodes at another length.
    return gymnasium.make(env_id, max_episode_steps=None, disable_env_checker=True, **kwargs)


def gym_task_family(
    name: str,
    env_id: str,
    draw: ParamSampler,
    apply: ParamApplier,
    *,
    task_param_dim: int,
    episode_length: int | None = None,
    splits: Sequence[str] = ("train", "validation", "test"),
    has_success: bool = False,
    description: str = "",
    env_kwargs: dict[str, Any] | None = None,
) -> GymTaskFamily:
    """A family from a gymnasium ``env_id``, a parameter sampler and a parameter applier.

    Spaces are read from one environment built here; ``episode_length`` defaults to the id's
    registered ``max_episode_steps``. With ``has_success`` the environment's ``info["success"]`` counts.
    """
    kwargs = dict(env_kwargs or {})
    probe = _make(env_id, kwargs)
    try:
        obs_space, act_space = probe.observation_space, probe.action_space
        spec_steps = probe.spec.max_episode_steps if probe.spec is not None else None
    finally:
        probe.close()
    if not isinstance(obs_space, Box) or len(obs_space.shape) != 1:
        raise ValueError(f"{env_id}: observations must be a flat Box, got {obs_space}")
    if not isinstance(act_space, Box) or len(act_space.shape) != 1:
        raise ValueError(f"{env_id}: actions must be a flat Box, got {act_space}")
    if not (np.isfinite(act_space.low).all() and np.isfinite(act_space.high).all()):
        raise ValueError(f"{env_id}: action bounds must be finite")
    length = episode_length or spec_steps
    if not length:
        raise ValueError(f"{env_id} registers no max_episode_steps: give episode_length")
    return GymTaskFamily(
        name=name,
        obs_dim=int(obs_space.shape[0]),
        act_dim=int(act_space.shape[0]),
        action_low=tuple(float(x) for x in act_space.low),
        action_high=tuple(float(x) for x in act_space.high),
        episode_length=int(length),
        task_param_dim=task_param_dim,
        has_success=has_success,
        splits=tuple(splits),
        description=description or f"{env_id} with {task_param_dim} task parameter(s)",
        env_id=env_id,
        draw=draw,
        apply=apply,
        env_kwargs=tuple(sorted(kwargs.items())),
    )


class _GymTaskEnv(TaskEnv):
    def _apply_task(self, task: Task) -> None:
        family = self.family
        assert isinstance(family, GymTaskFamily)
        family.apply(self.env, task.params)

    def _reset_sim(self, seed: int | None, options: dict[str, Any] | None) -> tuple[ObsArray, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        return np.asarray(obs, dtype=np.float32), info

    def step(self, action: NDArray[Any]) -> tuple[ObsArray, float, bool, bool, dict[str, Any]]:
        return self._step_env(action)
