"""Soak: many sessions stepping against a loopback service for a bounded time, with session churn.

Starts its own ``python -m service`` on 127.0.0.1 (a free port), drives ``--sessions`` sessions through
``POST /v1/act/batch`` (``--batch`` sessions a request, one closed loop per group), and every
``--churn-s`` seconds ends ``--churn`` of each group's sessions (checked, deleted) and opens new ones.
Every step carries the client's step counter; a reply with another step number is a duplicate, and a
session whose service-side ``steps`` differs from the client's count at its end has lost steps.

Sampled every ``--sample-s``: the server's RSS (``/proc/<pid>/status``), the models' device bytes
and CUDA allocated bytes (``/metrics``), and the step latency p50/p99 of the window. Prints a table
and one JSON object (also written to ``--json``)::

    python -m bench.soak --sessions 1024 --seconds 600            # the full run (make reliability)
    python -m bench.soak --sessions 1024 --seconds 15 --churn-s 3  # what CI runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from trmrl_sim.launch import ServiceProcess

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "point-nav"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Server(ServiceProcess):
    """A loopback service process on ``checkpoint`` (bounded: it is always stopped by :meth:`close`).

    The device is the service's default (``TRMRL_DEVICE`` in the environment or ``env``).
    """

    def __init__(self, checkpoint: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        server_env = {"PYTHONPATH": str(REPO), "TRMRL_TORCH_THREADS": "1", **(env or {})}
        super().__init__([checkpoint], port=port, env=server_env, cwd=REPO, device=None)
        self.checkpoint = checkpoint


@dataclass
class Tally:
    steps: int = 0
    duplicated: int = 0
    lost: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    sessions_opened: int = 0
    sessions_closed: int = 0
    stepping_s: float = 0.0
    """The longest time a group stepped (from its sessions being open to its end)."""
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (time, seconds)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


async def _open(client: httpx.AsyncClient, tally: Tally) -> str:
    r = await client.post("/v1/sessions", json={})
    r.raise_for_status()
    tally.sessions_opened += 1
    return str(r.json()["session_id"])


async def _close(client: httpx.AsyncClient, sid: str, counted: int, tally: Tally) -> None:
    """Check a session's step count against the client's, then delete it."""
    r = await client.get(f"/v1/sessions/{sid}")
    if r.status_code != 200:
        tally.error(f"info_{r.status_code}")
        tally.lost += counted
    else:
        server = int(r.json()["steps"])
        tally.lost += max(0, counted - server)
        tally.duplicated += max(0, server - counted)
    r = await client.delete(f"/v1/sessions/{sid}")
    if r.status_code != 204:
        tally.error(f"delete_{r.status_code}")
    tally.sessions_closed += 1


async def _group(
    client: httpx.AsyncClient, size: int, seconds: float, churn_s: float, churn: int, tally: Tally, seed: int
) -> None:
    """Open ``size`` sessions, then step them for ``seconds``, churning at least once if ``churn``.

    The time counts from the sessions being open, and the first churn is awaited however long the
    steps take: on a busy machine, opening 1,024 sessions may take longer than a short run.
    """
    rng = np.random.default_rng(seed)
    sids = [await _open(client, tally) for _ in range(size)]
    counters = [0] * size
    began = time.monotonic()
    until = began + seconds
    next_churn = began + churn_s * (0.5 + random.Random(seed).random())
    churned = False
    while time.monotonic() < until or (churn and not churned):
        if churn and time.monotonic() >= next_churn:
            next_churn += churn_s
            churned = True
            for i in rng.choice(size, size=min(churn, size), replace=False):
                await _close(client, sids[i], counters[i], tally)
                sids[i], counters[i] = await _open(client, tally), 0
        obs = rng.normal(scale=0.5, size=(size, 2)).round(4).tolist()
        items = [
            {"session_id": sid, "observation": o, "reward": 0.0, "step": n, "episode_start": n == 0}
            for sid, o, n in zip(sids, obs, counters, strict=True)
        ]
        started = time.perf_counter()
        try:
            r = await client.post("/v1/act/batch", json={"items": items})
        except httpx.TransportError as exc:
            tally.error(type(exc).__name__)
            await asyncio.sleep(0.1)
            continue
        tally.latencies.append((time.monotonic(), time.perf_counter() - started))
        if r.status_code != 200:
            tally.error(f"http_{r.status_code}")
            await asyncio.sleep(0.1)
            continue
        for i, item in enumerate(r.json()["items"]):
            if "error" in item:
                tally.error(item["error"]["code"])  # the step is resent as is next time
            elif item["step"] != counters[i]:
                tally.duplicated += 1
            else:
                counters[i] += 1
                tally.steps += 1
    tally.stepping_s = max(tally.stepping_s, time.monotonic() - began)
    for sid, counted in zip(sids, counters, strict=True):
        await _close(client, sid, counted, tally)


async def _sampler(
    server: Server, done: asyncio.Event, every_s: float, samples: list[dict[str, float]]
) -> None:
    """Sample every ``every_s`` and once more when ``done`` is set."""
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
        while True:
            text = (await client.get("/metrics")).text
            samples.append(
                {
                    "t": time.monotonic() - start,
                    "rss": float(rss_bytes(server.pid)),
                    "model_device_bytes": metric_sum(text, "trmrl_model_device_bytes"),
                    "cuda_allocated": metric_sum(text, "trmrl_device_memory_bytes"),
                    "active_sessions": metric_sum(text, "trmrl_active_sessions"),
                }
            )
            if done.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), every_s)


def _windows(tally: Tally, samples: list[dict[str, float]], start: float) -> list[dict[str, float]]:
    """Each sample with the step latency (per batch request) of the window that ends at it."""
    out = []
    previous = 0.0
    for s in samples:
        lat = [d for t, d in tally.latencies if previous <= t - start < s["t"]]
        p50, p99 = (np.percentile(lat, [50, 99]) * 1000).tolist() if lat else (0.0, 0.0)
        out.append({**s, "requests": float(len(lat)), "p50_ms": p50, "p99_ms": p99})
        previous = s["t"]
    return out


async def soak_async(
    server: Server, sessions: int, seconds: float, batch: int, churn_s: float, churn: int, sample_s: float
) -> dict[str, Any]:
    tally = Tally()
    samples: list[dict[str, float]] = []
    groups = [min(batch, sessions - i) for i in range(0, sessions, batch)]
    limits = httpx.Limits(max_connections=len(groups) + 2)
    start = time.monotonic()
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0, limits=limits) as client:
        sampler = asyncio.create_task(_sampler(server, done, sample_s, samples))
        await asyncio.gather(
            *(_group(client, g, seconds, churn_s, churn, tally, seed) for seed, g in enumerate(groups))
        )
        done.set()
        await sampler
        leftover = int(metric_sum((await client.get("/metrics")).text, "trmrl_active_sessions"))
    windows = _windows(tally, samples, start)
    # Warm-up: the windows until every session was open and stepping, and the first one after.
    active = [i for i, w in enumerate(windows) if w["requests"] and w["active_sessions"] >= sessions]
    steady = windows[active[0] + 1 :] if len(active) > 1 else windows
    rss = [w["rss"] for w in steady]
    p99 = [w["p99_ms"] for w in steady if w["requests"]]
    return {
        "sessions": sessions,
        "seconds": seconds,
        "batch": batch,
        "steps": tally.steps,
        "steps_per_s": tally.steps / max(tally.stepping_s, 1e-9),
        "lost": tally.lost,
        "duplicated": tally.duplicated,
        "errors": tally.errors,
        "sessions_opened": tally.sessions_opened,
        "sessions_closed": tally.sessions_closed,
        "sessions_left_open": leftover,
        "rss_start_mib": rss[0] / 2**20,
        "rss_max_mib": max(rss) / 2**20,
        "rss_growth_mib": (max(rss) - rss[0]) / 2**20,
        "model_device_bytes_min_max": [
            min(w["model_device_bytes"] for w in steady),
            max(w["model_device_bytes"] for w in steady),
        ],
        "cuda_allocated_min_max": [
            min(w["cuda_allocated"] for w in steady),
            max(w["cuda_allocated"] for w in steady),
        ],
        "p99_ms_first_last_max": [p99[0], p99[-1], max(p99)] if p99 else [0.0, 0.0, 0.0],
        "windows": windows,
    }


def run_soak(
    *,
    sessions: int = 1024,
    seconds: float = 600.0,
    batch: int = 128,
    churn_s: float = 10.0,
    churn: int = 8,
    sample_s: float = 10.0,
    checkpoint: Path = CHECKPOINT,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start a loopback service, soak it, stop it; the figures as a dict."""
    server = Server(checkpoint, {"TRMRL_MAX_SESSIONS": str(2 * sessions + 64), **(env or {})}).start()
    try:
        return asyncio.run(soak_async(server, sessions, seconds, batch, churn_s, churn, sample_s))
    finally:
        server.close()


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'t (s)':>7} {'RSS MiB':>8} {'model dev MiB':>13} {'CUDA MiB':>9} {'sessions':>8} {'req':>6} "
        f"{'p50 ms':>7} {'p99 ms':>7}"
    ]
    for w in result["windows"]:
        lines.append(
            f"{w['t']:7.1f} {w['rss'] / 2**20:8.1f} {w['model_device_bytes'] / 2**20:13.2f} "
            f"{w['cuda_allocated'] / 2**20:9.1f} {w['active_sessions']:8.0f} {w['requests']:6.0f} "
            f"{w['p50_ms']:7.1f} {w['p99_ms']:7.1f}"
        )
    lines.append(
        f"steps {result['steps']} ({result['steps_per_s']:.0f}/s), lost {result['lost']}, duplicated "
        f"{result['duplicated']}, errors {result['errors']}, sessions opened {result['sessions_opened']} / "
        f"closed {result['sessions_closed']}, RSS growth after warm-up {result['rss_growth_mib']:.1f} MiB"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=600.0, help="bounded run time (default 10 min)")
    parser.add_argument("--batch", type=int, default=128, help="sessions per batch request")
    parser.add_argument("--churn-s", type=float, default=10.0, help="seconds between churn rounds")
    parser.add_argument("--churn", type=int, default=8, help="sessions replaced per group per round")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run_soak(
        sessions=args.sessions,
        seconds=args.seconds,
        batch=args.batch,
        churn_s=args.churn_s,
        churn=args.churn,
        sample_s=args.sample_s,
        checkpoint=args.checkpoint,
        env={"TRMRL_DEVICE": args.device},
    )
    print(table(result))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
