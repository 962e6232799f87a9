"""Locomotion families on gymnasium's v5 MuJoCo HalfCheetah and Ant (the PEARL / variBAD benchmarks).

The rewards are computed here from simulator state, never taken from the base environment, so they are
exactly the published meta-RL ones rather than gymnasium's single-task rewards:

* ``halfcheetah-vel``: ``-|v_x - v*| - 0.05‖a‖²``
* ``halfcheetah-dir``: ``d·v_x - 0.05‖a‖²``
* ``ant-dir`` / ``ant-dir-2d``: ``(Δxy/dt)·(cos θ, sin θ) - 0.5‖a‖² - 0.5e-3·Σclip(cfrc_ext, -1, 1)² + 1``;
  terminates when the torso height leaves [0.2, 1.0] or the state is not finite.
* ``ant-goal`` (PEARL's ``ant_goal``): ``-‖xy - goal‖₁ - 0.1‖a‖² - 0.5e-3·Σclip(cfrc_ext, -1, 1)² + 0``;
  like PEARL it does not terminate on the torso height (with an always-negative reward that would teach
  the agent to flip over to end the episode), only on a non-finite state.

Velocities are finite differences of ``qpos`` over one control step (``dt = 0.05``). Actions are clipped to
the action bounds before they are applied and before the control cost is taken, so an unbounded policy
sample costs what is actually applied.

Each environment steps the MuJoCo model directly (``do_simulation``) instead of calling the base
``step``: that skips gymnasium's own reward, observation and info work that would be thrown away.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar, Final

import numpy as np
from numpy.typing import NDArray

from trmrl.tasks.base import SPLITS, ObsArray, Task, TaskEnv, TaskFamily

if TYPE_CHECKING:
    from gymnasium.envs.mujoco.mujoco_env import MujocoEnv

__all__ = ["FAMILIES", "LocomotionFamily"]

_CHEETAH_CTRL_COST: Final = 0.05
_ANT_CONTACT_COST: Final = 0.5e-3
_ANT_HEALTHY_Z: Final = (0.2, 1.0)


def _make_half_cheetah() -> MujocoEnv:
    # Imported lazily: gymnasium.envs.mujoco pulls in mujoco, which importing trmrl.tasks should not need.
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

    return HalfCheetahEnv()


def _make_ant() -> MujocoEnv:
    from gymnasium.envs.mujoco.ant_v5 import AntEnv

    # 27-d observation (no external contact forces), as in the meta-RL literature.
    return AntEnv(include_cfrc_ext_in_observation=False)


class _LocomotionEnv(TaskEnv):
    """Shared reset / observation code; subclasses implement the task's ``step``."""

    env: MujocoEnv
    # Leading qpos entries (the root's global position) left out of the observation, as gymnasium does.
    _N_HIDDEN_QPOS: ClassVar[int]

    def __init__(self, sim: MujocoEnv, family: TaskFamily, task: Task) -> None:
        super().__init__(sim, family, task)
        self._data = sim.data
        self._dt = float(sim.dt)
        self._frame_skip = int(sim.frame_skip)
        self._low = np.asarray(family.action_low, dtype=np.float64)
        self._high = np.asarray(family.action_high, dtype=np.float64)
        self._action_buf = np.empty(family.act_dim, dtype=np.float64)
        self._n_qpos_obs = int(sim.model.nq) - self._N_HIDDEN_QPOS
        # The meta-RL literature's HalfCheetah (PEARL, ProMP, the TrMRL authors' fork) appends the
        # torso's position (mujoco-py's get_body_com: the body frame's origin) to gymnasium's 17-d
        # observation; a family declares it by its 3 extra observation entries.
        extra = family.obs_dim - self._n_qpos_obs - int(sim.model.nv)
        if extra not in (0, 3):
            raise ValueError(
                f"{family.name}: obs_dim {family.obs_dim} does not fit the {sim.model.nq}-qpos body"
            )
        self._torso = int(sim.model.body("torso").id) if extra == 3 else None

    def _observe(self) -> ObsArray:
        # One allocation, filled in place, instead of concatenate + astype.
        data = self._data
        obs = np.empty(self.family.obs_dim, dtype=np.float32)
        n_qpos, n_qvel = self._n_qpos_obs, len(data.qvel)
        obs[:n_qpos] = data.qpos[self._N_HIDDEN_QPOS :]
        obs[n_qpos : n_qpos + n_qvel] = data.qvel
        if self._torso is not None:
            obs[n_qpos + n_qvel :] = data.xpos[self._torso]
        return obs

    def _simulate(self, action: NDArray[Any]) -> NDArray[np.float64]:
        """Apply the clipped ``action`` for one control step; return the clipped action.

        The returned array is a buffer reused by the next step.
        """
        a = np.clip(action, self._low, self._high, out=self._action_buf)
        self.env.do_simulation(a, self._frame_skip)
        return a

    def _reset_sim(self, seed: int | None, options: dict[str, Any] | None) -> tuple[ObsArray, dict[str, Any]]:
        _, info = self.env.reset(seed=seed, options=options)
        return self._observe(), info


