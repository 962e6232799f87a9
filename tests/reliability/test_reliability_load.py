"""Soak, faults and load shedding against real loopback services (``bench/soak.py``, ``bench/fault.py``).

The default suite runs short versions; ``TRMRL_LONG=1`` (``make reliability``) the full ones:
1,024 sessions for 10 minutes, three SIGKILLs of a service with 256 sessions.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from reliability_support import A, keyed_settings

from bench.fault import run_kill, run_stall
from bench.soak import run_soak, table
from service.app import create_app

RSS_BOUND_MIB = 64.0
"""Most the service's RSS may grow once every session is open and stepping."""


def check_soak(result: dict[str, Any]) -> None:
    print("\n" + table(result))
    assert result["lost"] == 0 and result["duplicated"] == 0
    assert result["errors"] == {}
    assert result["sessions_closed"] == result["sessions_opened"] > result["sessions"]  # churn happened
    assert result["sessions_left_open"] == 0
    assert result["rss_growth_mib"] < RSS_BOUND_MIB
    low, high = result["model_device_bytes_min_max"]
    assert low == high
    low, high = result["cuda_allocated_min_max"]
    assert high - low < RSS_BOUND_MIB * 2**20


@pytest.mark.timeout(600)  # a hang guard, not a speed check: the machine may be busy
def test_soak_short() -> None:
    check_soak(run_soak(sessions=1024, seconds=10.0, churn_s=2.5, churn=8, sample_s=2.0))


@pytest.mark.long
@pytest.mark.timeout(900)
def test_soak_ten_minutes() -> None:
    result = run_soak(sessions=1024, seconds=600.0, churn_s=10.0, churn=8, sample_s=30.0)
    check_soak(result)
    first, last, _worst = result["p99_ms_first_last_max"]
    assert last < 3 * first + 50, "p99 latency drifted"


def check_kill(result: dict[str, Any]) -> None:
    print("\n" + json.dumps(result))
    assert result["kills"] >= 1
    assert result["lost"] == 0, result["lost_detail"]
    assert result["recovered"] == result["sessions"]


@pytest.mark.timeout(600)  # a hang guard, not a speed check: the machine may be busy
def test_sigkill_under_load_loses_no_session() -> None:
    check_kill(run_kill(sessions=32, steps=40, kills=1, snapshot_s=0.5))


@pytest.mark.long
@pytest.mark.timeout(900)
def test_sigkill_three_times_with_256_sessions() -> None:
    check_kill(run_kill(sessions=256, steps=60, kills=3, snapshot_s=0.5, timeout_s=600.0))


@pytest.mark.timeout(600)  # a hang guard, not a speed check: the machine may be busy
def test_stalled_connections_and_streams_do_not_block_others() -> None:
    result = run_stall(stalled=32, steps=40)
    print("\n" + json.dumps(result))
    assert result["max_ms"] < 2000 and result["p50_ms"] < 250
    assert result["oversize_frame_close_code"] == 1009  # message too big: uvicorn's ws_max_size


# -- load shedding: a full queue or a full pool refuses, and the service goes on ------------------------
def _serving(**overrides: object) -> Any:
    import contextlib

    @contextlib.asynccontextmanager
    async def serving() -> Any:
        app = create_app(keyed_settings(**overrides))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=A) as client:
                yield client

    return serving()


@pytest.mark.anyio
async def test_a_full_queue_sheds_load_with_503_and_recovers() -> None:
    async with _serving(max_queued_steps=4, max_batch=2) as client:
        items = [{"observation": [0.1, 0.2]} for _ in range(64)]
        many = [client.post("/v1/act", json={"observation": [0.1, 0.2]}) for _ in range(64)]
        batch, *singles = await asyncio.gather(client.post("/v1/act/batch", json={"items": items}), *many)
        codes = [i["error"]["code"] for i in batch.json()["items"] if "error" in i]
        statuses = [r.status_code for r in singles]
        assert "overloaded" in codes or 503 in statuses
        assert set(statuses) <= {200, 503}
        for r in singles:
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "overloaded"
        assert (await client.get("/healthz")).status_code == 200
        r = await client.post("/v1/act", json={"observation": [0.1, 0.2]})
        assert r.status_code == 200


@pytest.mark.anyio
async def test_a_full_pool_answers_429() -> None:
    async with _serving(max_sessions=4, evict_idle_s=3600) as client:
        statuses = [(await client.post("/v1/sessions", json={})).status_code for _ in range(6)]
        assert statuses == [201] * 4 + [429] * 2
        r = await client.post("/v1/act", json={"observation": [0.1, 0.2]})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert (await client.get("/readyz")).status_code == 200


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"
