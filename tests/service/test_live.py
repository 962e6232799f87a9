"""The service as a real uvicorn process: the real openpi client, WebSocket heartbeats, and a restart
(SIGTERM, drain, state written, new process, state restored) that loses nothing.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from service_support import RunningServer, make_checkpoint

from trainer.evaluate import replay_actions
from trmrl.checkpoint import load_checkpoint

# openpi-client's WebsocketClientPolicy connects the way newer websockets releases deprecate.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

KEY = "live-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("live")
    return make_checkpoint(root / "point-nav", policy_out_gain=0.1, init_std=0.05)


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[RunningServer]:
    running = RunningServer([checkpoint], env={"TRMRL_API_KEYS": KEY})
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_the_real_openpi_client_drives_a_policy(server: RunningServer) -> None:
    # openpi-client pins numpy < 2 but runs with numpy 2: it is installed with --no-deps (see
    # docs/operations.md), so a fresh environment may lack it.
    openpi = pytest.importorskip("openpi_client.websocket_client_policy")
    WebsocketClientPolicy = openpi.WebsocketClientPolicy
    uri = f"ws://127.0.0.1:{server.port}/v1/openpi?model=point-nav"
    policy = WebsocketClientPolicy(host=uri, api_key=KEY)
    metadata = policy.get_server_metadata()
    assert (metadata["obs_dim"], metadata["act_dim"], metadata["name"]) == (2, 2, "point-nav")
    rng = np.random.default_rng(0)
    observations = rng.normal(size=(6, 2)).astype(np.float32)
    with httpx.Client(base_url=server.url, headers=AUTH) as http:
        twin = http.post("/v1/sessions", json={}).json()["session_id"]
        for t, obs in enumerate(observations):
            # numpy scalars travel as the openpi codec's "__npgeneric__" maps.
            reply = policy.infer({"observation": obs, "reward": np.float32(0.25), "episode_start": t == 0})
            assert reply["actions"].shape == (1, 2) and reply["actions"].dtype == np.float32
            assert reply["server_timing"]["infer_ms"] > 0
            want = http.post(
                "/v1/act", json={"session_id": twin, "observation": obs.tolist(), "reward": 0.25, "step": t}
            ).json()["action"]
            np.testing.assert_array_equal(reply["actions"][0], np.asarray(want, np.float32))
        with pytest.raises(RuntimeError, match="wrong_observation_length"):
            policy.infer({"observation": np.zeros(5, np.float32)})
        # The connection is a session of the key, visible over HTTP.
        info = http.get(f"/v1/sessions/{metadata['session_id']}").json()
        assert info["steps"] == len(observations)
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        WebsocketClientPolicy(host=uri, api_key="wrong")
    assert refused.value.response.status_code == 401


def test_streams_answer_heartbeats(server: RunningServer) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH) as http:
            sid = (await http.post("/v1/sessions", json={})).json()["session_id"]
        url = f"ws://127.0.0.1:{server.port}/v1/sessions/{sid}/stream"
        async with websockets.connect(url, additional_headers=AUTH, ping_interval=None) as ws:
            latency = await asyncio.wait_for(await ws.ping(), 5.0)
            assert latency >= 0
            await ws.send('{"observation": [0.1, 0.2]}')
            assert '"step":0' in await ws.recv()

    asyncio.run(run())


# -- restarts ------------------------------------------------------------------------------------------
class Robot:
    """A client session replaying a fixed trajectory, tracking which step it needs to send next."""

    def __init__(self, rng: np.random.Generator, length: int) -> None:
        self.obs = rng.normal(scale=2.0, size=(length, 2)).astype(np.float32)
        self.rewards = rng.normal(size=length).astype(np.float32)
        self.starts = np.zeros(length, bool)
        self.starts[[0, length // 2]] = True
        self.actions: list[list[float]] = []
        self.session_id = ""

    def body(self, t: int) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "observation": self.obs[t].tolist(),
            "reward": float(self.rewards[t]),
            "episode_start": bool(self.starts[t]),
            "step": t,
        }

    async def step(self, http: httpx.AsyncClient) -> bool:
        """Send the next step; ``False`` if the server was unreachable (the step is resent later)."""
        t = len(self.actions)
        try:
            r = await http.post("/v1/act", json=self.body(t))
        except httpx.TransportError:
            return False
        assert r.status_code == 200, r.text
        self.actions.append(r.json()["action"])
        return True


def test_a_restart_loses_nothing(checkpoint: Path, tmp_path: Path) -> None:
    env = {"TRMRL_STATE_DIR": str(tmp_path), "TRMRL_API_KEYS": KEY, "TRMRL_DRAIN_GRACE_S": "0.5"}
    rng = np.random.default_rng(3)
    robots = [Robot(rng, 12) for _ in range(4)]

    async def before_restart(server: RunningServer) -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=10.0) as http:
            for robot in robots:
                robot.session_id = (await http.post("/v1/sessions", json={})).json()["session_id"]
            for _ in range(4):
                assert all(await asyncio.gather(*(r.step(http) for r in robots)))
            # One more tick, with SIGTERM arriving while its steps are in flight: each either
            # finishes (and is saved) or never reached the server (and is resent after the restart).
            tick = asyncio.gather(*(r.step(http) for r in robots))
            await asyncio.sleep(0.002)
            server.process.terminate()
            await tick
            # While draining: not ready, no new sessions, existing sessions still answered.
            assert (await http.get("/readyz")).status_code == 503
            refused = await http.post("/v1/sessions", json={})
            assert (refused.status_code, refused.json()["error"]["code"]) == (503, "draining")
            assert await robots[0].step(http)

    first = RunningServer([checkpoint], env=env)
    first.wait_ready()
    try:
        asyncio.run(before_restart(first))
        # Uvicorn re-raises the signal once shut down, so the exit status says "terminated by SIGTERM".
        assert first.process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        first.stop()
    assert (tmp_path / "sessions.msgpack").is_file()

    async def after_restart(server: RunningServer) -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=10.0) as http:
            for robot in robots:
                info = (await http.get(f"/v1/sessions/{robot.session_id}")).json()
                assert info["steps"] == len(robot.actions)
            while any(len(r.actions) < len(r.obs) for r in robots):
                live = [r for r in robots if len(r.actions) < len(r.obs)]
                assert all(await asyncio.gather(*(r.step(http) for r in live)))

    second = RunningServer([checkpoint], env=env)
    try:
        second.wait_ready()
        asyncio.run(after_restart(second))
    finally:
        second.stop()

    loaded = load_checkpoint(checkpoint)
    low, high = np.asarray(loaded.info.action_low), np.asarray(loaded.info.action_high)
    for robot in robots:
        want = replay_actions(loaded.model, robot.obs, robot.rewards, robot.starts, low, high)
        np.testing.assert_allclose(np.asarray(robot.actions, np.float32), want, atol=1e-5, rtol=0)
