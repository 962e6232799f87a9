"""Meta-World v3 families: ML1 (reach, push, pick-place), ML10 and ML45.

The tasks are the benchmark's own: each benchmark object is built once per process with a fixed seed
(:data:`BENCHMARK_SEED`), so task ``i`` of a split is the same goal everywhere, and a :class:`Task` only
carries its index into ``benchmark.train_tasks`` / ``benchmark.test_tasks``. Building ML45 simulates
~2500 resets (tens of seconds), so it is done lazily and cached; processes forked after the first
``sample_tasks`` / ``make_env`` (e.g. ``AsyncVectorEnv`` workers on Linux) inherit the cache.

``Task.params`` is the goal position (``env._target_pos`` after ``set_task`` + ``reset``). Meta-World
only exposes it after a reset, so it is probed with a throw-away environment for the tasks actually
sampled, and cached. Note that a few classes (e.g. ``hammer-v3``, ``sweep-into-v3``, ``bin-picking-v3``)
randomise the object rather than the goal, so all their tasks share the same params.

``metaworld`` is imported inside functions because importing it takes about half a second.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import numpy as np
from gymnasium.spaces import Box
from numpy.typing import NDArray

from trmrl.tasks.base import ObsArray, Task, TaskEnv, TaskFamily, TaskFamilyError
from trmrl.tasks.metaworld_fast import speed_up

__all__ = ["BENCHMARK_SEED", "FAMILIES", "MAX_CACHED_SIMS", "MetaWorldFamily"]

BENCHMARK_SEED: Final = 0
"""Seed every Meta-World benchmark object is built with, so the goal sets are identical everywhere."""

MAX_CACHED_SIMS: Final = 4
"""Simulators (one per Meta-World env class) an ML10/ML45 environment keeps for switching classes.

One simulator holds about 20 MB and takes about 0.1 s to build, so all 50 would cost 1 GB per worker.
"""

_GOAL_TOLERANCE: Final = 1e-9


@dataclass
class _SplitData:
    """A benchmark split: Meta-World's task objects plus what :class:`Task` needs from them."""

    tasks: list[Any]
    env_names: list[str]
    labels: list[str]
    goals: dict[int, tuple[float, ...]] = field(default_factory=dict)


@dataclass
class _Benchmark:
    classes: dict[str, Any]
    splits: dict[str, _SplitData]


_CACHE_LOCK = threading.Lock()
_BENCHMARKS: dict[str, _Benchmark] = {}


def _split_data(mw_tasks: list[Any]) -> _SplitData:
    env_names = [t.env_name for t in mw_tasks]
    labels = []
    per_class: dict[str, int] = {}
    for name in env_names:
        k = per_class.get(name, 0)
        per_class[name] = k + 1
        labels.append(f"{name}#{k}")  # k-th goal of that class, the number a Meta-World user would use
    return _SplitData(list(mw_tasks), env_names, labels)


def _benchmark(key: str) -> _Benchmark:
    """The cached benchmark ``key`` (``"ML10"``, ``"ML45"`` or an ML1 env name such as ``"reach-v3"``)."""
    with _CACHE_LOCK:
        bench = _BENCHMARKS.get(key)
        if bench is None:
            import metaworld

            mw: Any
            if key == "ML10":
                mw = metaworld.ML10(seed=BENCHMARK_SEED)
            elif key == "ML45":
                mw = metaworld.ML45(seed=BENCHMARK_SEED)
            else:
                mw = metaworld.ML1(key, seed=BENCHMARK_SEED)
            bench = _Benchmark(
                classes={**mw.train_classes, **mw.test_classes},
                splits={"train": _split_data(mw.train_tasks), "test": _split_data(mw.test_tasks)},
            )
            _BENCHMARKS[key] = bench
        return bench


def _goals(bench: _Benchmark, split: str, indices: list[int]) -> list[tuple[float, ...]]:
    """Goal positions of the given tasks, probing (and caching) the ones not seen yet."""
    data = bench.splits[split]
    with _CACHE_LOCK:
        missing: dict[str, list[int]] = {}
        for i in sorted(set(indices) - data.goals.keys()):
            missing.setdefault(data.env_names[i], []).append(i)
        for env_name, idxs in missing.items():
            sim = bench.classes[env_name]()
            try:
                for i in idxs:
                    sim.set_task(data.tasks[i])
                    sim.reset()
                    data.goals[i] = tuple(float(v) for v in sim._target_pos)
            finally:
                sim.close()
        return [data.goals[i] for i in indices]


_OBJECT_GOAL_MIN_XY: Final = 0.15
_TRAIN_OBJECTS: dict[tuple[str, str], NDArray[np.float64]] = {}


