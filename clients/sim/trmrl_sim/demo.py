"""``make demo``: serve the bundled checkpoints, run held-out tasks through them, print the table.

One command, from a checkout of the repository (the service comes from its ``service`` package):

1. pick a task family -- ``halfcheetah-vel`` when its checkpoints are bundled, else ``point-nav``
   (or ``--family``) -- and its TrMRL checkpoint with the memoryless and oracle references;
2. start the service on them (CPU, a free port) and wait for ``/readyz``;
3. run :mod:`trmrl_sim.sim` on the held-out tasks for each model, through the service;
4. print the adaptation table side by side, with the trainer's own evaluation of each checkpoint;
5. stop the service with SIGTERM (and wait), also when anything above failed.

Example:
    python -m trmrl_sim.demo --family point-nav --tasks 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from trmrl_sim.launch import ServiceProcess, ServiceStartError
from trmrl_sim.sim import (
    EARLY_STEPS,
    TRANSPORTS,
    SimError,
    SimResult,
    exit_status,
    format_table,
    run_options,
    run_sim,
)

PREFERRED_FAMILIES = ("halfcheetah-vel", "point-nav")
KIND_ORDER = {"trmrl": 0, "memoryless": 1, "oracle": 2}


class DemoError(Exception):
    """Something the user must fix (no checkpoints, service would not start).

    Example:
        >>> raise DemoError("no checkpoint of family 'ant-goal' under checkpoints")  # doctest: +SKIP
    """


@dataclass(frozen=True)
class BundledModel:
    """A checkpoint directory and what its ``config.json`` says about it.

    Example:
        >>> BundledModel(Path("checkpoints/point-nav-oracle"), "point-nav", "oracle").name
        'point-nav-oracle'
    """

    path: Path
    family: str
    kind: str
    """``trmrl``, ``memoryless`` or ``oracle`` (the trainer's ``training.reference``)."""

    @property
    def name(self) -> str:
        return self.path.name


def find_models(root: Path, family: str | None) -> tuple[str, list[BundledModel]]:
    """The family to demo and its checkpoints under ``root`` (TrMRL first, then the references).

    Example:
        >>> find_models(Path("checkpoints"), None)[0]  # doctest: +SKIP
        'point-nav'
    """
    found: list[BundledModel] = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        config = path / "config.json"
        if not config.is_file():
            continue
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            continue
        kind = str((data.get("training") or {}).get("reference", "trmrl"))
        found.append(BundledModel(path, str(data.get("task_family", "")), kind))
    if family is None:
        present = {m.family for m in found}
        family = next((f for f in PREFERRED_FAMILIES if f in present), None)
        if family is None:
            raise DemoError(f"no bundled checkpoint of {' or '.join(PREFERRED_FAMILIES)} under {root}")
    chosen = [m for m in found if m.family == family and m.name.startswith(family)]
    if not chosen:
        raise DemoError(f"no checkpoint of family {family!r} under {root}")
    chosen.sort(key=lambda m: (KIND_ORDER.get(m.kind, 3), m.name))
    return family, chosen


@contextmanager
def running_service(
    checkpoints: Sequence[Path], *, ready_timeout_s: float = 120.0, log: IO[str] | None = None
) -> Iterator[str]:
    """Run ``python -m service`` on ``checkpoints`` (CPU, a free port); yield its URL; SIGTERM it after.

    Example:
        >>> with running_service([Path("checkpoints/point-nav")]) as url:  # doctest: +SKIP
        ...     print(httpx.get(f"{url}/readyz").status_code)
        200
    """
    service = ServiceProcess(checkpoints)
    try:
        try:
            service.start(ready_timeout_s)
        except ServiceStartError as exc:
            raise DemoError(str(exc)) from exc
        yield service.url
    finally:
        service.close()  # SIGTERM and wait; the output stays readable
        if log is not None:
            log.write(service.output())


def comparison_table(split: str, models: Sequence[BundledModel], results: Sequence[SimResult]) -> str:
    """The models side by side: returns per episode, early vs late, success, trainer's figure, latency.

    Example:
        >>> print(comparison_table("test", models, results))  # doctest: +SKIP
    """
    episodes = results[0].returns.shape[1]
    has_success = results[0].success is not None
    head = ["model", "kind", "version", "return", *(f"ep{e + 1}" for e in range(episodes))]
    head += [f"first{EARLY_STEPS}", f"after{EARLY_STEPS}"]
    head += ["success"] if has_success else []
    kinds = {m.kind: r.summary()["return"] for m, r in zip(models, results, strict=True)}
    gap = "memoryless" in kinds and "oracle" in kinds and kinds["oracle"] != kinds["memoryless"]
    head += ["gap closed"] if gap else []
    head += ["trainer eval", "p50 ms", "p99 ms", "actions/s"]
    rows = []
    for model, result in zip(models, results, strict=True):
        s = result.summary()
        row = [model.name, model.kind, result.version, f"{s['return']:.1f}"]
        row += [f"{s[f'return_ep{e + 1}']:.1f}" for e in range(episodes)]
        row += [f"{s[f'return_first{EARLY_STEPS}']:.1f}", f"{s[f'return_after{EARLY_STEPS}']:.1f}"]
        if has_success:
            row.append(f"{100 * s['success']:.0f}%")
        if gap:
            low, high = kinds["memoryless"], kinds["oracle"]
            row.append(f"{(s['return'] - low) / (high - low):.2f}")
        trainer = result.extra.get(f"{split}/return")
        row.append("" if trainer is None else f"{float(trainer):.1f}")
        row += [f"{s['latency_p50_ms']:.2f}", f"{s['latency_p99_ms']:.2f}", f"{s['actions_per_s']:.0f}"]
        rows.append(row)
    return format_table(head, rows)


def run_demo(args: argparse.Namespace) -> int:
    family, models = find_models(args.checkpoints, args.family)
    print(
        f"demo: {family}, {args.split} split, {args.tasks} tasks x {args.episodes} episodes, "
        f"models {', '.join(m.name for m in models)}; starting the service (CPU)...",
        flush=True,
    )
    results: list[SimResult] = []
    with running_service([m.path for m in models], ready_timeout_s=args.ready_timeout) as url:
        print(f"demo: service ready at {url}", flush=True)
        with httpx.Client(base_url=url) as http:
            metrics = {m["name"]: m.get("metrics", {}) for m in http.get("/v1/models").json()["models"]}
        for model in models:
            result = asyncio.run(run_sim(url, family, envs=args.tasks, model=model.name, **run_options(args)))
            result.extra.update(metrics.get(model.name, {}))
            print(result.footer(), flush=True)
            results.append(result)
    print("demo: service stopped")
    print()
    print(
        f"{family} {args.split}: {args.tasks} held-out tasks, {args.episodes} episodes each, deterministic "
        f"actions served over {args.transport}; 'trainer eval' is the checkpoint's own {args.split}/return"
    )
    print(comparison_table(args.split, models, results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=2))
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="trmrl-demo",
        description="Serve the bundled TrMRL checkpoint and its memoryless and oracle references, run "
        "held-out tasks through the service and print the adaptation table.",
    )
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="bundled checkpoints")
    parser.add_argument("--family", help=f"task family (default: the first bundled of {PREFERRED_FAMILIES})")
    parser.add_argument("--split", choices=["test", "ood"], default="test", help="held-out split")
    parser.add_argument("--tasks", type=int, default=30, help="tasks, one environment each (default 30)")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per task (default 2)")
    parser.add_argument(
        "--transport", choices=TRANSPORTS, default="vstream", help="default vstream: the fastest path"
    )
    parser.add_argument("--seed", type=int, default=1000, help="task-set seed (default 1000, as training)")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for /readyz")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the full results here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.episodes < 1:
        parser.error("--tasks and --episodes must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``make demo`` (``python -m trmrl_sim.demo``); returns the exit status.

    Example:
        >>> main(["--family", "point-nav", "--tasks", "8"])  # doctest: +SKIP
        0
    """
    args = parse_args(argv)
    return exit_status("demo", lambda: run_demo(args), (DemoError, SimError))


if __name__ == "__main__":
    sys.exit(main())
