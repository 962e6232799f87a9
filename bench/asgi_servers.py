"""The service under uvicorn and under granian, side by side in one run: host cost per path, and the drain.

Both serve the same tiny model as :mod:`bench.host_overhead` (so the forward pass is nearly free and
what is measured is the server and the service's host path), with the same settings:
``python -m service`` (uvicorn, uvloop, httptools) and ``python -m bench.granian_service`` (granian's
ASGI interface on uvloop). Every round starts each server in turn (the order alternating between
rounds, since a shared machine drifts) and drives

* ``act``: ``POST /v1/act``, one connection and one session per client (JSON), 256 sessions;
* ``columnar-msgpack``: the columnar batch, two simulators, 4,096 sessions;
* ``stream``: one WebSocket stream per session, MessagePack frames, 256 sessions;
* ``vstream``: the vectorised stream ``WS /v1/stream``, two simulators, 4,096 sessions;

measuring the server process's CPU time per action and actions/s; then the drain: a service with a
state directory and a 2 s grace gets SIGTERM while a tick of steps is in flight, and must answer or
cleanly refuse every step, fail ``/readyz`` and refuse new sessions during the grace, still step an
existing session, exit, and give every session back with its steps after a restart.

Run: ``python -m bench.asgi_servers [--rounds N] [--quick] [--json PATH]`` (needs ``pip install
granian==2.8.9``, a bench-only install: not a dependency of the service). Prints a table of medians
and of the per-round ratios granian / uvicorn, writes JSON (default ``bench/results/asgi_servers.json``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
import uvloop
from trmrl_sim.launch import ServiceProcess

from bench import common
from bench.host_overhead import OBS_DIM, PATHS, make_checkpoint, measured, server_env

REPO = Path(__file__).resolve().parents[1]
SERVERS = {"uvicorn": "service", "granian": "bench.granian_service"}
GRACE_S = 2.0
"""Drain grace of the drain check: long enough for the in-flight tick on a busy shared machine."""
CASES = [("act", 256), ("columnar-msgpack", 4096), ("stream", 256), ("vstream", 4096)]


def load_round(module: str, checkpoint: Path, duration_s: float, warmup_s: float) -> dict[str, Any]:
    """Every case against one fresh server process."""
    out: dict[str, Any] = {}
    with ServiceProcess([checkpoint], module=module, env=server_env(1), cwd=REPO) as server:
        for path, sessions in CASES:
            row = uvloop.run(measured(server.pid, server.port, PATHS[path], sessions, duration_s, warmup_s))
            out[f"{path}_{sessions}"] = row
    return out


async def _step(http: httpx.AsyncClient, session_id: str, step: int) -> int:
    """One act; its status, 0 when no reply came (the connection was refused or dropped)."""
    body = {"session_id": session_id, "observation": [0.1] * OBS_DIM, "reward": 0.0, "step": step}
    try:
        return (await http.post("/v1/act", json=body)).status_code
    except httpx.TransportError:
        return 0


async def _status(request: Awaitable[httpx.Response]) -> tuple[int, str | None]:
    """A reply's status and error code; ``(0, None)`` when no reply came."""
    try:
        response = await request
    except httpx.TransportError:
        return 0, None
    body = response.json() if response.content else {}
    return response.status_code, body.get("error", {}).get("code") if isinstance(body, dict) else None


async def _drain_before(server: ServiceProcess, sessions: int) -> dict[str, Any]:
    process = server.process
    assert process is not None
    limits = httpx.Limits(max_connections=sessions + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0, limits=limits) as http:
        ids = [(await http.post("/v1/sessions", json={})).json()["session_id"] for _ in range(sessions)]
        for step in range(3):
            await asyncio.gather(*(_step(http, sid, step) for sid in ids))
        tick = asyncio.gather(*(_step(http, sid, 3) for sid in ids))
        await asyncio.sleep(0.002)
        signalled = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        statuses = await tick
        tick_s = time.perf_counter() - signalled
        ready = await _status(http.get("/readyz"))
        refused = await _status(http.post("/v1/sessions", json={}))
        existing = await _step(http, ids[0], 4 if statuses[0] == 200 else 3)
    exit_status = await asyncio.to_thread(process.wait, 30)
    return {
        "ids": ids,
        "statuses": statuses,
        "in_flight_answered": sum(s == 200 for s in statuses),
        "in_flight_unanswered": sum(s == 0 for s in statuses),
        "in_flight_other": sorted({s for s in statuses if s not in (0, 200)}),
        "in_flight_s": round(tick_s, 3),
        "readyz_during_grace": ready[0],
        "new_session_during_grace": list(refused),
        "existing_session_step_during_grace": existing,
        "exit_status": exit_status,
        "exit_s_after_sigterm": round(time.perf_counter() - signalled, 3),
    }


async def _drain_after(server: ServiceProcess, ids: list[str]) -> list[int]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as http:
        infos = [(await http.get(f"/v1/sessions/{sid}")) for sid in ids]
    return [r.json()["steps"] if r.status_code == 200 else -1 for r in infos]


