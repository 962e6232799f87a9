"""Helpers of the client tests: a real ``python -m service`` process, test checkpoints, trajectories.

Nothing here imports the service: the client is tested as a robot would use it, over the network.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from trmrl_client import PolicyClient

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "checkpoints"
POINT_NAV = [BUNDLED / "point-nav", BUNDLED / "point-nav-memoryless", BUNDLED / "point-nav-oracle"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """A ``python -m service`` process; :meth:`restart` brings it back on the same port."""

    def __init__(self, checkpoints: list[Path], env: dict[str, str] | None = None) -> None:
        self.checkpoints = checkpoints
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 -- lives as long as the service; close() ends it

    def start(self, timeout_s: float = 60.0) -> Service:
        args = [sys.executable, "-m", "service", "--port", str(self.port)]
        for path in self.checkpoints:
            args += ["--checkpoint", str(path)]
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "TRMRL_DEVICE": "cpu",
            "TRMRL_LOG_LEVEL": "warning",
            "TRMRL_TORCH_THREADS": "1",
            **self.env,
        }
        self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(
                    f"service exited with {self.process.returncode}:\n{self._log.read()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"service not ready within {timeout_s} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port, without any state directory: every session is lost."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._log.close()


def make_cheetah_checkpoint(path: Path) -> Path:
    """A random-weights halfcheetah-vel checkpoint (obs 17, act 6) for driving a MuJoCo env."""
    import torch

    from trmrl.checkpoint import CheckpointInfo, save_checkpoint
    from trmrl.model import ModelConfig, TrMRL

    torch.manual_seed(0)
    model = TrMRL(ModelConfig.from_preset("small", obs_dim=17, act_dim=6, window=4))
    save_checkpoint(path, model, CheckpointInfo("halfcheetah-vel", (-1.0,) * 6, (1.0,) * 6))
    return path


def supports(url: str, method: str, path: str) -> bool:
    """Whether the service has a route (anything but a routing 404/405 means it does)."""
    response = httpx.request(method, f"{url}{path}", timeout=5.0)
    if response.status_code in (404, 405):
        try:
            return response.json()["error"]["code"] not in ("not_found", "method_not_allowed")
        except (ValueError, KeyError, TypeError):
            return False
    return True


API_KEYS = ("key-a", "key-b")
"""API keys of the ``restartable`` service."""

N_STEPS = 14
"""Steps of the test trajectory: more than the window (5) plus one, with an episode boundary inside."""


def trajectory(seed: int = 0, n: int = N_STEPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = rng.normal(scale=0.5, size=(n, 2)).astype(np.float32)
    rewards = rng.normal(size=n)
    starts = np.zeros(n, bool)
    starts[[0, 9]] = True
    return obs, rewards, starts


def assert_same(got: object, want: object) -> None:
    """Equal up to float32 rounding (a batch's size may change the last bits): the spec's 1e-5."""
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def uninterrupted(client: PolicyClient, n: int = N_STEPS, **session_args: object) -> np.ndarray:
    """The actions of a session that steps through :func:`trajectory` without any incident."""
    obs, rewards, starts = trajectory(n=n)
    session = client.session("point-nav", **session_args)  # type: ignore[arg-type]
    actions = np.stack([session.act(obs[t], rewards[t], bool(starts[t])) for t in range(n)])
    session.close()
    return actions


def require_streams(url: str, api_key: str | None = None) -> None:
    """Skip unless the service serves WebSocket session streams."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sid = httpx.post(f"{url}/v1/sessions", json={}, headers=headers).json()["session_id"]
    try:
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        with connect(f"{url.replace('http', 'ws', 1)}/v1/sessions/{sid}/stream", additional_headers=headers):
            pass
    except InvalidStatus as exc:
        if exc.response.status_code in (403, 404):
            pytest.skip("this service has no WebSocket session streams yet")
        raise
    finally:
        httpx.delete(f"{url}/v1/sessions/{sid}", headers=headers)
