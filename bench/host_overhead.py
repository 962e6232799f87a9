"""Host-overhead benchmark: what the service costs around the forward pass, path by path, in one run.

Part 1 serves a *tiny* model (d_model 8, one layer, one head, policy and value heads of 8 units,
window 5, obs 17, act 6), so that the forward pass costs little and what is measured is the host
path: reading and decoding the body, validation, the session table, the batcher, encoding the
reply. For every path

* ``act``: one ``POST /v1/act`` per session per step (JSON), one connection per session;
* ``items``: ``POST /v1/act/batch`` with one JSON item per session (two simulators);
* ``columnar-json`` / ``columnar-msgpack``: the columnar batch (two simulators);
* ``stream``: one WebSocket stream per session, MessagePack frames;
* ``vstream``: the vectorised stream ``WS /v1/stream``, one MessagePack frame per tick (two simulators);

at 1, 256 and 4,096 sessions, it reports the server's CPU time per action (user + system time of
the ``python -m service`` process over the measured window, from ``/proc``, divided by the actions
served in it) and actions/s. The load generator runs in this process and shares the two cores.

Part 2 serves the paper's MuJoCo-size model (d_model 128, 4 layers, 16 heads) with the service's
default torch threads (one on two cores) and drives it with the columnar MessagePack batch of 1,024
sessions, beside the bare batched step (``trmrl.policy.act`` on a slot pool, no HTTP) at batch 1,024,
at one and at two threads, before and after the service run, the best of those: the ratio is the
columnar efficiency.

Run: ``python -m bench.host_overhead [--quick] [--json PATH]``; prints a table, writes JSON.

Old against new in one run: ``--baseline-env NAME=VALUE`` (repeatable; e.g. ``TRMRL_COALESCE_WRITES=false``)
and/or ``--baseline-tree DIR`` (the service's code from another checkout, e.g. ``git archive main | tar -x
-C DIR``) and/or ``--baseline-module M`` (a server launched like the service, e.g. ``bench.bare_asgi``)
define a baseline server. Both servers run side by side; each cell (path, sessions) is measured on one
and at once on the other, ``--rounds N`` times, the order alternating, and both figures and their ratio
(new ÷ old) are reported round by round (``--in-turn``: one server at a time, every cell, then the other,
N times). ``--paths`` picks paths.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvloop
from trmrl_sim.launch import ServiceProcess

from bench import common
from bench.serve_bench import bare_step_rate
from bench.serve_load import LoadResult, run_act, run_batch, run_columnar, run_stream
from trmrl.checkpoint import CheckpointInfo, save_checkpoint
from trmrl.model import ModelConfig, TrMRL

REPO = Path(__file__).resolve().parents[1]
OBS_DIM, ACT_DIM = 17, 6
TICK = os.sysconf("SC_CLK_TCK")
TARGETS = {
    "host_us_per_action": 3.0,
    "host_actions_per_s": 150_000.0,
    "efficiency_1024": 0.85,
    "act_us": 60.0,
}

Runner = Callable[..., Coroutine[Any, Any, LoadResult]]
PATHS: dict[str, Runner] = {
    "act": run_act,
    "items": partial(run_batch, simulators=2),
    "columnar-json": partial(run_columnar, encoding="json"),
    "columnar-msgpack": partial(run_columnar, encoding="msgpack"),
    "stream": partial(run_stream, encoding="msgpack"),
    "vstream": partial(run_columnar, encoding="msgpack", stream=True),
}


def make_checkpoint(path: Path, size: str) -> Path:
    torch.manual_seed(0)
    if size == "tiny":
        config = ModelConfig(
            obs_dim=OBS_DIM, act_dim=ACT_DIM, d_model=8, n_layers=1, n_heads=1, d_ff=8, head_hidden=(8,)
        )
    else:
        config = ModelConfig.from_preset("mujoco", obs_dim=OBS_DIM, act_dim=ACT_DIM)
    save_checkpoint(
        path, TrMRL(config), CheckpointInfo("halfcheetah-vel", (-1.0,) * ACT_DIM, (1.0,) * ACT_DIM)
    )
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def measured(
    pid: int, port: int, runner: Runner, sessions: int, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    """Run one load while sampling the server's CPU time; CPU per action over the measured window."""
    trace: list[tuple[float, float]] = []
    load: asyncio.Task[LoadResult] = asyncio.create_task(
        runner("127.0.0.1", port, sessions, OBS_DIM, duration_s=duration_s, warmup_s=warmup_s)
    )
    while not load.done():
        trace.append((time.perf_counter(), cpu_seconds(pid)))
        await asyncio.sleep(0.05)
    trace.append((time.perf_counter(), cpu_seconds(pid)))
    result = await load
    times, cpu = zip(*trace, strict=True)
    begin, end = result.measured_from, result.measured_from + result.seconds
    spent = float(np.interp(end, times, cpu) - np.interp(begin, times, cpu))
    per_action = spent / result.actions * 1e6 if result.actions else float("nan")
    return result.summary() | {"server_cpu_s": round(spent, 3), "server_us_per_action": round(per_action, 2)}


