"""Tests of the task families on the real simulators (MuJoCo via gymnasium v5, Meta-World v3).

Rewards are recomputed here from simulator state with independent code, so a wrong coefficient, a
reward taken from the base environment or a task that is not applied all make these tests fail.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium
import mujoco
import numpy as np
import pytest
from gymnasium.wrappers import TimeLimit

from trmrl.tasks import Task, TaskFamily, TaskFamilyError, family_names, get_family
from trmrl.tasks.base import TaskEnv

REPO_ROOT = Path(__file__).resolve().parents[2]

POINT_AND_LOCOMOTION = (
    "point-nav",
    "halfcheetah-vel",
    "halfcheetah-dir",
    "ant-dir",
    "ant-dir-2d",
    "ant-goal",
)
LOCOMOTION = POINT_AND_LOCOMOTION[1:]
ML1 = {
    "ml1-reach": "reach-v3",
    "ml1-reach-decoupled": "reach-v3",
    "ml1-reach-fresh": "reach-v3",
    "ml1-push": "push-v3",
    "ml1-push-fresh": "push-v3",
    "ml1-pick-place": "pick-place-v3",
}
METAWORLD = (*ML1, "ml10", "ml45")
DT = 0.05  # HalfCheetah-v5 and Ant-v5: timestep 0.01 x frame_skip 5


def _other_family_task(name: str) -> Task:
    other = "point-nav" if name != "point-nav" else "halfcheetah-vel"
    return get_family(other).sample_tasks("train", 1, seed=0)[0]


# --- import, registry, types ------------------------------------------------------------------------


def test_import_loads_neither_torch_nor_metaworld() -> None:
    code = "import sys, trmrl.tasks; assert 'torch' not in sys.modules and 'metaworld' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_registry_lists_every_family() -> None:
    assert set(family_names()) == {
        *POINT_AND_LOCOMOTION,
        *METAWORLD,
        "halfcheetah-vel-20d",
        "halfcheetah-dir-20d",
    }
    for name in family_names():
        family = get_family(name)
        assert isinstance(family, TaskFamily)
        assert family.name == name
        assert family.description


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(TaskFamilyError, match="unknown task family 'cartpole'") as excinfo:
        get_family("cartpole")
    assert "halfcheetah-vel" in str(excinfo.value)
    assert "ml45" in str(excinfo.value)


def test_families_and_tasks_are_immutable_and_picklable() -> None:
    family = get_family("ant-goal")
    task = family.sample_tasks("train", 1, seed=0)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        family.episode_length = 10  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.params = (0.0, 0.0)  # type: ignore[misc]
    # AsyncVectorEnv workers receive families (inside env factories) and tasks by pickling.
    assert pickle.loads(pickle.dumps(family)) == family
    assert pickle.loads(pickle.dumps(task)) == task
    assert pickle.loads(pickle.dumps(get_family("ml45"))) == get_family("ml45")


def test_task_normalises_params_and_rejects_bad_split() -> None:
    task = Task("point-nav", "train", np.int64(3), [np.float32(0.5), 1], "x")  # type: ignore[arg-type]
    assert task.params == (0.5, 1.0)
    assert all(type(p) is float for p in task.params)
    assert type(task.index) is int
    assert hash(task) == hash(Task("point-nav", "train", 3, (0.5, 1.0), "x"))
    with pytest.raises(TaskFamilyError, match="split"):
        Task("point-nav", "dev", 0, (0.0, 1.0), "x")
    with pytest.raises(TaskFamilyError, match="index"):
        Task("point-nav", "train", -1, (0.0, 1.0), "x")


# --- sampling -----------------------------------------------------------------------------------------


def _params(tasks: list[Task]) -> np.ndarray:
    return np.array([t.params for t in tasks])


@pytest.mark.parametrize("name", POINT_AND_LOCOMOTION)
def test_sampling_is_deterministic_and_splits_differ(name: str) -> None:
    family = get_family(name)
    train = family.sample_tasks("train", 20, seed=7)
    assert train == family.sample_tasks("train", 20, seed=7)
    assert train != family.sample_tasks("train", 20, seed=8)
    # Compare params, not tasks: tasks of different splits are never equal, even with equal params.
    assert _params(train).tolist() != _params(family.sample_tasks("test", 20, seed=7)).tolist()
    validation = _params(family.sample_tasks("validation", 20, seed=7)).tolist()
    assert validation != _params(train).tolist()
    assert validation != _params(family.sample_tasks("test", 20, seed=7)).tolist()
    for split in family.splits:
        tasks = family.sample_tasks(split, 20, seed=7)
        assert len(tasks) == 20
        assert [t.index for t in tasks] == list(range(20))
        for task in tasks:
            assert (task.family, task.split) == (name, split)
            assert len(task.params) == family.task_param_dim
            assert task.label
            family.check_task(task)


@pytest.mark.parametrize("split", ["train", "validation", "test", "ood"])
def test_point_nav_goal_ranges(split: str) -> None:
    goals = _params(get_family("point-nav").sample_tasks(split, 200, seed=0))
    np.testing.assert_allclose(np.linalg.norm(goals, axis=1), 1.0)
    angles = np.mod(np.arctan2(goals[:, 1], goals[:, 0]), 2 * np.pi)
    low, high = (np.pi, 2 * np.pi) if split == "ood" else (0.0, np.pi)
    assert np.all((angles >= low - 1e-9) & (angles <= high + 1e-9))
    assert np.ptp(angles) > 0.8 * np.pi  # covers the arc, not one point


@pytest.mark.parametrize(
    ("split", "low", "high"), [("train", 0, 3), ("validation", 0, 3), ("test", 0, 3), ("ood", 3, 4)]
)
def test_halfcheetah_vel_ranges(split: str, low: float, high: float) -> None:
    v = _params(get_family("halfcheetah-vel").sample_tasks(split, 200, seed=0))[:, 0]
    assert np.all((v >= low) & (v <= high))
    assert np.ptp(v) > 0.8 * (high - low)


def test_halfcheetah_dir_directions() -> None:
    family = get_family("halfcheetah-dir")
    d = _params(family.sample_tasks("train", 50, seed=0))[:, 0]
    assert set(d) == {-1.0, 1.0}
    assert family.splits == ("train", "validation", "test")


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("train", {(1.0, 0.0), (-1.0, 0.0)}),
        ("validation", {(1.0, 0.0), (-1.0, 0.0)}),
        ("test", {(1.0, 0.0), (-1.0, 0.0)}),
        ("ood", {(0.0, 1.0), (0.0, -1.0)}),
    ],
)
def test_ant_dir_directions(split: str, expected: set[tuple[float, float]]) -> None:
    tasks = get_family("ant-dir").sample_tasks(split, 50, seed=0)
    assert {t.params for t in tasks} == expected


def test_ant_dir_2d_directions() -> None:
    family = get_family("ant-dir-2d")
    units = _params(family.sample_tasks("train", 200, seed=0))
    np.testing.assert_allclose(np.linalg.norm(units, axis=1), 1.0)
    angles = np.mod(np.arctan2(units[:, 1], units[:, 0]), 2 * np.pi)
    assert np.ptp(angles) > 1.8 * np.pi
    assert "ood" not in family.splits


@pytest.mark.parametrize(
    ("split", "r_low", "r_high"), [("train", 0, 3), ("validation", 0, 3), ("test", 0, 3), ("ood", 3, 4)]
)
def test_ant_goal_ranges(split: str, r_low: float, r_high: float) -> None:
    goals = _params(get_family("ant-goal").sample_tasks(split, 400, seed=0))
    r = np.linalg.norm(goals, axis=1)
    assert np.all((r >= r_low - 1e-9) & (r <= r_high + 1e-9))
    # Uniform over the area: the median radius is that of half the area, not the mid radius.
    np.testing.assert_allclose(np.median(r), math.sqrt((r_low**2 + r_high**2) / 2), rtol=0.1)


@pytest.mark.parametrize("name", ["halfcheetah-dir", "ant-dir-2d", "ml1-reach", "ml10"])
def test_unsupported_split_raises(name: str) -> None:
    family = get_family(name)
    with pytest.raises(
        TaskFamilyError, match=r"split 'ood' is not supported; supported splits: train, validation, test"
    ):
        family.sample_tasks("ood", 1, seed=0)


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "4"])
def test_bad_n_raises(n: Any) -> None:
    with pytest.raises(TaskFamilyError, match="n must be a positive int"):
        get_family("halfcheetah-vel").sample_tasks("train", n, seed=0)


@pytest.mark.parametrize("split", ["val", "TRAIN", ""])
def test_unknown_split_raises(split: str) -> None:
    with pytest.raises(TaskFamilyError, match="not supported"):
        get_family("point-nav").sample_tasks(split, 1, seed=0)


def test_bad_seed_raises() -> None:
    with pytest.raises(TaskFamilyError, match="seed must be a non-negative int"):
        get_family("point-nav").sample_tasks("train", 1, seed=-1)


# --- environments: spaces, task switching, time limit -------------------------------------------------


@pytest.mark.parametrize("name", POINT_AND_LOCOMOTION)
def test_env_spaces_match_family(name: str) -> None:
    family = get_family(name)
    env = family.make_env()
    low = np.asarray(family.action_low, dtype=np.float32)
    high = np.asarray(family.action_high, dtype=np.float32)
    for space in (env.action_space, env.unwrapped.action_space):
        assert isinstance(space, gymnasium.spaces.Box)
        assert space.shape == (family.act_dim,)
        np.testing.assert_array_equal(space.low, low)
        np.testing.assert_array_equal(space.high, high)
    assert env.observation_space.shape == (family.obs_dim,)
    assert env.observation_space.dtype == np.float32
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32
    assert obs.shape == (family.obs_dim,)
    obs, *_ = env.step(env.action_space.sample())
    assert obs.dtype == np.float32
    assert obs.shape == (family.obs_dim,)
    assert isinstance(env, TimeLimit)
    assert env.max_episode_steps == family.episode_length
    env.close()


@pytest.mark.parametrize("name", LOCOMOTION)
def test_locomotion_obs_is_gymnasiums_observation(name: str) -> None:
    env = get_family(name).make_env()
    obs, _ = env.reset(seed=1)
    np.testing.assert_array_equal(obs, env.unwrapped._get_obs().astype(np.float32))  # type: ignore[attr-defined]
    obs, *_ = env.step(env.action_space.sample())
    np.testing.assert_array_equal(obs, env.unwrapped._get_obs().astype(np.float32))  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", POINT_AND_LOCOMOTION)
def test_reset_is_deterministic_under_seed(name: str) -> None:
    env = get_family(name).make_env()
    actions = np.random.default_rng(0).uniform(-0.1, 0.1, size=(3, env.action_space.shape[0]))  # type: ignore[index]

    def rollout(seed: int) -> list[Any]:
        out: list[Any] = [env.reset(seed=seed)[0]]
        for a in actions:
            obs, reward, *_ = env.step(a)
            out += [obs, reward]
        return out

    first = rollout(3)
    for x, y in zip(first, rollout(3), strict=True):
        np.testing.assert_array_equal(x, y)
    if name != "point-nav":  # point-nav always starts at the origin
        assert not np.array_equal(first[0], rollout(4)[0])


@pytest.mark.parametrize("name", POINT_AND_LOCOMOTION)
def test_set_task_rejects_foreign_tasks(name: str) -> None:
    family = get_family(name)
    env = family.make_env()
    foreign = _other_family_task(name)
    with pytest.raises(TaskFamilyError, match=f"belongs to family '{foreign.family}', not to '{name}'"):
        env.set_task(foreign)
    with pytest.raises(TaskFamilyError):
        family.make_env(foreign)
    with pytest.raises(TaskFamilyError):
        env.task = foreign  # the attribute route (VectorEnv.set_attr) validates too
    wrong_dim = Task(name, "train", 0, (0.5,) * (family.task_param_dim + 1), "bad")
    with pytest.raises(TaskFamilyError, match="params"):
        env.set_task(wrong_dim)
    if "ood" not in family.splits:
        with pytest.raises(TaskFamilyError, match="not supported"):
            env.set_task(Task(name, "ood", 0, (1.0,) * family.task_param_dim, "ood"))


def test_default_task_is_first_train_task_of_seed_0() -> None:
    family = get_family("halfcheetah-vel")
    env = family.make_env()
    assert env.task == family.sample_tasks("train", 1, seed=0)[0]


def test_set_task_takes_effect_at_next_reset() -> None:
    family = get_family("halfcheetah-vel")
    slow = Task("halfcheetah-vel", "train", 0, (0.0,), "v*=0")
    fast = Task("halfcheetah-vel", "train", 1, (3.0,), "v*=3")
    env = family.make_env(slow)
    env.reset(seed=0)
    zero = np.zeros(6)
    *_, info = env.step(zero)
    env.set_task(fast)
    assert env.task == slow
    *_, info = env.step(zero)
    assert info["forward_reward"] == pytest.approx(-abs(info["x_velocity"]))
    env.reset(seed=0)
    assert env.task == fast
    *_, info = env.step(zero)
    assert info["forward_reward"] == pytest.approx(-abs(info["x_velocity"] - 3.0))


def test_step_before_reset_raises() -> None:
    env = get_family("halfcheetah-dir").make_env()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(6))


@pytest.mark.parametrize("name", ["point-nav", "halfcheetah-vel"])
def test_truncates_at_episode_length(name: str) -> None:
    family = get_family(name)
    env = family.make_env()
    env.reset(seed=0)
    flags = [env.step(np.zeros(family.act_dim))[2:4] for _ in range(family.episode_length)]
    assert flags[-1] == (False, True)
    assert all(f == (False, False) for f in flags[:-1])
    env.reset(seed=0)  # the counter restarts
    assert env.step(np.zeros(family.act_dim))[3] is False


def test_async_vector_env_reaches_set_task_and_task_attribute() -> None:
    family = get_family("halfcheetah-vel")
    tasks = family.sample_tasks("test", 3, seed=0)
    vec = gymnasium.vector.AsyncVectorEnv([functools.partial(family.make_env, tasks[0])] * 2)
    try:
        vec.call("set_task", tasks[1])  # the same task everywhere
        vec.reset(seed=0)
        assert vec.get_attr("task") == (tasks[1], tasks[1])
        vec.set_attr("task", [tasks[2], tasks[0]])  # one task per sub-environment
        assert vec.get_attr("task") == (tasks[1], tasks[1])  # not before the next reset
        obs, _ = vec.reset(seed=0)
        assert obs.dtype == np.float32
        assert vec.get_attr("task") == (tasks[2], tasks[0])
        _, _, _, _, info = vec.step(np.zeros((2, family.act_dim), dtype=np.float32))
        targets = np.array([tasks[2].params[0], tasks[0].params[0]])
        np.testing.assert_allclose(info["forward_reward"], -np.abs(info["x_velocity"] - targets))
    finally:
        vec.close()


# --- point-nav dynamics ---------------------------------------------------------------------------------


def test_point_nav_dynamics_reward_clipping_and_truncation() -> None:
    family = get_family("point-nav")
    goal = (0.0, 1.0)
    env = family.make_env(Task("point-nav", "train", 0, goal, "goal=(0.00,1.00)"))
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, [0.0, 0.0])
    pos = np.zeros(2)
    actions = [(0.5, 0.2), (5.0, -30.0), (-1.0, 1.0), (0.0, 1.0)] + [(0.1, 1.0)] * 96
    for t, action in enumerate(actions, start=1):
        a = np.asarray(action, dtype=np.float32)
        obs, reward, terminated, truncated, info = env.step(a)
        pos = pos + 0.1 * np.clip(a.astype(np.float64), -1.0, 1.0)
        np.testing.assert_allclose(obs, pos, rtol=1e-6, atol=1e-6)
        assert reward == pytest.approx(-np.linalg.norm(pos - goal), rel=1e-9)
        assert info["distance"] == pytest.approx(-reward)
        assert terminated is False
        assert truncated is (t == 100)
    assert pos[1] > 1.0  # the walk passed the goal, so the reward was not monotone
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([np.nan, 0.0]))


# --- locomotion rewards and termination --------------------------------------------------------------


def _expected_reward(
    name: str,
    params: tuple[float, ...],
    qpos0: np.ndarray,
    qpos1: np.ndarray,
    cfrc: np.ndarray,
    a: np.ndarray,
) -> float:
    contact = 0.5e-3 * np.sum(np.square(np.clip(cfrc, -1.0, 1.0)))
    if name == "halfcheetah-vel":
        return -abs((qpos1[0] - qpos0[0]) / DT - params[0]) - 0.05 * np.sum(a**2)
    if name == "halfcheetah-dir":
        return params[0] * (qpos1[0] - qpos0[0]) / DT - 0.05 * np.sum(a**2)
    if name in ("ant-dir", "ant-dir-2d"):
        velocity = (qpos1[:2] - qpos0[:2]) / DT
        return float(velocity @ np.asarray(params)) - 0.5 * np.sum(a**2) - contact + 1.0
    assert name == "ant-goal"
    return -np.sum(np.abs(qpos1[:2] - np.asarray(params))) - 0.1 * np.sum(a**2) - contact


@pytest.mark.parametrize("name", LOCOMOTION)
def test_locomotion_reward_matches_simulator_state(name: str) -> None:
    family = get_family(name)
    tasks = family.sample_tasks("ood" if "ood" in family.splits else "test", 20, seed=5)
    # Two tasks with different params (e.g. both directions), switched with set_task between episodes.
    checked = [tasks[0], next(t for t in tasks if t.params != tasks[0].params)]
    env = family.make_env(checked[0])
    sim = env.unwrapped
    assert sim.dt == pytest.approx(DT)  # type: ignore[attr-defined]
    data = sim.data  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    contact_seen = False
    for task in checked:
        env.set_task(task)
        env.reset(seed=0)
        for _ in range(6):
            a = rng.uniform(-1.0, 1.0, size=family.act_dim)
            qpos0 = data.qpos.copy()
            _, reward, terminated, _, info = env.step(a)
            expected = _expected_reward(name, task.params, qpos0, data.qpos.copy(), data.cfrc_ext.copy(), a)
            np.testing.assert_allclose(reward, expected, rtol=1e-6)
            assert not terminated
            assert info["ctrl_cost"] > 0
            contact_seen |= info.get("contact_cost", 0.0) > 0
    assert contact_seen == name.startswith("ant")  # the contact term was exercised


def test_ant_actions_are_clipped_before_costs() -> None:
    env = get_family("ant-dir").make_env()
    env.reset(seed=0)
    *_, info = env.step(np.full(8, 5.0))
    assert info["ctrl_cost"] == pytest.approx(0.5 * 8)


def _step_from(env: gymnasium.Env[Any, Any], z: float, disable_contacts: bool = False) -> bool:
    env.reset(seed=0)
    sim = env.unwrapped
    if disable_contacts:
        sim.model.opt.disableflags |= mujoco.mjtDisableBit.mjDSBL_CONTACT  # type: ignore[attr-defined]
    qpos = sim.data.qpos.copy()  # type: ignore[attr-defined]
    qpos[2] = z
    sim.set_state(qpos, np.zeros(sim.model.nv))  # type: ignore[attr-defined]
    terminated: bool = env.step(np.zeros(8))[2]
    return terminated


@pytest.mark.parametrize("name", ["ant-dir", "ant-dir-2d"])
def test_ant_terminates_outside_healthy_height(name: str) -> None:
    env = get_family(name).make_env()
    assert _step_from(env, 0.6) is False
    assert _step_from(env, 1.5) is True
    assert env.unwrapped.data.qpos[2] > 1.0  # type: ignore[attr-defined]
    # Contacts off, so the floor cannot push the torso back above 0.2 within the step.
    assert _step_from(env, 0.1, disable_contacts=True) is True
    assert env.unwrapped.data.qpos[2] < 0.2  # type: ignore[attr-defined]


def test_ant_goal_does_not_terminate_on_height() -> None:
    # PEARL's ant-goal never terminates on height: with an always-negative reward that would reward suicide.
    env = get_family("ant-goal").make_env()
    assert _step_from(env, 1.5) is False


# --- Meta-World ------------------------------------------------------------------------------------------


def _check_metaworld_env(family: TaskFamily, env: TaskEnv) -> None:
    assert env.observation_space.shape == (family.obs_dim,) == (39,)
    assert env.observation_space.dtype == np.float32
    for space in (env.action_space, env.unwrapped.action_space):
        assert isinstance(space, gymnasium.spaces.Box)
        np.testing.assert_array_equal(space.low, np.asarray(family.action_low, dtype=np.float32))
        np.testing.assert_array_equal(space.high, np.asarray(family.action_high, dtype=np.float32))
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32
    assert obs.shape == (39,)
    np.testing.assert_array_equal(obs, env.reset(seed=0)[0])
    obs, reward, terminated, truncated, info = env.step(np.zeros(4, dtype=np.float32))
    assert obs.dtype == np.float32
    assert obs.shape == (39,)
    assert isinstance(reward, float)
    assert not terminated
    assert not truncated
    assert "success" in info
    goal = tuple(env.unwrapped._target_pos)  # type: ignore[attr-defined]
    np.testing.assert_allclose(goal, env.task.params)


@pytest.mark.slow
@pytest.mark.metaworld
@pytest.mark.parametrize("name", list(ML1))
def test_ml1_family(name: str) -> None:
    family = get_family(name)
    env_name = ML1[name]
    assert (family.obs_dim, family.act_dim, family.task_param_dim, family.episode_length) == (39, 4, 3, 500)
    assert family.has_success
    assert family.splits == ("train", "validation", "test")
    train = family.sample_tasks("train", 5, seed=3)
    test = family.sample_tasks("test", 5, seed=3)
    assert train == family.sample_tasks("train", 5, seed=3)
    assert {t.params for t in train}.isdisjoint(t.params for t in test)
    for task in (*train, *test):
        assert 0 <= task.index < 50
        fresh = family.draws_fresh_goals(task.split)  # type: ignore[attr-defined]  # a goal, not a number
        assert task.label.startswith(f"{env_name}@(") if fresh else task.label == f"{env_name}#{task.index}"
        assert len(task.params) == 3
    # Without replacement up to the 50 tasks of a split, with replacement beyond.
    assert len({t.index for t in family.sample_tasks("train", 50, seed=0)}) == 50
    many = family.sample_tasks("train", 60, seed=0)
    assert len(many) == 60
    assert len({t.index for t in many}) < 60

    env = family.make_env(train[0])
    assert type(env.unwrapped).__name__.lower().startswith("sawyer")
    _check_metaworld_env(family, env)
    assert isinstance(env, TimeLimit)
    assert env.max_episode_steps == 500
    env.set_task(test[0])
    _check_metaworld_env(family, env)
    with pytest.raises(TaskFamilyError, match="does not match"):
        env.set_task(dataclasses.replace(test[0], label=f"{env_name}#999"))
    with pytest.raises(TaskFamilyError, match="out of range"):
        env.set_task(dataclasses.replace(test[0], index=50))
    with pytest.raises(TaskFamilyError, match="belongs to family"):
        env.set_task(_other_family_task(name))
    env.close()


def _puck(obs: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.round(obs[4:7], 6))


@pytest.mark.slow
@pytest.mark.metaworld
def test_ml1_decoupled_draws_the_puck_of_a_train_goal_apart_from_its_goal() -> None:
    benchmark, decoupled = get_family("ml1-reach"), get_family("ml1-reach-decoupled")
    plain = benchmark.make_env(benchmark.sample_tasks("train", 1, seed=0)[0])
    train_pucks = set()
    for task in benchmark.sample_tasks("train", 50, seed=0):
        plain.set_task(task)
        train_pucks.add(_puck(plain.reset(seed=0)[0]))
    task = decoupled.sample_tasks("train", 1, seed=3)[0]
    plain.set_task(dataclasses.replace(task, family="ml1-reach"))
    own_puck = _puck(plain.reset(seed=0)[0])
    env = decoupled.make_env(task)
    pucks = []
    for k in range(10):
        obs, _ = env.reset(seed=11 if k == 0 else None)
        puck = _puck(obs)
        assert puck in train_pucks  # another train task's start ...
        assert math.dist(puck[:2], task.params[:2]) >= 0.15  # ... where the simulator accepts it
        np.testing.assert_allclose(env.unwrapped._target_pos, task.params)  # type: ignore[attr-defined]
        pucks.append(puck)
    assert len(set(pucks) - {own_puck}) > 1
    assert [_puck(env.reset(seed=11 if k == 0 else None)[0]) for k in range(10)] == pucks  # seeded
    # Test goals are the benchmark's own, puck included.
    for test_task in decoupled.sample_tasks("test", 3, seed=3):
        env.set_task(test_task)
        plain.set_task(dataclasses.replace(test_task, family="ml1-reach"))
        for _ in range(2):
            np.testing.assert_array_equal(env.reset(seed=5)[0], plain.reset(seed=5)[0])
    env.close()
    plain.close()


@pytest.mark.slow
@pytest.mark.metaworld
@pytest.mark.parametrize(
    ("name", "env_name", "low", "high"),
    [
        ("reach", "reach-v3", [-0.1, 0.8, 0.05], [0.1, 0.9, 0.3]),
        ("push", "push-v3", [-0.1, 0.8, 0.019], [0.1, 0.9, 0.02]),  # at the puck's height
    ],
)
def test_ml1_fresh_draws_train_and_validation_goals_from_the_goal_box(
    name: str, env_name: str, low: list[float], high: list[float]
) -> None:
    benchmark, fresh = get_family(f"ml1-{name}"), get_family(f"ml1-{name}-fresh")
    benchmark_goals = {t.params for t in benchmark.sample_tasks("train", 50, seed=0)}  # all 50
    assert len(benchmark_goals) == 50
    train = fresh.sample_tasks("train", 40, seed=3)
    validation = fresh.sample_tasks("validation", 40, seed=3)
    assert fresh.sample_tasks("train", 40, seed=3) == train  # seeded
    goals = np.array([t.params for t in train + validation])
    assert len({t.params for t in train + validation}) == 80  # every goal new ...
    assert benchmark_goals.isdisjoint(t.params for t in train + validation)  # ... none the benchmark's
    assert (goals >= low).all() and (goals <= high).all()  # the class's goal box
    assert all(t.label.startswith(f"{env_name}@(") for t in train)
    env = fresh.make_env(train[0])
    for task in train[:3] + validation[:3]:
        env.set_task(task)
        for k in range(3):
            obs, _ = env.reset(seed=7 if k == 0 else None)
            np.testing.assert_allclose(env.unwrapped._target_pos, task.params)  # type: ignore[attr-defined]
            assert math.dist(_puck(obs)[:2], task.params[:2]) >= 0.15
    # Test goals are the benchmark's own, puck included.
    plain = benchmark.make_env(benchmark.sample_tasks("test", 1, seed=0)[0])
    for test_task in fresh.sample_tasks("test", 3, seed=3):
        assert test_task.label.startswith(f"{env_name}#")
        env.set_task(test_task)
        plain.set_task(dataclasses.replace(test_task, family=f"ml1-{name}"))
        np.testing.assert_array_equal(env.reset(seed=5)[0], plain.reset(seed=5)[0])
    # A fresh goal's label names no benchmark task, so it only resolves on a train-like split.
    with pytest.raises(TaskFamilyError, match="does not match"):
        fresh.resolve(dataclasses.replace(train[0], split="test"))
    env.close()
    plain.close()


@pytest.mark.slow
@pytest.mark.metaworld
@pytest.mark.timeout(1200)  # building ML45's simulators takes minutes on a busy 2-core machine
@pytest.mark.parametrize("name", ["ml10", "ml45"])
def test_ml10_ml45_family(name: str) -> None:
    from metaworld import env_dict

    classes = {"ml10": env_dict.ML10_V3, "ml45": env_dict.ML45_V3}[name]
    train_classes, test_classes = dict(classes["train"]), dict(classes["test"])
    assert len(test_classes) == 5
    assert train_classes.keys().isdisjoint(test_classes)
    family = get_family(name)
    train = family.sample_tasks("train", 20, seed=0)
    test = family.sample_tasks("test", 20, seed=0)
    assert family.sample_tasks("test", 20, seed=0) == test
    assert all(_env_name(t) in train_classes for t in train)
    assert all(_env_name(t) in test_classes for t in test)  # the test split holds out whole env classes
    assert len({_env_name(t) for t in test}) > 1
    assert all(t.index < 50 * len(train_classes) for t in train)
    assert all(t.index < 50 * len(test_classes) for t in test)

    env = family.make_env(train[0])
    _check_metaworld_env(family, env)
    assert type(env.unwrapped) is train_classes[_env_name(train[0])]
    # Held-out classes: set_task switches the simulator's env class, at the next reset.
    for task in test[:3]:
        env.set_task(task)
        _check_metaworld_env(family, env)
        assert type(env.unwrapped) is test_classes[_env_name(task)]
    env.set_task(train[0])
    _check_metaworld_env(family, env)
    assert type(env.unwrapped) is train_classes[_env_name(train[0])]
    env.close()


def _env_name(task: Task) -> str:
    return task.label.split("#")[0]


@pytest.mark.parametrize("name", ["halfcheetah-vel", "halfcheetah-dir"])
def test_the_20d_halfcheetah_appends_the_torso_position(name: str) -> None:
    short, long = get_family(name), get_family(f"{name}-20d")
    assert (short.obs_dim, long.obs_dim) == (17, 20)
    task = short.sample_tasks("train", 1, seed=0)[0]
    envs = [f.make_env(Task(f.name, task.split, 0, task.params, task.label)) for f in (short, long)]
    try:
        obs = [env.reset(seed=3)[0] for env in envs]
        action = np.full(6, 0.5, np.float32)
        for _ in range(20):
            steps = [env.step(action) for env in envs]
        obs, rewards = [s[0] for s in steps], [s[1] for s in steps]
        np.testing.assert_array_equal(obs[0], obs[1][:17])
        assert rewards[0] == rewards[1]
        torso = envs[1].unwrapped.data.body("torso").xpos  # type: ignore[attr-defined]
        np.testing.assert_allclose(obs[1][17:], torso, rtol=1e-6)
        assert obs[1][19] > 0.0  # the torso's height
    finally:
        for env in envs:
            env.close()
