"""A ``context="trial"`` checkpoint behind ``python -m service`` (uvicorn on a free port): a two-episode
``point-nav`` trial driven through the HTTP API, every action compared with the trainer's evaluation
path and with a full causal re-encode of the trial; then the trial runs full and is refused. A second
server with a fixed key/value cache (``TRMRL_CACHE_MIB``) refuses a step it has no block for."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from service_support import RunningServer, make_checkpoint

from trainer.evaluate import replay_actions
from trmrl.checkpoint import load_checkpoint
from trmrl.memory import working_memory
from trmrl.model import TrMRL
from trmrl.tasks import get_family
from trmrl.trial_pool import TrialPool

EPISODES = 2
EPISODE_STEPS = 100  # point-nav's time limit
MAX_CONTEXT = EPISODES * EPISODE_STEPS + 4


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("trial-served")
    path = make_checkpoint(
        root / "nav-trial",
        seed=11,
        bound=1.0,
        policy_out_gain=3.0,
        context="trial",
        window=1,
        max_context=MAX_CONTEXT,
        memory_scope="trial",
    )
    running = RunningServer([path])
    try:
        running.wait_ready()
        yield running, path
    finally:
        running.stop()


def full_re_encode(
    model: TrMRL, obs: np.ndarray, rewards: np.ndarray, starts: np.ndarray, actions: np.ndarray
) -> np.ndarray:
    """Every step's clipped mean action from one causal forward over the whole trial's working
    memories, built here from the history (the previous action is the one the service returned)."""
    prev = np.concatenate([np.zeros_like(actions[:1]), actions[:-1]])
    first = torch.from_numpy(starts)
    tokens = working_memory(
        torch.from_numpy(obs),
        torch.where(first.unsqueeze(-1), 0.0, torch.from_numpy(prev)),
        torch.where(first, 0.0, torch.from_numpy(rewards)),
        first & (torch.arange(len(obs)) > 0),
        include_previous=model.config.include_previous,
    )
    with torch.no_grad():
        mean = model.forward_sequence(tokens.unsqueeze(0), first.unsqueeze(0)).mean[0]
    return mean.clamp(-1.0, 1.0).numpy()


def test_a_point_nav_trial_through_the_server_equals_the_evaluation_path_and_a_full_re_encode(
    served: tuple[RunningServer, Path],
) -> None:
    running, path = served
    family = get_family("point-nav")
    env = family.make_env(family.sample_tasks("test", 1, seed=3)[0])
    log: dict[str, list[object]] = {"obs": [], "reward": [], "start": [], "action": []}
    with httpx.Client(base_url=running.url, timeout=30.0) as client:
        r = client.post("/v1/sessions", json={})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        step = 0
        for episode in range(EPISODES):
            obs, _ = env.reset(seed=episode)
            reward, start, done = 0.0, True, False
            while not done:
                body = {
                    "session_id": sid,
                    "observation": obs.tolist(),
                    "reward": reward,
                    "episode_start": start,
                    "step": step,
                }
                r = client.post("/v1/act", json=body)
                assert r.status_code == 200, r.text
                act = np.asarray(r.json()["action"], np.float32)
                for key, value in zip(log, (obs, reward, start, act), strict=True):
                    log[key].append(value)
                obs, reward, terminated, truncated, _ = env.step(act)
                reward, start, done, step = float(reward), False, terminated or truncated, step + 1
        assert step == EPISODES * EPISODE_STEPS

        # The trial runs full: the next step is refused and changes nothing; a trial reset restarts it.
        for extra in range(MAX_CONTEXT - step):
            r = client.post(
                "/v1/act", json={"session_id": sid, "observation": [0.0, 0.0], "step": step + extra}
            )
            assert r.status_code == 200, r.text
        step = MAX_CONTEXT
        before = client.get(f"/v1/sessions/{sid}/state").json()
        assert before["context"] == "trial" and before["length"] == MAX_CONTEXT
        r = client.post("/v1/act", json={"session_id": sid, "observation": [0.5, 0.5], "step": step})
        assert r.status_code == 409 and r.json()["error"]["code"] == "context_full", r.text
        assert client.get(f"/v1/sessions/{sid}/state").json() == before
        assert client.post(f"/v1/sessions/{sid}/reset", json={"scope": "trial"}).status_code == 200
        r = client.post("/v1/act", json={"session_id": sid, "observation": [0.5, 0.5], "step": step})
        assert r.status_code == 200, r.text
        restarted = np.asarray(r.json()["action"])

    obs = np.asarray(log["obs"], np.float32)
    rewards = np.asarray(log["reward"], np.float32)
    starts = np.asarray(log["start"], bool)
    actions = np.asarray(log["action"], np.float32)
    checkpoint = load_checkpoint(path)
    model = checkpoint.model
    assert isinstance(model, TrMRL)
    low, high = np.asarray(checkpoint.info.action_low), np.asarray(checkpoint.info.action_high)
    np.testing.assert_allclose(
        actions, replay_actions(model, obs, rewards, starts, low, high), rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        actions, full_re_encode(model, obs, rewards, starts, actions), rtol=0, atol=1e-5
    )
    # Both episodes begin at the same observation; the second acts on what the first left in memory.
    assert starts.sum() == EPISODES and np.array_equal(obs[0], obs[EPISODE_STEPS])
    assert not np.allclose(actions[0], actions[EPISODE_STEPS], rtol=0, atol=1e-4)
    fresh = replay_actions(
        model, np.asarray([[0.5, 0.5]], np.float32), np.zeros(1), np.ones(1, bool), low, high
    )
    np.testing.assert_allclose(restarted, fresh[0], rtol=0, atol=1e-5)


def test_a_server_with_a_fixed_cache_refuses_the_step_it_has_no_block_for_until_one_is_free(
    served: tuple[RunningServer, Path],
) -> None:
    _, path = served
    model = load_checkpoint(path).model
    assert isinstance(model, TrMRL)
    blocks = -(-MAX_CONTEXT // 16)  # one full trial: the smallest budget the service accepts
    mib = blocks * TrialPool.block_bytes_of(model) / 2**20
    running = RunningServer([path], env={"TRMRL_CACHE_MIB": repr(mib), "TRMRL_MAX_SESSIONS": "8"})
    try:
        running.wait_ready()
        with httpx.Client(base_url=running.url, timeout=30.0) as client:
            first, second = (client.post("/v1/sessions", json={}).json()["session_id"] for _ in range(2))
            for step in range(MAX_CONTEXT):  # the first session's trial fills the whole cache
                r = client.post(
                    "/v1/act", json={"session_id": first, "observation": [0.1, 0.2], "step": step}
                )
                assert r.status_code == 200, r.text
            r = client.post("/v1/act", json={"session_id": second, "observation": [0.1, 0.2], "step": 0})
            assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
            assert r.json()["error"] == {
                "code": "cache_exhausted",
                "message": r.json()["error"]["message"],
                "detail": {"cache_blocks": blocks},
            }
            metrics = client.get("/metrics").text
            assert 'trmrl_cache_refused_steps_total{model="nav-trial"' in metrics
            assert client.delete(f"/v1/sessions/{first}").status_code == 204
            r = client.post("/v1/act", json={"session_id": second, "observation": [0.1, 0.2], "step": 0})
            assert r.status_code == 200 and r.json()["step"] == 0, r.text
    finally:
        running.stop()
