"""Drive sessions across a disruption of the deployment (docker/smoke.sh): restart, or a replica killed.

Creates N deterministic sessions with ``trmrl_client``, steps each, fetches snapshots (of every session,
or of every other one with ``--snapshot-half``: recovery then exercises both the snapshot restore and the
history replay), runs the disruption command, waits for ``--ready-url``, steps every session again and
checks the outcome:

* ``--expect continue``: no session was recovered, the service's step counter carried on, and each
  session's snapshot after the disruption equals the one before (the restart lost nothing);
* ``--expect recover``: every session kept answering and at least one was recovered (its replica died).

Prints one JSON line with the facts; exits 1 when a check fails. Uses only the host's client venv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx
import numpy as np
from trmrl_client import PolicyClient, Session


def _obs(rng: np.random.Generator, dim: int) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, size=dim).astype(np.float32)


def _step_all(sessions: list[Session], rng: np.random.Generator, steps: int) -> None:
    for t in range(steps):
        for s in sessions:
            s.act(_obs(rng, s.model.obs_dim), reward=0.1, episode_start=t == 0 and s.step == 0)


def _upstreams(url: str, headers: dict[str, str], sessions: list[Session]) -> Counter[str]:
    """Which replica holds each session (the router's X-Trmrl-Upstream reply header)."""
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=url, headers=headers, timeout=10.0) as http:
        for s in sessions:
            reply = http.get(f"/v1/sessions/{s.session_id}")
            seen[reply.headers.get("x-trmrl-upstream", "direct").split(",")[-1].strip()] += 1
    return seen


def _wait_ready(url: str, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"not ready after {timeout_s:.0f} s: {url}")


def _same_memory(before: dict[str, Any], after: dict[str, Any]) -> bool:
    keys = ("session_id", "model_version", "window", "length", "prev_action", "steps", "episodes")
    return all(before.get(k) == after.get(k) for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--model", default="point-nav")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--disrupt", required=True, help="shell command run between the two halves")
    parser.add_argument("--ready-url", required=True, help="polled until 200 after the disruption")
    parser.add_argument("--expect", choices=["continue", "recover"], required=True)
    parser.add_argument("--snapshot-half", action="store_true", help="snapshot every other session only")
    parser.add_argument("--min-upstreams", type=int, default=1, help="replicas the sessions must span")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    failures: list[str] = []
    with PolicyClient(args.url, api_key=args.api_key, timeout=10.0, retries=5) as client:
        sessions = [client.session(args.model, seed=i) for i in range(args.sessions)]
        _step_all(sessions, rng, args.steps)
        before = {}
        for i, s in enumerate(sessions):
            if not args.snapshot_half or i % 2 == 0:
                before[s.session_id] = s.snapshot()
        spread = _upstreams(args.url, headers, sessions)
        if len(spread) < args.min_upstreams:
            failures.append(f"sessions span {len(spread)} replicas, expected >= {args.min_upstreams}")

        start = time.monotonic()
        subprocess.run(args.disrupt, shell=True, check=True)
        ready_s = _wait_ready(args.ready_url, 180.0)
        outage_s = time.monotonic() - start

        unchanged = 0
        if args.expect == "continue":
            # Before any new step: the restored memories are exactly the ones saved at shutdown.
            with httpx.Client(base_url=args.url, headers=headers, timeout=10.0) as http:
                for sid, snap in before.items():
                    now = http.get(f"/v1/sessions/{sid}/state")
                    if now.status_code == 200 and _same_memory(snap, now.json()):
                        unchanged += 1
            if unchanged != len(before):
                failures.append(f"{len(before) - unchanged} of {len(before)} sessions came back changed")
        ids_before = [s.session_id for s in sessions]
        _step_all(sessions, rng, args.steps)
        recoveries = sum(s.recoveries for s in sessions)
        steps_after = [int(s.info()["steps"]) for s in sessions]
        if args.expect == "continue":
            if recoveries:
                failures.append(f"{recoveries} sessions were recovered; the restart should lose none")
            if steps_after != [2 * args.steps] * len(sessions):
                failures.append(f"service step counters {steps_after}, expected {2 * args.steps} each")
        elif recoveries == 0:
            failures.append("no session was recovered, yet a replica holding sessions died")
        spread_after = _upstreams(args.url, headers, sessions)
        for s in sessions:
            s.close()

    report = {
        "expect": args.expect,
        "sessions": len(sessions),
        "steps_each": 2 * args.steps,
        "replicas_before": dict(spread),
        "replicas_after": dict(spread_after),
        "recoveries": recoveries,
        "ids_changed": sum(a != s.session_id for a, s in zip(ids_before, sessions, strict=True)),
        "snapshots_taken": len(before),
        "snapshots_unchanged": unchanged if args.expect == "continue" else None,
        "disruption_s": round(outage_s, 1),
        "ready_wait_s": round(ready_s, 1),
        "failures": failures,
    }
    print(json.dumps(report))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