def _train_objects(key: str, env_name: str) -> NDArray[np.float64]:
    """``[n, 3]`` object start positions of the train tasks of ``env_name`` in benchmark ``key``."""
    with _CACHE_LOCK:
        cached = _TRAIN_OBJECTS.get((key, env_name))
    if cached is not None:
        return cached
    bench = _benchmark(key)
    data = bench.splits["train"]
    sim = bench.classes[env_name]()
    try:
        vectors = []
        for mw_task, name in zip(data.tasks, data.env_names, strict=True):
            if name == env_name:
                sim.set_task(mw_task)
                vectors.append(np.array(sim._last_rand_vec, dtype=np.float64))
    finally:
        sim.close()
    if any(v.shape != (6,) for v in vectors):
        raise TaskFamilyError(f"{env_name}: decouple_objects needs an (object, goal) task vector of 6 values")
    objects = np.stack([v[:3] for v in vectors])
    with _CACHE_LOCK:
        _TRAIN_OBJECTS[(key, env_name)] = objects
    return objects


_GOAL_SPACES: dict[tuple[str, str], tuple[NDArray[np.float64], NDArray[np.float64]]] = {}


def _goal_space(key: str, env_name: str) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(low, high)`` of the goal positions ``env_name``'s own randomisation draws from.

    Some classes (push) put the goal at the object's height whatever height was drawn: for those the
    box is flat at that height, so that a goal drawn from it is the goal the class will use.
    """
    with _CACHE_LOCK:
        cached = _GOAL_SPACES.get((key, env_name))
    if cached is not None:
        return cached
    sim = _benchmark(key).classes[env_name]()
    try:
        space = sim._random_reset_space
        low, high = np.asarray(space.low, np.float64)[-3:], np.asarray(space.high, np.float64)[-3:]
        heights = []
        if len(space.low) == 6:
            goal = (low + high) / 2
            objects = _allowed_objects(_train_objects(key, env_name), goal)
            sim._freeze_rand_vec = True
            for z in (low[2], high[2]):
                sim._last_rand_vec = np.concatenate([objects[0], goal[:2], [z]])
                sim.reset()
                heights.append(float(sim._target_pos[2]))
        if len(heights) == 2 and high[2] > low[2] and math.isclose(heights[0], heights[1], abs_tol=1e-9):
            low[2] = high[2] = heights[0]
        bounds = (low, high)
    finally:
        sim.close()
    with _CACHE_LOCK:
        _GOAL_SPACES[(key, env_name)] = bounds
    return bounds


def _allowed_objects(objects: NDArray[np.float64], goal: NDArray[np.float64]) -> NDArray[np.float64]:
    """The object starts a class's reset accepts with ``goal``: the classes redraw until the object is
    15 cm (in x, y) from the goal, so with the task vector frozen a closer object would loop for ever."""
    return objects[np.linalg.norm(objects[:, :2] - goal[:2], axis=1) >= _OBJECT_GOAL_MIN_XY]


def _benchmark_split(split: str) -> str:
    """Meta-World defines train and test goals only: validation tasks are train goals drawn with their
    own seed (the training distribution, as with every family)."""
    return "train" if split == "validation" else split


@dataclass(frozen=True)
class MetaWorldFamily(TaskFamily):
    """A Meta-World benchmark as a task family.

    Attributes:
        benchmark: ``"ML10"``, ``"ML45"`` or the ML1 env name (e.g. ``"reach-v3"``).
        decouple_objects: ML1 only. On train (and validation) tasks, every reset places the object where
            another train task of the class places it, drawn at random, the goal unchanged; test tasks are
            the benchmark's, untouched. Each ML1 task fixes its object's start together with its goal, and
            the object is in the observation: on 50 train tasks a policy can read the goal off the object's
            position, which tells nothing about a held-out goal. Drawing the object independently of the
            goal takes that shortcut away (the goal is then found from the reward only).
        fresh_goals: ML1 only, with ``decouple_objects``. Train and validation tasks are not the
            benchmark's 50 train goals but goals drawn afresh, uniformly from the box the class itself
            draws goals from (``validation``: with its own seed, so goals no update trained on); each
            still names a benchmark train task for its class. Test tasks are the benchmark's, untouched.
            Measures how much of the gap between train and test goals is the 50-goal train set.
    """

    benchmark: str
    decouple_objects: bool = False
    fresh_goals: bool = False
    meta_world: ClassVar[bool] = True

    def draws_fresh_goals(self, split: str) -> bool:
        """Whether tasks of ``split`` are goals drawn afresh rather than the benchmark's (``fresh_goals``)."""
        return self.fresh_goals and _benchmark_split(split) == "train"

    def _sample_tasks(self, split: str, n: int, rng: np.random.Generator) -> list[Task]:
        bench = _benchmark(self.benchmark)
        data = bench.splits[_benchmark_split(split)]
        available = len(data.tasks)
        indices = [int(i) for i in rng.choice(available, size=n, replace=n > available)]
        if self.draws_fresh_goals(split):
            return [self._fresh_task(split, i, rng) for i in indices]
        goals = _goals(bench, _benchmark_split(split), indices)
        return [Task(self.name, split, i, g, data.labels[i]) for i, g in zip(indices, goals, strict=True)]

    def _fresh_task(self, split: str, index: int, rng: np.random.Generator) -> Task:
        """A goal drawn from the class's goal box for benchmark train task ``index``'s class, redrawn
        until some train object start lies 15 cm from it."""
        env_name = _benchmark(self.benchmark).splits["train"].env_names[index]
        low, high = _goal_space(self.benchmark, env_name)
        objects = _train_objects(self.benchmark, env_name)
        for _ in range(1000):
            goal = rng.uniform(low, high)
            if len(_allowed_objects(objects, goal)):
                break
        else:  # pragma: no cover - the boxes of the ML1 classes leave room everywhere
            raise TaskFamilyError(f"{self.name}: no goal in {env_name}'s box is 15 cm from a train object")
        label = f"{env_name}@({goal[0]:.3f}, {goal[1]:.3f}, {goal[2]:.3f})"
        return Task(self.name, split, index, tuple(float(g) for g in goal), label)

    def resolve(self, task: Task) -> tuple[str, Any]:
        """Return the Meta-World env name and task object behind ``task``.

        Raises:
            TaskFamilyError: If ``task`` is not a task of this family's benchmark (wrong family or split,
                index out of range, or a label that does not match the benchmark's task at that index).
        """
        self.check_task(task)
        data = _benchmark(self.benchmark).splits[_benchmark_split(task.split)]
        if task.index >= len(data.tasks):
            raise TaskFamilyError(
                f"{self.name}: {task.split} task index {task.index} out of range (0..{len(data.tasks) - 1})"
            )
        if not self.draws_fresh_goals(task.split) and task.label != data.labels[task.index]:
            # Guards against tasks sampled from a differently seeded benchmark or another metaworld version.
            raise TaskFamilyError(
                f"{self.name}: task label {task.label!r} does not match {data.labels[task.index]!r}, "
                f"the benchmark's {task.split} task {task.index}"
            )
        return data.env_names[task.index], data.tasks[task.index]

    def _make_env(self, task: Task) -> TaskEnv:
        return _MetaWorldEnv(self, task)


