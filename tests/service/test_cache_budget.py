"""A fixed key/value cache budget (``TRMRL_CACHE_MIB``) for a trial-context model: a step that needs a
block when none is free is refused alone (503 ``cache_exhausted``) on every act path with its session
unchanged, and goes through once a block comes back; restores, restarts and migrations the budget
cannot hold are refused or cut short, changing nothing; a budget below one full context is refused
when the model loads."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from service_support import ADMIN, ServiceClient, action, assert_error, make_checkpoint, new_session, serving
from trmrl_client.codec import packb, unpackb

from service.api.routes.fleet import FleetFeed
from service.app import create_app
from service.config import Settings
from service.core.engine import Engine, EngineLimits
from service.core.errors import ServiceError
from trainer.evaluate import replay_actions
from trmrl.checkpoint import CheckpointError, load_checkpoint
from trmrl.model import TrMRL
from trmrl.trial_pool import TrialPool

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "install httpx2 instead": the test client works with httpx
    from starlette.testclient import TestClient

pytestmark = pytest.mark.anyio

MAX_CONTEXT = 40  # 3 blocks of 16
TRIAL = {"context": "trial", "window": 1, "max_context": MAX_CONTEXT, "memory_scope": "trial"}
BLOCKS = 6
MSGPACK = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("budget-root")
    make_checkpoint(base / "trial", seed=5, policy_out_gain=0.1, **TRIAL)  # type: ignore[arg-type]
    # A value encoder of its own: twice the layers, so the same MiB hold half the blocks (3).
    make_checkpoint(base / "trial-wide", seed=6, policy_out_gain=0.1, value_input="encoder", **TRIAL)  # type: ignore[arg-type]
    return base


def cache_mib(root: Path, blocks: int = BLOCKS) -> float:
    model = load_checkpoint(root / "trial").model
    assert isinstance(model, TrMRL)
    return blocks * TrialPool.block_bytes_of(model) / 2**20


def settings(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"cache_mib": cache_mib(root), "max_sessions": 16, **overrides}
    return Settings(models=[root / "trial"], checkpoint_root=root, admin_keys=["admin-key"], **values)


@pytest.fixture
async def client(root: Path) -> AsyncIterator[ServiceClient]:
    async with serving(create_app(settings(root))) as c:
        yield c


def trajectory(steps: int = MAX_CONTEXT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    obs = rng.normal(size=(steps, 2)).astype(np.float32)
    rewards = rng.normal(size=steps).astype(np.float32)
    starts = np.zeros(steps, bool)
    starts[[0, steps // 2]] = True
    return obs, rewards, starts


TRAJ = trajectory()


def fields(t: int) -> dict[str, Any]:
    obs, rewards, starts = TRAJ
    return {
        "observation": obs[t].tolist(),
        "reward": float(rewards[t]),
        "episode_start": bool(starts[t]),
        "step": t,
    }


async def drive(client: ServiceClient, sid: str, steps: range) -> np.ndarray:
    return np.stack([await action(client, sid, **fields(t)) for t in steps])


def expected(root: Path) -> np.ndarray:
    ckpt = load_checkpoint(root / "trial")
    low, high = np.asarray(ckpt.info.action_low), np.asarray(ckpt.info.action_high)
    return replay_actions(ckpt.model, *TRAJ, low, high)


def refused_steps(metrics: str) -> float:
    line = next(x for x in metrics.splitlines() if x.startswith("trmrl_cache_refused_steps_total{"))
    return float(line.rsplit(" ", 1)[1])


async def fill(client: ServiceClient) -> dict[str, str]:
    """Spend the budget: ``a`` at a block's end (16 memories), ``b`` 3 blocks, ``c`` and ``d`` one each."""
    sids = {name: await new_session(client, model="trial") for name in "abcd"}
    for name, steps in (("a", 16), ("b", 33), ("c", 1), ("d", 1)):
        await drive(client, sids[name], range(steps))
    pool = client.registry.engines["trial"].pool
    assert isinstance(pool, TrialPool) and pool.budget == BLOCKS and pool.free_blocks == 0
    return sids


