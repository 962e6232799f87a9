"""PolicyClient / AsyncPolicyClient against a real service: acting, errors, retries and recovery."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
from client_support import API_KEYS, N_STEPS, Service, assert_same, supports, trajectory, uninterrupted
from trmrl_client import AsyncPolicyClient, PolicyClient, ServiceError, ServiceUnavailable
from trmrl_client.protocol import ROUTE_HEADER, Call


def test_importing_every_client_module_loads_no_torch() -> None:
    modules = "trmrl_client, trmrl_client.http, trmrl_client.stream, trmrl_client.websocket, trmrl_sim.sim"
    modules += ", trmrl_sim.robot_loop, trmrl_sim.demo, trmrl_sim.launch"
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_session_acts_with_numpy_in_and_out(service: Service) -> None:
    with PolicyClient(service.url) as client:
        models = {m.name: m for m in client.models()}
        assert models["point-nav"].window == 5 and models["point-nav-memoryless"].window == 1
        assert models["point-nav"].policy == "trmrl"
        session = client.session("point-nav")
        action = session.act(np.zeros(2, np.float32), episode_start=True)
        assert action.dtype == np.float32 and action.shape == (2,)
        assert session.step == 1
        again = client.session("point-nav").act([0.0, 0.0])
        assert_same(action, again)  # deterministic: same memory, same action
        assert session.info()["steps"] == 1
        session.reset("trial")
        assert_same(session.act([0.0, 0.0]), action)
        session.close()
        session.close()  # already gone is fine


def test_refusals_are_clear(service: Service) -> None:
    with PolicyClient(service.url) as client:
        with pytest.raises(ServiceError) as info:
            client.session("no-such-model")
        assert info.value.status == 404 and info.value.code == "unknown_model"
        session = client.session("point-nav")
        with pytest.raises(ValueError, match="must hold 2 numbers"):
            session.act([1.0, 2.0, 3.0])
        with pytest.raises(ValueError, match="NaN"):
            session.act([np.nan, 0.0])
        assert session.step == 0  # a refused step changes nothing


def test_unreachable_service_raises_after_retries() -> None:
    with PolicyClient("http://127.0.0.1:9", retries=1, timeout=0.5) as client:
        assert not client.ready()
        with pytest.raises(ServiceUnavailable) as info:
            client.models()
        assert info.value.code == "unreachable"


class DropReplies(httpx.BaseTransport):
    """Passes requests to the service; for chosen act steps, throws the reply away (a lost answer),
    or fails before sending (a request that never arrived)."""

    def __init__(self, drop_reply_at: set[int], fail_before_at: set[int]) -> None:
        self.inner = httpx.HTTPTransport()
        self.drop_reply_at = drop_reply_at
        self.fail_before_at = fail_before_at

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        step = None
        if request.url.path == "/v1/act":
            step = __import__("json").loads(request.content).get("step")
        if step in self.fail_before_at:
            self.fail_before_at.discard(step)
            raise httpx.ConnectError("connection refused", request=request)
        response = self.inner.handle_request(request)
        if step in self.drop_reply_at:
            self.drop_reply_at.discard(step)
            response.read()
            raise httpx.ReadTimeout("reply lost", request=request)
        return response


def test_a_lost_reply_is_retried_with_the_same_step(service: Service) -> None:
    obs, rewards, starts = trajectory()
    with PolicyClient(service.url) as plain:
        want = uninterrupted(plain)
    with PolicyClient(service.url, transport=DropReplies({3, 7}, set())) as client:
        session = client.session("point-nav")
        got = np.stack([session.act(obs[t], rewards[t], bool(starts[t])) for t in range(N_STEPS)])
        assert session.info()["steps"] == N_STEPS  # the retried steps did not advance the memory twice
    assert_same(got, want)


def test_a_step_that_never_arrived_is_sent_again_with_the_next(service: Service) -> None:
    """No retries: step 4 fails; the robot runs a fallback; step 5 finds the gap and fills it."""
    obs, rewards, starts = trajectory()
    fallback = np.array([0.25, -0.5], np.float32)
    with PolicyClient(service.url) as plain:
        reference = plain.session("point-nav")
        want = [reference.act(obs[t], rewards[t], bool(starts[t])) for t in range(5)]
        want.append(reference.act(obs[5], rewards[5], bool(starts[5]), applied_action=fallback))
    with PolicyClient(service.url, retries=0, transport=DropReplies(set(), {4})) as client:
        session = client.session("point-nav")
        got = [session.act(obs[t], rewards[t], bool(starts[t])) for t in range(4)]
        with pytest.raises(ServiceUnavailable):
            session.act(obs[4], rewards[4], bool(starts[4]))
        got.append(want[4])  # what the service would have said; the robot never saw it
        got.append(session.act(obs[5], rewards[5], bool(starts[5]), applied_action=fallback))
        assert session.ledger.unconfirmed == 0 and session.recoveries == 0
    assert_same(np.stack(got), np.stack(want))


def test_recovery_after_a_restart_without_state_gives_the_uninterrupted_actions(
    restartable: Service,
) -> None:
    obs, rewards, starts = trajectory()
    cut = 12  # after the second episode started (step 9) and more than N + 1 steps in
    with PolicyClient(restartable.url, api_key=API_KEYS[0]) as client:
        want = uninterrupted(client)
        session = client.session("point-nav")
        before = session.session_id
        got = [session.act(obs[t], rewards[t], bool(starts[t])) for t in range(cut)]
        batched = client.session("point-nav")
        for t in range(cut):
            client.act_batch([batched], obs[t : t + 1], rewards[t : t + 1], starts[t : t + 1])
        restartable.restart()
        got += [session.act(obs[t], rewards[t], bool(starts[t])) for t in range(cut, N_STEPS)]
        assert session.recoveries == 1 and session.session_id != before
        tail = [
            client.act_batch([batched], obs[t : t + 1], rewards[t : t + 1])[0] for t in range(cut, N_STEPS)
        ]
        assert batched.recoveries == 1
    assert_same(np.stack(got), want)
    assert_same(np.stack(tail), want[cut:])


def test_api_keys_are_sent_and_sessions_stay_private(restartable: Service) -> None:
    with PolicyClient(restartable.url) as anonymous, pytest.raises(ServiceError) as info:
        anonymous.models()
    assert info.value.status == 401
    with (
        PolicyClient(restartable.url, api_key=API_KEYS[0]) as owner,
        PolicyClient(restartable.url, api_key=API_KEYS[1]) as other,
    ):
        session = owner.session("point-nav")
        session.act([0.0, 0.0])
        assert session.info()["steps"] == 1
        peek = other.send(Call("GET", f"/v1/sessions/{session.session_id}"))
        assert peek.status == 404 and peek.error().code == "unknown_session"


@pytest.mark.anyio
async def test_async_client_recovers_a_deleted_session(service: Service) -> None:
    obs, rewards, starts = trajectory()
    with PolicyClient(service.url) as plain:
        want = uninterrupted(plain)
    async with AsyncPolicyClient(service.url) as client:
        sessions = [await client.session("point-nav") for _ in range(3)]
        got = []
        for t in range(N_STEPS):
            if t == 8:  # the service loses one session (as if evicted or expired)
                httpx.delete(f"{service.url}/v1/sessions/{sessions[1].session_id}")
            got.append(
                await client.act_batch(
                    sessions, np.repeat(obs[t : t + 1], 3, 0), [rewards[t]] * 3, [starts[t]] * 3
                )
            )
        assert [s.recoveries for s in sessions] == [0, 1, 0]
    for i in range(3):
        assert_same(np.stack(got)[:, i], want)


def test_snapshot_restore_keeps_the_session_id_and_the_noise_stream(service: Service) -> None:
    if not supports(service.url, "GET", "/v1/sessions/x/state"):
        pytest.skip("this service has no session snapshots (GET /v1/sessions/{id}/state)")
    obs, rewards, starts = trajectory()
    with PolicyClient(service.url) as client:
        want = uninterrupted(client, deterministic=False, seed=11)
        session = client.session("point-nav", deterministic=False, seed=11)
        sid = session.session_id
        got = [session.act(obs[t], rewards[t], bool(starts[t])) for t in range(7)]
        session.snapshot()
        got += [session.act(obs[t], rewards[t], bool(starts[t])) for t in range(7, 10)]
        httpx.delete(f"{service.url}/v1/sessions/{sid}")
        got += [session.act(obs[t], rewards[t], bool(starts[t])) for t in range(10, N_STEPS)]
        assert session.recoveries == 1 and session.session_id == sid
    assert_same(np.stack(got), want)


def test_msgpack_bodies_give_the_same_actions(service: Service) -> None:
    probe = httpx.post(
        f"{service.url}/v1/act", content=b"\x80", headers={"Content-Type": "application/msgpack"}
    )
    if probe.status_code == 415:
        pytest.skip("this service does not accept MessagePack bodies yet")
    obs, rewards, starts = trajectory()
    with PolicyClient(service.url) as plain:
        want = uninterrupted(plain)
    with PolicyClient(service.url, encoding="msgpack") as client:
        session = client.session("point-nav")
        got = np.stack([session.act(obs[t], rewards[t], bool(starts[t])) for t in range(N_STEPS)])
    assert_same(got, want)


class RecordRouteKeys(httpx.BaseTransport):
    """Passes requests to the service and records each one's path and routing header."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.seen: list[tuple[str, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.url.path, request.headers.get(ROUTE_HEADER)))
        return self.inner.handle_request(request)


