"""The sampler's environments, in stages: groups of envs stepped together, in this process or in workers.

A :class:`TrialSampler <trainer.rollout.TrialSampler>` splits its environments into stages. Each stage
is stepped as one batch: it is given the actions of its running envs (:meth:`Stage.send`) and later
returns what they observed (:meth:`Stage.recv`); an env whose episode ended is reset at once, and both its
last observation (for a bootstrap value) and its first of the next episode come back.

* ``sync``: one :class:`LocalStage`, stepped in this process when its results are asked for. On a
  couple of cores this is the cheapest way to step a few dozen small simulators.
* ``async``: two :class:`WorkerStage` halves, each stepped by worker processes; while one half's
  simulators step, the policy runs on the other half, so simulation and inference overlap.

This module does not import torch, so a worker never runs torch.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from multiprocessing.connection import Connection
from typing import Any, NamedTuple, Protocol

import numpy as np
from numpy.typing import NDArray

from trmrl.tasks import Task, TaskEnv, TaskFamily

__all__ = ["LocalStage", "Stage", "StepResult", "WorkerStage", "make_stages"]

_WAIT_S = 300.0
"""How long the sampler waits for a worker's reply before it calls the worker lost."""


class StepResult(NamedTuple):
    """What the stepped envs of a stage observed, in the order they were given."""

    obs: NDArray[Any]
    """``[m, O]`` observation after the step (the episode's last one where it ended)."""
    reward: NDArray[np.float64]
    terminated: NDArray[np.bool_]
    truncated: NDArray[np.bool_]
    success: NDArray[np.float32]
    """``info["success"]`` of the step where the env reports it, else 0."""
    next_obs: NDArray[Any]
    """``[m, O]`` the observation the policy sees next: the first of a new episode where one ended."""


class Stage(Protocol):
    members: NDArray[np.int64]
    """Indices (into the sampler's envs) of this stage's envs, ascending."""

    def set_tasks(self, tasks: list[Task]) -> None: ...
    def reset(self, seeds: list[int]) -> NDArray[Any]: ...
    def send(self, which: NDArray[np.int64], actions: NDArray[np.float32]) -> None: ...
    def recv(self) -> StepResult: ...
    def close(self) -> None: ...


class _Envs:
    """A list of one family's envs with the stage verbs; lives in the sampler or in a worker."""

    def __init__(self, family: TaskFamily, n: int) -> None:
        self.envs: list[TaskEnv] = [family.make_env() for _ in range(n)]
        self.dtype = self.envs[0].observation_space.dtype if self.envs else np.float32

    def set_tasks(self, tasks: list[Task]) -> None:
        for env, task in zip(self.envs, tasks, strict=True):
            env.set_wrapper_attr("task", task)

    def reset(self, seeds: list[int]) -> NDArray[Any]:
        return np.asarray([env.reset(seed=s)[0] for env, s in zip(self.envs, seeds, strict=True)], self.dtype)

    def step(self, which: NDArray[np.int64], actions: NDArray[np.float32]) -> StepResult:
        m = len(which)
        shape: tuple[int, ...] = self.envs[0].observation_space.shape or ()
        obs = np.zeros((m, *shape), self.dtype)
        reward = np.zeros(m, np.float64)
        terminated, truncated = np.zeros(m, bool), np.zeros(m, bool)
        success = np.zeros(m, np.float32)
        for j, i in enumerate(which.tolist()):
            obs[j], reward[j], terminated[j], truncated[j], info = self.envs[i].step(actions[j])
            if "success" in info:
                success[j] = float(info["success"])
        next_obs = obs.copy()
        for j in np.flatnonzero(terminated | truncated).tolist():
            next_obs[j] = self.envs[int(which[j])].reset()[0]
        return StepResult(obs, reward, terminated, truncated, success, next_obs)

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _check_which(which: NDArray[np.int64], size: int) -> None:
    if len(which) and (which.min() < 0 or which.max() >= size):
        raise ValueError(f"positions {which.tolist()} are not envs of this stage (it has {size})")


class LocalStage:
    """Envs stepped in this process, when their results are asked for."""

    def __init__(self, family: TaskFamily, members: NDArray[np.int64]) -> None:
        self.members = members
        self._envs = _Envs(family, len(members))
        self._pending: tuple[NDArray[np.int64], NDArray[np.float32]] | None = None

    def set_tasks(self, tasks: list[Task]) -> None:
        self._envs.set_tasks(tasks)

    def reset(self, seeds: list[int]) -> NDArray[Any]:
        return self._envs.reset(seeds)

    def send(self, which: NDArray[np.int64], actions: NDArray[np.float32]) -> None:
        _check_which(which, len(self.members))
        self._pending = (which, actions)

    def recv(self) -> StepResult:
        if self._pending is None:
            raise RuntimeError("recv() without a send()")
        which, actions = self._pending
        self._pending = None
        return self._envs.step(which, actions)

    def close(self) -> None:
        self._envs.close()


