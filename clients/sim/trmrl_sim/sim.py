"""``trmrl-sim``: run K environments of a task family locally, each a session of the policy service.

Every environment gets its own task (``family.sample_tasks(split, K, seed)``) and runs a trial of
``--episodes`` episodes; all of them step together, one tick at a time, over one of five transports:

* ``vstream``: one frame of the vectorised stream ``WS /v1/stream`` per tick, the arrays as
  msgpack-numpy (the fastest);
* ``vbatch``: one columnar ``POST /v1/act/batch`` per tick (MessagePack arrays);
* ``batch``: one ``POST /v1/act/batch`` per tick, one item per environment;
* ``http``: one ``POST /v1/act`` per environment per tick, concurrently;
* ``ws``: one WebSocket stream per environment.

It reports, per task, the return of each episode, the return over the first 20 steps of an episode
against the rest (how fast the policy adapts), success for Meta-World families, and the request
latency percentiles and actions per second. The task definitions come from the ``trmrl`` package
(its torch-free ``trmrl.tasks`` module), which must be installed next to the client.

With ``--render PATH`` (``.gif`` or ``.mp4``; ``pip install 'trmrl-sim[render]'``) it also renders one
environment's episodes offscreen (:mod:`trmrl_sim.render`), the task and step drawn on every frame.

Example:
    trmrl-sim --family point-nav --split test --envs 8 --episodes 2 --transport vstream \\
        --url http://127.0.0.1:8000
    MUJOCO_GL=osmesa trmrl-sim --family halfcheetah-vel --envs 1 --episodes 1 --render cheetah.gif
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from trmrl_client.errors import ServiceError
from trmrl_client.http import AsyncPolicyClient
from trmrl_client.protocol import FloatArray, ModelInfo
from trmrl_client.vector import AsyncVectorSession

from trmrl_sim.render import (
    EpisodeRecorder,
    RenderError,
    check_can_render,
    choose_gl_backend,
    parse_size,
    write_clip,
)

try:
    from trmrl.tasks.trials import EARLY_STEPS, TrialReturns, policy_obs_dim, trial_flow
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "trmrl-sim needs the 'trmrl' package for the task definitions (gymnasium/MuJoCo environments); "
        f"install it (pip install -e . in the trmrl repository): {exc}"
    ) from exc

TRANSPORTS = ("vstream", "vbatch", "batch", "http", "ws")
#: Transports that step all environments as one vector of sessions (arrays in, arrays out).
VECTOR_TRANSPORTS = {"vstream": "stream", "vbatch": "batch"}


class SimError(Exception):
    """A problem found before any work starts (bad arguments, service unreachable, model mismatch).

    Example:
        >>> str(SimError("unknown task family 'x'"))
        "unknown task family 'x'"
    """


def load_tasks_module() -> Any:
    """``trmrl.tasks``, or a clear error when the ``trmrl`` package is missing."""
    try:
        import trmrl.tasks
    except ImportError as exc:
        raise SimError(
            "trmrl-sim needs the 'trmrl' package for the task definitions (gymnasium/MuJoCo "
            f"environments); install it (pip install -e . in the trmrl repository): {exc}"
        ) from exc
    return trmrl.tasks


@dataclass(frozen=True)
class SimResult(TrialReturns):
    """What one run measured: the trials' returns, and how the service answered.

    Example:
        >>> r = SimResult(["a"], np.ones((1, 2)), np.ones((1, 2)), None, "m", "v", "point-nav", "test",
        ...     [0.001, 0.002], 200, 0.5, 1)
        >>> r.summary()["return"]
        1.0
    """

    model: str
    version: str
    family: str
    split: str
    latencies_s: list[float]
    """Round trip of every request (one per tick for ``batch``, one per step otherwise)."""
    actions: int
    seconds: float
    recoveries: int
    transport: str = "batch"
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self, prefix: str = "") -> dict[str, float]:
        """The trials' figures (:meth:`TrialReturns.summary`), latency percentiles and throughput."""
        out = super().summary(prefix)
        lat = np.asarray(self.latencies_s) * 1000.0
        out[f"{prefix}latency_p50_ms"] = float(np.percentile(lat, 50)) if len(lat) else float("nan")
        out[f"{prefix}latency_p99_ms"] = float(np.percentile(lat, 99)) if len(lat) else float("nan")
        out[f"{prefix}actions_per_s"] = self.actions / max(self.seconds, 1e-9)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "family": self.family,
            "split": self.split,
            "transport": self.transport,
            **super().to_json(),
            "actions": self.actions,
            "seconds": self.seconds,
            "recoveries": self.recoveries,
            "summary": self.summary(),
        }

    def table(self) -> str:
        """Per-task lines: return of each episode, early vs late return, success."""
        episodes = self.returns.shape[1]
        head = [
            "task",
            *(f"ep{e + 1}" for e in range(episodes)),
            f"first{EARLY_STEPS}",
            f"after{EARLY_STEPS}",
        ]
        if self.success is not None:
            head.append("success")
        rows = []
        for i, label in enumerate(self.labels):
            row = [label, *(f"{self.returns[i, e]:.1f}" for e in range(episodes))]
            row += [
                f"{self.early_returns[i].mean():.1f}",
                f"{(self.returns[i] - self.early_returns[i]).mean():.1f}",
            ]
            if self.success is not None:
                row.append("/".join(str(int(s)) for s in self.success[i]))
            rows.append(row)
        return format_table(head, rows)

    def footer(self) -> str:
        s = self.summary()
        text = (
            f"{self.model} ({self.version}) on {self.family} {self.split}, {len(self.labels)} tasks: "
            f"return {s['return']:.1f} (first{EARLY_STEPS} {s[f'return_first{EARLY_STEPS}']:.1f}, "
            f"after {s[f'return_after{EARLY_STEPS}']:.1f})"
        )
        if "success" in s:
            text += f", success {100 * s['success']:.0f}%"
        text += (
            f"\n{self.transport}: latency p50 {s['latency_p50_ms']:.2f} ms, "
            f"p99 {s['latency_p99_ms']:.2f} ms, "
            f"{s['actions_per_s']:.0f} actions/s, {self.actions} actions in {self.seconds:.1f} s"
        )
        if self.recoveries:
            text += f", {self.recoveries} sessions recovered"
        return text