class _CheetahEnv(_LocomotionEnv):
    """HalfCheetah: a forward reward from the torso's x velocity, less the control cost."""

    _N_HIDDEN_QPOS = 1

    def _forward_reward(self, x_velocity: float) -> float:
        raise NotImplementedError

    def step(self, action: NDArray[Any]) -> tuple[ObsArray, float, bool, bool, dict[str, Any]]:
        truncated = self._tick()
        qpos = self._data.qpos
        x_before = float(qpos[0])
        a = self._simulate(action)
        x_velocity = (float(qpos[0]) - x_before) / self._dt
        forward_reward = self._forward_reward(x_velocity)
        ctrl_cost = _CHEETAH_CTRL_COST * float(np.dot(a, a))
        info = {"x_velocity": x_velocity, "forward_reward": forward_reward, "ctrl_cost": ctrl_cost}
        return self._observe(), forward_reward - ctrl_cost, False, truncated, info


class _CheetahVelEnv(_CheetahEnv):
    _target_velocity = 0.0

    def _apply_task(self, task: Task) -> None:
        self._target_velocity = task.params[0]

    def _forward_reward(self, x_velocity: float) -> float:
        return -abs(x_velocity - self._target_velocity)


class _CheetahDirEnv(_CheetahEnv):
    _direction = 1.0

    def _apply_task(self, task: Task) -> None:
        self._direction = task.params[0]

    def _forward_reward(self, x_velocity: float) -> float:
        return self._direction * x_velocity


class _AntEnv(_LocomotionEnv):
    """Ant bookkeeping shared by the direction and goal tasks."""

    _N_HIDDEN_QPOS = 2
    _CTRL_COST: ClassVar[float]
    _SURVIVE_REWARD: ClassVar[float]

    def __init__(self, sim: MujocoEnv, family: TaskFamily, task: Task) -> None:
        super().__init__(sim, family, task)
        self._contact_buf = np.empty_like(self._data.cfrc_ext)

    def _costs(self, a: NDArray[np.float64]) -> tuple[float, float]:
        """Control and contact costs of the step just simulated."""
        forces = np.clip(self._data.cfrc_ext, -1.0, 1.0, out=self._contact_buf).ravel()
        return self._CTRL_COST * float(np.dot(a, a)), _ANT_CONTACT_COST * float(np.dot(forces, forces))

    def _finite(self) -> bool:
        data = self._data
        return bool(np.isfinite(data.qpos).all() and np.isfinite(data.qvel).all())

    def _task_reward(self, x_before: float, y_before: float) -> tuple[float, bool, dict[str, Any]]:
        """The task's reward for the step just simulated from ``(x_before, y_before)``, whether the
        episode ends there, and the step's ``info``."""
        raise NotImplementedError

    def step(self, action: NDArray[Any]) -> tuple[ObsArray, float, bool, bool, dict[str, Any]]:
        truncated = self._tick()
        qpos = self._data.qpos
        x_before, y_before = float(qpos[0]), float(qpos[1])
        a = self._simulate(action)
        task_reward, terminated, info = self._task_reward(x_before, y_before)
        ctrl_cost, contact_cost = self._costs(a)
        reward = task_reward - ctrl_cost - contact_cost + self._SURVIVE_REWARD
        info.update(ctrl_cost=ctrl_cost, contact_cost=contact_cost, survive_reward=self._SURVIVE_REWARD)
        return self._observe(), reward, terminated, truncated, info


