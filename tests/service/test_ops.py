"""Operations in process: load shedding, metrics, draining, state written and restored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from service_support import OBS, ServiceClient, action, assert_error, new_session

from service.app import create_app
from service.config import Settings

pytestmark = pytest.mark.anyio

MakeClient = Callable[..., Awaitable[ServiceClient]]


async def test_a_full_queue_sheds_load_with_503_and_changes_nothing(make_client: MakeClient) -> None:
    client = await make_client(max_queued_steps=4, max_batch=1)
    sids = [await new_session(client) for _ in range(16)]
    replies = await asyncio.gather(
        *(client.post("/v1/act", json={"session_id": s, "observation": OBS[0], "step": 0}) for s in sids)
    )
    shed = [s for s, r in zip(sids, replies, strict=True) if r.status_code == 503]
    served = [s for s, r in zip(sids, replies, strict=True) if r.status_code == 200]
    assert shed and served and len(shed) + len(served) == len(sids)
    for r in replies:
        if r.status_code == 503:
            assert_error(r, 503, "overloaded")
            assert r.headers["retry-after"] == "1"
    # A shed step was not taken: the session still expects step 0 and answers it like a fresh one.
    for sid in shed:
        assert (await client.get(f"/v1/sessions/{sid}")).json()["steps"] == 0
        np.testing.assert_array_equal(
            await action(client, sid, OBS[0], step=0), await action(client, served[0], OBS[0], step=0)
        )
    # New sessions by /v1/act are shed before they are created.
    before = len(client.registry.engines["point-nav"].table)
    engine = client.registry.engines["point-nav"]
    engine.queued_steps += 4  # as if four steps were waiting
    try:
        assert_error(await client.post("/v1/act", json={"observation": OBS[0]}), 503, "overloaded")
    finally:
        engine.queued_steps -= 4
    assert len(engine.table) == before


async def test_metrics_cover_routes_batches_sessions_and_memory(make_client: MakeClient) -> None:
    client = await make_client()
    sid = await new_session(client)
    for step, obs in enumerate(OBS[:3]):
        await action(client, sid, obs, step=step)
    await client.post("/v1/act", json={"session_id": sid, "observation": [1.0], "step": 3})
    await client.get(f"/v1/sessions/{sid}")
    text = (await client.get("/metrics")).text
    version = client.registry.engines["point-nav"].version
    model = f'model="point-nav",version="{version}"'
    for line in (
        'trmrl_request_duration_seconds_count{method="POST",route="/v1/act",status="200"} 3.0',
        'trmrl_request_duration_seconds_count{method="POST",route="/v1/act",status="422"} 1.0',
        'trmrl_request_duration_seconds_count{method="GET",route="/v1/sessions/{session_id}",'
        'status="200"} 1.0',
        'trmrl_request_duration_seconds_count{method="POST",route="/v1/sessions",status="201"} 1.0',
        f"trmrl_batch_size_count{{{model}}} 3.0",
        f"trmrl_active_sessions{{{model}}} 1.0",
        f"trmrl_session_evictions_total{{{model}}} 0.0",
        f"trmrl_steps_total{{{model}}} 3.0",
        f"trmrl_model_active{{{model}}} 1.0",
        # Steps 1 and 2 carry rewards (0.0 by default) for the episode's first actions.
        f'trmrl_reward_steps_total{{model="point-nav",phase="first20",version="{version}"}} 2.0',
    ):
        assert line in text, line
    assert f'trmrl_queue_wait_seconds_bucket{{le="+Inf",{model}}} 3.0' in text
    assert "trmrl_model_device_bytes" in text and "trmrl_device_memory_bytes" in text


async def test_draining_refuses_new_sessions_and_serves_existing_ones(make_client: MakeClient) -> None:
    client = await make_client()
    sid = await new_session(client)
    client.registry.draining = True
    client.app.state.ready = False
    assert_error(await client.get("/readyz"), 503, "not_ready")
    assert_error(await client.post("/v1/sessions", json={}), 503, "draining")
    assert_error(await client.post("/v1/act", json={"observation": OBS[0]}), 503, "draining")
    assert (await client.post("/v1/act", json={"session_id": sid, "observation": OBS[0]})).status_code == 200
    state = (await client.get(f"/v1/sessions/{sid}/state")).json()
    assert (await client.put(f"/v1/sessions/{sid}/state", json=state)).status_code == 200  # in place: fine
    moved = {**state, "session_id": "moved-here"}
    assert_error(await client.put("/v1/sessions/moved-here/state", json=moved), 503, "draining")


async def test_sessions_survive_a_restart_through_the_state_dir(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    settings = Settings(models=list(checkpoints.values()), state_dir=tmp_path, api_keys=["k1", "k2"])
    a, b = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    app = create_app(settings)
    async with app.router.lifespan_context(app), ServiceClient(app) as client:
        sid = (await client.post("/v1/sessions", json={"model": "point-nav-trial"}, headers=a)).json()[
            "session_id"
        ]
        fresh = (await client.post("/v1/sessions", json={}, headers=b)).json()["session_id"]
        for step, obs in enumerate(OBS[:3]):
            r = await client.post(
                "/v1/act", json={"session_id": sid, "observation": obs, "step": step}, headers=a
            )
            assert r.status_code == 200
        before = (await client.get(f"/v1/sessions/{sid}/state", headers=a)).json()
    assert (tmp_path / "sessions.msgpack").is_file()
    app = create_app(settings)
    async with app.router.lifespan_context(app), ServiceClient(app) as client:
        after = (await client.get(f"/v1/sessions/{sid}/state", headers=a)).json()
        assert after == before
        assert (await client.get(f"/v1/sessions/{sid}", headers=b)).status_code == 404  # still k1's
        assert (await client.get(f"/v1/sessions/{fresh}/state", headers=b)).json()["episode_start_pending"]


async def test_periodic_snapshots_write_the_state_dir(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(models=list(checkpoints.values()), state_dir=tmp_path, snapshot_interval_s=0.05)
    app = create_app(settings)
    async with app.router.lifespan_context(app), ServiceClient(app) as client:
        await new_session(client)
        deadline = time.monotonic() + 60.0  # a generous wait for a 50 ms period: the machine may be busy
        while not (tmp_path / "sessions.msgpack").is_file() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert (tmp_path / "sessions.msgpack").is_file()


async def test_saved_sessions_that_no_longer_fit_are_skipped(
    checkpoints: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from service.core.snapshot_file import read_sessions, write_sessions

    settings = Settings(models=list(checkpoints.values()), state_dir=tmp_path)
    app = create_app(settings)
    async with app.router.lifespan_context(app), ServiceClient(app) as client:
        kept = await new_session(client, model="point-nav-trial")
        await new_session(client)
    blocks = read_sessions(tmp_path)
    for block in blocks:
        if block["model"] == "point-nav":
            block["model_version"] = "000000000000"  # as if the checkpoint had changed
    write_sessions(tmp_path, blocks)
    app = create_app(settings)
    async with app.router.lifespan_context(app), ServiceClient(app) as client:
        assert len(client.registry.engines["point-nav"].table) == 0
        assert (await client.get(f"/v1/sessions/{kept}")).status_code == 200
    assert any("not restored" in r.getMessage() for r in caplog.records)
    (tmp_path / "sessions.msgpack").write_bytes(b"\xc1garbage")
    app = create_app(settings)
    async with app.router.lifespan_context(app):  # an unreadable file is reported, not fatal
        assert sum(len(e.table) for e in app.state.registry.engines.values()) == 0