async def test_a_step_without_a_free_block_is_refused_alone_unchanged_and_served_once_one_is_back(
    client: ServiceClient, root: Path
) -> None:
    want = expected(root)
    sids = await fill(client)
    a, c, d = sids["a"], sids["c"], sids["d"]
    before = (await client.get(f"/v1/sessions/{a}/state")).json()
    assert before["length"] == 16

    r = await client.post("/v1/act", json={"session_id": a, **fields(16)})
    error = assert_error(r, 503, "cache_exhausted")
    assert r.headers["Retry-After"] == "1"  # transient: the client library waits and resends
    assert error["detail"] == {"cache_blocks": BLOCKS} and "retry" in error["message"]
    r = await client.post("/v1/act", content=packb({"session_id": a, **fields(16)}), headers=MSGPACK)
    assert r.status_code == 503 and unpackb(r.content)["error"]["code"] == "cache_exhausted"
    # A new session's first step needs a block too.
    e = await new_session(client, model="trial")
    assert_error(await client.post("/v1/act", json={"session_id": e, **fields(0)}), 503, "cache_exhausted")
    # One columnar tick: a's and e's rows are refused; c's has room in its block and is served.
    obs, rewards, _ = TRAJ
    tick = {
        "session_ids": [a, c, e],
        "observations": [obs[16].tolist(), obs[1].tolist(), obs[0].tolist()],
        "rewards": [float(rewards[16]), float(rewards[1]), 0.0],
        "episode_starts": [False, False, True],
        "steps": [16, 1, 0],
    }
    r = await client.post("/v1/act/batch", json=tick)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert [(x["row"], x["error"]["code"]) for x in reply["errors"]] == [
        (0, "cache_exhausted"),
        (2, "cache_exhausted"),
    ]
    assert reply["actions"][0] == [None, None] and reply["actions"][2] == [None, None]
    np.testing.assert_allclose(reply["actions"][1], want[1], rtol=0, atol=1e-6)
    assert reply["steps"] == [16, 1, 0]
    assert (await client.get(f"/v1/sessions/{a}/state")).json() == before
    assert refused_steps((await client.get("/metrics")).text) == 5
    r = await client.get("/v1/fleet", headers=ADMIN)
    assert r.status_code == 200, r.text
    FleetFeed.model_validate(r.json())
    [row] = [m for m in r.json()["models"] if m["model"] == "trial"]
    want_cache = {"blocks_held": BLOCKS, "blocks_free": 0, "budget_blocks": BLOCKS, "refused_steps": 5}
    assert row["cache"] == want_cache

    # d ends: its block goes back at the next pass, which then serves a's retried step as if never refused.
    assert (await client.delete(f"/v1/sessions/{d}")).status_code == 204
    got = await drive(client, a, range(16, 20))
    np.testing.assert_allclose(got, want[16:20], rtol=0, atol=1e-6)
    # The budget is spent again: e still waits, and gets in when a restarts its trial (one block kept).
    assert_error(await client.post("/v1/act", json={"session_id": e, **fields(0)}), 503, "cache_exhausted")
    assert (await client.post(f"/v1/sessions/{a}/reset", json={"scope": "trial"})).status_code == 200
    restarted = await action(client, a, **{**fields(0), "step": 20})  # a fresh trial's first step
    np.testing.assert_allclose(restarted, want[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(await drive(client, e, range(0, 2)), want[:2], rtol=0, atol=1e-6)


async def test_a_restore_the_budget_cannot_hold_is_refused_and_creates_nothing(client: ServiceClient) -> None:
    sids = await fill(client)
    state = (await client.get(f"/v1/sessions/{sids['b']}/state")).json()
    r = await client.put("/v1/sessions/newcomer/state", json={**state, "session_id": "newcomer"})
    error = assert_error(r, 503, "cache_exhausted")
    assert error["detail"] == {"cache_blocks": BLOCKS, "needed_blocks": 3}
    assert (await client.get("/v1/sessions/newcomer/state")).status_code == 404
    # Over an existing session: refused when it needs more blocks than the session holds (a's one
    # for b's three), a unchanged; served when it does not (a's state over c, one block each).
    before = (await client.get(f"/v1/sessions/{sids['a']}/state")).json()
    r = await client.put(f"/v1/sessions/{sids['a']}/state", json={**state, "session_id": sids["a"]})
    assert assert_error(r, 503, "cache_exhausted")["detail"]["needed_blocks"] == 2
    assert (await client.get(f"/v1/sessions/{sids['a']}/state")).json() == before
    r = await client.put(f"/v1/sessions/{sids['c']}/state", json={**before, "session_id": sids["c"]})
    assert r.status_code == 200, r.text
    assert (await client.get(f"/v1/sessions/{sids['c']}/state")).json()["length"] == 16


async def test_a_migration_the_new_versions_budget_cannot_hold_is_refused_and_moves_nothing(
    client: ServiceClient, root: Path
) -> None:
    want = expected(root)
    a, b = await new_session(client, model="trial"), await new_session(client, model="trial")
    await drive(client, a, range(33))  # 3 blocks
    await drive(client, b, range(1))  # 1 block: 4 in all, the wide version holds 3
    r = await client.post(
        "/v1/admin/models", json={"name": "trial", "checkpoint": "trial-wide"}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    wide = load_checkpoint(root / "trial-wide").info.version
    r = await client.post(
        "/v1/admin/models/trial/activate", json={"version": wide, "migrate_sessions": True}, headers=ADMIN
    )
    error = assert_error(r, 503, "cache_exhausted")
    assert error["detail"] == {"cache_blocks": 3, "needed_blocks": 4}
    version = load_checkpoint(root / "trial").info.version
    listed = {m["version"]: m for m in (await client.get("/v1/models")).json()["models"]}
    assert listed[version]["active"] and not listed[wide]["active"]
    r = await client.post("/v1/act", json={"session_id": a, **fields(33)})
    assert r.status_code == 200 and r.json()["model_version"] == version, r.text
    np.testing.assert_allclose(r.json()["action"], want[33], rtol=0, atol=1e-6)
    # Once they fit, they move.
    assert (await client.delete(f"/v1/sessions/{a}")).status_code == 204
    r = await client.post(
        "/v1/admin/models/trial/activate", json={"version": wide, "migrate_sessions": True}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["migrated_sessions"] == 1, r.text


async def test_a_restart_under_a_smaller_budget_restores_the_sessions_that_fit_in_order(
    root: Path, tmp_path: Path
) -> None:
    want = expected(root)
    async with serving(create_app(settings(root, state_dir=tmp_path, cache_mib=0))) as c:
        sids = [await new_session(c, model="trial") for _ in range(3)]
        for sid, steps in zip(sids, (33, 33, 1), strict=True):  # 3 + 3 + 1 blocks
            await drive(c, sid, range(steps))
        order = sorted(sids, key=c.registry.engines["trial"].table.get)
    async with serving(create_app(settings(root, state_dir=tmp_path))) as c:
        kept = [sid for sid in order if (await c.get(f"/v1/sessions/{sid}/state")).status_code == 200]
        blocks = {33: 3, 1: 1}
        lengths = [(await c.get(f"/v1/sessions/{sid}/state")).json()["length"] for sid in kept]
        assert sum(blocks[n] for n in lengths) <= BLOCKS and len(kept) == 2
        assert kept == order[:2]  # in the saved order, stopping at the first that does not fit
        sid = kept[0]
        length = lengths[0]
        r = await c.post("/v1/act", json={"session_id": sid, **fields(length)})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["action"], want[length], rtol=0, atol=1e-6)


def test_a_budget_below_one_full_context_is_refused_when_the_model_loads(root: Path) -> None:
    limits = EngineLimits(
        max_sessions=4,
        max_batch=4,
        batch_wait_s=0.0,
        session_ttl_s=60.0,
        evict_idle_s=0.0,
        cache_mib=cache_mib(root, blocks=2),
    )
    with pytest.raises(
        CheckpointError, match=r"holds 2 key/value cache blocks .* fewer than one full trial context"
    ):
        Engine("trial", load_checkpoint(root / "trial"), limits, torch.device("cpu"))


def test_a_stream_frame_without_a_free_block_gets_an_error_frame_and_the_stream_goes_on(root: Path) -> None:
    with TestClient(create_app(settings(root, cache_mib=cache_mib(root, blocks=3)))) as http:
        full = http.post("/v1/sessions", json={"model": "trial"}).json()["session_id"]
        for t in range(33):  # 3 blocks: the budget
            assert http.post("/v1/act", json={"session_id": full, **fields(t)}).status_code == 200
        sid = http.post("/v1/sessions", json={"model": "trial"}).json()["session_id"]
        with http.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
            ws.send_text(json.dumps(fields(0)))
            assert json.loads(ws.receive_text())["error"]["code"] == "cache_exhausted"
            assert http.delete(f"/v1/sessions/{full}").status_code == 204
            ws.send_text(json.dumps(fields(0)))
            assert json.loads(ws.receive_text())["step"] == 0


async def test_steps_queued_behind_a_refused_one_are_refused_too_and_the_session_is_as_before(
    client: ServiceClient, root: Path
) -> None:
    want = expected(root)
    sids = await fill(client)
    a, d = sids["a"], sids["d"]
    engine = client.registry.engines["trial"]
    before = (await client.get(f"/v1/sessions/{a}/state")).json()
    obs, rewards, starts = TRAJ
    slot = engine.table.get(a)
    # Steps 16 and 17 of a queued at once (two batches: a batch holds one step of a session); 16 needs a
    # block the cache does not have. While its pass runs, d ends: its block is back for the next pass,
    # where 17 would find room -- but 17 builds on 16, so it is refused too.
    tickets = [engine.submit(slot, obs[t], float(rewards[t]), bool(starts[t]), t, None) for t in (16, 17)]
    while len(engine.batcher._open) == 2:  # the first batch's pass has begun (its released slots taken)
        await asyncio.sleep(0)
    engine.table.delete(d)  # at once, before the pass can end and the next one begin
    for ticket in tickets:
        with pytest.raises(ServiceError) as refused:
            await ticket.action()
        assert refused.value.code == "cache_exhausted"
    assert (await client.get(f"/v1/sessions/{a}/state")).json() == before
    assert engine.table.context[slot] == 16 and engine.table.queued[slot] == 0
    # The same steps again are served as if never refused.
    np.testing.assert_allclose(await drive(client, a, range(16, 19)), want[16:19], rtol=0, atol=1e-6)