class _AntDirEnv(_AntEnv):
    _CTRL_COST = 0.5
    _SURVIVE_REWARD = 1.0
    _direction = (1.0, 0.0)

    def _apply_task(self, task: Task) -> None:
        self._direction = (task.params[0], task.params[1])

    def _task_reward(self, x_before: float, y_before: float) -> tuple[float, bool, dict[str, Any]]:
        qpos = self._data.qpos
        x_velocity = (float(qpos[0]) - x_before) / self._dt
        y_velocity = (float(qpos[1]) - y_before) / self._dt
        forward_reward = x_velocity * self._direction[0] + y_velocity * self._direction[1]
        z = float(qpos[2])
        terminated = not (_ANT_HEALTHY_Z[0] <= z <= _ANT_HEALTHY_Z[1] and self._finite())
        info = {"x_velocity": x_velocity, "y_velocity": y_velocity, "forward_reward": forward_reward}
        return forward_reward, terminated, info


class _AntGoalEnv(_AntEnv):
    _CTRL_COST = 0.1
    _SURVIVE_REWARD = 0.0
    _goal = (0.0, 0.0)

    def _apply_task(self, task: Task) -> None:
        self._goal = (task.params[0], task.params[1])

    def _task_reward(self, x_before: float, y_before: float) -> tuple[float, bool, dict[str, Any]]:
        qpos = self._data.qpos
        x, y = float(qpos[0]), float(qpos[1])
        goal_reward = -(abs(x - self._goal[0]) + abs(y - self._goal[1]))
        info = {
            "x_position": x,
            "y_position": y,
            "x_velocity": (x - x_before) / self._dt,
            "y_velocity": (y - y_before) / self._dt,
            "goal_reward": goal_reward,
        }
        return goal_reward, not self._finite(), info


class LocomotionFamily(TaskFamily):
    """Base of the MuJoCo locomotion families; subclasses choose the robot, env and task sampler."""

    _ENV_CLS: ClassVar[type[_LocomotionEnv]]
    _ROBOT: ClassVar[str]

    def _make_env(self, task: Task) -> TaskEnv:
        sim = _make_half_cheetah() if self._ROBOT == "halfcheetah" else _make_ant()
        return self._ENV_CLS(sim, self, task)


class _CheetahVelFamily(LocomotionFamily):
    _ENV_CLS = _CheetahVelEnv
    _ROBOT = "halfcheetah"

    def _sample_tasks(self, split: str, n: int, rng: np.random.Generator) -> list[Task]:
        low, high = (3.0, 4.0) if split == "ood" else (0.0, 3.0)
        velocities = rng.uniform(low, high, size=n)
        return [Task(self.name, split, i, (float(v),), f"v*={v:.2f}") for i, v in enumerate(velocities)]


class _CheetahDirFamily(LocomotionFamily):
    _ENV_CLS = _CheetahDirEnv
    _ROBOT = "halfcheetah"

    def _sample_tasks(self, split: str, n: int, rng: np.random.Generator) -> list[Task]:
        directions = rng.choice((-1.0, 1.0), size=n)
        return [Task(self.name, split, i, (float(d),), f"dir={d:+.0f}") for i, d in enumerate(directions)]


def _direction_task(family: str, split: str, index: int, theta: float, unit: tuple[float, float]) -> Task:
    return Task(family, split, index, unit, f"dir={math.degrees(theta):.0f}deg")


# Exact unit vectors for the axis directions, so that θ = π gives (-1, 0) and not (-1, 1.2e-16).
_AXIS_DIRECTIONS: Final = {
    "train": ((0.0, (1.0, 0.0)), (math.pi, (-1.0, 0.0))),
    "validation": ((0.0, (1.0, 0.0)), (math.pi, (-1.0, 0.0))),
    "test": ((0.0, (1.0, 0.0)), (math.pi, (-1.0, 0.0))),
    "ood": ((0.5 * math.pi, (0.0, 1.0)), (1.5 * math.pi, (0.0, -1.0))),
}


class _AntDirFamily(LocomotionFamily):
    _ENV_CLS = _AntDirEnv
    _ROBOT = "ant"

    def _sample_tasks(self, split: str, n: int, rng: np.random.Generator) -> list[Task]:
        choices = _AXIS_DIRECTIONS[split]
        picks = rng.integers(0, len(choices), size=n)
        return [_direction_task(self.name, split, i, *choices[int(k)]) for i, k in enumerate(picks)]


class _AntDir2DFamily(LocomotionFamily):
    _ENV_CLS = _AntDirEnv
    _ROBOT = "ant"

    def _sample_tasks(self, split: str, n: int, rng: np.random.Generator) -> list[Task]:
        thetas = rng.uniform(0.0, 2.0 * math.pi, size=n)
        return [
            _direction_task(self.name, split, i, float(t), (math.cos(t), math.sin(t)))
            for i, t in enumerate(thetas)
        ]


