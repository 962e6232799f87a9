"""Meta-World v3 step cost: the benchmark's simulator as installed against the same simulator with
:mod:`trmrl.tasks.metaworld_fast` bound to it (what every Meta-World family of trmrl steps).

Each round steps both simulators of a class the same number of steps with the same random actions
(resetting at truncation), alternating which goes first; the figure is each side's median over the
rounds and the ratio of the medians. Both give the same observations, rewards and info
(``tests/tasks/test_metaworld_fast.py``).

Run: ``python -m bench.metaworld_step [--classes push-v3 reach-v3 pick-place-v3] [--steps 1000]
[--rounds 5] [--json bench/results/metaworld_step.json]``
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from trmrl.tasks.metaworld_fast import OBJECT_GEOMS, speed_up


def _steps(sim: Any, actions: np.ndarray) -> float:
    sim.reset()
    start = time.perf_counter()
    for action in actions:
        if sim.step(action)[3]:
            sim.reset()
    return (time.perf_counter() - start) / len(actions)


def measure(env_name: str, steps: int, rounds: int) -> dict[str, Any]:
    import metaworld

    ml1 = metaworld.ML1(env_name, seed=0)
    sims = {"meta-world": ml1.train_classes[env_name](), "trmrl": ml1.train_classes[env_name]()}
    speed_up(sims["trmrl"], env_name)
    for sim in sims.values():
        sim.set_task(ml1.train_tasks[0])
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {name: [] for name in sims}
    for r in range(rounds):
        actions = rng.uniform(-1, 1, (steps, 4))
        for name in list(sims)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(_steps(sims[name], actions))
    us = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    return {
        "class": env_name,
        "meta_world_us": us["meta-world"],
        "trmrl_us": us["trmrl"],
        "speedup": us["meta-world"] / us["trmrl"],
        "rounds_us": {name: [round(x * 1e6, 1) for x in t] for name, t in times.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--classes", nargs="+", default=sorted(OBJECT_GEOMS), choices=sorted(OBJECT_GEOMS))
    p.add_argument("--steps", type=int, default=1000, help="steps per side and round (default 1000)")
    p.add_argument("--rounds", type=int, default=5, help="alternated rounds (default 5)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1")
    rows = [measure(name, args.steps, args.rounds) for name in args.classes]
    print("| class | Meta-World as installed | with trmrl's equivalents | speed-up |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['class']} | {row['meta_world_us']:.0f} µs | {row['trmrl_us']:.0f} µs | "
            f"{row['speedup']:.2f}× |"
        )
    if args.json:
        result = {"date": common.stamp(), "machine": common.machine(), "rows": rows}
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
