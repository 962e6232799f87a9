"""Fixtures for the service tests: checkpoints with random weights, apps, clients, a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import pytest
from service_support import OBS, ServiceClient, Twins, action, make_checkpoint, new_session, serving

from service.app import create_app
from service.config import Settings


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``point-nav`` (episode scope, the default model) and ``point-nav-trial`` (trial scope).

    ``policy_out_gain`` puts the mean action near the bounds (some actions are clipped) and
    ``init_std`` keeps sampled actions mostly inside them.
    """
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "point-nav": make_checkpoint(root / "point-nav", policy_out_gain=0.1, init_std=0.05),
        "point-nav-trial": make_checkpoint(
            root / "point-nav-trial",
            seed=1,
            memory_scope="trial",
            window=3,
            policy_out_gain=0.1,
            init_std=0.05,
        ),
    }


def settings_for(checkpoints: dict[str, Path], **overrides: object) -> Settings:
    return Settings(models=list(checkpoints.values()), **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client(checkpoints: dict[str, Path]) -> AsyncIterator[ServiceClient]:
    """A client of an app serving both test models."""
    async with serving(create_app(settings_for(checkpoints))) as c:
        yield c


@pytest.fixture
async def make_client(checkpoints: dict[str, Path]) -> AsyncIterator[Callable[..., Awaitable[ServiceClient]]]:
    """Build clients of apps with particular settings (closed after the test)."""
    async with AsyncExitStack() as stack:

        async def build(**overrides: object) -> ServiceClient:
            return await stack.enter_async_context(
                serving(create_app(settings_for(checkpoints, **overrides)))
            )

        yield build


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
async def twins(client: ServiceClient) -> Twins:
    target, twin = await new_session(client), await new_session(client)
    for step, obs in enumerate(OBS[:3]):
        for sid in (target, twin):
            await action(client, sid, obs, reward=-0.5 * step, step=step)
    return Twins(client, target, twin, 3)
