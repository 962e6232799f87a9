"""Drive sessions across a disruption of the deployment (docker/smoke.sh): restart, killed replica, upgrade.

Creates N deterministic sessions with ``trmrl_client``, steps each, fetches snapshots (of every session,
or of every other one with ``--snapshot-half``: recovery then exercises both the snapshot restore and the
history replay), runs the disruption command, waits for ``--ready-url``, steps every session again and
checks the outcome:

* ``--expect continue``: no session was recovered, the service's step counter carried on, and each
  session's snapshot after the disruption equals the one before (the restart lost nothing);
* ``--expect recover``: every session kept answering and at least one was recovered (its replica died).

``--expect upgrade`` drives a fleet upgrade instead (no ``--disrupt``): sessions step without pause
through ``--url`` (the router; each session sends its own ``X-Session-Key``) while, on every replica
(each ``--replica-url``, with ``--admin-key``), a new version of ``--model`` is loaded from
``--checkpoint`` (a path under the replicas' ``TRMRL_CHECKPOINT_ROOT``), activated with
``migrate_sessions``, rolled back (the previous version activated the same way) and retired. Each phase
lasts until every session has stepped in it a few times. First, the same load sent to the router with the
admin key must be refused: 421 ``admin_on_replica`` in the service's error format, no replica changed.
Checks: no failed step and no step conflict;
every session's replies name v1, then v2, then v1 again, each switch once and between two steps, and
answer every step number in turn; ``GET /v1/models`` of each replica shows the versions and which is
active at each phase; sessions that do not step during the switch keep their memory (window, length,
previous action, step counter) across both migrations; every session's step counter ends at the number
of steps it sent.

Prints one JSON line with the facts; exits 1 when a check fails. Uses only the host's client venv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from itertools import pairwise
from typing import Any

import httpx
import numpy as np
from trmrl_client import PolicyClient, Session
from trmrl_client.protocol import ROUTE_HEADER, new_route_key


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


class _Stepper:
    """One session stepped with raw ``POST /v1/act`` calls (no client retries or recovery, so every
    failure and every step conflict is seen): the version each step was answered by, in order."""

    def __init__(self, session_id: str, route_key: str, obs_dim: int) -> None:
        self.session_id = session_id
        self.route_key = route_key
        self.obs_dim = obs_dim
        self.step = 0
        self.versions: list[str] = []
        self.latencies_s: list[float] = []

    def act(self, http: httpx.Client, rng: np.random.Generator, problems: list[str]) -> str:
        """One step; ``"ok"``, ``"conflict"`` or ``"failed"`` (the step is then sent again next time)."""
        body = {
            "session_id": self.session_id,
            "observation": _obs(rng, self.obs_dim).tolist(),
            "reward": 0.1,
            "episode_start": self.step == 0,
            "step": self.step,
        }
        start = time.monotonic()
        try:
            reply = http.post("/v1/act", json=body, headers={ROUTE_HEADER: self.route_key})
        except httpx.HTTPError as exc:
            problems.append(f"{self.session_id} step {self.step}: {type(exc).__name__}: {exc}")
            return "failed"
        if reply.status_code == 409 and "step_conflict" in reply.text:
            problems.append(f"{self.session_id} step {self.step}: conflict {reply.text[:200]}")
            return "conflict"
        if reply.status_code != 200:
            problems.append(f"{self.session_id} step {self.step}: {reply.status_code} {reply.text[:200]}")
            return "failed"
        answer = reply.json()
        if answer.get("step") != self.step:
            problems.append(f"{self.session_id}: step {self.step} answered as step {answer.get('step')}")
            return "failed"
        self.latencies_s.append(time.monotonic() - start)
        self.versions.append(str(answer["model_version"]))
        self.step += 1
        return "ok"


class _Fleet:
    """Worker threads that step their sessions round after round until stopped, and count the rounds
    each worker completed entirely within the current phase."""

    def __init__(self, url: str, headers: dict[str, str], groups: list[list[_Stepper]]) -> None:
        self.url = url
        self.headers = headers
        self.groups = groups
        self.phase = 0
        self.rounds = [0] * len(groups)
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._work, args=(k,), daemon=True) for k in range(len(groups))
        ]

    def _work(self, k: int) -> None:
        rng = np.random.default_rng(100 + k)
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=30.0) as http:
            while not self.stop.is_set():
                seen = self.phase
                for s in self.groups[k]:
                    outcome = s.act(http, rng, self.problems)
                    with self.lock:
                        self.counts[outcome] += 1
                    if outcome != "ok":
                        time.sleep(0.05)
                with self.lock:
                    if seen == self.phase:
                        self.rounds[k] += 1

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def next_phase(self) -> None:
        with self.lock:
            self.phase += 1
            self.rounds = [0] * len(self.groups)

    def wait_rounds(self, rounds: int, timeout_s: float) -> None:
        """Until every worker has stepped all its sessions ``rounds`` times within this phase."""
        deadline = time.monotonic() + timeout_s
        while min(self.rounds) < rounds:
            if time.monotonic() > deadline or not all(t.is_alive() for t in self.threads):
                raise SystemExit(f"phase {self.phase}: sessions stopped stepping (rounds {self.rounds})")
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60.0)


def _versions_of(http: httpx.Client, model: str, headers: dict[str, str]) -> dict[str, bool]:
    """``GET /v1/models``: each loaded version of ``model`` and whether it is the active one."""
    reply = http.get("/v1/models", headers=headers)
    reply.raise_for_status()
    return {m["version"]: bool(m["active"]) for m in reply.json()["models"] if m["name"] == model}


#: The router's answer to any admin call (docker/nginx.conf): they must go to every replica's own address.
ROUTER_ADMIN_STATUS = 421
ROUTER_ADMIN_CODE = "admin_on_replica"


def _admin_via_router(
    router: httpx.Client, admin: dict[str, str], body: dict[str, Any], failures: list[str]
) -> dict[str, Any]:
    """An admin call with the admin key sent to the router: refused, in the service's error format."""
    reply = router.post("/v1/admin/models", json=body, headers=admin)
    try:
        error = reply.json()["error"]
        shape_ok = set(error) == {"code", "message", "detail"} and isinstance(error["detail"], dict)
    except (ValueError, KeyError, TypeError):
        error, shape_ok = {}, False
    if reply.status_code != ROUTER_ADMIN_STATUS or not shape_ok or error.get("code") != ROUTER_ADMIN_CODE:
        failures.append(
            f"POST {router.base_url}/v1/admin/models with the admin key: {reply.status_code} "
            f"{reply.text[:300]}, expected {ROUTER_ADMIN_STATUS} {ROUTER_ADMIN_CODE}"
        )
    return {"status": reply.status_code, "code": error.get("code"), "message": error.get("message")}