def drain_check(module: str, checkpoint: Path, sessions: int = 64) -> dict[str, Any]:
    """SIGTERM while steps are in flight, then a restart from the state directory."""
    with tempfile.TemporaryDirectory() as state:
        env = {**server_env(1), "TRMRL_STATE_DIR": state, "TRMRL_DRAIN_GRACE_S": str(GRACE_S)}
        first = ServiceProcess([checkpoint], module=module, env=env, cwd=REPO).start()
        try:
            before = asyncio.run(_drain_before(first, sessions))
        finally:
            first.close()
        saved = (Path(state) / "sessions.msgpack").is_file()
        with ServiceProcess([checkpoint], module=module, env=env, cwd=REPO) as second:
            steps = asyncio.run(_drain_after(second, before.pop("ids")))
    statuses = before.pop("statuses")
    # Three steps each, the in-flight one where it was answered, and session 0's step during the grace.
    extra = before["existing_session_step_during_grace"] == 200  # one more step of session 0
    want = [3 + (status == 200) + (i == 0 and extra) for i, status in enumerate(statuses)]
    result = before | {"state_file_written": saved, "sessions_restored_exactly": steps == want}
    result["ok"] = (
        not result["in_flight_other"]
        and result["readyz_during_grace"] == 503
        and result["new_session_during_grace"] == [503, "draining"]
        and result["existing_session_step_during_grace"] == 200
        and result["exit_status"] in (0, -signal.SIGTERM)
        and saved
        and result["sessions_restored_exactly"]
    )
    return result


def _ratio(rounds: list[dict[str, Any]], key: str, field: str) -> list[float]:
    return [r["granian"][key][field] / r["uvicorn"][key][field] for r in rounds]


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for path, sessions in CASES:
        key = f"{path}_{sessions}"
        row: dict[str, Any] = {}
        for server in SERVERS:
            runs = [r[server][key] for r in rounds]
            row[server] = {
                "us_per_action_median": round(statistics.median(x["server_us_per_action"] for x in runs), 2),
                "actions_per_s_median": round(statistics.median(x["actions_per_s"] for x in runs), 1),
                "errors": sum(x["errors"] for x in runs),
            }
        cpu = _ratio(rounds, key, "server_us_per_action")
        rate = _ratio(rounds, key, "actions_per_s")
        row["cpu_ratio_by_round"] = [round(x, 3) for x in cpu]
        row["rate_ratio_by_round"] = [round(x, 3) for x in rate]
        row["cpu_ratio_median"] = round(statistics.median(cpu), 3)
        row["rate_ratio_median"] = round(statistics.median(rate), 3)
        summary[key] = row
    return summary


def table(summary: dict[str, Any], drains: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "server CPU us per action (median of rounds) | actions/s; ratio granian/uvicorn per round",
        f"{'path':24s}{'uvicorn':>22s}{'granian':>22s}   {'CPU ratio by round':28s} rate ratio by round",
    ]
    for key, row in summary.items():
        u, g = row["uvicorn"], row["granian"]
        lines.append(
            f"{key:24s}{u['us_per_action_median']:9.2f} | {u['actions_per_s_median']:9.0f}"
            f"{g['us_per_action_median']:9.2f} | {g['actions_per_s_median']:9.0f}   "
            f"{' '.join(f'{x:.2f}' for x in row['cpu_ratio_by_round']):28s} "
            f"{' '.join(f'{x:.2f}' for x in row['rate_ratio_by_round'])}"
        )
    lines.append("")
    lines.append(
        f"SIGTERM drain (64 sessions, a tick in flight, {GRACE_S:g} s grace, restart from the state dir)"
    )
    for server, runs in drains.items():
        for run in runs:
            lines.append(
                f"  {server:8s} ok={run['ok']!s:5s} answered {run['in_flight_answered']:2d}, "
                f"unanswered {run['in_flight_unanswered']:2d}, readyz {run['readyz_during_grace']}, "
                f"new session {run['new_session_during_grace'][0]}, exit {run['exit_status']} "
                f"after {run['exit_s_after_sigterm']:.2f} s, "
                f"restored exactly: {run['sessions_restored_exactly']}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    parser.add_argument("--json", type=Path, default=REPO / "bench/results/asgi_servers.json")
    args = parser.parse_args()
    duration, warmup = (1.0, 0.5) if args.quick else (4.0, 1.0)
    import granian
    import uvicorn

    results: dict[str, Any] = {
        "machine": common.machine(),
        "versions": {"granian": granian.__version__, "uvicorn": uvicorn.__version__},
        "settings": {"duration_s": duration, "warmup_s": warmup, "rounds": args.rounds, "cases": CASES},
        "date": common.stamp(),
    }
    rounds: list[dict[str, Any]] = []
    drains: dict[str, list[dict[str, Any]]] = {server: [] for server in SERVERS}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_checkpoint(Path(tmp) / "tiny", "tiny")
        for n in range(args.rounds):
            order = list(SERVERS) if n % 2 == 0 else list(reversed(SERVERS))
            this: dict[str, Any] = {"order": order}
            for server in order:
                this[server] = load_round(SERVERS[server], tiny, duration, warmup)
                drains[server].append(drain_check(SERVERS[server], tiny))
                print(
                    f"round {n + 1} {server:8s} "
                    + "  ".join(f"{k} {v['server_us_per_action']:.1f} us" for k, v in this[server].items())
                    + f"  drain ok={drains[server][-1]['ok']}",
                    flush=True,
                )
            rounds.append(this)
    results["rounds"] = rounds
    results["drain"] = drains
    results["summary"] = summarise(rounds)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    print()
    print(table(results["summary"], drains))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
