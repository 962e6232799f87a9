"""``trmrl-robot-loop``: a fixed-rate control loop with a per-step deadline and a declared fallback action.

A robot cannot wait for a late policy. At every tick (default 50 Hz) the loop sends the newest
observation with a timeout that ends at the step's deadline; when no action has come by then --
the service is slow, restarting or down -- it applies the declared fallback (``zeros``, or ``hold``
the last action) and counts a deadline miss. The service is told what really ran
(``applied_action``), and the step counter lets the next tick find out whether the service got the
step it never answered, so the session's memory stays true to the robot's history.

The command runs a MuJoCo environment of a task family stepped in real time as the "robot".

Example:
    trmrl-robot-loop --url http://127.0.0.1:8000 --family halfcheetah-vel --rate 50 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from trmrl_client import PolicyClient, Session
from trmrl_client.errors import ServiceError

from trmrl.tasks.trials import policy_observation
from trmrl_sim.sim import SimError, check_model, load_tasks_module

Fallback = Literal["zeros", "hold"]
Observation = NDArray[np.float32]


@dataclass
class LoopStats:
    """What a run of the loop counted.

    Example:
        >>> LoopStats(steps=50, misses=2).miss_rate
        0.04
    """

    steps: int = 0
    misses: int = 0
    """Ticks whose action did not arrive by the deadline (the fallback ran instead)."""
    overruns: int = 0
    """Ticks that started late because the previous one (env step included) took longer than a period."""
    errors: dict[str, int] = field(default_factory=dict)
    """Why actions were missing, by error code (``timeout``, ``unreachable``...)."""
    latencies_s: list[float] = field(default_factory=list)
    """Round trip of every action that arrived in time."""
    total_reward: float = 0.0
    seconds: float = 0.0

    @property
    def miss_rate(self) -> float:
        return self.misses / max(self.steps, 1)

    def summary(self) -> dict[str, float]:
        lat = np.asarray(self.latencies_s) * 1000.0
        return {
            "steps": self.steps,
            "misses": self.misses,
            "miss_rate": self.miss_rate,
            "overruns": self.overruns,
            "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "latency_p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "total_reward": self.total_reward,
            "rate_hz": self.steps / max(self.seconds, 1e-9),
        }


class RobotLoop:
    """Run a policy session at a fixed rate with a deadline per step and a fallback action.

    Args:
        client: The service (its session is created on the first tick, and again if lost).
        model: Model name (``None``: the service's default).
        act_dim: Length of an action (for the ``zeros`` fallback before any action arrived).
        rate_hz: Control rate.
        deadline_s: Time after a tick's start by which its action must have arrived (default: 3/4 of
            a period, leaving the rest for applying it).
        fallback: ``zeros``, ``hold`` (the last action applied), or a fixed action.

    Example:
        >>> loop = RobotLoop(PolicyClient("http://127.0.0.1:8000"), "point-nav", act_dim=2)  # doctest: +SKIP
        >>> stats = loop.run(env, steps=100)  # doctest: +SKIP
        >>> stats.misses  # doctest: +SKIP
        0
    """

    def __init__(
        self,
        client: PolicyClient,
        model: str | None,
        *,
        act_dim: int,
        rate_hz: float = 50.0,
        deadline_s: float | None = None,
        fallback: Fallback | Sequence[float] = "zeros",
        observe: Callable[[Observation], Observation] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate_hz <= 0:
            raise ValueError("rate_hz must be positive")
        self.client = client
        self.model = model
        self.period = 1.0 / rate_hz
        self.deadline_s = 0.75 * self.period if deadline_s is None else deadline_s
        if not 0 < self.deadline_s <= self.period:
            raise ValueError(f"the deadline must lie within one period ({self.period:.4f} s)")
        if isinstance(fallback, str):
            if fallback not in ("zeros", "hold"):
                raise ValueError(f"fallback must be 'zeros', 'hold' or an action, got {fallback!r}")
            self.fixed_fallback: NDArray[np.float32] | None = None
            self.fallback_mode: str = fallback
        else:
            self.fixed_fallback = np.asarray(fallback, np.float32).reshape(act_dim)
            self.fallback_mode = "fixed"
        self.act_dim = act_dim
        self.observe = observe or (lambda obs: obs)
        self.clock = clock
        self.sleep = sleep
        self.session: Session | None = None

    def fallback_action(self, last: NDArray[np.float32]) -> NDArray[np.float32]:
        """The declared action when the policy's is late or missing.

        Example:
            >>> loop.fallback_action(np.ones(2, np.float32))  # doctest: +SKIP
            array([0., 0.], dtype=float32)
        """
        if self.fixed_fallback is not None:
            return self.fixed_fallback.copy()
        return last.copy() if self.fallback_mode == "hold" else np.zeros(self.act_dim, np.float32)

    def _policy_action(
        self, obs: Observation, reward: float, start: bool, applied: NDArray[np.float32] | None, budget: float
    ) -> NDArray[np.float32]:
        started = self.clock()
        if self.session is None:
            self.session = self.client.session(self.model, timeout=budget)
            budget = max(0.0, budget - (self.clock() - started))
        return self.session.act(obs, reward, start, applied, timeout=budget)

    def run(self, env: Any, steps: int, *, reset_seed: int | None = None) -> LoopStats:
        """Control ``env`` (a gymnasium env) for ``steps`` ticks; episodes restart as they end.

        Example:
            >>> stats = loop.run(env, steps=50)  # doctest: +SKIP
        """
        stats = LoopStats()
        obs, _ = env.reset(seed=reset_seed)
        reward, start = 0.0, True
        last = np.zeros(self.act_dim, np.float32)
        applied: NDArray[np.float32] | None = None
        began = self.clock()
        for k in range(steps):
            tick = began + k * self.period
            now = self.clock()
            if now > tick + self.period:
                stats.overruns += 1
            deadline = max(tick, now - self.period) + self.deadline_s
            sent = self.clock()
            try:
                action = self._policy_action(self.observe(obs), reward, start, applied, deadline - sent)
            except ServiceError as exc:
                action = None
                stats.errors[exc.code] = stats.errors.get(exc.code, 0) + 1
            arrived = self.clock()
            if action is None or arrived > deadline:
                stats.misses += 1
                action = self.fallback_action(last)
                applied = action  # the service must remember what really ran
            else:
                stats.latencies_s.append(arrived - sent)
                applied = None
            last = np.asarray(action, np.float32)
            obs, reward_f, terminated, truncated, _ = env.step(last)
            reward, start = float(reward_f), False
            stats.total_reward += reward
            stats.steps += 1
            if terminated or truncated:
                obs, _ = env.reset()
                reward, start = 0.0, True
            pause = began + (k + 1) * self.period - self.clock()
            if pause > 0:
                self.sleep(pause)
        stats.seconds = self.clock() - began
        return stats


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="trmrl-robot-loop",
        description="A fixed-rate control loop against the trmrl policy service, with a deadline per "
        "step and a fallback action; drives a MuJoCo environment of a task family in real time.",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument("--family", required=True, help="task family of the simulated robot")
    parser.add_argument("--model", help="model name (default: the first loaded model of the family)")
    parser.add_argument("--split", choices=["test", "ood"], default="test", help="split of the task")
    parser.add_argument("--task", type=int, default=0, help="index of the task in the split (default 0)")
    parser.add_argument("--rate", type=float, default=50.0, help="control rate in Hz (default 50)")
    parser.add_argument("--deadline-ms", type=float, help="deadline after each tick (default 3/4 period)")
    parser.add_argument("--fallback", choices=["zeros", "hold"], default="zeros", help="fallback action")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--api-key", help="API key, sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the counters here")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0:
        parser.error("--rate and --seconds must be positive")
    if args.deadline_ms is not None and not 0 < args.deadline_ms <= 1000.0 / args.rate:
        parser.error("--deadline-ms must lie within one period")
    if args.task < 0:
        parser.error("--task must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trmrl-robot-loop``; returns the exit status.

    Example:
        >>> main(["--family", "point-nav", "--seconds", "2"])  # doctest: +SKIP
        0
    """
    args = parse_args(argv)
    try:
        tasks_module = load_tasks_module()
        try:
            family = tasks_module.get_family(args.family)
            task = family.sample_tasks(args.split, args.task + 1, seed=1000)[args.task]
        except tasks_module.TaskFamilyError as exc:
            raise SimError(str(exc)) from exc
        client = PolicyClient(args.url, api_key=args.api_key, timeout=2.0, retries=0)
        model, oracle = None, False
        try:
            model_info, oracle = check_model(client.models(), family, args.model)
            model = model_info.name
        except ServiceError as exc:
            # A robot starts even when its policy is not up yet: the fallback covers the gap.
            print(f"trmrl-robot-loop: warning: service not answering ({exc}); starting on the fallback")
            model = args.model
    except SimError as exc:
        print(f"trmrl-robot-loop: error: {exc}", file=sys.stderr)
        return 2
    params = np.asarray(task.params, np.float32)
    loop = RobotLoop(
        client,
        model,
        act_dim=family.act_dim,
        rate_hz=args.rate,
        deadline_s=None if args.deadline_ms is None else args.deadline_ms / 1000.0,
        fallback=args.fallback,
        observe=(lambda obs: policy_observation(obs, params)) if oracle else None,
    )
    env = family.make_env(task)
    try:
        stats = loop.run(env, max(1, round(args.seconds * args.rate)), reset_seed=0)
    finally:
        env.close()
        client.close()
    s = stats.summary()
    print(
        f"{stats.steps} steps at {s['rate_hz']:.1f} Hz on {task.label}: {stats.misses} deadline misses "
        f"({100 * stats.miss_rate:.1f}%, fallback {args.fallback}), {stats.overruns} overruns, "
        f"latency p50 {s['latency_p50_ms']:.2f} ms p99 {s['latency_p99_ms']:.2f} ms, "
        f"return {stats.total_reward:.1f}"
    )
    if stats.errors:
        print("missing actions by cause: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.errors.items())))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**s, "errors": stats.errors}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
