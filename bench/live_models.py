"""Live-model benchmark: the stepping pause of a migration, and what recording costs, in one run.

Part 1, in process (no HTTP): a registry with two versions of the paper's MuJoCo-size model (obs 17,
act 6, window 5) and 10,000 resident sessions with full windows; each version is activated in turn
with ``migrate_sessions``, and the time steps were held back (``ModelRegistry.last_pause_s``: drain,
move every session's window and counters, reopen) is measured five times each way.

Part 2, through two real services side by side (the same checkpoint, one recording every session to
Parquet in a temporary directory, one not): actions/s and the server's CPU time per action at 256
sessions over ``/v1/act`` and over the columnar MessagePack batch, the two services measured
alternately, three times each, so drift in the machine's load hits both. On a busy machine the CPU
time per action is the steadier figure: the closed-loop actions/s follow the neighbours' load.

Run: ``python -m bench.live_models [--quick] [--json PATH]``; prints a table, writes JSON.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvloop
from trmrl_sim.launch import ServiceProcess

from bench import common
from bench.host_overhead import measured
from bench.serve_load import run_act, run_columnar
from service.core import migration
from service.core.engine import Engine, EngineLimits
from service.core.registry import ModelRegistry
from trmrl.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from trmrl.model import ModelConfig, TrMRL

REPO = Path(__file__).resolve().parents[1]
OBS_DIM, ACT_DIM = 17, 6
TARGETS = {"pause_ms_10k": 50.0, "recording_ratio_256": 0.9}


def make_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = TrMRL(ModelConfig.from_preset("mujoco", obs_dim=OBS_DIM, act_dim=ACT_DIM))
    save_checkpoint(path, model, CheckpointInfo("halfcheetah-vel", (-1.0,) * ACT_DIM, (1.0,) * ACT_DIM))
    return path


async def migration_pauses(paths: list[Path], sessions: int, repeats: int) -> dict[str, Any]:
    limits = EngineLimits(
        max_sessions=sessions + 16,
        max_batch=4096,
        batch_wait_s=0.0,
        session_ttl_s=3600.0,
        evict_idle_s=3600.0,
        max_queued_steps=sessions + 16,
    )
    device = torch.device("cpu")
    engines = [Engine("cheetah", load_checkpoint(p), limits, device) for p in paths]
    registry = ModelRegistry([engines[0]], limits, device)
    registry.add_version(engines[1])
    await registry.start()
    first = engines[0]
    ids = [first.table.create(deterministic=True, seed=None, ttl_s=None)[0] for _ in range(sessions)]
    slots = first.table.lookup(ids, None)
    rng = np.random.default_rng(0)
    for step in range(5):  # fill every window
        tickets = first.submit_rows(
            slots,
            rng.normal(size=(sessions, OBS_DIM)).astype(np.float32),
            np.zeros(sessions, np.float32),
            np.full(sessions, step == 0),
            None,
            None,
        )
        for future, _, _ in tickets.parts:
            await future
    pauses = []
    for i in range(repeats * 2):
        target = engines[(i + 1) % 2]
        moved = await migration.activate(registry, "cheetah", target.version, migrate=True)
        assert moved == sessions, moved
        pauses.append(registry.last_pause_s * 1e3)
    await registry.stop()
    return {
        "sessions": sessions,
        "pauses_ms": [round(p, 3) for p in pauses],
        "median_ms": round(statistics.median(pauses), 3),
        "max_ms": round(max(pauses), 3),
    }


async def load_on(server: ServiceProcess, path: str, duration_s: float) -> dict[str, Any]:
    """Actions/s at 256 sessions, and the server's CPU time per action over the same window."""
    runner = run_act if path == "act" else partial(run_columnar, encoding="msgpack", simulators=2)
    return await measured(server.pid, server.port, runner, 256, duration_s, 1.0)


def recording_overhead(path: Path, duration_s: float, rounds: int) -> dict[str, Any]:
    env = {"PYTHONPATH": str(REPO), "TRMRL_TORCH_THREADS": "1", "TRMRL_MAX_SESSIONS": "16384"}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as records:
        recording_env = {**env, "TRMRL_RECORD_DIR": records, "TRMRL_RECORD_FRACTION": "1.0"}
        with (
            ServiceProcess([path], env=env, cwd=REPO) as plain,
            ServiceProcess([path], env=recording_env, cwd=REPO) as recording,
        ):
            for load in ("act", "columnar"):
                rates: dict[str, list[float]] = {"plain": [], "recording": []}
                cpu: dict[str, list[float]] = {"plain": [], "recording": []}
                for _ in range(rounds):
                    for name, server in (("plain", plain), ("recording", recording)):
                        row = uvloop.run(load_on(server, load, duration_s))
                        rates[name].append(row["actions_per_s"])
                        cpu[name].append(row["server_us_per_action"])
                        print(
                            f"  {load:9s} {name:10s} {row['actions_per_s']:9.0f} actions/s "
                            f"{row['server_us_per_action']:8.1f} us of server CPU per action",
                            flush=True,
                        )
                mean = {k: statistics.mean(v) for k, v in rates.items()}
                cost = {k: statistics.median(v) for k, v in cpu.items()}
                out[load] = {
                    "plain_actions_per_s": round(mean["plain"], 1),
                    "recording_actions_per_s": round(mean["recording"], 1),
                    "ratio": round(mean["recording"] / mean["plain"], 3),
                    "plain_us_per_action": round(cost["plain"], 2),
                    "recording_us_per_action": round(cost["recording"], 2),
                    "cpu_ratio": round(cost["plain"] / cost["recording"], 3),
                    "runs": rates,
                    "cpu_runs": cpu,
                }
        written = list(Path(records).glob("*.parquet"))
        out["files_written"] = len(written)
    return out


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sessions and shorter windows")
    parser.add_argument("--json", type=Path, default=REPO / "bench/results/live_models.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sessions, repeats, duration, rounds = (2000, 2, 1.0, 1) if args.quick else (10_000, 5, 3.0, 3)
    results: dict[str, Any] = {
        "machine": common.machine(torch=torch.__version__),
        "date": common.stamp(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = [make_checkpoint(Path(tmp) / f"cheetah-{i}", seed=i) for i in range(2)]
        print(f"part 1: migrating {sessions} sessions between two versions", flush=True)
        results["migration"] = asyncio.run(migration_pauses(paths, sessions, repeats))
        print(f"  pauses (ms): {results['migration']['pauses_ms']}", flush=True)
        print("part 2: recording every session vs none, 256 sessions", flush=True)
        results["recording"] = recording_overhead(paths[0], duration, rounds)
    migration, recording = results["migration"], results["recording"]
    print()
    print(
        f"migration of {migration['sessions']} sessions: pause median {migration['median_ms']:.2f} ms, "
        f"max {migration['max_ms']:.2f} ms (target <= {TARGETS['pause_ms_10k']:.0f} ms)"
    )
    for load in ("act", "columnar"):
        row = recording[load]
        print(
            f"recording, {load:8s} 256 sessions: {row['recording_actions_per_s']:9.0f} vs "
            f"{row['plain_actions_per_s']:9.0f} actions/s, ratio {row['ratio']:.3f} "
            f"(target >= {TARGETS['recording_ratio_256']}); server CPU per action "
            f"{row['recording_us_per_action']:.1f} vs {row['plain_us_per_action']:.1f} us, "
            f"ratio {row['cpu_ratio']:.3f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
