"""Helpers shared by the service tests: test checkpoints, an in-process client, a real server process,
and small API helpers (create, step, inspect, assert an error, twin sessions).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from fastapi import FastAPI
from trmrl_sim.launch import ServiceProcess

from service.app import create_app
from service.config import Settings
from service.core.registry import ModelRegistry
from trmrl.checkpoint import CheckpointInfo, save_checkpoint
from trmrl.model import ModelConfig
from trmrl.networks import build_model

REPO = Path(__file__).resolve().parents[2]

#: The small test model's action bounds: tight enough that some actions are clipped.
BOUND = 0.1

#: The keys of an app with admin, viewer and API keys (``admin-key``, ``viewer-key``, ``user-key``).
ADMIN = {"Authorization": "Bearer admin-key"}
VIEWER = {"Authorization": "Bearer viewer-key"}
USER = {"Authorization": "Bearer user-key"}


def make_checkpoint(
    path: Path,
    *,
    preset: str = "small",
    obs_dim: int = 2,
    act_dim: int = 2,
    bound: float = BOUND,
    family: str = "point-nav",
    seed: int = 0,
    **overrides: object,
) -> Path:
    """Save a checkpoint with random weights and non-trivial observation statistics."""
    torch.manual_seed(seed)
    config = ModelConfig.from_preset(preset, obs_dim=obs_dim, act_dim=act_dim, **overrides)  # type: ignore[arg-type]
    model = build_model(config)
    with torch.no_grad():
        model.obs_mean.copy_(torch.linspace(-0.5, 0.5, obs_dim))
        model.obs_std.copy_(torch.linspace(0.5, 2.0, obs_dim))
    save_checkpoint(path, model, CheckpointInfo(family, (-bound,) * act_dim, (bound,) * act_dim))
    return path


class ServiceClient(httpx.AsyncClient):
    """An in-process client that also exposes the app, for looking behind the API in assertions."""

    def __init__(self, app: FastAPI) -> None:
        super().__init__(transport=httpx.ASGITransport(app=app), base_url="http://service")
        self.app = app

    @property
    def registry(self) -> ModelRegistry:
        registry: ModelRegistry = self.app.state.registry
        return registry


@asynccontextmanager
async def serving(app: FastAPI, headers: dict[str, str] | None = None) -> AsyncIterator[ServiceClient]:
    """Run the app's lifespan (load, warm up, ready) and yield an in-process client of it, sending
    ``headers`` with every request."""
    async with app.router.lifespan_context(app), ServiceClient(app) as client:
        client.headers.update(headers or {})
        yield client


Serve = Callable[..., AbstractAsyncContextManager[ServiceClient]]
"""``serve(**settings)``: an app with those settings, served in process (:func:`serving`)."""


def versions_root(base: Path, **others: dict[str, Any]) -> Path:
    """A checkpoint root: versions 1 and 2 of ``point-nav`` (``point-nav`` and ``point-nav-v2``) and
    one checkpoint for each of ``others`` (its name: its :func:`make_checkpoint` keywords)."""
    make_checkpoint(base / "point-nav", seed=0, policy_out_gain=0.1)
    make_checkpoint(base / "point-nav-v2", seed=5, policy_out_gain=0.1)
    for name, options in others.items():
        make_checkpoint(base / name, **options)  # type: ignore[arg-type]
    return base


def serve_root(
    root: Path, models: list[str], headers: dict[str, str] | None = None, **defaults: Any
) -> Serve:
    """``serve(**settings)`` for apps on the checkpoint root ``root`` that load ``models`` from it at
    start, with ``defaults`` under the settings given and ``headers`` sent with every request."""

    def run(**overrides: Any) -> AbstractAsyncContextManager[ServiceClient]:
        settings = Settings(
            models=[root / name for name in models], checkpoint_root=root, **{**defaults, **overrides}
        )
        return serving(create_app(settings), headers=headers)

    return run


class RunningServer(ServiceProcess):
    """A ``python -m service`` process on a free port, started at once (CPU, one torch thread).

    :meth:`wait_ready` waits for ``/readyz``; ``process`` is the child, for signalling it directly.
    """

    def __init__(self, checkpoints: list[Path], env: dict[str, str] | None = None) -> None:
        test_env = {"PYTHONPATH": str(REPO), "TRMRL_TORCH_THREADS": "1", **(env or {})}
        super().__init__(checkpoints, env=test_env, cwd=REPO)
        self.start(wait=False)

    def wait_ready(self, timeout_s: float = 600.0) -> RunningServer:
        """As the client's, with a wait sized for a machine whose cores other jobs keep busy (importing
        torch and warming the model up then takes minutes): a guard against a hang, not a timing check."""
        super().wait_ready(timeout_s)
        return self


# -- API helpers ------------------------------------------------------------------------------------------
OBS = [[0.3, -0.2], [0.1, 0.4], [-0.5, 0.25], [0.9, -0.9], [0.05, 0.6]]


async def new_session(client: httpx.AsyncClient, **body: Any) -> str:
    r = await client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def act(
    client: httpx.AsyncClient, session_id: str | None, observation: list[float], **fields: Any
) -> httpx.Response:
    body: dict[str, Any] = {"observation": observation, **fields}
    if session_id is not None:
        body["session_id"] = session_id
    return await client.post("/v1/act", json=body)


async def action(
    client: httpx.AsyncClient, session_id: str, observation: list[float], **fields: Any
) -> np.ndarray:
    r = await act(client, session_id, observation, **fields)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["action"])


async def info(client: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/sessions/{session_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["detail"], dict)
    return dict(error)


class Twins:
    """Two sessions with the same history: ``target`` receives a bad request, ``twin`` does not."""

    def __init__(self, client: httpx.AsyncClient, target: str, twin: str, steps: int) -> None:
        self.client, self.target, self.twin, self.steps = client, target, twin, steps

    async def assert_untouched(self) -> None:
        a, b = await info(self.client, self.target), await info(self.client, self.twin)
        assert a["steps"] == b["steps"] == self.steps
        assert a["episodes"] == b["episodes"]
        obs = [0.7, -0.3]
        got = await action(self.client, self.target, obs, reward=0.25, step=self.steps)
        want = await action(self.client, self.twin, obs, reward=0.25, step=self.steps)
        np.testing.assert_array_equal(got, want)
