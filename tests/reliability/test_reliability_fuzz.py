"""Property-based fuzzing of the act bodies and codecs (JSON, MessagePack, WebSocket frames), in process.

Every request goes to one session of key A (and to made-up or foreign ids): no reply is a 5xx, nothing
hangs, and a refused request leaves the session exactly as it was (its ``GET .../state`` before and
after are equal). ``TRMRL_LONG=1`` runs ten times the examples.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from reliability_support import A
from starlette.testclient import TestClient
from trmrl_client.codec import CodecError, packb, unpackb

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 1500 if os.environ.get("TRMRL_LONG") == "1" else 120
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("TRMRL_LONG") != "1",  # CI: the same cases every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def fuzzed(test: Callable[..., None]) -> Callable[..., None]:
    """A fuzz test: its ``data`` drawn by hypothesis with the :data:`FUZZ` settings, ten minutes at most."""
    return pytest.mark.timeout(600)(FUZZ(given(data=st.data())(test)))


#: Replies by codec and status (printed at the end: the figures of docs/reliability.md).
SEEN: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    for name in ("json", "msgpack", "websocket"):
        statuses = {s: n for (k, s), n in sorted(SEEN.items()) if k == name}
        print(f"\nfuzz {name}: {sum(statuses.values())} requests/frames, by status {statuses}")


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
vectors = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=4)
FIELDS = ["session_id", "model", "observation", "reward", "episode_start", "step", "applied_action"]


def act_bodies(sid: str, next_step: int) -> st.SearchStrategy[dict[str, Any]]:
    field = {
        "session_id": st.sampled_from([sid, sid, "no-such-session", ""]) | st.text(max_size=20),
        "model": st.sampled_from(["point-nav", "../point-nav", None]) | st.text(max_size=10),
        "observation": st.just([0.25, -0.5]) | vectors | values,
        "reward": st.floats(allow_nan=True, allow_infinity=True) | values,
        "episode_start": st.booleans() | values,
        "step": st.sampled_from([next_step, next_step - 1, next_step + 1, 0, -1, 2**63]) | values,
        "applied_action": vectors | values,
        "extra": values,
    }
    return st.fixed_dictionaries({}, optional=field)


def state_of(http: TestClient, sid: str) -> dict[str, Any]:
    r = http.get(f"/v1/sessions/{sid}/state", headers=A)
    assert r.status_code == 200, r.text
    return dict(r.json())


def changed_target(status: int, reply: Any, sid: str, batch: bool) -> bool:
    """Whether the reply says the target session may have moved (a successful step or reset)."""
    if status >= 400:
        return False
    if batch:
        return any(isinstance(i, dict) and i.get("session_id") == sid for i in reply.get("items", []))
    return True


class Target:
    """The session every fuzz request aims at, and its last known state."""

    def __init__(self, http: TestClient, name: str) -> None:
        self.http = http
        self.sid = http.post("/v1/sessions", json={}).json()["session_id"]
        for step in range(2):
            http.post("/v1/act", json={"session_id": self.sid, "observation": [0.1, 0.2], "step": step})
        self.state = state_of(http, self.sid)
        self.name = name

    def check(self, status: int, reply: Any, *, batch: bool = False) -> None:
        SEEN[self.name, status] += 1
        assert status < 500, reply
        after = state_of(self.http, self.sid)
        if not changed_target(status, reply, self.sid, batch):
            assert after == self.state, f"a refused request ({status}: {reply}) changed the session"
        self.state = after


ROUTES = ["/v1/act", "/act", "/v1/act/batch", "/v1/sessions/{sid}/reset", "/v1/sessions/{sid}/state"]


@pytest.fixture(scope="module")
def json_target(http: TestClient) -> Target:
    return Target(http, "json")


@pytest.fixture(scope="module")
def msgpack_target(http: TestClient) -> Target:
    return Target(http, "msgpack")


@pytest.fixture(scope="module")
def ws_target(http: TestClient) -> Target:
    return Target(http, "websocket")


def _send(http: TestClient, target: Target, route: str, body: bytes, kind: str) -> None:
    method = "PUT" if route.endswith("state") else "POST"
    r = http.request(method, route.format(sid=target.sid), content=body, headers={"Content-Type": kind})
    reply: Any = None
    if r.content:
        reply = unpackb(r.content) if "msgpack" in r.headers.get("content-type", "") else r.json()
    target.check(r.status_code, reply, batch=route.endswith("batch"))


@fuzzed
def test_fuzzed_json_bodies_never_fail_the_service_or_move_the_session(
    http: TestClient, json_target: Target, data: st.DataObject
) -> None:
    route = data.draw(st.sampled_from(ROUTES))
    shape = data.draw(st.sampled_from(["act", "raw", "value"]))
    if shape == "act":
        obj: Any = data.draw(act_bodies(json_target.sid, json_target.state["steps"]))
        if route.endswith("batch"):
            obj = {"items": data.draw(st.lists(st.just(obj) | act_bodies("x", 0), max_size=3))}
        body = json.dumps(obj).encode()  # NaN/Infinity become the non-JSON literals: refused
    elif shape == "raw":
        body = data.draw(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
    else:
        body = json.dumps(data.draw(values)).encode()
    kind = data.draw(st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]))
    _send(http, json_target, route, body, kind)


def arrays() -> st.SearchStrategy[Any]:
    """msgpack-numpy maps, honest and not: odd dtypes (object, strings, complex), lying shapes and sizes."""
    dtype = st.sampled_from(
        ["<f4", "<f8", ">f4", "<i8", "|u1", "|b1", "|O", "<U3", "|V8", "<c16", "bogus", ""]
    )
    shape = st.lists(st.integers(-2, 4), max_size=3) | st.just([2])
    raw = st.fixed_dictionaries(
        {"__ndarray__": st.just(True), "data": st.binary(max_size=32), "dtype": dtype, "shape": shape}
    )
    honest = st.lists(st.floats(width=32), min_size=0, max_size=4).map(lambda v: np.asarray(v, np.float32))
    return raw | honest


@fuzzed
def test_fuzzed_msgpack_bodies_never_fail_the_service_or_move_the_session(
    http: TestClient, msgpack_target: Target, data: st.DataObject
) -> None:
    route = data.draw(st.sampled_from(ROUTES))
    if data.draw(st.booleans()):
        body = data.draw(st.binary(max_size=64))
    else:
        obj = data.draw(act_bodies(msgpack_target.sid, msgpack_target.state["steps"]))
        for key in ("observation", "applied_action"):
            if data.draw(st.booleans()):
                obj[key] = data.draw(arrays())
        if route.endswith("batch"):
            obj = {"items": [obj]}
        try:
            body = packb(obj)
        except (TypeError, ValueError, OverflowError, CodecError):
            body = packb(
                {"observation": [math.nan, 0.0], "session_id": msgpack_target.sid, "step": 0}
            )  # what msgpack cannot carry, it cannot send either
    _send(http, msgpack_target, route, body, "application/msgpack")


@fuzzed
def test_fuzzed_stream_frames_get_a_reply_and_never_move_the_session_when_refused(
    http: TestClient, ws_target: Target, data: st.DataObject
) -> None:
    frames = data.draw(st.lists(st.tuples(st.booleans(), st.data()), min_size=1, max_size=4))
    with http.websocket_connect(f"/v1/sessions/{ws_target.sid}/stream", headers=A) as ws:
        for binary, frame_data in frames:
            obj = frame_data.draw(act_bodies(ws_target.sid, ws_target.state["steps"]))
            obj.pop("session_id", None)
            obj.pop("model", None)
            if binary:
                raw = frame_data.draw(st.binary(max_size=48) | st.just(b""))
                try:
                    payload = packb(obj) if frame_data.draw(st.booleans()) else raw
                except (TypeError, ValueError, OverflowError, CodecError):
                    payload = raw
                ws.send_bytes(payload)
                reply = unpackb(ws.receive_bytes())
            else:
                text = (
                    json.dumps(obj)
                    if frame_data.draw(st.booleans())
                    else frame_data.draw(st.text(max_size=48))
                )
                ws.send_text(text)
                reply = ws.receive_json()
            status = 200 if "error" not in reply else 400
            ws_target.check(status, reply)