class _MetaWorldEnv(TaskEnv):
    """Meta-World env whose simulator follows the task's env class (ML10/ML45 mix classes).

    Rewards, termination (never) and ``info`` (including ``"success"``) are Meta-World's own (each
    simulator computes two of its per-step quantities faster, to the same values:
    :mod:`trmrl.tasks.metaworld_fast`).
    """

    family: MetaWorldFamily

    def __init__(self, family: MetaWorldFamily, task: Task) -> None:
        env_name, _ = family.resolve(task)
        bench = _benchmark(family.benchmark)
        sim = speed_up(bench.classes[env_name](), env_name)
        super().__init__(sim, family, task)
        self._classes = bench.classes
        self._sim: Any = sim  # self.env, typed loosely to reach Meta-World's attributes
        self._sims: OrderedDict[str, Any] = OrderedDict([(env_name, sim)])
        # Meta-World clips observations to these bounds, which are the same for every class.
        space = sim.observation_space
        self.observation_space = Box(
            space.low.astype(np.float32), space.high.astype(np.float32), dtype=np.float32
        )
        self._expected_goal: tuple[float, ...] | None = None
        self._decoupled_vectors: NDArray[np.float64] | None = None
        """``decouple_objects``: the task vectors a reset draws from (another train task's object, this
        task's goal); None: the task's own vector."""
        self._object_rng = np.random.default_rng(0)

    def set_task(self, task: Task) -> None:
        """Use ``task`` (of any env class of the benchmark) from the next :meth:`reset` on.

        Raises:
            TaskFamilyError: If ``task`` is not a task of this environment's benchmark.
        """
        self.family.resolve(task)  # validate now, so that misuse is reported here and not at reset
        self._pending_task = task

    def _sim_for(self, env_name: str) -> Any:
        sim = self._sims.pop(env_name, None)
        if sim is None:
            sim = speed_up(self._classes[env_name](), env_name)
        self._sims[env_name] = sim  # (re)insert as most recently used
        while len(self._sims) > MAX_CACHED_SIMS:
            _, evicted = self._sims.popitem(last=False)
            evicted.close()
        return sim

    def _apply_task(self, task: Task) -> None:
        env_name, mw_task = self.family.resolve(task)
        sim = self._sim_for(env_name)
        sim.set_task(mw_task)
        self.env = sim
        self._sim = sim
        self._expected_goal = task.params
        self._decoupled_vectors = None
        if self.family.decouple_objects and _benchmark_split(task.split) == "train":
            if self.family.draws_fresh_goals(task.split):
                goal = np.asarray(task.params, dtype=np.float64)
            else:
                goal = np.asarray(sim._last_rand_vec, dtype=np.float64)[3:]
            allowed = _allowed_objects(_train_objects(self.family.benchmark, env_name), goal)
            if len(allowed):
                self._decoupled_vectors = np.hstack([allowed, np.tile(goal, (len(allowed), 1))])

    def _reset_sim(self, seed: int | None, options: dict[str, Any] | None) -> tuple[ObsArray, dict[str, Any]]:
        # Meta-World's reset ignores its seed argument; its episodes are deterministic anyway (the goal is
        # frozen by set_task), but seeding the simulator's generator keeps gymnasium's reset contract.
        if seed is not None:
            self._sim.seed(seed)
            self._object_rng = np.random.default_rng([seed, 0x0B7EC7])
        if self._decoupled_vectors is not None:
            # A train task's object start drawn at random, this task's goal (``decouple_objects``).
            vectors = self._decoupled_vectors
            self._sim._last_rand_vec = vectors[int(self._object_rng.integers(len(vectors)))].copy()
        obs, info = self.env.reset(seed=seed, options=options)
        if self._expected_goal is not None:
            goal = self._sim._target_pos
            if not all(
                math.isclose(g, e, abs_tol=_GOAL_TOLERANCE)
                for g, e in zip(goal, self._expected_goal, strict=True)
            ):
                raise TaskFamilyError(
                    f"{self.family.name}: task {self.task.label!r} has goal {self._expected_goal} but the "
                    f"benchmark's goal is {tuple(goal)}; the task was sampled from a different benchmark"
                )
            self._expected_goal = None
        return np.asarray(obs, dtype=np.float32), info

    def step(self, action: NDArray[Any]) -> tuple[ObsArray, float, bool, bool, dict[str, Any]]:
        return self._step_env(action)

    def close(self) -> None:
        """Close every cached simulator."""
        while self._sims:
            _, sim = self._sims.popitem()
            sim.close()


