"""Helpers of the client tests: a real ``python -m service`` process, test checkpoints, trajectories.

Nothing here imports the service: the client is tested as a robot would use it, over the network.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from trmrl_client import PolicyClient
from trmrl_sim.launch import ServiceProcess

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "checkpoints"
POINT_NAV = [BUNDLED / "point-nav", BUNDLED / "point-nav-memoryless", BUNDLED / "point-nav-oracle"]


class Service(ServiceProcess):
    """A ``python -m service`` process (CPU, one torch thread); :meth:`restart` keeps the port.

    A restart has no state directory unless ``env`` sets one: every session is lost.
    """

    def __init__(self, checkpoints: list[Path], env: dict[str, str] | None = None) -> None:
        test_env = {"PYTHONPATH": str(REPO), "TRMRL_TORCH_THREADS": "1", **(env or {})}
        super().__init__(checkpoints, env=test_env, cwd=REPO)


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