def _worker(conn: Connection, family: TaskFamily, n: int) -> None:
    """A worker process: holds ``n`` envs and answers the stage verbs until told to close."""
    envs = _Envs(family, n)
    conn.send(("ready", None))
    try:
        while True:
            verb, arg = conn.recv()
            if verb == "close":
                break
            try:
                if verb == "tasks":
                    envs.set_tasks(arg)
                    out: Any = None
                elif verb == "reset":
                    out = envs.reset(arg)
                else:
                    out = envs.step(*arg)
            except Exception as exc:
                try:
                    conn.send(("error", exc))
                except Exception:  # an exception that does not pickle goes as its text
                    conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
            else:
                conn.send(("ok", out))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        envs.close()


class WorkerStage:
    """Envs split over worker processes, stepped while the sampler does other work."""

    def __init__(self, family: TaskFamily, members: NDArray[np.int64], workers: int) -> None:
        self.members = members
        # fork where there is one: a worker then needs no import of the caller's main module (which
        # spawn would re-run) and inherits the family as it is; it never touches torch.
        ctx: Any = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        parts = np.array_split(np.arange(len(members)), max(1, min(workers, len(members))))
        self._parts = [p for p in parts if len(p)]
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._waiting = False
        """A step was sent and its replies not yet read."""
        try:
            for part in self._parts:
                here, there = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(there, family, len(part)), daemon=True)
                proc.start()
                there.close()
                self._conns.append(here)
                self._procs.append(proc)
            for conn in self._conns:
                self._reply(conn)
        except BaseException:
            self.close()
            raise

    def _reply(self, conn: Connection) -> Any:
        if not conn.poll(_WAIT_S):
            raise RuntimeError(f"an env worker did not answer within {_WAIT_S:.0f} s")
        try:
            status, out = conn.recv()
        except EOFError:
            raise RuntimeError("an env worker died") from None
        if status == "error":
            out.add_note("(raised in an env worker process)")
            raise out
        return out

    @staticmethod
    def _send(conn: Connection, message: tuple[str, Any]) -> None:
        try:
            conn.send(message)
        except (BrokenPipeError, ConnectionResetError):
            raise RuntimeError("an env worker died") from None

    def _ask(self, messages: list[tuple[str, Any]]) -> list[Any]:
        for conn, message in zip(self._conns, messages, strict=True):
            self._send(conn, message)
        return [self._reply(conn) for conn in self._conns]

    def set_tasks(self, tasks: list[Task]) -> None:
        self._ask([("tasks", [tasks[i] for i in part]) for part in self._parts])

    def reset(self, seeds: list[int]) -> NDArray[Any]:
        return np.concatenate(self._ask([("reset", [seeds[i] for i in part]) for part in self._parts]))

    def send(self, which: NDArray[np.int64], actions: NDArray[np.float32]) -> None:
        _check_which(which, len(self.members))
        for conn, part in zip(self._conns, self._parts, strict=True):
            mine = (which >= part[0]) & (which <= part[-1])
            self._send(conn, ("step", (which[mine] - part[0], actions[mine])))
        self._waiting = True

    def recv(self) -> StepResult:
        if not self._waiting:
            raise RuntimeError("recv() without a send()")
        self._waiting = False
        results: list[StepResult] = [self._reply(conn) for conn in self._conns]
        return StepResult(*(np.concatenate(field) for field in zip(*results, strict=True)))

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("close", None))
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []


def make_stages(family: TaskFamily, n_envs: int, mode: str, workers: int = 0) -> list[Stage]:
    """The stages of ``n_envs`` envs for vector mode ``sync`` or ``async``.

    ``workers`` (``async``): worker processes in all, at least one per stage; 0 picks one per CPU
    core the process may use, at least two.
    """
    if mode == "sync":
        return [LocalStage(family, np.arange(n_envs))]
    if mode != "async":
        raise ValueError(f"vector mode must be 'sync' or 'async' (got {mode!r})")
    if workers < 0:
        raise ValueError(f"env workers must be >= 0 (got {workers})")
    if n_envs < 2:
        return [WorkerStage(family, np.arange(n_envs), max(workers, 1))]
    total = workers or max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    halves = np.array_split(np.arange(n_envs), 2)
    stages: list[Stage] = []
    try:
        for i, half in enumerate(halves):
            stages.append(WorkerStage(family, half, max(1, total // 2 + (i < total % 2))))
    except BaseException:
        for stage in stages:
            stage.close()
        raise
    return stages
