"""An RL² checkpoint served: its memory is a hidden state per slot; actions equal the trainer's
evaluation path, retries are idempotent, snapshots restore, and sessions never move between kinds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from service_support import ADMIN, BOUND, ServiceClient, action, assert_error, make_checkpoint, new_session

from service.app import create_app
from service.config import Settings
from service.core.engine import Engine, EngineLimits
from trainer.evaluate import replay_actions
from trmrl.checkpoint import CheckpointError, load_checkpoint

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("rl2-root")
    make_checkpoint(base / "rl2", seed=2, policy="rl2", window=1, rnn_hidden=8, memory_scope="trial")
    make_checkpoint(base / "rl2-v2", seed=3, policy="rl2", window=1, rnn_hidden=8, memory_scope="trial")
    make_checkpoint(base / "trmrl", seed=4)
    return base


@pytest.fixture
async def client(root: Path) -> AsyncIterator[ServiceClient]:
    settings = Settings(models=[root / "rl2"], checkpoint_root=root, admin_keys=["admin-key"])
    app = create_app(settings)
    async with app.router.lifespan_context(app), ServiceClient(app) as c:
        yield c


def _trajectory(steps: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(steps, 2)).astype(np.float32)
    rewards = rng.normal(size=steps).astype(np.float32)
    starts = np.zeros(steps, bool)
    starts[[0, steps * 2 // 3]] = True  # two episodes of one trial: the hidden state is kept across them
    return obs, rewards, starts


async def test_served_rl2_actions_equal_the_trainers_evaluation_path(
    client: ServiceClient, root: Path
) -> None:
    obs, rewards, starts = _trajectory()
    ckpt = load_checkpoint(root / "rl2")
    low, high = np.asarray(ckpt.info.action_low), np.asarray(ckpt.info.action_high)
    expected = replay_actions(ckpt.model, obs, rewards, starts, low, high)
    sid = await new_session(client, deterministic=True)
    served = []
    for t in range(len(obs)):
        fields = {"step": t, "episode_start": bool(starts[t])}
        if not starts[t]:
            fields["reward"] = float(rewards[t])
        served.append(await action(client, sid, obs[t].tolist(), **fields))
    np.testing.assert_allclose(np.stack(served), expected, rtol=0, atol=1e-6)
    assert np.abs(expected).max() <= BOUND


async def test_rl2_retries_are_idempotent_and_snapshots_restore_the_hidden_state(
    client: ServiceClient,
) -> None:
    obs, rewards, starts = _trajectory(6)
    sid = await new_session(client, deterministic=True)
    for t in range(5):
        await action(
            client, sid, obs[t].tolist(), step=t, reward=float(rewards[t]), episode_start=bool(starts[t])
        )
    again = await action(client, sid, obs[4].tolist(), step=4, reward=float(rewards[4]))
    state = (await client.get(f"/v1/sessions/{sid}/state")).json()
    assert len(state["window"]) == 1 and len(state["window"][0]) == 8 and state["length"] == 1
    np.testing.assert_array_equal(again, state["last_action"])
    copy = await new_session(client, deterministic=True)
    r = await client.put(f"/v1/sessions/{copy}/state", json={**state, "session_id": copy})
    assert r.status_code == 200, r.text
    nxt = [await action(client, s, obs[5].tolist(), step=5, reward=float(rewards[5])) for s in (sid, copy)]
    np.testing.assert_array_equal(nxt[0], nxt[1])
    # A TrMRL-shaped memory does not fit: refused, nothing changed.
    before = (await client.get(f"/v1/sessions/{copy}/state")).json()
    bad = {**state, "window": [[0.0] * 8] * 5}
    assert_error(
        await client.put(f"/v1/sessions/{copy}/state", json={**bad, "session_id": copy}),
        422,
        "invalid_snapshot",
    )
    assert (await client.get(f"/v1/sessions/{copy}/state")).json() == before


async def test_rl2_sessions_migrate_between_rl2_versions_but_not_to_trmrl(client: ServiceClient) -> None:
    sid = await new_session(client, deterministic=True)
    await action(client, sid, [0.1, 0.2], step=0, episode_start=True)
    for checkpoint in ("rl2-v2", "trmrl"):
        r = await client.post(
            "/v1/admin/models", json={"name": "rl2", "checkpoint": checkpoint}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
    listed = (await client.get("/v1/models")).json()["models"]
    versions = {m["version"] for m in listed}
    kinds = {m["version"]: m["policy"] for m in listed}
    root = Path(client.app.state.settings.checkpoint_root)
    v2, trmrl = (load_checkpoint(root / name).info.version for name in ("rl2-v2", "trmrl"))
    assert {v2, trmrl} <= versions
    assert (kinds[v2], kinds[trmrl]) == ("rl2", "trmrl")
    r = await client.post(
        "/v1/admin/models/rl2/activate", json={"version": trmrl, "migrate_sessions": True}, headers=ADMIN
    )
    assert_error(r, 409, "incompatible_model")
    r = await client.post(
        "/v1/admin/models/rl2/activate", json={"version": v2, "migrate_sessions": True}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        "/v1/act", json={"session_id": sid, "observation": [0.1, 0.2], "step": 1, "reward": 0.5}
    )
    assert r.status_code == 200 and r.json()["model_version"] == v2


def test_an_rl2_checkpoint_is_refused_in_reduced_precision(root: Path) -> None:
    limits = EngineLimits(
        max_sessions=4, max_batch=4, batch_wait_s=0.0, session_ttl_s=60.0, evict_idle_s=0.0, precision="bf16"
    )
    with pytest.raises(CheckpointError, match="fp32 only"):
        Engine("rl2", load_checkpoint(root / "rl2"), limits, torch.device("cpu"))
