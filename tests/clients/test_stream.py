"""StreamingSession over the service's WebSocket stream: JSON and MessagePack frames, recovery."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from client_support import API_KEYS, N_STEPS, Service, assert_same, require_streams, trajectory, uninterrupted
from trmrl_client import PolicyClient
from trmrl_client.stream import StreamingSession


@pytest.mark.anyio
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_stream_gives_the_http_actions_and_recovers_a_lost_session(
    service: Service, encoding: str
) -> None:
    require_streams(service.url)
    obs, rewards, starts = trajectory()
    with PolicyClient(service.url) as plain:
        want = uninterrupted(plain)
    stream = await StreamingSession.open(service.url, "point-nav", encoding=encoding)  # type: ignore[arg-type]
    async with stream:
        got = []
        for t in range(N_STEPS):
            if t == 10:
                httpx.delete(f"{service.url}/v1/sessions/{stream.session_id}")
            got.append(await stream.act(obs[t], rewards[t], bool(starts[t])))
        assert stream.recoveries == 1
    assert_same(np.stack(got), want)


@pytest.mark.anyio
async def test_stream_with_an_api_key_survives_a_restart_without_state(restartable: Service) -> None:
    require_streams(restartable.url, API_KEYS[0])
    obs, rewards, starts = trajectory()
    with PolicyClient(restartable.url, api_key=API_KEYS[0]) as plain:
        want = uninterrupted(plain)
    stream = await StreamingSession.open(restartable.url, "point-nav", api_key=API_KEYS[0])
    async with stream:
        got = []
        for t in range(N_STEPS):
            if t == 11:
                restartable.restart()
            got.append(await stream.act(obs[t], rewards[t], bool(starts[t])))
        assert stream.recoveries == 1
    assert_same(np.stack(got), want)