class _AntGoalFamily(LocomotionFamily):
    _ENV_CLS = _AntGoalEnv
    _ROBOT = "ant"

    def _sample_tasks(self, split: str, n: int, rng: np.random.Generator) -> list[Task]:
        # Uniform over the area: the disc of radius 3 (r = 3√u) or, for ood, the annulus 3 ≤ r ≤ 4.
        r_low, r_high = (3.0, 4.0) if split == "ood" else (0.0, 3.0)
        radii = np.sqrt(rng.uniform(r_low**2, r_high**2, size=n))
        angles = rng.uniform(0.0, 2.0 * math.pi, size=n)
        tasks = []
        for i, (r, phi) in enumerate(zip(radii, angles, strict=True)):
            gx, gy = float(r * math.cos(phi)), float(r * math.sin(phi))
            tasks.append(Task(self.name, split, i, (gx, gy), f"goal=({gx:.2f},{gy:.2f})"))
        return tasks


_BODIES: Final[dict[str, tuple[int, int]]] = {"halfcheetah": (17, 6), "ant": (27, 8)}
"""Observation and action widths of each robot (the x/y position is hidden from the policy)."""


def _family(
    cls: type[LocomotionFamily],
    name: str,
    *,
    task_param_dim: int,
    splits: tuple[str, ...],
    description: str,
) -> LocomotionFamily:
    """A locomotion family: actions in [-1, 1], 200-step episodes, no success signal."""
    obs_dim, act_dim = _BODIES[cls._ROBOT]
    return cls(
        name=name,
        obs_dim=obs_dim,
        act_dim=act_dim,
        action_low=(-1.0,) * act_dim,
        action_high=(1.0,) * act_dim,
        episode_length=200,
        task_param_dim=task_param_dim,
        has_success=False,
        splits=splits,
        description=description,
    )


def _with_torso_position(family: LocomotionFamily) -> LocomotionFamily:
    """``family`` with the 20-d observation of the meta-RL literature's HalfCheetah tasks (the TrMRL
    authors' fork among them): the same tasks, the torso's x, y, z appended. The 17-d families stay as
    they are, so checkpoints trained on them keep loading."""
    return dataclasses.replace(
        family,
        name=f"{family.name}-20d",
        obs_dim=family.obs_dim + 3,
        description=f"{family.name} with the 20-d observation (gymnasium's 17-d + the torso's x, y, z).",
    )


_CHEETAH_VEL = _family(
    _CheetahVelFamily,
    "halfcheetah-vel",
    task_param_dim=1,
    splits=SPLITS,
    description="HalfCheetah-v5 running at a target velocity v* ~ U[0, 3] (ood: U[3, 4]); "
    "reward -|v_x - v*| - 0.05‖a‖².",
)
_CHEETAH_DIR = _family(
    _CheetahDirFamily,
    "halfcheetah-dir",
    task_param_dim=1,
    splits=("train", "validation", "test"),
    description="HalfCheetah-v5 running forward (d=+1) or backward (d=-1); reward d·v_x - 0.05‖a‖².",
)


FAMILIES: Final[tuple[TaskFamily, ...]] = (
    _CHEETAH_VEL,
    _CHEETAH_DIR,
    _with_torso_position(_CHEETAH_VEL),
    _with_torso_position(_CHEETAH_DIR),
    _family(
        _AntDirFamily,
        "ant-dir",
        task_param_dim=2,
        splits=SPLITS,
        description="Ant-v5 running along θ ∈ {0, π} (ood: {π/2, 3π/2}); params (cos θ, sin θ); "
        "PEARL reward, terminates when the torso height leaves [0.2, 1.0].",
    ),
    _family(
        _AntDir2DFamily,
        "ant-dir-2d",
        task_param_dim=2,
        splits=("train", "validation", "test"),
        description="Ant-v5 running along θ ~ U[0, 2π); params (cos θ, sin θ); reward as ant-dir.",
    ),
    _family(
        _AntGoalFamily,
        "ant-goal",
        task_param_dim=2,
        splits=SPLITS,
        description="Ant-v5 walking to a goal uniform on the disc of radius 3 (ood: annulus 3 ≤ r ≤ 4); "
        "PEARL reward -‖xy - goal‖₁ - 0.1‖a‖² - contact.",
    ),
)
