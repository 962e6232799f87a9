"""Sessions program against the transport interface: driven here over an in-memory fake service.

No server, no sockets: :class:`FakeService` implements :class:`~trmrl_client.transport.Transport`
(one ``attempt`` and a retry policy) and answers the act, batch and session routes the way the
service does (step numbers, idempotent resends, ``404`` for a lost session, ``409`` for a gap), with
faults injected per try.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trmrl_client
from trmrl_client import PolicyClient, ServiceError, ServiceUnavailable, Session
from trmrl_client import routes as r
from trmrl_client.codec import packb
from trmrl_client.protocol import Call, Reply, SessionLedger, create_flow, new_route_key
from trmrl_client.retry import Outcome, RetryPolicy, Try
from trmrl_client.session import AsyncSession
from trmrl_client.transport import AsyncTransport, Routed, Transport, run, run_async
from trmrl_client.vector import AsyncVectorSession, VectorLedger, VectorSession, create_sessions_flow
from trmrl_client.websocket import FRAME_RETRY_S, _refusal

MODEL = {
    "name": "fake",
    "version": "v1",
    "task_family": "point-nav",
    "obs_dim": 2,
    "act_dim": 2,
    "action_low": [-1, -1],
    "action_high": [1, 1],
    "window": 3,
    "memory_scope": "episode",
}


MSGPACK = {"content-type": "application/msgpack"}


def _error(status: int, code: str, **detail: Any) -> Reply:
    return Reply(status, {"error": {"code": code, "message": code, "detail": detail}})


class FakeService:
    """A :class:`Transport` that is its own service: ``faults`` are what the next tries get instead
    of an answer (``"timeout"``; ``"busy"``: a ``429``; ``"refuse"``: a ``422``); ``calls`` records
    every try's call."""

    def __init__(self, retries: int = 2, faults: list[str] | None = None) -> None:
        self.policy = RetryPolicy(timeout=1.0, retries=retries)
        self.faults = list(faults or [])
        self.calls: list[Call] = []
        self.sessions: dict[str, int] = {}  # id -> the step it expects next
        self.steps: dict[str, list[int]] = {}  # id -> the steps it acted on, in order
        self._ids = itertools.count()
        self.cache_full = 0
        """The next this many acts are refused for now, as by a spent key/value cache (503
        ``cache_exhausted``): with ``Retry-After`` on the act route, as a bare error in a batch or a tick."""

    def attempt(self, step: Try) -> Outcome:
        self.calls.append(step.call)
        fault = self.faults.pop(0) if self.faults else None
        if fault == "timeout":
            return ServiceUnavailable("timeout", "no reply in time")
        if fault == "refuse":
            return _error(422, "invalid_input")
        if fault == "busy":
            return Reply(429, {"error": {"code": "capacity_exhausted", "message": "busy"}}, retry_after=0.0)
        return self.answer(step.call)

    def answer(self, call: Call) -> Reply:
        body: Any = call.body or {}
        if call.route is r.CREATE_SESSIONS:
            ids = [self.create() for _ in range(body.get("count", 1))]
            return Reply(201, {"session_id": ids[0], "session_ids": ids, "model": MODEL})
        if call.route is r.ACT:
            reply = self.act(body)
            return Reply(reply.status, reply.body, 0.0) if reply.status == 503 else reply
        if call.route is r.ACT_ITEMS:
            return Reply(200, {"items": [self.act(item).body for item in body["items"]]})
        if call.route is r.ACT_COLUMNAR:
            items = [
                self.act({"session_id": sid, "step": int(step)})
                for sid, step in zip(body["session_ids"], body["steps"], strict=True)
            ]
            errors = [{**item.body, "row": i} for i, item in enumerate(items) if not item.ok]
            actions = [item.body["action"] if item.ok else [0.0, 0.0] for item in items]
            return Reply(200, {"actions": actions, "errors": errors})
        if call.route is r.DELETE_SESSION:
            return (
                Reply(204, None) if self.drop(call.path.rsplit("/", 1)[1]) else _error(404, "unknown_session")
            )
        raise AssertionError(f"the fake serves no {call.method} {call.path}")

    def create(self) -> str:
        session_id = f"s{next(self._ids)}"
        self.sessions[session_id], self.steps[session_id] = 0, []
        return session_id

    def drop(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def act(self, body: dict[str, Any]) -> Reply:
        session_id, step = body["session_id"], int(body["step"])
        if self.cache_full and session_id in self.sessions:
            self.cache_full -= 1
            return _error(503, "cache_exhausted", cache_blocks=4)
        expected = self.sessions.get(session_id)
        if expected is None:
            return _error(404, "unknown_session")
        if step == expected:
            self.sessions[session_id] += 1
            self.steps[session_id].append(step)
        elif step != expected - 1:  # the last step again is answered again; anything else is a gap
            return _error(409, "step_conflict", expected_step=expected)
        return Reply(200, {"action": [float(step), 0.0], "step": step})

    def sent(self, route: r.Route) -> list[Call]:
        return [call for call in self.calls if call.route is route]


class AsyncFake:
    """The fake service as an :class:`AsyncTransport`."""

    def __init__(self, service: FakeService) -> None:
        self.service = service
        self.policy = service.policy

    async def attempt(self, step: Try) -> Outcome:
        return self.service.attempt(step)


class FakeStream:
    """A :class:`Stream` carrying ``routes`` to the same fake service; records what it carried."""

    def __init__(self, service: FakeService, carries: frozenset[r.Route]) -> None:
        self.service = service
        self.routes = carries
        self.carried: list[Call] = []
        self.closed = False

    async def attempt(self, step: Try) -> Outcome:
        self.carried.append(step.call)
        return self.service.attempt(step)

    async def aclose(self) -> None:
        self.closed = True


def _body(call: Call) -> dict[str, Any]:
    assert call.body is not None
    return call.body


def open_session(service: FakeService) -> Session:
    transport: Transport = service
    return Session(transport, run(transport, create_flow({"model": "fake"}, new_route_key())))


def open_vector(service: FakeService) -> tuple[list[str], VectorSession]:
    """Three sessions as one vector, each one step into its episode."""
    ids, info = run(service, create_sessions_flow(3, {"model": "fake"}, "key"))
    envs = VectorSession(service, VectorLedger(info, ids, {"model": "fake"}, "key"))
    envs.act(np.zeros((3, 2)), episode_starts=np.ones(3, bool))
    return ids, envs


def test_steps_are_numbered_in_order_and_carry_the_session() -> None:
    service = FakeService()
    session = open_session(service)
    actions = [session.act([0.0, 0.0], episode_start=True), session.act([0.1, 0.0]), session.act([0.2, 0.0])]
    assert [a[0] for a in actions] == [0.0, 1.0, 2.0]
    acts = service.sent(r.ACT)
    assert [_body(c)["step"] for c in acts] == [0, 1, 2]
    assert {_body(c)["session_id"] for c in acts} == {session.session_id}
    assert {c.route_key for c in service.calls} == {session.ledger.route_key}
    assert [c.path for c in service.calls] == ["/v1/sessions"] + ["/v1/act"] * 3
    assert session.step == 3


def test_a_try_without_reply_is_retried_with_the_same_step() -> None:
    service = FakeService(retries=2)
    session = open_session(service)
    session.act([0.0, 0.0])
    service.faults = ["timeout", "busy"]
    assert session.act([0.1, 0.0])[0] == 1.0
    assert [_body(c)["step"] for c in service.sent(r.ACT)] == [0, 1, 1, 1]
    assert service.steps[session.session_id] == [0, 1]


def test_out_of_tries_the_step_is_kept_and_resent_first() -> None:
    service = FakeService(retries=1, faults=[])
    session = open_session(service)
    session.act([0.0, 0.0])
    service.faults = ["timeout", "timeout"]
    with pytest.raises(ServiceUnavailable):
        session.act([0.1, 0.0])
    assert session.ledger.unconfirmed == 1 and session.step == 2
    assert session.act([0.2, 0.0])[0] == 2.0  # steps 1 and 2 in one batch of items
    (batch,) = service.sent(r.ACT_ITEMS)
    assert [item["step"] for item in _body(batch)["items"]] == [1, 2]
    assert service.steps[session.session_id] == [0, 1, 2]
    assert session.ledger.unconfirmed == 0


def test_a_lost_session_is_recreated_and_its_history_replayed() -> None:
    service = FakeService()
    session = open_session(service)
    for t in range(4):
        session.act([float(t), 0.0])
    lost = session.session_id
    service.drop(lost)
    assert session.act([4.0, 0.0])[0] == 4.0  # the replayed window (steps 0-3), then step 4
    assert session.session_id != lost and session.recoveries == 1
    assert service.steps[session.session_id] == [0, 1, 2, 3, 4]
    assert session.step == 5


def test_a_refusal_is_raised_and_the_step_is_not_taken() -> None:
    service = FakeService()
    session = open_session(service)
    session.act([0.0, 0.0])
    service.faults = ["refuse"]
    with pytest.raises(ServiceError) as info:
        session.act([0.1, 0.0])
    assert info.value.code == "invalid_input" and info.value.status == 422
    assert len(service.sent(r.ACT)) == 2  # a refusal is an answer: not retried
    assert session.step == 1 and session.ledger.unconfirmed == 0
    assert session.act([0.2, 0.0])[0] == 1.0


def test_the_vector_session_runs_over_the_interface_and_recovers_one_row() -> None:
    service = FakeService()
    ids, envs = open_vector(service)
    service.drop(ids[1])
    actions = envs.act(np.zeros((3, 2)))
    assert actions[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert envs.recoveries == 1 and envs.session_ids[1] != ids[1]
    assert envs.ledger.next_step.tolist() == [2, 2, 2]
    ticks = service.sent(r.ACT_COLUMNAR)
    assert [_body(c)["steps"].tolist() for c in ticks] == [[0, 0, 0], [1, 1, 1]]


def test_a_step_refused_for_now_is_sent_again_after_the_wait_and_taken_once() -> None:
    service = FakeService(retries=2)
    session = open_session(service)
    session.act([0.0, 0.0])
    service.cache_full = 2  # the act's first two tries (HTTP: Retry-After, a wait, the same call again)
    assert session.act([0.1, 0.0])[0] == 1.0
    assert [_body(c)["step"] for c in service.sent(r.ACT)][-3:] == [1, 1, 1]
    service.cache_full = 3  # more than its tries: the refusal is raised, the step not taken
    with pytest.raises(ServiceError) as info:
        session.act([0.2, 0.0])
    assert info.value.code == "cache_exhausted" and info.value.status == 503
    assert session.step == 2 and service.steps[session.session_id] == [0, 1]
    assert session.act([0.2, 0.0])[0] == 2.0


def test_a_tick_row_refused_for_now_is_resent_alone_and_the_others_are_taken_once() -> None:
    service = FakeService()
    ids, envs = open_vector(service)
    service.cache_full = 1  # the tick's first row (a 503 row error, no Retry-After on a row)
    actions = envs.act(np.zeros((3, 2)))
    assert actions[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert [service.steps[sid] for sid in ids] == [[0, 1], [0, 1], [0, 1]]
    resent = service.sent(r.ACT)
    assert len(resent) == 1 and _body(resent[0])["session_id"] == ids[0] and _body(resent[0])["step"] == 1
    assert envs.ledger.next_step.tolist() == [2, 2, 2]


@pytest.mark.anyio
async def test_a_stream_carries_its_routes_and_http_the_rest() -> None:
    service = FakeService()
    http = AsyncFake(service)
    stream = FakeStream(service, frozenset({r.ACT}))
    session = AsyncSession(http, await _create(http))
    session.transport = Routed(stream, http)
    await session.act([0.0, 0.0])
    service.drop(session.session_id)
    await session.act([0.1, 0.0])
    await session.close()
    # Step 0, step 1 refused (the session was lost), step 1 again after the recovery: all frames.
    assert [c.route for c in stream.carried] == [r.ACT] * 3 and len(service.sent(r.ACT)) == 3
    over_http = [c.route for c in service.calls if c.route is not r.ACT]
    assert over_http == [r.CREATE_SESSIONS, r.CREATE_SESSIONS, r.ACT_ITEMS, r.DELETE_SESSION]
    assert session.recoveries == 1 and service.steps[session.session_id] == [0, 1]


@pytest.mark.anyio
async def test_the_async_vector_session_closes_its_stream_and_deletes_over_http() -> None:
    service = FakeService()
    http = AsyncFake(service)
    ids, info = await run_async(http, create_sessions_flow(2, {"model": "fake"}, "key"))
    stream = FakeStream(service, frozenset({r.ACT_COLUMNAR}))
    envs = AsyncVectorSession(http, VectorLedger(info, ids, {"model": "fake"}, "key"), stream)
    await envs.act(np.zeros((2, 2)))
    await envs.close()
    assert [c.route for c in stream.carried] == [r.ACT_COLUMNAR] and stream.closed
    assert not service.sessions


async def _create(transport: AsyncTransport) -> SessionLedger:
    ledger: SessionLedger = await run_async(transport, create_flow({"model": "fake"}, new_route_key()))
    return ledger


def test_the_http_transport_encodes_by_route_not_by_path() -> None:
    seen: list[tuple[str, str, str | None]] = []

    def service(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.headers.get("content-type")))
        if request.url.path == "/v1/sessions":
            return httpx.Response(201, json={"session_id": "s0", "model": MODEL})
        if request.url.path == "/v1/act":
            return httpx.Response(200, content=packb({"action": [0.5, 0.0], "step": 0}), headers=MSGPACK)
        return httpx.Response(204)

    with PolicyClient("http://fake", encoding="msgpack", transport=httpx.MockTransport(service)) as client:
        session = client.session()
        assert session.act([0.0, 0.0]).tolist() == [0.5, 0.0]
        session.close()
        client.send(Call("POST", "/v1/act", {"session_id": "s0"}))  # no route: a plain JSON request
    assert seen == [
        ("POST", "/v1/sessions", "application/json"),
        ("POST", "/v1/act", "application/msgpack"),
        ("DELETE", "/v1/sessions/s0", None),
        ("POST", "/v1/act", "application/json"),
    ]


def test_the_client_modules_import_no_cycle() -> None:
    package = Path(trmrl_client.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        name = "trmrl_client" if path.stem == "__init__" else f"trmrl_client.{path.stem}"
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "trmrl_client":
                imported |= {f"trmrl_client.{a.name}" for a in node.names}  # submodules
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trmrl_client."):
                imported.add(str(node.module))
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("trmrl_client")}
        graph[name] = imported - {name}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        if module in done:
            return
        for other in sorted(graph.get(module, ())):
            visit(other, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert "trmrl_client.http" not in graph["trmrl_client.websocket"] | graph["trmrl_client.vector"]


def test_a_stream_frame_refused_for_now_is_tried_again_after_a_wait_and_others_stand() -> None:
    def frame(code: str) -> dict[str, Any]:
        return {"error": {"code": code, "message": code, "detail": {}}}

    for code, status in (("cache_exhausted", 503), ("overloaded", 503), ("capacity_exhausted", 429)):
        reply = _refusal(frame(code))
        assert (reply.status, reply.retry_after) == (status, FRAME_RETRY_S), code
    for code, status in (("context_full", 409), ("step_conflict", 409), ("wrong_shape", 422)):
        reply = _refusal(frame(code))
        assert (reply.status, reply.retry_after) == (status, None), code
