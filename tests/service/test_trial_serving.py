"""A ``context="trial"`` checkpoint served: actions equal the trainer's evaluation path on every act
path, a step past ``max_context`` is refused for its session alone (409 ``context_full``, nothing
changed), snapshots carry the trial's working memories and refuse what does not fit, and migrations
and restarts keep the trial's memory."""

from __future__ import annotations

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

from service.app import create_app
from service.config import Settings
from service.core.engine import Engine, EngineLimits
from trainer.evaluate import replay_actions
from trmrl.checkpoint import CheckpointError, load_checkpoint
from trmrl.policy import act as policy_act
from trmrl.trial_pool import TrialPool

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "install httpx2 instead": the test client works with httpx
    from starlette.testclient import TestClient

pytestmark = pytest.mark.anyio

MSGPACK = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
MAX_CONTEXT = 8
TRIAL = {"context": "trial", "window": 1, "max_context": MAX_CONTEXT, "memory_scope": "trial"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("trial-root")
    make_checkpoint(base / "trial", seed=5, policy_out_gain=0.1, **TRIAL)  # type: ignore[arg-type]
    make_checkpoint(base / "trial-v2", seed=6, policy_out_gain=0.1, **TRIAL)  # type: ignore[arg-type]
    make_checkpoint(base / "window", seed=4)
    return base


def settings(root: Path, **overrides: Any) -> Settings:
    return Settings(
        models=[root / "trial", root / "window"], checkpoint_root=root, admin_keys=["admin-key"], **overrides
    )


@pytest.fixture
async def client(root: Path) -> AsyncIterator[ServiceClient]:
    async with serving(create_app(settings(root))) as c:
        yield c


def trajectory(steps: int = MAX_CONTEXT, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-episode trial: observations, rewards (for the previous action) and episode starts."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(steps, 2)).astype(np.float32)
    rewards = rng.normal(size=steps).astype(np.float32)
    starts = np.zeros(steps, bool)
    starts[[0, steps // 2]] = True
    return obs, rewards, starts


def expected(path: Path, obs: np.ndarray, rewards: np.ndarray, starts: np.ndarray) -> np.ndarray:
    ckpt = load_checkpoint(path)
    low, high = np.asarray(ckpt.info.action_low), np.asarray(ckpt.info.action_high)
    return replay_actions(ckpt.model, obs, rewards, starts, low, high)


def body(sid: str, obs: np.ndarray, rewards: np.ndarray, starts: np.ndarray, t: int) -> dict[str, Any]:
    return {
        "session_id": sid,
        "observation": obs[t].tolist(),
        "reward": float(rewards[t]),
        "episode_start": bool(starts[t]),
        "step": t,
    }


async def drive(client: ServiceClient, sid: str, traj: tuple[np.ndarray, ...], steps: range) -> np.ndarray:
    obs, rewards, starts = traj
    return np.stack([await action(client, sid, **_fields(body(sid, obs, rewards, starts, t))) for t in steps])


def _fields(b: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in b.items() if k != "session_id"}


async def test_served_trial_actions_equal_the_trainers_evaluation_path_on_every_act_path(
    client: ServiceClient, root: Path
) -> None:
    traj = obs, rewards, starts = trajectory()
    want = expected(root / "trial", *traj)
    json_sid, msgpack_sid, col_a, col_b = [await new_session(client, model="trial") for _ in range(4)]
    got_json = await drive(client, json_sid, traj, range(MAX_CONTEXT))
    got_msgpack, got_columnar = [], []
    for t in range(MAX_CONTEXT):
        r = await client.post("/v1/act", content=packb(body(msgpack_sid, *traj, t)), headers=MSGPACK)
        assert r.status_code == 200, r.text
        got_msgpack.append(unpackb(r.content)["action"])
        tick = {
            "session_ids": [col_a, col_b],
            "observations": [obs[t].tolist()] * 2,
            "rewards": [float(rewards[t])] * 2,
            "episode_starts": [bool(starts[t])] * 2,
            "steps": [t, t],
        }
        r = await client.post("/v1/act/batch", json=tick)
        assert r.status_code == 200 and r.json()["errors"] == [], r.text
        got_columnar.append(r.json()["actions"])
    np.testing.assert_allclose(got_json, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_msgpack), want, rtol=0, atol=1e-6)
    columnar = np.asarray(got_columnar)
    np.testing.assert_allclose(columnar[:, 0], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(columnar[:, 1], want, rtol=0, atol=1e-6)
    listed = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
    assert (listed["trial"]["context"], listed["trial"]["max_context"]) == ("trial", MAX_CONTEXT)
    assert (listed["window"]["context"], listed["window"]["max_context"]) == ("window", None)


async def test_a_step_past_max_context_is_refused_alone_and_leaves_the_session_unchanged(
    client: ServiceClient, root: Path
) -> None:
    traj = obs, rewards, _ = trajectory()
    full = await new_session(client, model="trial")
    await drive(client, full, traj, range(MAX_CONTEXT))
    # A neighbour half-way through its trial, and its twin stepped with the same history.
    neighbour, twin = await new_session(client, model="trial"), await new_session(client, model="trial")
    for sid in (neighbour, twin):
        await drive(client, sid, traj, range(3))
    before = (await client.get(f"/v1/sessions/{full}/state")).json()
    assert before["length"] == MAX_CONTEXT and len(before["window"]) == MAX_CONTEXT

    nxt = [0.25, -0.5]
    error = assert_error(
        await client.post("/v1/act", json={"session_id": full, "observation": nxt, "step": MAX_CONTEXT}),
        409,
        "context_full",
    )
    assert "trial" in error["message"] and "reset" in error["message"]
    assert error["detail"] == {"session_id": full, "max_context": MAX_CONTEXT}
    # An episode start does not start a trial-scope context again: still refused (MessagePack too).
    r = await client.post(
        "/v1/act",
        content=packb({"session_id": full, "observation": nxt, "episode_start": True}),
        headers=MSGPACK,
    )
    assert r.status_code == 409 and unpackb(r.content)["error"]["code"] == "context_full"

    # One columnar tick: the full session's row is refused, the neighbour's is served as if alone.
    tick = {"session_ids": [full, neighbour], "observations": [nxt, nxt], "rewards": [0.5, 0.5]}
    r = await client.post("/v1/act/batch", json=tick)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert [(e["row"], e["error"]["code"]) for e in reply["errors"]] == [(0, "context_full")]
    assert reply["actions"][0] == [None, None] and reply["steps"] == [MAX_CONTEXT, 3]
    alone = await action(client, twin, nxt, reward=0.5, step=3)
    np.testing.assert_array_equal(reply["actions"][1], alone)

    after = (await client.get(f"/v1/sessions/{full}/state")).json()
    assert after == before
    # A retry of the newest step is still answered (it adds no memory).
    last = await action(client, full, obs[-1].tolist(), step=MAX_CONTEXT - 1, reward=float(rewards[-1]))
    np.testing.assert_array_equal(last, before["last_action"])
    # A trial reset starts the trial again: the next step is a fresh trial's first.
    r = await client.post(f"/v1/sessions/{full}/reset", json={"scope": "trial"})
    assert r.status_code == 200, r.text
    again = await action(client, full, nxt, step=MAX_CONTEXT)
    fresh = await new_session(client, model="trial")
    np.testing.assert_array_equal(again, await action(client, fresh, nxt, step=0))
    assert (await client.get(f"/v1/sessions/{full}/state")).json()["length"] == 1


async def test_trial_snapshots_restore_and_refuse_what_does_not_fit(client: ServiceClient) -> None:
    traj = obs, rewards, _ = trajectory()
    sid = await new_session(client, model="trial")
    await drive(client, sid, traj, range(5))
    state = (await client.get(f"/v1/sessions/{sid}/state")).json()
    assert state["context"] == "trial" and state["length"] == 5 and len(state["window"]) == 5
    width = len(state["window"][0])
    copy = await new_session(client, model="trial")
    r = await client.put(f"/v1/sessions/{copy}/state", json={**state, "session_id": copy})
    assert r.status_code == 200, r.text
    nxt = [await action(client, s, obs[5].tolist(), step=5, reward=float(rewards[5])) for s in (sid, copy)]
    # The copy's keys and values were re-encoded from its working memories: equal to float tolerance.
    np.testing.assert_allclose(nxt[0], nxt[1], rtol=0, atol=1e-6)

    window_sid = await new_session(client, model="window")
    await action(client, window_sid, [0.1, 0.2], step=0)
    window_state = (await client.get(f"/v1/sessions/{window_sid}/state")).json()
    assert window_state["context"] == "window"
    trial_version = state["model_version"]
    bad = {
        "too many memories": {
            **state,
            "window": [[0.0] * width] * (MAX_CONTEXT + 1),
            "length": MAX_CONTEXT + 1,
        },
        "wrong width": {**state, "window": [[0.0] * (width + 1)] * 5},
        "length not the rows": {**state, "length": 4},
        "a window snapshot": {**window_state, "model": "trial", "model_version": trial_version},
        "a trial snapshot into a window model": {
            **state,
            "model": "window",
            "model_version": window_state["model_version"],
        },
    }
    for case, snapshot in bad.items():
        for target in (copy, window_sid):
            before = (await client.get(f"/v1/sessions/{target}/state")).json()
            r = await client.put(f"/v1/sessions/{target}/state", json={**snapshot, "session_id": target})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_snapshot", (case, r.text)
            assert (await client.get(f"/v1/sessions/{target}/state")).json() == before, case


async def test_an_ended_sessions_cache_blocks_go_back_at_the_next_pass_and_spare_a_restored_slot(
    client: ServiceClient, root: Path
) -> None:
    traj = obs, rewards, starts = trajectory()
    want = expected(root / "trial", *traj)
    engine = client.registry.engines["trial"]
    pool = engine.pool
    assert isinstance(pool, TrialPool)
    a, b = [await new_session(client, model="trial") for _ in range(2)]
    for sid in (a, b):
        await drive(client, sid, traj, range(3))
    slot_a, slot_b = engine.table.get(a), engine.table.get(b)
    assert pool.held[[slot_a, slot_b]].tolist() == [1, 1]
    free = pool.free_blocks

    def gauge(state: str, text: str) -> float:
        line = next(
            x for x in text.splitlines() if x.startswith("trmrl_cache_blocks{") and f'state="{state}"' in x
        )
        return float(line.rsplit(" ", 1)[1])

    assert gauge("held", (await client.get("/metrics")).text) == 2
    assert (await client.delete(f"/v1/sessions/{a}")).status_code == 204
    assert int(pool.held[slot_a]) == 1  # nothing touches the device outside a forward pass
    await drive(client, b, traj, range(3, 4))
    assert int(pool.held[slot_a]) == 0 and pool.free_blocks == free + 1
    metrics = (await client.get("/metrics")).text
    assert (gauge("held", metrics), gauge("free", metrics)) == (1, free + 1)

    # A slot freed and handed out again before the next pass keeps what a restore wrote into it.
    state = (await client.get(f"/v1/sessions/{b}/state")).json()
    assert (await client.delete(f"/v1/sessions/{b}")).status_code == 204
    c = await new_session(client, model="trial")
    assert engine.table.get(c) == slot_b
    r = await client.put(f"/v1/sessions/{c}/state", json={**state, "session_id": c})
    assert r.status_code == 200, r.text
    got = await action(
        client, c, obs[4].tolist(), step=4, reward=float(rewards[4]), episode_start=bool(starts[4])
    )
    np.testing.assert_allclose(got, want[4], rtol=0, atol=1e-6)
    assert int(pool.lengths[slot_b]) == 5


def next_action_under(
    model: torch.nn.Module, traj: tuple[np.ndarray, ...], applied: np.ndarray
) -> np.ndarray:
    """A fresh trial-context pool under ``model``'s weights, fed the trajectory with the actions the
    session actually took as its previous actions; the last step's clipped deterministic action."""
    obs, rewards, starts = traj
    pool = TrialPool(model, 1)  # type: ignore[arg-type]
    slot = torch.zeros(1, dtype=torch.long)
    bound = torch.full((2,), 0.1)
    result = None
    for t in range(len(obs)):
        with torch.no_grad():
            result = policy_act(
                pool,
                slot,
                torch.from_numpy(obs[t : t + 1]),
                torch.from_numpy(rewards[t : t + 1]),
                torch.tensor([bool(starts[t])]),
                low=-bound,
                high=bound,
                deterministic=True,
                noise=None,
                applied_action=torch.from_numpy(applied[t - 1 : t]) if t else None,
            )
    assert result is not None
    return result.actions[0].numpy()


async def test_a_migrated_trial_continues_as_a_fresh_pool_under_the_new_weights(
    client: ServiceClient, root: Path
) -> None:
    traj = trajectory()
    sid = await new_session(client, model="trial")
    served = await drive(client, sid, traj, range(5))
    r = await client.post("/v1/admin/models", json={"name": "trial", "checkpoint": "trial-v2"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    v2 = load_checkpoint(root / "trial-v2")
    # A window model cannot take a trial's sessions, nor the other way round.
    r = await client.post("/v1/admin/models", json={"name": "trial", "checkpoint": "window"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    window_version = load_checkpoint(root / "window").info.version
    r = await client.post(
        "/v1/admin/models/trial/activate",
        json={"version": window_version, "migrate_sessions": True},
        headers=ADMIN,
    )
    assert_error(r, 409, "incompatible_model")
    r = await client.post(
        "/v1/admin/models/trial/activate",
        json={"version": v2.info.version, "migrate_sessions": True},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    obs, rewards, starts = traj
    r = await client.post("/v1/act", json=body(sid, obs, rewards, starts, 5))
    assert r.status_code == 200 and r.json()["model_version"] == v2.info.version, r.text
    want = next_action_under(v2.model, tuple(a[:6] for a in traj), served)
    np.testing.assert_allclose(r.json()["action"], want, rtol=0, atol=1e-6)
    # Not what the old weights would give: the memory really was re-encoded.
    old = next_action_under(load_checkpoint(root / "trial").model, tuple(a[:6] for a in traj), served)
    assert not np.allclose(want, old, rtol=0, atol=1e-6)


async def test_a_restart_keeps_the_trials_memory(root: Path, tmp_path: Path) -> None:
    traj = trajectory()
    want = expected(root / "trial", *traj)
    async with serving(create_app(settings(root, state_dir=tmp_path))) as c:
        sid = await new_session(c, model="trial")
        first = await drive(c, sid, traj, range(5))
    async with serving(create_app(settings(root, state_dir=tmp_path))) as c:
        assert (await c.get(f"/v1/sessions/{sid}/state")).json()["length"] == 5
        rest = await drive(c, sid, traj, range(5, MAX_CONTEXT))
        assert_error(
            await c.post("/v1/act", json={"session_id": sid, "observation": [0.0, 0.0]}), 409, "context_full"
        )
    np.testing.assert_allclose(np.concatenate([first, rest]), want, rtol=0, atol=1e-6)


def test_a_trial_context_checkpoint_is_refused_in_reduced_precision(root: Path) -> None:
    limits = EngineLimits(
        max_sessions=4, max_batch=4, batch_wait_s=0.0, session_ttl_s=60.0, evict_idle_s=0.0, precision="bf16"
    )
    with pytest.raises(CheckpointError, match="context=trial policy is served in fp32 only"):
        Engine("trial", load_checkpoint(root / "trial"), limits, torch.device("cpu"))


def test_trial_streams_step_like_http_and_refuse_a_full_context_per_frame(root: Path) -> None:
    traj = obs, rewards, starts = trajectory()
    want = expected(root / "trial", *traj)
    with TestClient(create_app(settings(root))) as http:
        sid, other, twin = (
            http.post("/v1/sessions", json={"model": "trial"}).json()["session_id"] for _ in range(3)
        )
        got = []
        with http.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
            for t in range(MAX_CONTEXT):
                ws.send_text(json.dumps(_fields(body(sid, obs, rewards, starts, t))))
                got.append(json.loads(ws.receive_text())["action"])
            ws.send_text(json.dumps({"observation": [0.0, 0.0], "step": MAX_CONTEXT}))
            assert json.loads(ws.receive_text())["error"]["code"] == "context_full"
            # The stream stays open; after a trial reset the next frame is served.
            assert http.post(f"/v1/sessions/{sid}/reset", json={"scope": "trial"}).status_code == 200
            ws.send_text(json.dumps({"observation": [0.0, 0.0], "step": MAX_CONTEXT}))
            assert json.loads(ws.receive_text())["step"] == MAX_CONTEXT
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        for t in range(MAX_CONTEXT - 1):  # ``sid`` full again, ``other`` one step into its trial
            fields = _fields(body(sid, obs, rewards, starts, t))
            fields["step"] = MAX_CONTEXT + 1 + t
            assert http.post("/v1/act", json={"session_id": sid, **fields}).status_code == 200
        for session in (other, twin):
            assert (
                http.post("/v1/act", json={"session_id": session, "observation": [0.1, 0.1]}).status_code
                == 200
            )
        with http.websocket_connect("/v1/stream") as ws:
            ws.send_bytes(
                packb({"session_ids": [sid, other], "observations": np.full((2, 2), 0.3, np.float32)})
            )
            reply = unpackb(ws.receive_bytes())
        assert [(e["row"], e["error"]["code"]) for e in reply["errors"]] == [(0, "context_full")]
        assert np.isnan(reply["actions"][0]).all()
        r = http.post("/v1/act", json={"session_id": twin, "observation": [0.3, 0.3]})
        np.testing.assert_array_equal(reply["actions"][1], np.asarray(r.json()["action"], np.float32))
