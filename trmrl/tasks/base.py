"""Task, task family and environment base types, and the family registry.

A *task family* is a distribution over MDPs that share observation and action spaces (e.g. HalfCheetah
with a target velocity). A *task* is one member of a family, identified by its family name, its split
and a numeric parameter vector (the "oracle" description of the task, never observed by the policy).

Every environment returned by :meth:`TaskFamily.make_env` is a :class:`TaskEnv`: a single wrapper layer
that owns the time limit, emits float32 observations and exposes :meth:`TaskEnv.set_task` as the
outermost object, so ``gymnasium.vector`` ``call("set_task", ...)`` reaches it directly.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, TypeAlias

import gymnasium
import numpy as np
from gymnasium.spaces import Box
from gymnasium.wrappers import TimeLimit
from numpy.typing import NDArray

__all__ = [
    "SPLITS",
    "ObsArray",
    "Split",
    "Task",
    "TaskEnv",
    "TaskFamily",
    "TaskFamilyError",
    "family_names",
    "get_family",
    "register_family",
]

Split = Literal["train", "validation", "test", "ood"]
"""A task split: ``train``, ``validation`` and ``test`` share a distribution (separate samples), ``ood``
does not. ``validation`` is for choosing checkpoints and settings, so that ``test`` stays held out."""

SPLITS: Final[tuple[str, ...]] = ("train", "validation", "test", "ood")

# Each split gets its own random stream so that train, validation and test tasks differ for the same
# seed. The first three keep the numbers they had before validation existed: the same seed still draws
# the same train, test and ood tasks.
_SPLIT_STREAM: Final[dict[str, int]] = {"train": 0, "test": 1, "ood": 2, "validation": 3}

ObsArray: TypeAlias = NDArray[np.float32]
"""Observation type of every task environment."""


class TaskFamilyError(ValueError):
    """Raised for an unknown family, an unsupported split, a bad sample count or a foreign task."""


@dataclass(frozen=True)
class Task:
    """One task of a family.

    Attributes:
        family: Registry name of the family this task belongs to, e.g. ``"halfcheetah-vel"``.
        split: ``"train"``, ``"validation"``, ``"test"`` or ``"ood"``.
        index: Position in the sampled list (Meta-World: index into the benchmark's task list).
        params: Numeric task description of length ``family.task_param_dim`` (the oracle input).
        label: Short human-readable description, e.g. ``"v*=1.73"`` or ``"reach-v3#17"``.
    """

    family: str
    split: str
    index: int
    params: tuple[float, ...]
    label: str

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise TaskFamilyError(f"task split must be one of {SPLITS}, got {self.split!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int | np.integer) or self.index < 0:
            raise TaskFamilyError(f"task index must be a non-negative int, got {self.index!r}")
        # Normalise so that tasks built from JSON lists or numpy values compare and hash like sampled ones.
        object.__setattr__(self, "index", int(self.index))
        object.__setattr__(self, "params", tuple(float(p) for p in self.params))


@dataclass(frozen=True)
class TaskFamily(ABC):
    """A family of tasks sharing observation and action spaces.

    Subclasses implement :meth:`_sample_tasks` and :meth:`_make_env`; the public methods validate
    their arguments first so every family reports misuse the same way (:class:`TaskFamilyError`).

    Attributes:
        name: Registry name, e.g. ``"ant-dir"``.
        obs_dim: Length of the (float32) observation vector.
        act_dim: Length of the action vector.
        action_low: Per-dimension lower action bound.
        action_high: Per-dimension upper action bound.
        episode_length: Steps after which an episode is truncated.
        task_param_dim: Length of :attr:`Task.params`.
        has_success: Whether ``info["success"]`` is reported by ``step``.
        splits: The splits this family supports.
        description: One-line human description.
        meta_world: Whether the family is a Meta-World benchmark (trained and evaluated without the
            oracle and memoryless references).
    """

    meta_world: ClassVar[bool] = False

    name: str
    obs_dim: int
    act_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    episode_length: int
    task_param_dim: int
    has_success: bool
    splits: tuple[str, ...]
    description: str

    def __post_init__(self) -> None:
        if len(self.action_low) != self.act_dim or len(self.action_high) != self.act_dim:
            raise ValueError(f"{self.name}: action bounds must have act_dim={self.act_dim} entries")
        if not self.splits or not set(self.splits) <= set(SPLITS):
            raise ValueError(f"{self.name}: splits must be a non-empty subset of {SPLITS}")

    def sample_tasks(self, split: str, n: int, seed: int) -> list[Task]:
        """Sample ``n`` tasks of ``split``, deterministically under ``seed``.

        Every split draws from its own random stream, so train, validation and test differ for the same
        seed; validation tasks come from the training distribution.

        Raises:
            TaskFamilyError: If the split is not supported, ``n`` is not a positive int or ``seed`` is
                not a non-negative int.
        """
        self._check_split(split)
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise TaskFamilyError(f"{self.name}: n must be a positive int, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise TaskFamilyError(f"{self.name}: seed must be a non-negative int, got {seed!r}")
        rng = np.random.default_rng([_SPLIT_STREAM[split], operator.index(seed)])
        tasks = self._sample_tasks(split, int(n), rng)
        if (
            not isinstance(tasks, list)
            or len(tasks) != n
            or not all(isinstance(t, Task) and t.family == self.name and t.split == split for t in tasks)
        ):
            got = f"a {type(tasks).__name__}"
            if isinstance(tasks, list | tuple):
                got += f" of {len(tasks)} " + ", ".join(
                    sorted({type(t).__name__ for t in tasks}) or ["items"]
                )
            raise TaskFamilyError(
                f"{self.name}: _sample_tasks({split!r}, {n}) must return a list of {n} Task objects of "
                f"family {self.name!r} and split {split!r}; it returned {got}"
            )
        return tasks

    def make_env(self, task: Task | None = None) -> TaskEnv:
        """Create an environment of this family set to ``task``.

        Args:
            task: The task in effect from the first ``reset``; ``None`` means the first train task of
                seed 0.

        Returns:
            A :class:`TaskEnv` truncating episodes after :attr:`episode_length` steps.
        """
        if task is None:
            task = self.sample_tasks("train", 1, seed=0)[0]
        self.check_task(task)
        return self._make_env(task)

    def check_task(self, task: Task) -> None:
        """Raise :class:`TaskFamilyError` unless ``task`` is a well-formed task of this family."""
        if not isinstance(task, Task):
            raise TaskFamilyError(f"{self.name}: expected a Task, got {type(task).__name__}")
        if task.family != self.name:
            raise TaskFamilyError(
                f"task {task.label!r} belongs to family {task.family!r}, not to {self.name!r}"
            )
        self._check_split(task.split)
        if len(task.params) != self.task_param_dim:
            raise TaskFamilyError(
                f"{self.name}: task params must have {self.task_param_dim} entries, got {len(task.params)}"
            )
        if not all(math.isfinite(p) for p in task.params):
            raise TaskFamilyError(f"{self.name}: task params must be finite, got {task.params}")

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise TaskFamilyError(
                f"{self.name}: split {split!r} is not supported; supported splits: {', '.join(self.splits)}"
            )

    @abstractmethod
    def _sample_tasks(self, split: str, n: int, rng: np.random.Generator) -> list[Task]:
        """Sample ``n`` tasks of an already validated ``split`` from ``rng``."""

    @abstractmethod
    def _make_env(self, task: Task) -> TaskEnv:
        """Create the environment for an already validated ``task``."""


class TaskEnv(TimeLimit[ObsArray, NDArray[Any]], ABC):
    """The single wrapper layer around a simulator that every :meth:`TaskFamily.make_env` returns.

    It is a :class:`gymnasium.wrappers.TimeLimit` (so code that looks for one finds it) but counts the
    steps itself (:attr:`elapsed_steps`), because subclasses implement ``step`` directly on the simulator
    to avoid per-step overhead. :meth:`set_task` only records the task; it takes effect at the next
    :meth:`reset`, so a running episode is never changed halfway.
    """

    def __init__(self, env: gymnasium.Env[Any, Any], family: TaskFamily, task: Task) -> None:
        family.check_task(task)
        super().__init__(env, family.episode_length)
        self.family = family
        self._task = task
        self._pending_task: Task | None = task
        self._steps = -1  # -1 until the first reset: stepping before it is an error
        self.observation_space = Box(-np.inf, np.inf, shape=(family.obs_dim,), dtype=np.float32)
        self.action_space = Box(
            np.asarray(family.action_low, dtype=np.float32),
            np.asarray(family.action_high, dtype=np.float32),
            dtype=np.float32,
        )

    @property
    def task(self) -> Task:
        """The task of the current episode (before the first reset: the task it will use).

        Assigning to it is :meth:`set_task`, so ``VectorEnv.set_attr("task", tasks)`` gives every
        sub-environment its own task; like :meth:`set_task` it takes effect at the next reset, and until
        then this property still reports the running episode's task.
        """
        return self._task

    @task.setter
    def task(self, task: Task) -> None:
        self.set_task(task)

    @property
    def elapsed_steps(self) -> int:
        """Steps taken in the current episode (-1 before the first reset)."""
        return self._steps

    @property
    def max_episode_steps(self) -> int:
        """Steps after which an episode is truncated (the family's ``episode_length``)."""
        return self._max_episode_steps

    def set_task(self, task: Task) -> None:
        """Use ``task`` from the next :meth:`reset` on.

        Raises:
            TaskFamilyError: If ``task`` does not belong to this environment's family or split set.
        """
        self.family.check_task(task)
        self._pending_task = task

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsArray, dict[str, Any]]:
        """Start an episode of the current task (applying a task given to :meth:`set_task` first)."""
        if self._pending_task is not None:
            self._apply_task(self._pending_task)
            self._task = self._pending_task
            self._pending_task = None
        self._steps = 0
        return self._reset_sim(seed, options)

    def _tick(self) -> bool:
        """Count one step; return whether the episode is truncated by the time limit."""
        steps = self._steps
        if steps < 0:
            raise RuntimeError("reset() must be called before step()")
        steps += 1
        self._steps = steps
        return steps >= self._max_episode_steps

    def _step_env(self, action: NDArray[Any]) -> tuple[ObsArray, float, bool, bool, dict[str, Any]]:
        """One step of the wrapped gymnasium env with its own reward, termination and ``info``, counted
        against the family's time limit."""
        truncated = self._tick()
        obs, reward, terminated, env_truncated, info = self.env.step(action)
        return (
            np.asarray(obs, dtype=np.float32),
            float(reward),
            bool(terminated),
            truncated or bool(env_truncated),
            info,
        )

    @abstractmethod
    def step(self, action: NDArray[Any]) -> tuple[ObsArray, float, bool, bool, dict[str, Any]]:
        """Advance one step; subclasses must call :meth:`_tick` exactly once."""

    @abstractmethod
    def _apply_task(self, task: Task) -> None:
        """Make ``task`` (already validated) the task of the episode that is about to start."""

    @abstractmethod
    def _reset_sim(self, seed: int | None, options: dict[str, Any] | None) -> tuple[ObsArray, dict[str, Any]]:
        """Reset the simulator and return the first observation."""


_REGISTRY: dict[str, TaskFamily] = {}


def register_family(family: TaskFamily) -> None:
    """Add ``family`` to the registry under ``family.name``.

    Raises:
        ValueError: If a family with that name is already registered.
    """
    if family.name in _REGISTRY:
        raise ValueError(f"task family {family.name!r} is already registered")
    _REGISTRY[family.name] = family


ENTRY_POINT_GROUP: Final = "trmrl.task_families"
"""Installed packages offer families under this entry-point group: ``name = "module:attribute"``, the
attribute a :class:`TaskFamily` (or a function of no arguments returning one) named ``name``."""


def _one_line(exc: BaseException, *, typed: bool = False) -> str:
    """``exc`` as one line of text (its first line), with its type in front when ``typed``."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if not typed:
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_attribute(spec: str) -> TaskFamily:
    """The family at ``module:attribute`` (a family, or a zero-argument function returning one)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise TaskFamilyError(f"cannot load task family {spec!r}: expected module:attribute")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskFamilyError(f"cannot load task family {spec!r}: {_one_line(exc)}") from exc
    except Exception as exc:  # a user's module: whatever its import raises, name the module and the error
        raise TaskFamilyError(
            f"cannot load task family {spec!r}: importing {module_name} raised {_one_line(exc, typed=True)}"
        ) from exc
    try:
        for part in attribute.split("."):
            target = getattr(target, part)
    except AttributeError as exc:
        raise TaskFamilyError(f"cannot load task family {spec!r}: {_one_line(exc)}") from exc
    if callable(target) and not isinstance(target, TaskFamily):
        try:
            target = target()
        except Exception as exc:  # a user's factory: whatever it raises, say which one failed
            raise TaskFamilyError(
                f"cannot build task family from {spec!r}: {_one_line(exc, typed=True)}"
            ) from exc
    family = target
    if not isinstance(family, TaskFamily):
        raise TaskFamilyError(f"{spec!r} is a {type(family).__name__}, not a TaskFamily")
    return family


def _installed(name: str | None = None) -> list[importlib.metadata.EntryPoint]:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in found if name is None or ep.name == name]


def get_family(name: str) -> TaskFamily:
    """Return the family ``name``: a built-in or registered one, one an installed package offers under
    the ``trmrl.task_families`` entry-point group, or ``module:attribute``.

    A family found the last two ways is registered under its own name, so a checkpoint that records
    that name finds it again.

    Raises:
        TaskFamilyError: If no family of that name exists; the message lists the known names.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        family = _load_attribute(name)
    else:
        offered = _installed(name)
        if not offered:
            raise TaskFamilyError(
                f"unknown task family {name!r}; known families: {', '.join(family_names())}"
            )
        family = _load_attribute(offered[0].value)
        if family.name != name:
            raise TaskFamilyError(
                f"entry point {name!r} of {ENTRY_POINT_GROUP} names a family {family.name!r}"
            )
    known = _REGISTRY.get(family.name)
    if known is not None and known is not family:
        raise TaskFamilyError(f"{name!r} gives a family named {family.name!r}, which is another family")
    _REGISTRY[family.name] = family
    return family


def family_names() -> tuple[str, ...]:
    """Names of all registered families, in registration order, then those installed packages offer."""
    return tuple(dict.fromkeys([*_REGISTRY, *(ep.name for ep in _installed())]))
