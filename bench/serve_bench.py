"""Serving benchmark: the service against the straightforward server, side by side in one run.

For the paper's MuJoCo-size network (d_model 128, 4 layers, 16 heads, N = 5, obs 17, act 6) it
measures, on this machine:

* the bare batched step (``trmrl.policy.act`` on a slot pool, no HTTP) at each batch size;
* device memory per resident session, and sessions per GiB;
* for the service (``python -m service``) and the straightforward server (``bench.serve_naive``),
  each a real uvicorn process on a free port: a single session's round trip over >= 2,000
  sequential ``/v1/act`` steps, and actions/s and p99 latency at 1, 16, 256 and 1,024 concurrent
  sessions over ``/v1/act`` and ``/v1/act/batch``, and (service only: the straightforward server has
  no streams) over WebSocket streams with JSON text frames and MessagePack binary frames;
* serving efficiency (service actions/s / bare step actions/s at the same batch size) and the
  ratios to the straightforward server.

The load generator (``bench.serve_load``) runs in this process and shares the cores with the
server it measures. Prints a table and writes JSON.

Run: ``python -m bench.serve_bench [--quick] [--json PATH]``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import uvloop
from trmrl_sim.launch import ServiceProcess

from bench import common
from bench.serve_load import LoadResult, run_act, run_batch, run_sequential, run_stream
from service.config import Settings
from trmrl.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from trmrl.model import ModelConfig, TrMRL
from trmrl.networks import make_pool
from trmrl.policy import act
from trmrl.slot_pool import SlotPool

REPO = Path(__file__).resolve().parents[1]
OBS_DIM, ACT_DIM = 17, 6
TARGETS = {"p50_ms": 1.5, "p99_ms": 5.0, "vs_naive_256": 10.0, "efficiency_256": 0.5, "sessions_per_gib": 1e6}


def make_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = TrMRL(ModelConfig.from_preset("mujoco", obs_dim=OBS_DIM, act_dim=ACT_DIM))
    save_checkpoint(path, model, CheckpointInfo("halfcheetah-vel", (-1.0,) * ACT_DIM, (1.0,) * ACT_DIM))
    return path


# -- model side -------------------------------------------------------------------------------------------
@torch.inference_mode()
def bare_step_rate(checkpoint: Path, batch: int, seconds: float, threads: int, repeats: int = 5) -> float:
    """Actions/s of the batched step alone: one ``act`` (window update + forward + clip) per batch.

    The best of ``repeats`` windows: on a shared machine the fastest window is the least disturbed.
    """
    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    pool = make_pool(ckpt.model, max(batch, 1))
    low, high = torch.tensor(ckpt.info.action_low), torch.tensor(ckpt.info.action_high)
    slots = torch.arange(batch)
    obs = torch.randn(batch, OBS_DIM)
    reward = torch.zeros(batch)
    start = torch.zeros(batch, dtype=torch.bool)

    def step() -> None:
        act(pool, slots, obs, reward, start, low=low, high=high, deterministic=True, noise=None)

    for _ in range(5):
        step()
    best = 0.0
    for _ in range(repeats):
        count, began = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - began) < seconds / repeats:
            step()
            count += 1
        best = max(best, batch * count / elapsed)
    return best


def memory_per_session(checkpoint: Path) -> dict[str, float]:
    """Device bytes one slot takes, and what a pool of a million slots really allocates."""
    model = load_checkpoint(checkpoint).model
    assert isinstance(model, TrMRL), "the serving benchmark measures TrMRL checkpoints"
    per_slot = SlotPool(model, 1).bytes_per_slot
    million = SlotPool(model, 1_000_000)
    allocated = sum(
        t.untyped_storage().nbytes() for t in (million.windows, million.lengths, million.prev_action)
    )
    return {
        "bytes_per_session": per_slot,
        "sessions_per_gib": (1 << 30) / per_slot,
        "pool_of_1m_sessions_mib": allocated / (1 << 20),
    }


# -- servers ------------------------------------------------------------------------------------------------
async def measure_server(
    port: int, loads: list[int], *, sequential_steps: int, duration_s: float, slow: bool, streams: bool
) -> dict[str, Any]:
    """The single-session round trip, then every load over both endpoints."""
    out: dict[str, Any] = {}
    seq = await run_sequential("127.0.0.1", port, OBS_DIM, sequential_steps)
    out["sequential"] = seq.summary()
    print(f"  sequential: p50 {seq.percentile(50):.3f} ms  p99 {seq.percentile(99):.3f} ms", flush=True)
    for sessions in loads:
        # A slow server answers 1,024 sessions only every few seconds: give its loops time to settle.
        extra = sessions / 300 if slow else 0.0
        runners: list[tuple[str, Any]] = [("act", run_act), ("batch", run_batch)]
        if streams:
            runners += [
                ("ws-json", partial(run_stream, encoding="json")),
                ("ws-msgpack", partial(run_stream, encoding="msgpack")),
            ]
        for endpoint, runner in runners:
            result: LoadResult = await runner(
                "127.0.0.1", port, sessions, OBS_DIM, duration_s=duration_s + extra, warmup_s=1.0 + extra
            )
            out[f"{endpoint}_{sessions}"] = result.summary()
            print(
                f"  {endpoint:10s} {sessions:5d} sessions: {result.actions_per_s:9.0f} actions/s  "
                f"p50 {result.percentile(50):8.2f} ms  p99 {result.percentile(99):8.2f} ms  "
                f"errors {result.errors}",
                flush=True,
            )
    return out


# -- report -------------------------------------------------------------------------------------------------
def report(results: dict[str, Any], loads: list[int]) -> str:
    svc, naive, bare = results["service"], results["naive"], results["bare_step_actions_per_s"]
    load = results["machine"]
    lines = [
        f"serving benchmark -- {load['summary']}",
        f"load average (1/5/15 min): {load['load_average_at_start']} at start, "
        f"{load['load_average_at_end']} at end",
        "",
        "single session, sequential /v1/act round trips:",
        f"  {'server':10s} {'steps':>6s} {'p50 ms':>8s} {'p99 ms':>8s}",
    ]
    for name, r in (("service", svc), ("naive", naive)):
        s = r["sequential"]
        lines.append(f"  {name:10s} {s['requests']:6d} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f}")
    lines += [
        "",
        "concurrent sessions (closed loops; batch: 4 simulators, each one request per tick):",
        f"  {'endpoint':8s} {'sessions':>8s} {'service act/s':>14s} {'p99 ms':>9s} {'naive act/s':>12s} "
        f"{'p99 ms':>9s} {'x naive':>8s} {'bare act/s':>11s} {'efficiency':>10s}",
    ]
    for endpoint in ("act", "batch"):
        for n in loads:
            s, v = svc[f"{endpoint}_{n}"], naive[f"{endpoint}_{n}"]
            ratio = s["actions_per_s"] / v["actions_per_s"] if v["actions_per_s"] else float("inf")
            eff = s["actions_per_s"] / bare[str(n)]
            lines.append(
                f"  {endpoint:8s} {n:8d} {s['actions_per_s']:14.0f} {s['p99_ms']:9.2f} "
                f"{v['actions_per_s']:12.0f} {v['p99_ms']:9.2f} {ratio:8.1f} {bare[str(n)]:11.0f} {eff:10.2f}"
            )
    lines += [
        "",
        "WebSocket streams (service; closed loops, one stream per session):",
        f"  {'frames':8s} {'sessions':>8s} {'act/s':>10s} {'p50 ms':>8s} {'p99 ms':>9s} {'x /v1/act':>10s} "
        f"{'efficiency':>10s}",
    ]
    for endpoint in ("ws-json", "ws-msgpack"):
        for n in loads:
            s, http = svc[f"{endpoint}_{n}"], svc[f"act_{n}"]
            ratio = s["actions_per_s"] / http["actions_per_s"] if http["actions_per_s"] else float("inf")
            lines.append(
                f"  {endpoint[3:]:8s} {n:8d} {s['actions_per_s']:10.0f} {s['p50_ms']:8.2f} "
                f"{s['p99_ms']:9.2f} {ratio:10.2f} {s['actions_per_s'] / bare[str(n)]:10.2f}"
            )
    mem = results["memory"]
    lines += [
        "",
        f"device memory per resident session: {mem['bytes_per_session']} bytes "
        f"({mem['sessions_per_gib']:,.0f} sessions per GiB; a pool of 1M sessions: "
        f"{mem['pool_of_1m_sessions_mib']:.0f} MiB)",
        "",
        "targets:",
    ]
    for name, (value, target, ok) in results["targets"].items():
        lines.append(f"  {name:32s} {value:12.3f}  target {target:>10}  {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def judge(results: dict[str, Any]) -> dict[str, tuple[float, str, bool]]:
    """Each target of ``TARGETS.md`` this run measured: (value, target, met)."""
    svc, naive, bare = results["service"], results["naive"], results["bare_step_actions_per_s"]
    seq, per_gib = svc["sequential"], results["memory"]["sessions_per_gib"]
    out = {
        "single-session p50 ms": (seq["p50_ms"], "<= 1.5", seq["p50_ms"] <= TARGETS["p50_ms"]),
        "single-session p99 ms": (seq["p99_ms"], "<= 5", seq["p99_ms"] <= TARGETS["p99_ms"]),
        "sessions per GiB": (per_gib, ">= 1e6", per_gib >= TARGETS["sessions_per_gib"]),
    }
    if "act_256" not in svc:
        return out
    act, batch, slow = svc["act_256"], svc["batch_256"], naive["act_256"]
    vs_naive = act["actions_per_s"] / max(slow["actions_per_s"], 1e-9)
    efficiency = {name: r["actions_per_s"] / bare["256"] for name, r in (("/v1/act", act), ("batch", batch))}
    out["x naive at 256 (/v1/act)"] = (vs_naive, ">= 10", vs_naive >= TARGETS["vs_naive_256"])
    lower = act["p99_ms"] < slow["p99_ms"]
    out["p99 ms at 256 (/v1/act)"] = (act["p99_ms"], f"< naive {slow['p99_ms']:.0f}", lower)
    for name, value in efficiency.items():
        out[f"efficiency at 256 ({name})"] = (value, ">= 0.5", value >= TARGETS["efficiency_256"])
    return out


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of the benchmark)")
    parser.add_argument("--loads", default="1,16,256,1024", help="concurrent session counts")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "serve_bench.json")
    args = parser.parse_args()
    loads = [int(n) for n in args.loads.split(",")]
    default_threads = torch.get_num_threads()
    service_threads = Settings().forward_threads()
    duration = 1.5 if args.quick else 5.0
    sequential_steps = 500 if args.quick else 2000

    results: dict[str, Any] = {
        "machine": {
            "summary": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, service forward pass on {service_threads} torch thread(s)",
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "service_torch_threads": service_threads,
            "python": platform.python_version(),
            "device": "cpu",
            # Other work on a shared machine shows here: compare ratios, not absolute figures.
            "load_average_at_start": os.getloadavg(),
        },
        "model": {"preset": "mujoco", "obs_dim": OBS_DIM, "act_dim": ACT_DIM, "window": 5},
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "halfcheetah-vel")
        print("bare batched step (trmrl.policy.act on a slot pool, no HTTP):", flush=True)
        thread_counts = sorted({1, os.cpu_count() or 1})
        by_threads: dict[str, dict[str, float]] = {}
        for threads in thread_counts:
            by_threads[str(threads)] = {
                str(n): bare_step_rate(checkpoint, n, 1.0 if args.quick else 3.0, threads) for n in loads
            }
        torch.set_num_threads(default_threads)
        # The efficiency denominator is the faster of the thread counts: the harder reference.
        bare = {str(n): max(rates[str(n)] for rates in by_threads.values()) for n in loads}
        for n in loads:
            per = ", ".join(f"{t} thread(s) {by_threads[str(t)][str(n)]:8.0f}" for t in thread_counts)
            print(f"  batch {n:5d}: {per} actions/s", flush=True)
        results["bare_step_actions_per_s_by_threads"] = by_threads
        results["bare_step_actions_per_s"] = bare
        results["memory"] = memory_per_session(checkpoint)

        for name, module, env in (
            ("service", "service", {"TRMRL_MAX_SESSIONS": str(4 * max(loads) + 4096)}),
            ("naive", "bench.serve_naive", {}),
        ):
            print(f"{name} ({module}):", flush=True)
            # The device is the servers' own default (TRMRL_DEVICE if set), as the bare step's is.
            with ServiceProcess(
                [checkpoint], module=module, env={"PYTHONPATH": str(REPO), **env}, cwd=REPO, device=None
            ) as server:
                results[name] = uvloop.run(
                    measure_server(
                        server.port,
                        loads,
                        sequential_steps=sequential_steps,
                        duration_s=duration,
                        slow=name == "naive",
                        streams=name == "service",
                    )
                )

    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["targets"] = judge(results)
    print()
    print(report(results, loads))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
