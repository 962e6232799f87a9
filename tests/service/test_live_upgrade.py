"""An upgrade under load, through a real server: 256 sessions keep stepping while a new version is
loaded, activated with migration and rolled back. No request fails, no step conflicts, and every
session's replies show each switch once, at a step boundary."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
from service_support import ADMIN, RunningServer, make_checkpoint

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SESSIONS = 256
SIMULATORS = 8
TICKS_PER_PHASE = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("upgrade")
    make_checkpoint(root / "point-nav", seed=0)
    make_checkpoint(root / "point-nav-v2", seed=3)
    env = {"TRMRL_ADMIN_KEYS": "admin-key", "TRMRL_CHECKPOINT_ROOT": str(root)}
    running = RunningServer([root / "point-nav"], env=env)
    try:
        running.wait_ready()
        yield running, root
    finally:
        running.stop()


async def test_load_migrate_and_roll_back_under_256_stepping_sessions(
    server: tuple[RunningServer, Path],
) -> None:
    """Eight simulators of 32 sessions each step in closed loops (one columnar tick per request) while
    the operator upgrades with migration and rolls back; each phase lasts until every simulator has
    stepped through it a few times, so the test does not depend on how fast the machine is."""
    running, _ = server
    async with httpx.AsyncClient(base_url=running.url, timeout=60.0) as http:
        created = await http.post("/v1/sessions", json={"count": SESSIONS})
        ids = created.json()["session_ids"]
        v1 = created.json()["model"]["version"]
        groups = [ids[k::SIMULATORS] for k in range(SIMULATORS)]
        versions: dict[str, list[str]] = {sid: [] for sid in ids}
        failures: list[str] = []
        phase = 0  # 0: on v1, 1: after the upgrade, 2: after the rollback
        ticks_in_phase = [0] * SIMULATORS
        phase_done = [asyncio.Event() for _ in range(3)]

        async def simulator(k: int) -> None:
            step = 0
            while True:
                seen = phase
                body = {
                    "session_ids": groups[k],
                    "observations": [[0.1, -0.2]] * len(groups[k]),
                    "steps": [step] * len(groups[k]),
                }
                r = await http.post("/v1/act/batch", json=body)
                reply = r.json()
                if r.status_code != 200 or reply["errors"]:
                    failures.append(f"simulator {k} step {step}: {r.status_code} {r.text[:300]}")
                    return
                for i, sid in enumerate(groups[k]):
                    versions[sid].append(
                        (reply.get("model_versions") or [reply["model_version"]] * len(groups[k]))[i]
                    )
                step += 1
                if seen == phase:
                    ticks_in_phase[k] += 1
                    if min(ticks_in_phase) >= TICKS_PER_PHASE:
                        phase_done[phase].set()
                    if phase == 2 and ticks_in_phase[k] >= TICKS_PER_PHASE:
                        return

        async def operator() -> str:
            nonlocal phase
            await phase_done[0].wait()
            r = await http.post(
                "/v1/admin/models", json={"name": "point-nav", "checkpoint": "point-nav-v2"}, headers=ADMIN
            )
            assert r.status_code == 201, r.text
            v2 = str(r.json()["version"])
            for target in (v2, v1):
                r = await http.post(
                    "/v1/admin/models/point-nav/activate",
                    json={"version": target, "migrate_sessions": True},
                    headers=ADMIN,
                )
                assert r.status_code == 200 and r.json()["migrated_sessions"] == SESSIONS, r.text
                ticks_in_phase[:] = [0] * SIMULATORS
                phase += 1
                if phase == 1:
                    await phase_done[1].wait()
            return v2

        results = await asyncio.wait_for(
            asyncio.gather(operator(), *(simulator(k) for k in range(SIMULATORS))), timeout=240
        )
        v2 = results[0]
    assert failures == []
    for sid, seen in versions.items():
        # v1 ... v1 v2 ... v2 v1 ... v1: each switch once, between two steps.
        switches = [(a, b) for a, b in pairwise(seen) if a != b]
        assert switches == [(v1, v2), (v2, v1)], (sid, seen)