def format_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces.

    Example:
        >>> print(format_table(["a", "bb"], [["1", "2"]]))
        a  bb
        1  2
    """
    widths = [
        max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i]) for i in range(len(head))
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


class Progress:
    """A progress bar: tqdm when installed, otherwise a line every 10 %.

    Example:
        >>> bar = Progress(100, "demo", enabled=False); bar.update(10); bar.done
        10
    """

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.desc = desc
        self.enabled = enabled
        self._next_print = 0.1
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=desc, unit="act", leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        elif self.done >= self._next_print * self.total:
            print(f"{self.desc}: {100 * self.done // max(self.total, 1)}%", file=sys.stderr, flush=True)
            self._next_print += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- transports -------------------------------------------------------------------------------------------
ActFn = Callable[[list[int], np.ndarray, np.ndarray, np.ndarray], Awaitable[FloatArray]]


class _Sessions:
    """K sessions of one model behind one of the transports."""

    def __init__(self, client: AsyncPolicyClient, transport: str, latencies: list[float]) -> None:
        self.client = client
        self.transport = transport
        self.latencies = latencies
        self.sessions: list[Any] = []
        self.vector: AsyncVectorSession | None = None

    async def open(self, model: str, k: int) -> None:
        if self.transport in VECTOR_TRANSPORTS:
            self.vector = await self.client.vector(
                k,
                model,
                transport=VECTOR_TRANSPORTS[self.transport],  # type: ignore[arg-type]
            )
        elif self.transport == "ws":
            from trmrl_client.stream import StreamingSession

            async def one() -> Any:
                return await StreamingSession.open(self.client.url, model, client=self.client)

            self.sessions = list(await asyncio.gather(*(one() for _ in range(k))))
        else:
            self.sessions = list(await asyncio.gather(*(self.client.session(model) for _ in range(k))))

    async def act(
        self, idx: list[int], obs: np.ndarray, rewards: np.ndarray, starts: np.ndarray
    ) -> FloatArray:
        if self.vector is not None:
            started = time.perf_counter()
            actions = await self.vector.act(obs, rewards, starts, rows=idx)
            self.latencies.append(time.perf_counter() - started)
            return actions
        if self.transport == "batch":
            started = time.perf_counter()
            actions = await self.client.act_batch([self.sessions[i] for i in idx], obs, rewards, starts)
            self.latencies.append(time.perf_counter() - started)
            return actions

        async def one(j: int) -> FloatArray:
            started = time.perf_counter()
            action = await self.sessions[idx[j]].act(obs[j], float(rewards[j]), bool(starts[j]))
            self.latencies.append(time.perf_counter() - started)
            return np.asarray(action, np.float32)

        return np.stack(await asyncio.gather(*(one(j) for j in range(len(idx)))))

    @property
    def recoveries(self) -> int:
        if self.vector is not None:
            return self.vector.recoveries
        return sum(s.recoveries for s in self.sessions)

    async def close(self) -> None:
        if self.vector is not None:
            with contextlib.suppress(ServiceError):
                await self.vector.close()
            return

        async def one(s: Any) -> None:
            with contextlib.suppress(ServiceError):
                await s.close()

        await asyncio.gather(*(one(s) for s in self.sessions))


# -- the run -------------------------------------------------------------------------------------------
def check_model(models: Sequence[ModelInfo], family: Any, name: str | None) -> tuple[ModelInfo, bool]:
    """Pick the model (``name``, or the first loaded one of the family) and whether it is an oracle.

    Example:
        >>> info, oracle = check_model(client.models(), get_family("point-nav"), None)  # doctest: +SKIP
    """
    if name is not None:
        # The active version of the model (a service may also serve others of the same name).
        chosen = next((m for m in sorted(models, key=lambda m: not m.active) if m.name == name), None)
        if chosen is None:
            raise SimError(f"the service has no model {name!r}; loaded: {', '.join(m.name for m in models)}")
    else:
        ordered = sorted(models, key=lambda m: (not m.default, not m.active))
        chosen = next((m for m in ordered if m.task_family == family.name), None)
        if chosen is None:
            raise SimError(
                f"the service has no model of family {family.name!r}; loaded: "
                + ", ".join(f"{m.name} ({m.task_family})" for m in models)
            )
    if chosen.task_family != family.name:
        raise SimError(f"model {chosen.name!r} is of family {chosen.task_family!r}, not {family.name!r}")
    # The service may not say whether a model is an oracle; its observation width does.
    oracle = chosen.task_params_in_obs
    if oracle is None:
        oracle = family.task_param_dim > 0 and chosen.obs_dim == policy_obs_dim(family, oracle=True)
    if chosen.obs_dim != policy_obs_dim(family, bool(oracle)) or chosen.act_dim != family.act_dim:
        raise SimError(
            f"model {chosen.name!r} takes {chosen.obs_dim} observations and gives {chosen.act_dim} actions; "
            f"family {family.name!r} has {family.obs_dim} and {family.act_dim}"
        )
    return chosen, bool(oracle)


async def run_sim(
    url: str,
    family_name: str,
    *,
    split: str = "test",
    envs: int = 8,
    episodes: int = 2,
    transport: str = "vstream",
    model: str | None = None,
    api_key: str | None = None,
    seed: int = 1000,
    progress: bool = True,
    timeout: float = 30.0,
    recorder: EpisodeRecorder | None = None,
) -> SimResult:
    """Run ``envs`` environments of ``family_name`` through the service and measure them.

    Environment ``i`` gets task ``i`` of ``sample_tasks(split, envs, seed)`` and is first reset with
    seed ``seed * 1000 + i``, as the trainer's evaluation does, so the figures are comparable. A
    ``recorder`` (:class:`trmrl_sim.render.EpisodeRecorder`) renders one of the environments as it runs.

    Example:
        >>> result = asyncio.run(run_sim("http://127.0.0.1:8000", "point-nav", envs=4))  # doctest: +SKIP
        >>> print(result.table())  # doctest: +SKIP
    """
    tasks_module = load_tasks_module()
    try:
        family = tasks_module.get_family(family_name)
        tasks = family.sample_tasks(split, envs, seed)
    except tasks_module.TaskFamilyError as exc:
        raise SimError(str(exc)) from exc
    if transport not in TRANSPORTS:
        raise SimError(f"unknown transport {transport!r}; choose one of {', '.join(TRANSPORTS)}")
    if episodes < 1:
        raise SimError("--episodes must be at least 1")
    if recorder is not None and recorder.env_index >= envs:
        raise SimError(f"--render-env {recorder.env_index} is not one of the {envs} environments")
    if transport in ("ws", "vstream", "vbatch"):
        try:
            import trmrl_client.codec
            import trmrl_client.stream  # noqa: F401
        except ImportError as exc:
            raise SimError(str(exc)) from exc

    encoding: Literal["json", "msgpack"] = "msgpack" if transport in VECTOR_TRANSPORTS else "json"
    async with AsyncPolicyClient(
        url, api_key=api_key, timeout=timeout, max_connections=envs + 4, encoding=encoding
    ) as client:
        try:
            models = await client.models()
        except ServiceError as exc:
            raise SimError(f"cannot list the models of the service at {url}: {exc}") from exc
        info, oracle = check_model(models, family, model)
        latencies: list[float] = []
        sessions = _Sessions(client, transport, latencies)
        await sessions.open(info.name, envs)
        try:
            result = await _run_episodes(
                family, tasks, sessions, episodes, oracle, seed, progress, info, recorder
            )
        finally:
            await sessions.close()
    return replace(result, transport=transport, recoveries=sessions.recoveries)


async def _run_episodes(
    family: Any,
    tasks: list[Any],
    sessions: _Sessions,
    episodes: int,
    oracle: bool,
    seed: int,
    progress: bool,
    info: ModelInfo,
    recorder: EpisodeRecorder | None = None,
) -> SimResult:
    env_list = [family.make_env(task) for task in tasks]
    try:
        on_step = None
        if recorder is not None:
            recorder.title = recorder.title or info.name
            recorder.attach(family, tasks, env_list)
            on_step = recorder.on_step
        trial = trial_flow(family, env_list, tasks, episodes, oracle=oracle, seed=seed, on_step=on_step)
        bar = Progress(len(tasks) * episodes * family.episode_length, info.name, progress)
        actions_taken = 0
        started = time.perf_counter()
        tick = next(trial)
        while True:
            rows = tick.rows.tolist()
            actions = await sessions.act(rows, tick.observations, tick.rewards, tick.episode_starts)
            actions_taken += len(rows)
            bar.update(len(rows))
            try:
                tick = trial.send(actions)
            except StopIteration as stop:
                returns: TrialReturns = stop.value
                break
        seconds = time.perf_counter() - started
        bar.close()
    finally:
        if recorder is not None:
            recorder.close()
        for env in env_list:
            env.close()
    return SimResult(
        **vars(returns),
        model=info.name,
        version=info.version,
        family=family.name,
        split=tasks[0].split,
        latencies_s=sessions.latencies,
        actions=actions_taken,
        seconds=seconds,
        recoveries=0,
    )


# -- the command line -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="trmrl-sim",
        description="Run K environments of a task family through the trmrl policy service and report "
        "per-task returns, adaptation within episodes, success and latency.",
    )
    parser.add_argument("--family", required=True, help="task family, e.g. point-nav or halfcheetah-vel")
    parser.add_argument(
        "--split", choices=["test", "ood"], default="test", help="held-out split (default test)"
    )
    parser.add_argument(
        "--envs", type=int, default=8, metavar="K", help="environments, one task each (default 8)"
    )
    parser.add_argument("--episodes", type=int, default=2, metavar="E", help="episodes per task (default 2)")
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="vstream",
        help="vstream (default: one vectorised-stream frame per tick), vbatch, batch, http or ws",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument("--model", help="model name (default: the first loaded model of the family)")
    parser.add_argument("--api-key", help="API key, sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--seed", type=int, default=1000, help="task-set seed (default 1000, as training)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the full results here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    render = parser.add_argument_group(
        "rendering", "render one environment's episodes offscreen (needs trmrl-sim[render] and MUJOCO_GL)"
    )
    render.add_argument(
        "--render", type=Path, metavar="PATH", help="write the rendered episodes here: a .gif or an .mp4"
    )
    render.add_argument(
        "--render-env", type=int, default=0, metavar="I", help="the environment rendered (default 0)"
    )
    render.add_argument(
        "--render-size", default="320x240", metavar="WxH", help="frame size in pixels (default 320x240)"
    )
    render.add_argument(
        "--render-every", type=int, default=2, metavar="N", help="keep every N-th step's frame (default 2)"
    )
    args = parser.parse_args(argv)
    if args.envs < 1:
        parser.error(f"--envs must be at least 1, got {args.envs}")
    if args.episodes < 1:
        parser.error(f"--episodes must be at least 1, got {args.episodes}")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if not 0 <= args.render_env < args.envs:
        parser.error(f"--render-env must be one of the {args.envs} environments (0..{args.envs - 1})")
    if args.render_every < 1:
        parser.error(f"--render-every must be at least 1, got {args.render_every}")
    try:
        args.render_size = parse_size(args.render_size)
    except ValueError as exc:
        parser.error(f"--render-size: {exc}")
    return args


def preflight(args: argparse.Namespace) -> None:
    """Fail fast, before any session is opened: unknown family, a family or an output that cannot be
    rendered (``--render``: checked on one probe environment), unreachable or unready service.

    Example:
        >>> preflight(parse_args(["--family", "point-nav", "--url", "http://127.0.0.1:9"]))  # doctest: +SKIP
        Traceback (most recent call last):
        SimError: cannot reach the service at http://127.0.0.1:9: ...
    """
    tasks_module = load_tasks_module()
    try:
        family = tasks_module.get_family(args.family)
    except tasks_module.TaskFamilyError as exc:
        raise SimError(str(exc)) from exc
    if getattr(args, "render", None) is not None:
        check_render(family, args.render, args.render_size)
    try:
        response = httpx.get(f"{args.url.rstrip('/')}/readyz", timeout=5.0)
    except httpx.HTTPError as exc:
        raise SimError(f"cannot reach the service at {args.url}: {exc}") from exc
    if response.status_code != 200:
        raise SimError(
            f"the service at {args.url} is not ready (GET /readyz answered {response.status_code})"
        )


def check_render(family: Any, path: Path, size: tuple[int, int]) -> None:
    """Refuse ``--render`` for a family without a MuJoCo scene, an unknown format or no offscreen GL,
    by rendering one frame, before any work starts.

    Example:
        >>> check_render(get_family("point-nav"), Path("x.gif"), (320, 240))  # doctest: +SKIP
        Traceback (most recent call last):
        SimError: family 'point-nav' cannot be rendered: it has no MuJoCo scene
    """
    choose_gl_backend()
    try:
        check_can_render(family, path, size)
    except RenderError as exc:
        raise SimError(str(exc)) from exc


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_sim`'s keywords from the options of a command that runs environments through the
    service (``--split``, ``--episodes``, ``--transport``, ``--seed``, ``--no-progress``).

    Example:
        >>> run_options(parse_args(["--family", "point-nav", "--episodes", "3"]))["episodes"]
        3
    """
    return {
        "split": args.split,
        "episodes": args.episodes,
        "transport": args.transport,
        "seed": args.seed,
        "progress": not args.no_progress,
    }