def server_env(threads: int, tree: Path = REPO) -> dict[str, str]:
    return {
        "PYTHONPATH": str(tree),
        "TRMRL_TORCH_THREADS": str(threads),
        "TRMRL_MAX_BATCH": "4096",
        "TRMRL_MAX_QUEUED_STEPS": "65536",
        "TRMRL_MAX_SESSIONS": "65536",
        "TRMRL_MAX_BODY_BYTES": str(16 << 20),
        "TRMRL_LOG_LEVEL": "warning",
    }


async def host_part(
    port: int,
    pid: int,
    loads: list[int],
    duration_s: float,
    warmup_s: float,
    paths: list[str] | None = None,
    label: str = "",
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sessions in loads:
        for path in paths or PATHS:
            row = await measured(pid, port, PATHS[path], sessions, duration_s, warmup_s)
            out[f"{path}_{sessions}"] = row
            print(
                f"  {label}{path:17s} {sessions:5d} sessions: {row['actions_per_s']:10.0f} actions/s  "
                f"{row['server_us_per_action']:8.2f} us/action  p50 {row['p50_ms']:8.2f} ms  "
                f"errors {row['errors']}",
                flush=True,
            )
    return out


def table(results: dict[str, Any], loads: list[int]) -> str:
    host = results["host"]
    lines = [
        "Host overhead, tiny model (forward ~ free): server CPU us per action | actions/s",
        f"{'path':18s}" + "".join(f"{n:>24d}" for n in loads),
    ]
    for path in PATHS:
        cells = []
        for n in loads:
            row = host.get(f"{path}_{n}")
            cells.append(f"{row['server_us_per_action']:9.2f} | {row['actions_per_s']:10.0f}" if row else "-")
        lines.append(f"{path:18s}" + "".join(f"{c:>24s}" for c in cells))
    mujoco = results.get("mujoco")
    if mujoco:
        lines += [
            "",
            "MuJoCo-size model, batch 1,024: actions/s",
            f"  bare batched step (best of 1 and 2 threads) {mujoco['bare_1024']:10.0f}",
            f"  columnar msgpack batch, service {mujoco['columnar_1024']['actions_per_s']:10.0f}"
            f"   ({mujoco['columnar_1024']['server_us_per_action']:.2f} us/action of server CPU)",
            f"  efficiency                      {mujoco['efficiency_1024']:10.3f}   "
            f"(target >= {TARGETS['efficiency_1024']})",
        ]
    return "\n".join(lines)


def compare_part(
    tiny: Path, args: Any, loads: list[int], paths: list[str], duration: float, warmup: float
) -> dict[str, Any]:
    """The baseline server and this tree's, side by side: each cell (path, sessions) is measured on one,
    then at once on the other, ``args.rounds`` times, the order alternating, so that the machine's
    drifting load falls on both alike (``--in-turn``: one server at a time, all cells, then the other)."""
    baseline_env = dict(entry.split("=", 1) for entry in args.baseline_env)
    tree = args.baseline_tree.resolve() if args.baseline_tree else REPO
    variants = {"old": server_env(1, tree) | baseline_env, "new": server_env(1)}

    def launch(name: str) -> ServiceProcess:
        module = args.baseline_module if name == "old" else "service"
        return ServiceProcess([tiny], module=module, env=variants[name], cwd=tree if name == "old" else REPO)

    rounds: list[dict[str, Any]] = [{"old": {}, "new": {}} for _ in range(args.rounds)]
    if args.in_turn:
        for index, done in enumerate(rounds):
            for name in ("old", "new") if index % 2 == 0 else ("new", "old"):
                with launch(name) as server:
                    label = f"round {index} {name} "
                    part = host_part(server.port, server.pid, loads, duration, warmup, paths, label)
                    done[name] = uvloop.run(part)
    else:
        with launch("old") as old, launch("new") as new:
            servers = {"old": old, "new": new}
            cell = 0
            for sessions in loads:
                for path in paths:
                    for index, done in enumerate(rounds):
                        for name in ("old", "new") if (index + cell) % 2 == 0 else ("new", "old"):
                            server = servers[name]
                            label = f"round {index} {name} "
                            part = host_part(
                                server.port, server.pid, [sessions], duration, warmup, [path], label
                            )
                            done[name] |= uvloop.run(part)
                    cell += 1
    ratios: dict[str, Any] = {}
    for key in rounds[0]["new"]:
        cpu = [r["new"][key]["server_us_per_action"] / r["old"][key]["server_us_per_action"] for r in rounds]
        rate = [r["new"][key]["actions_per_s"] / r["old"][key]["actions_per_s"] for r in rounds]
        ratios[key] = {
            "old_us": [r["old"][key]["server_us_per_action"] for r in rounds],
            "new_us": [r["new"][key]["server_us_per_action"] for r in rounds],
            "cpu_ratio_by_round": [round(x, 3) for x in cpu],
            "cpu_ratio_median": round(float(np.median(cpu)), 3),
            "rate_ratio_median": round(float(np.median(rate)), 3),
        }
    return {
        "baseline": {
            "env": baseline_env,
            "tree": str(tree) if args.baseline_tree else None,
            "module": args.baseline_module,
        },
        "side_by_side": not args.in_turn,
        "rounds": rounds,
        "ratios": ratios,
    }


def compare_table(compare: dict[str, Any]) -> str:
    lines = [
        "Old (baseline) against new, server CPU us per action, medians over rounds; ratio new / old",
        f"{'path_sessions':24s}{'old us':>10s}{'new us':>10s}{'cpu ratio':>11s}{'rate ratio':>12s}  by round",
    ]
    for key, row in compare["ratios"].items():
        lines.append(
            f"{key:24s}{np.median(row['old_us']):10.2f}{np.median(row['new_us']):10.2f}"
            f"{row['cpu_ratio_median']:11.3f}{row['rate_ratio_median']:12.3f}  {row['cpu_ratio_by_round']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    parser.add_argument("--loads", default="1,256,4096", help="session counts (default 1,256,4096)")
    parser.add_argument("--json", type=Path, default=REPO / "bench/results/host_overhead.json")
    parser.add_argument("--no-mujoco", action="store_true", help="skip part 2")
    parser.add_argument("--paths", default=",".join(PATHS), help="paths to measure (default: all)")
    parser.add_argument(
        "--baseline-env", action="append", default=[], metavar="NAME=VALUE", help="the baseline's settings"
    )
    parser.add_argument("--baseline-tree", type=Path, default=None, help="the baseline's source tree")
    parser.add_argument(
        "--baseline-module", default="service", help="the baseline's server module (e.g. bench.bare_asgi)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="baseline/new rounds (with a baseline)")
    parser.add_argument("--in-turn", action="store_true", help="one server at a time (with a baseline)")
    args = parser.parse_args()
    loads = [int(x) for x in args.loads.split(",")]
    paths = args.paths.split(",")
    comparing = bool(args.baseline_env or args.baseline_tree or args.baseline_module != "service")
    duration, warmup = (1.0, 0.5) if args.quick else (4.0, 1.0)
    results: dict[str, Any] = {
        "machine": common.machine(torch=torch.__version__),
        "settings": {"duration_s": duration, "warmup_s": warmup, "loads": loads, "paths": paths},
        "date": common.stamp(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_checkpoint(Path(tmp) / "tiny", "tiny")
        print("part 1: tiny model, host path by path", flush=True)
        if comparing:
            results["compare"] = compare_part(tiny, args, loads, paths, duration, warmup)
            results["host"] = results["compare"]["rounds"][-1]["new"]
        else:
            with ServiceProcess([tiny], env=server_env(1), cwd=REPO) as server:
                results["host"] = uvloop.run(
                    host_part(server.port, server.pid, loads, duration, warmup, paths)
                )
        if not args.no_mujoco:
            print("part 2: MuJoCo-size model, columnar batch of 1,024 vs the bare batched step", flush=True)
            big = make_checkpoint(Path(tmp) / "mujoco", "mujoco")

            # The reference is the bare step at 1 and at 2 torch threads, before and after the service
            # run, the best of all: the machine's load may drift during the run, and two threads lose
            # badly to one on a shared machine (they wait on each other whenever a core is taken).
            def reference() -> dict[int, float]:
                return {t: bare_step_rate(big, 1024, seconds=duration, threads=t) for t in (1, 2)}

            before = reference()
            with ServiceProcess([big], env=server_env(1), cwd=REPO) as server:
                row = uvloop.run(
                    measured(
                        server.pid, server.port, PATHS["columnar-msgpack"], 1024, duration * 2, warmup * 2
                    )
                )
            after = reference()
            bare = max(*before.values(), *after.values())
            results["mujoco"] = {
                "bare_1024": round(bare, 1),
                "bare_1024_by_threads": {"before": before, "after": after},
                "columnar_1024": row,
                "efficiency_1024": round(row["actions_per_s"] / bare, 3),
            }
    results["machine"]["load_average_at_end"] = os.getloadavg()
    print()
    print(table(results, loads))
    if comparing:
        print()
        print(compare_table(results["compare"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
