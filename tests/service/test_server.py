"""The service as a real process: ``python -m service`` under uvicorn on a free port.

The equivalence test replays multi-episode trajectories of several sessions, interleaved and sent
concurrently, through the running server and compares every action with the trainer's evaluation
path (deterministic mode, float32, 1e-5).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import REPO, RunningServer, make_checkpoint

from trmrl.checkpoint import load_checkpoint

try:
    from trainer.evaluate import replay_actions
except ImportError as exc:  # pragma: no cover - only while the trainer's evaluation path is missing
    pytest.skip(f"trainer.evaluate.replay_actions is not available: {exc}", allow_module_level=True)

MODELS = ("cheetah", "cheetah-trial")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, dict[str, Path]]]:
    """The paper's MuJoCo-size network (obs 17, act 6), in both memory scopes, behind one server."""
    root = tmp_path_factory.mktemp("served")
    mujoco = {
        "preset": "mujoco",
        "obs_dim": 17,
        "act_dim": 6,
        "family": "halfcheetah-vel",
        "policy_out_gain": 0.1,
    }
    paths = {
        "cheetah": make_checkpoint(root / "cheetah", **mujoco),
        "cheetah-trial": make_checkpoint(root / "cheetah-trial", seed=3, memory_scope="trial", **mujoco),
    }
    running = RunningServer(list(paths.values()))
    try:
        running.wait_ready()
        yield running, paths
    finally:
        running.stop()


def trajectory(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observations, rewards and episode starts of a trial with episodes of uneven lengths."""
    obs = rng.normal(scale=2.0, size=(length, 17)).astype(np.float32)
    rewards = rng.normal(size=length).astype(np.float32)
    starts = np.zeros(length, bool)
    starts[0] = True
    starts[rng.choice(np.arange(3, length), size=3, replace=False)] = True
    return obs, rewards, starts


async def replay_through_server(
    url: str, model: str, trajectories: list[tuple[np.ndarray, ...]]
) -> list[np.ndarray]:
    """Every session steps concurrently each tick; sessions start at different ticks (interleaved)."""
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        sids = []
        for _ in trajectories:
            r = await client.post("/v1/sessions", json={"model": model})
            assert r.status_code == 201, r.text
            sids.append(r.json()["session_id"])
        offsets = [2 * i for i in range(len(trajectories))]
        actions: list[list[list[float]]] = [[] for _ in trajectories]

        async def step(i: int, t: int) -> None:
            obs, rewards, starts = trajectories[i]
            body = {
                "session_id": sids[i],
                "observation": obs[t].tolist(),
                "reward": float(rewards[t]),
                "episode_start": bool(starts[t]),
                "step": t,
            }
            r = await client.post("/v1/act", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["step"] == t
            actions[i].append(r.json()["action"])

        horizon = max(o + len(tr[0]) for o, tr in zip(offsets, trajectories, strict=True))
        for tick in range(horizon):
            live = [i for i, o in enumerate(offsets) if 0 <= tick - o < len(trajectories[i][0])]
            await asyncio.gather(*(step(i, tick - offsets[i]) for i in live))
    return [np.asarray(a, np.float32) for a in actions]


@pytest.mark.parametrize("model", MODELS)
def test_served_actions_equal_the_trainers_evaluation_path(
    server: tuple[RunningServer, dict[str, Path]], model: str
) -> None:
    running, paths = server
    rng = np.random.default_rng(7)
    trajectories = [trajectory(rng, n) for n in (24, 31, 18, 27)]
    served = asyncio.run(replay_through_server(running.url, model, trajectories))
    checkpoint = load_checkpoint(paths[model])
    low, high = np.asarray(checkpoint.info.action_low), np.asarray(checkpoint.info.action_high)
    clipped = 0
    for (obs, rewards, starts), got in zip(trajectories, served, strict=True):
        want = replay_actions(checkpoint.model, obs, rewards, starts, low, high)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        clipped += int(np.isclose(np.abs(want), high).sum())
    assert clipped > 0  # the comparison covers clipping too


def test_without_checkpoints_the_server_says_so_and_exits_nonzero(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRMRL_CHECKPOINTS_DIR": str(tmp_path)}
    env.pop("TRMRL_MODELS", None)
    done = subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "no checkpoints to serve" in done.stderr
    assert str(tmp_path) in done.stderr