def exit_status(prog: str, command: Callable[[], int], errors: tuple[type[Exception], ...]) -> int:
    """Run a command line's work and return its exit status: what ``command`` returns, 2 after one of
    ``errors`` (something the user must fix) or 1 after a refusal of the service, told on stderr.

    Example:
        >>> exit_status("trmrl-sim", lambda: 0, (SimError,))
        0
    """
    try:
        return command()
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ServiceError as exc:
        print(f"{prog}: the service refused: {exc}", file=sys.stderr)
        return 1


def run_from_args(args: argparse.Namespace) -> int:
    """Check, run and report what the command line asked for (:func:`main` without its error handling).

    Example:
        >>> run_from_args(parse_args(["--family", "point-nav", "--envs", "4"]))  # doctest: +SKIP
        0
    """
    preflight(args)
    recorder: EpisodeRecorder | None = None
    if args.render is not None:
        recorder = EpisodeRecorder(
            args.render_env, size=args.render_size, every=args.render_every, title=args.model or ""
        )
    result = asyncio.run(
        run_sim(
            args.url,
            args.family,
            envs=args.envs,
            model=args.model,
            api_key=args.api_key,
            recorder=recorder,
            **run_options(args),
        )
    )
    if recorder is not None:
        write_render(args.render, recorder, result)
    print(result.table())
    print(result.footer())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_json(), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trmrl-sim``; returns the exit status (2: bad invocation, 1: refused by the service).

    Example:
        >>> main(["--family", "point-nav", "--envs", "4", "--url", "http://127.0.0.1:8000"])  # doctest: +SKIP
        0
    """
    args = parse_args(argv)
    return exit_status("trmrl-sim", lambda: run_from_args(args), (SimError, RenderError))


def write_render(path: Path, recorder: EpisodeRecorder, result: SimResult) -> None:
    """Write the recorded frames to ``path`` and say so on stderr.

    Example:
        >>> write_render(Path("cheetah.gif"), recorder, result)  # doctest: +SKIP
        trmrl-sim: rendered 101 frames of halfcheetah-vel on task v*=0.59 to cheetah.gif
    """
    write_clip(path, recorder.frames, recorder.fps)
    print(
        f"trmrl-sim: rendered {len(recorder.frames)} frames of {result.model} on task "
        f"{recorder.task.label} to {path}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
