"""Fixtures of the client tests: real service processes (helpers in ``client_support``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_support import API_KEYS, BUNDLED, POINT_NAV, Service, make_cheetah_checkpoint


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The bundled point-nav checkpoints (TrMRL, memoryless, oracle) and a random halfcheetah-vel one."""
    cheetah = make_cheetah_checkpoint(tmp_path_factory.mktemp("ckpt") / "cheetah-random")
    running = Service([*POINT_NAV, cheetah])
    try:
        yield running.start()
    finally:
        running.close()


@pytest.fixture(scope="module")
def restartable() -> Iterator[Service]:
    """A service of its own (point-nav only, API keys required), for tests that kill and restart it."""
    running = Service([BUNDLED / "point-nav"], env={"TRMRL_API_KEYS": ",".join(API_KEYS)})
    try:
        yield running.start()
    finally:
        running.close()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
