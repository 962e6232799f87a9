"""The vectorised client: many sessions as arrays over the columnar batch and the vectorised stream,
against a real service; per-row recovery gives the actions of uninterrupted sessions."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from client_support import N_STEPS, Service, assert_same, trajectory, uninterrupted
from trmrl_client import AsyncPolicyClient, PolicyClient, ServiceError, ServiceUnavailable

ENVS = 3


def ticks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test trajectory for every env: ``[T, ENVS, ...]`` (all envs see the same one)."""
    obs, rewards, starts = trajectory()
    return (
        np.repeat(obs[:, None], ENVS, 1),
        np.repeat(rewards[:, None], ENVS, 1),
        np.repeat(starts[:, None], ENVS, 1),
    )


class DropBatch(httpx.BaseTransport):
    """Fails chosen ``/v1/act/batch`` requests (by their order) before they reach the service."""

    def __init__(self, fail_at: set[int]) -> None:
        self.inner = httpx.HTTPTransport()
        self.fail_at = fail_at
        self.count = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/act/batch":
            self.count += 1
            if self.count in self.fail_at:
                raise httpx.ConnectError("connection refused", request=request)
        return self.inner.handle_request(request)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_vector_gives_the_actions_of_single_sessions(service: Service, encoding: Any) -> None:
    obs, rewards, starts = ticks()
    with PolicyClient(service.url) as plain:
        want = uninterrupted(plain)
    with PolicyClient(service.url, encoding=encoding) as client:
        envs = client.vector(ENVS, "point-nav")
        assert envs.num_envs == ENVS and len(set(envs.session_ids)) == ENVS
        got = np.stack([envs.act(obs[t], rewards[t], starts[t]) for t in range(N_STEPS)])
        assert got.shape == (N_STEPS, ENVS, 2) and got.dtype == np.float32
        envs.close()
    for i in range(ENVS):
        assert_same(got[:, i], want)


def test_vector_recovers_lost_rows_alone(service: Service) -> None:
    """The service loses one env's session mid-trajectory: that row is rebuilt by replay, the others
    are untouched, and every row's actions equal an uninterrupted session's."""
    obs, rewards, starts = ticks()
    with PolicyClient(service.url) as plain:
        want = uninterrupted(plain)
    with PolicyClient(service.url, encoding="msgpack") as client:
        envs = client.vector(ENVS, "point-nav")
        got = []
        for t in range(N_STEPS):
            if t == 8:
                httpx.delete(f"{service.url}/v1/sessions/{envs.session_ids[1]}")
            got.append(envs.act(obs[t], rewards[t], starts[t]))
        assert envs.recoveries == 1
    for i in range(ENVS):
        assert_same(np.stack(got)[:, i], want)


def test_a_tick_that_never_arrived_is_resent_with_the_next(service: Service) -> None:
    """No retries: tick 5 fails before reaching the service; tick 6 resends it row by row first."""
    obs, rewards, starts = ticks()
    with PolicyClient(service.url) as plain:
        want = uninterrupted(plain)
    with PolicyClient(service.url, retries=0, transport=DropBatch({6})) as client:
        envs = client.vector(ENVS, "point-nav")
        got = [envs.act(obs[t], rewards[t], starts[t]) for t in range(5)]
        with pytest.raises(ServiceUnavailable):
            envs.act(obs[5], rewards[5], starts[5])
        assert envs.ledger.unconfirmed.tolist() == [1] * ENVS
        # The robots ran a fallback for tick 5 and say so; here the fallback is what the service would
        # have answered, so the uninterrupted sessions are the reference.
        executed = np.repeat(want[5][None], ENVS, 0)
        got.append(executed)
        got.append(envs.act(obs[6], rewards[6], starts[6], applied_actions=executed))
        got += [envs.act(obs[t], rewards[t], starts[t]) for t in range(7, N_STEPS)]
        assert envs.ledger.unconfirmed.tolist() == [0] * ENVS and envs.recoveries == 0
    for i in range(ENVS):
        assert_same(np.stack(got)[:, i], want)


def test_a_subset_of_rows_steps_alone(service: Service) -> None:
    obs, rewards, starts = ticks()
    with PolicyClient(service.url) as client:
        envs = client.vector(ENVS, "point-nav")
        envs.act(obs[0], rewards[0], starts[0])
        part = envs.act(obs[1][:2], rewards[1][:2], starts[1][:2], rows=[2, 0])
        assert part.shape == (2, 2)
        assert envs.ledger.next_step.tolist() == [2, 1, 2]


def test_bad_input_is_refused_before_sending(service: Service) -> None:
    with PolicyClient(service.url) as client:
        envs = client.vector(2, "point-nav")
        with pytest.raises(ValueError, match="shape"):
            envs.act(np.zeros((3, 2)))
        with pytest.raises(ValueError, match="env 1"):
            envs.act(np.array([[0.0, 0.0], [1e39, 0.0]]))  # finite in float64, not in float32
        with pytest.raises(ValueError, match="distinct"):
            envs.act(np.zeros((2, 2)), rows=[1, 1])
        assert envs.ledger.next_step.tolist() == [0, 0]
        with pytest.raises(ServiceError) as info:
            client.vector(2, "no-such-model")
        assert info.value.code == "unknown_model"


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["batch", "stream"])
async def test_async_vector_over_batch_and_stream(service: Service, transport: Any) -> None:
    obs, rewards, starts = ticks()
    with PolicyClient(service.url) as plain:
        want = uninterrupted(plain)
    async with AsyncPolicyClient(service.url, encoding="msgpack") as client:
        envs = await client.vector(ENVS, "point-nav", transport=transport)
        got = []
        for t in range(N_STEPS):
            if t == 10:
                httpx.delete(f"{service.url}/v1/sessions/{envs.session_ids[0]}")
            got.append(await envs.act(obs[t], rewards[t], starts[t]))
        assert envs.recoveries == 1
        await envs.close()
    for i in range(ENVS):
        assert_same(np.stack(got)[:, i], want)