def _family(
    name: str, benchmark: str, description: str, decouple_objects: bool = False, fresh_goals: bool = False
) -> MetaWorldFamily:
    return MetaWorldFamily(
        name=name,
        obs_dim=39,
        act_dim=4,
        action_low=(-1.0,) * 4,
        action_high=(1.0,) * 4,
        episode_length=500,
        task_param_dim=3,
        has_success=True,
        splits=("train", "validation", "test"),
        description=description,
        benchmark=benchmark,
        decouple_objects=decouple_objects,
        fresh_goals=fresh_goals,
    )


FAMILIES: Final[tuple[TaskFamily, ...]] = (
    _family("ml1-reach", "reach-v3", "Meta-World ML1 reach-v3: 50 train / 50 test goal positions."),
    _family("ml1-push", "push-v3", "Meta-World ML1 push-v3: 50 train / 50 test goal positions."),
    _family(
        "ml1-reach-decoupled",
        "reach-v3",
        "Meta-World ML1 reach-v3; on train goals the puck starts where another train task puts it "
        "(test goals: the benchmark's).",
        decouple_objects=True,
    ),
    _family(
        "ml1-reach-fresh",
        "reach-v3",
        "Meta-World ML1 reach-v3; train and validation goals drawn afresh from the class's goal box, the "
        "puck from the train tasks' starts (test goals: the benchmark's).",
        decouple_objects=True,
        fresh_goals=True,
    ),
    _family(
        "ml1-push-fresh",
        "push-v3",
        "Meta-World ML1 push-v3; train and validation goals drawn afresh from the class's goal box, the "
        "puck from the train tasks' starts (test goals: the benchmark's).",
        decouple_objects=True,
        fresh_goals=True,
    ),
    _family(
        "ml1-pick-place", "pick-place-v3", "Meta-World ML1 pick-place-v3: 50 train / 50 test goal positions."
    ),
    _family("ml10", "ML10", "Meta-World ML10: 10 train env classes, 5 held-out test classes, 50 goals each."),
    _family("ml45", "ML45", "Meta-World ML45: 45 train env classes, 5 held-out test classes, 50 goals each."),
)