def _admin_call(http: httpx.Client, method: str, path: str, want: int, **kw: Any) -> Any:
    reply = http.request(method, path, **kw)
    if reply.status_code != want:
        raise SystemExit(
            f"{method} {http.base_url}{path}: {reply.status_code} {reply.text[:300]}, expected {want}"
        )
    return reply.json() if reply.content else None


def _upgrade(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The fleet upgrade under stepping sessions (``--expect upgrade``); returns the facts and failures."""
    failures: list[str] = []
    user = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    admin = {"Authorization": f"Bearer {args.admin_key}"}
    replicas = [httpx.Client(base_url=u, headers=admin, timeout=120.0) for u in args.replica_url]
    router = httpx.Client(base_url=args.url, headers=user, timeout=30.0)
    # Sessions through the router, each with its own routing key: they spread over the replicas.
    steppers: list[_Stepper] = []
    quiet: list[_Stepper] = []
    for i in range(args.sessions + args.quiet):
        key = new_route_key()
        reply = router.post(
            "/v1/sessions", json={"model": args.model, "seed": i}, headers={ROUTE_HEADER: key}
        )
        reply.raise_for_status()
        created = reply.json()
        s = _Stepper(created["session_id"], key, int(created["model"]["obs_dim"]))
        (steppers if i < args.sessions else quiet).append(s)
    v1 = str(created["model"]["version"])
    # The quiet sessions get some memory, then stand still while their replica switches versions.
    rng = np.random.default_rng(7)
    for s in quiet:
        for _ in range(args.steps):
            if s.act(router, rng, failures) != "ok":
                raise SystemExit(f"quiet session: {failures[-1]}")

    def states(sessions: list[_Stepper]) -> list[dict[str, Any]]:
        out = []
        for s in sessions:
            r = router.get(f"/v1/sessions/{s.session_id}/state", headers={ROUTE_HEADER: s.route_key})
            r.raise_for_status()
            out.append(r.json())
        return out

    quiet_before = states(quiet)
    # Through the router an admin call reaches no replica: refused, and every replica still has v1 alone.
    via_router = _admin_via_router(
        router, admin, {"name": args.model, "checkpoint": args.checkpoint}, failures
    )
    for http in replicas:
        if (got := _versions_of(http, args.model, user)) != {v1: True}:
            failures.append(f"GET {http.base_url}/v1/models after the router's refusal: {got}")
    spread = Counter(
        router.get(f"/v1/sessions/{s.session_id}", headers={ROUTE_HEADER: s.route_key})
        .headers.get("x-trmrl-upstream", "direct")
        .split(",")[-1]
        .strip()
        for s in steppers + quiet
    )
    if len(spread) < args.min_upstreams:
        failures.append(f"sessions span {len(spread)} replicas, expected >= {args.min_upstreams}")

    workers = max(1, min(args.workers, len(steppers)))
    fleet = _Fleet(args.url, user, [steppers[k::workers] for k in range(workers)])
    t0 = time.monotonic()
    fleet.start()
    per_replica: list[dict[str, Any]] = [{"url": u} for u in args.replica_url]
    listed: dict[str, Any] = {}
    quiet_upgraded: list[dict[str, Any]] = []
    try:
        fleet.wait_rounds(args.rounds, args.phase_timeout)
        # 1. load the new version on every replica (not active yet)
        v2 = ""
        for http, facts in zip(replicas, per_replica, strict=True):
            t = time.monotonic()
            loaded = _admin_call(
                http,
                "POST",
                "/v1/admin/models",
                201,
                json={"name": args.model, "checkpoint": args.checkpoint},
            )
            facts["load_s"] = round(time.monotonic() - t, 2)
            v2 = v2 or str(loaded["version"])
            if loaded["version"] != v2 or v2 == v1 or loaded["active"]:
                failures.append(f"{http.base_url}: loaded {loaded}, expected inactive version {v2} != {v1}")
        listed["loaded"] = [_versions_of(http, args.model, user) for http in replicas]
        listed["loaded_via_router"] = _versions_of(router, args.model, user)
        # 2. activate it with migration on every replica, then 3. roll back the same way
        for phase, (target, label) in enumerate(((v2, "upgrade"), (v1, "rollback")), start=1):
            for http, facts in zip(replicas, per_replica, strict=True):
                done = _admin_call(
                    http,
                    "POST",
                    f"/v1/admin/models/{args.model}/activate",
                    200,
                    json={"version": target, "migrate_sessions": True},
                )
                facts[f"{label}_migrated"] = done["migrated_sessions"]
                facts[f"{label}_pause_ms"] = done["pause_ms"]
                if done["active_version"] != target:
                    failures.append(f"{http.base_url}: {label} left {done['active_version']} active")
            fleet.next_phase()
            fleet.wait_rounds(args.rounds, args.phase_timeout)
            listed[label] = [_versions_of(http, args.model, user) for http in replicas]
            if phase == 1:
                quiet_upgraded = states(quiet)
    finally:
        fleet.finish()
    upgrade_s = time.monotonic() - t0
    quiet_after = states(quiet)
    # 4. retire the new version: no session is left on it
    for http in replicas:
        _admin_call(http, "DELETE", f"/v1/admin/models/{args.model}/versions/{v2}", 204)
    listed["retired"] = [_versions_of(http, args.model, user) for http in replicas]

    # -- checks --
    if fleet.counts["failed"]:
        failures.append(f"{fleet.counts['failed']} failed steps: {fleet.problems[:3]}")
    if fleet.counts["conflict"]:
        failures.append(f"{fleet.counts['conflict']} step conflicts: {fleet.problems[:3]}")
    for label in ("upgrade", "rollback"):
        moved = sum(int(f[f"{label}_migrated"]) for f in per_replica)
        if moved < len(steppers) + len(quiet):
            failures.append(
                f"{label}: {moved} sessions migrated, fewer than the {len(steppers) + len(quiet)} live"
            )
    expected_lists = {
        "loaded": {v1: True, v2: False},
        "upgrade": {v1: False, v2: True},
        "rollback": {v1: True, v2: False},
        "retired": {v1: True},
    }
    for label, want in expected_lists.items():
        for url, got in zip(args.replica_url, listed[label], strict=True):
            if got != want:
                failures.append(
                    f"GET {url}/v1/models after the {label}: {args.model} versions {got}, expected {want}"
                )
    if listed["loaded_via_router"] != expected_lists["loaded"]:
        failures.append(f"GET /v1/models through the router after loading: {listed['loaded_via_router']}")
    switch_steps: dict[str, list[int]] = {"upgrade": [], "rollback": []}
    for s in steppers:
        switches = [(i, a, b) for i, (a, b) in enumerate(pairwise(s.versions), start=1) if a != b]
        if [(a, b) for _, a, b in switches] != [(v1, v2), (v2, v1)]:
            failures.append(f"session {s.session_id}: version switches {switches}, expected {v1}->{v2}->{v1}")
        else:
            switch_steps["upgrade"].append(switches[0][0])
            switch_steps["rollback"].append(switches[1][0])
    # The service's counters continue: each session has taken exactly the steps it sent, on v1 again.
    for s in steppers + quiet:
        info = router.get(f"/v1/sessions/{s.session_id}", headers={ROUTE_HEADER: s.route_key}).json()
        if info.get("steps") != s.step or info.get("model_version") != v1:
            failures.append(f"session {s.session_id}: service says {info}, client sent {s.step} steps")
    # Sessions that stood still kept their memory through both migrations (and showed the new version).
    for before, mid, after in zip(quiet_before, quiet_upgraded, quiet_after, strict=True):
        if mid["model_version"] != v2 or after["model_version"] != v1:
            seen = (mid["model_version"], after["model_version"])
            failures.append(f"quiet session {before['session_id']}: versions {seen}, expected {(v2, v1)}")
        for key in ("window", "length", "prev_action", "steps", "episodes"):
            if not (before.get(key) == mid.get(key) == after.get(key)):
                failures.append(f"quiet session {before['session_id']}: {key} changed by the migration")
    rng = np.random.default_rng(8)
    for s in quiet:  # and step on from where they were
        if s.act(router, rng, failures) != "ok" or s.versions[-1] != v1:
            failures.append(f"quiet session {s.session_id} did not step on after the rollback")
    for s in steppers + quiet:
        router.delete(f"/v1/sessions/{s.session_id}", headers={ROUTE_HEADER: s.route_key})
    for c in replicas:
        c.close()
    router.close()

    latencies = np.array([x for s in steppers for x in s.latencies_s])
    report = {
        "expect": "upgrade",
        "model": args.model,
        "versions": {"v1": v1, "v2": v2},
        "admin_via_router": via_router,
        "sessions": len(steppers),
        "quiet_sessions": len(quiet),
        "replicas": dict(spread),
        "steps": fleet.counts["ok"],
        "steps_per_session": [min(s.step for s in steppers), max(s.step for s in steppers)],
        "failed_steps": fleet.counts["failed"],
        "step_conflicts": fleet.counts["conflict"],
        "switch_step": {k: [min(v), max(v)] if v else None for k, v in switch_steps.items()},
        "per_replica": per_replica,
        "upgrade_s": round(upgrade_s, 1),
        "step_latency_ms": {
            "p50": round(float(np.percentile(latencies, 50)) * 1e3, 1),
            "p99": round(float(np.percentile(latencies, 99)) * 1e3, 1),
            "max": round(float(latencies.max()) * 1e3, 1),
        },
        "failures": failures,
    }
    return report, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--model", default="point-nav")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--disrupt", help="shell command run between the two halves")
    parser.add_argument("--ready-url", help="polled until 200 after the disruption")
    parser.add_argument("--expect", choices=["continue", "recover", "upgrade"], required=True)
    parser.add_argument("--snapshot-half", action="store_true", help="snapshot every other session only")
    parser.add_argument("--min-upstreams", type=int, default=1, help="replicas the sessions must span")
    upgrade = parser.add_argument_group("--expect upgrade")
    upgrade.add_argument("--replica-url", action="append", default=[], help="each replica (admin calls)")
    upgrade.add_argument("--admin-key")
    upgrade.add_argument("--checkpoint", help="the new version, under the replicas' TRMRL_CHECKPOINT_ROOT")
    upgrade.add_argument("--quiet", type=int, default=4, help="sessions that stand still during the switch")
    upgrade.add_argument("--workers", type=int, default=4, help="threads stepping the sessions")
    upgrade.add_argument("--rounds", type=int, default=3, help="steps of every session in each phase")
    upgrade.add_argument("--phase-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.expect == "upgrade":
        if not (args.replica_url and args.admin_key and args.checkpoint):
            parser.error("--expect upgrade needs --replica-url, --admin-key and --checkpoint")
        report, failed = _upgrade(args)
        print(json.dumps(report))
        return 1 if failed else 0
    if not (args.disrupt and args.ready_url):
        parser.error(f"--expect {args.expect} needs --disrupt and --ready-url")

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