def test_every_request_of_a_session_carries_its_own_routing_key(service: Service) -> None:
    """A session-aware router hashes X-Session-Key: creation, steps, snapshots, a restore, a
    re-creation under a new id and deletion all carry the session's one key; other sessions have others."""
    obs, rewards, starts = trajectory()
    recorder = RecordRouteKeys()
    with PolicyClient(service.url, transport=recorder) as client, PolicyClient(service.url) as other:
        first, second = client.session("point-nav"), client.session("point-nav")
        for t in range(4):
            first.act(obs[t], rewards[t], bool(starts[t]))
            second.act(obs[t], rewards[t], bool(starts[t]))
        first.snapshot()
        original = first.session_id
        other.send(Call("DELETE", f"/v1/sessions/{original}"))  # lost: restored from the snapshot
        first.act(obs[4], rewards[4], bool(starts[4]))
        assert first.recoveries == 1 and first.session_id == original
        first.ledger.snapshot = None
        other.send(Call("DELETE", f"/v1/sessions/{original}"))  # lost again: recreated under a new id
        first.act(obs[5], rewards[5], bool(starts[5]))
        assert first.recoveries == 2 and first.session_id != original
        client.act_batch([first, second], obs[6:8], rewards[6:8], starts[6:8])
        first.close()
    key = first.ledger.route_key
    assert second.ledger.route_key != key
    assert {k for _, k in recorder.seen} == {key, second.ledger.route_key, None}
    mine = [path for path, k in recorder.seen if k == key]
    assert mine.count("/v1/sessions") == 2  # created, then recreated by the second recovery
    assert f"/v1/sessions/{original}/state" in mine  # snapshot fetched and restored
    assert mine[-1] == f"/v1/sessions/{first.session_id}"  # the delete of the recreated session
    assert [path for path, k in recorder.seen if k is None] == ["/v1/act/batch"]  # many sessions: no key
