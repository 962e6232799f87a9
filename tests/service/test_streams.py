"""WebSocket streams in process (Starlette's test client): frames, error frames, auth, idempotent steps."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from trmrl_client.codec import packb, unpackb

from service.app import create_app
from service.config import Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "install httpx2 instead": the test client works with httpx
    from starlette.testclient import TestClient, WebSocketDenialResponse

OBS = [[0.3, -0.2], [0.1, 0.4], [-0.5, 0.25], [0.9, -0.9], [0.05, 0.6]]
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


@pytest.fixture(scope="module")
def http(checkpoints: dict[str, Path]) -> Iterator[TestClient]:
    app = create_app(Settings(models=list(checkpoints.values()), api_keys=["key-a", "key-b"]))
    with TestClient(app, headers=A) as client:
        yield client


def refused(client: TestClient, url: str, headers: dict[str, str]) -> WebSocketDenialResponse:
    """The HTTP reply that turned a WebSocket handshake down."""
    with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect(url, headers=headers):
        pass
    return denied.value


def new_session(http: TestClient) -> str:
    r = http.post("/v1/sessions", json={})
    assert r.status_code == 201
    return str(r.json()["session_id"])


def http_action(http: TestClient, sid: str, obs: list[float], **fields: Any) -> list[float]:
    r = http.post("/v1/act", json={"session_id": sid, "observation": obs, **fields})
    assert r.status_code == 200, r.text
    return list(r.json()["action"])


def test_json_and_msgpack_frames_step_like_http(http: TestClient) -> None:
    reference, text_sid, binary_sid = new_session(http), new_session(http), new_session(http)
    with (
        http.websocket_connect(f"/v1/sessions/{text_sid}/stream", headers=A) as text_ws,
        http.websocket_connect(f"/v1/sessions/{binary_sid}/stream", headers=A) as binary_ws,
    ):
        for step, obs in enumerate(OBS):
            want = http_action(http, reference, obs, reward=0.5, step=step)
            text_ws.send_text(json.dumps({"observation": obs, "reward": 0.5, "step": step}))
            got = json.loads(text_ws.receive_text())
            assert (got["session_id"], got["step"]) == (text_sid, step)
            np.testing.assert_array_equal(got["action"], want)
            binary_ws.send_bytes(
                packb({"observation": np.asarray(obs, np.float32), "reward": np.float32(0.5)})
            )
            got = unpackb(binary_ws.receive_bytes())
            assert got["step"] == step
            np.testing.assert_allclose(got["action"], want, rtol=0, atol=1e-6)
        # A retry of the newest step repeats its action without advancing memory.
        text_ws.send_text(json.dumps({"observation": OBS[0], "step": len(OBS) - 1}))
        np.testing.assert_array_equal(json.loads(text_ws.receive_text())["action"], got["action"])
    metrics = http.get("/metrics").text
    assert 'route="/v1/sessions/{session_id}/stream",status="200"}' in metrics
    assert 'trmrl_open_streams{route="stream"} 0.0' in metrics
    # Closing the streams leaves the sessions usable over HTTP.
    assert http.get(f"/v1/sessions/{text_sid}").json()["steps"] == len(OBS)
    np.testing.assert_array_equal(
        http_action(http, text_sid, OBS[1], step=len(OBS)),
        http_action(http, reference, OBS[1], step=len(OBS)),
    )


BAD_FRAMES: list[tuple[str, str | bytes, str]] = [
    ("bad-json", "{", "malformed_json"),
    ("bad-msgpack", b"\xc1", "malformed_msgpack"),
    ("object-dtype", packb({"observation": [0.0, 0.0]})[:1] + b"\x00", "malformed_msgpack"),
    ("short-observation", json.dumps({"observation": [0.1]}), "wrong_observation_length"),
    ("nan", packb({"observation": np.array([np.nan, 0.0], np.float32)}), "non_finite"),
    ("unknown-field", json.dumps({"observation": [0.1, 0.2], "session_id": "x"}), "unknown_field"),
    ("step-ahead", json.dumps({"observation": [0.1, 0.2], "step": 9}), "step_conflict"),
    ("not-a-map", packb([1, 2]), "wrong_type"),
]


@pytest.mark.parametrize(("frame", "code"), [b[1:] for b in BAD_FRAMES], ids=[b[0] for b in BAD_FRAMES])
def test_a_bad_frame_gets_an_error_frame_and_the_stream_stays_open(
    http: TestClient, frame: str | bytes, code: str
) -> None:
    target, twin = new_session(http), new_session(http)
    for sid in (target, twin):
        http_action(http, sid, OBS[0], step=0)
    with http.websocket_connect(f"/v1/sessions/{target}/stream", headers=A) as ws:
        if isinstance(frame, bytes):
            ws.send_bytes(frame)
            error = unpackb(ws.receive_bytes())["error"]
        else:
            ws.send_text(frame)
            error = json.loads(ws.receive_text())["error"]
        assert error["code"] == code and error["message"]
        ws.send_text(json.dumps({"observation": OBS[1], "reward": 1.0, "step": 1}))
        got = json.loads(ws.receive_text())
    np.testing.assert_array_equal(got["action"], http_action(http, twin, OBS[1], reward=1.0, step=1))


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer nope"}, 401, "unauthorized"),
        (B, 404, "unknown_session"),
    ],
    ids=["no-key", "bad-key", "other-key"],
)
def test_streams_need_the_owner_key(
    http: TestClient, headers: dict[str, str], status: int, code: str
) -> None:
    sid = new_session(http)
    bare = TestClient(http.app)  # no default key; the app is already serving (its lifespan runs in ``http``)
    denied = refused(bare, f"/v1/sessions/{sid}/stream", headers)
    assert denied.status_code == status and denied.json()["error"]["code"] == code


def test_unknown_session_is_refused(http: TestClient) -> None:
    assert refused(http, "/v1/sessions/nope/stream", A).status_code == 404


def test_openpi_in_process_errors_come_as_text(http: TestClient) -> None:
    with http.websocket_connect(
        "/v1/openpi?model=point-nav", headers={"Authorization": "Api-Key key-a"}
    ) as ws:
        metadata = unpackb(ws.receive_bytes())
        assert metadata["act_dim"] == 2 and metadata["name"] == "point-nav"
        ws.send_text("{}")
        assert json.loads(ws.receive_text())["error"]["code"] == "unsupported_frame"
        ws.send_bytes(packb({"observation": np.zeros(3, np.float32)}))
        assert json.loads(ws.receive_text())["error"]["code"] == "wrong_observation_length"
        ws.send_bytes(packb({"observation": np.zeros(2, np.float32)}))
        reply = unpackb(ws.receive_bytes())
        assert reply["actions"].shape == (1, 2) and reply["actions"].dtype == np.float32
    denied = refused(http, "/v1/openpi?model=nope", {"Authorization": "Api-Key key-a"})
    assert denied.status_code == 404 and denied.json()["error"]["code"] == "unknown_model"
    # The session outlives the connection: the same key can see it.
    assert http.get(f"/v1/sessions/{metadata['session_id']}").json()["steps"] == 1


def test_disconnect_mid_stream_is_clean(http: TestClient) -> None:
    sid = new_session(http)
    with http.websocket_connect(f"/v1/sessions/{sid}/stream", headers=A) as ws:
        ws.send_text(json.dumps({"observation": OBS[0]}))
        ws.receive_text()
        ws.close()
    assert http.get(f"/v1/sessions/{sid}").json()["steps"] == 1


# -- the vectorised stream ---------------------------------------------------------------------------------
def new_sessions(http: TestClient, count: int) -> list[str]:
    r = http.post("/v1/sessions", json={"count": count})
    assert r.status_code == 201, r.text
    return list(r.json()["session_ids"])


def vector_frame(ws: Any, frame: dict[str, Any], binary: bool) -> dict[str, Any]:
    if binary:
        ws.send_bytes(packb(frame))
        return dict(unpackb(ws.receive_bytes()))
    ws.send_text(json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in frame.items()}))
    return dict(json.loads(ws.receive_text()))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_vector_stream_steps_ticks_like_single_sessions(http: TestClient, binary: bool) -> None:
    ids = new_sessions(http, 3)
    alone = [new_session(http) for _ in range(3)]
    with http.websocket_connect("/v1/stream?model=point-nav", headers=A) as ws:
        for step in range(3):
            obs = np.asarray(OBS[step : step + 3], np.float32)
            frame = {"session_ids": ids, "observations": obs, "rewards": np.full(3, 0.5), "steps": [step] * 3}
            reply = vector_frame(ws, frame, binary)
            assert reply["errors"] == [] and list(reply["steps"]) == [step] * 3
            again = vector_frame(ws, frame, binary)  # a re-sent tick: same actions, memory not advanced
            np.testing.assert_array_equal(np.asarray(again["actions"]), np.asarray(reply["actions"]))
            for i, sid in enumerate(alone):
                want = http_action(http, sid, obs[i].tolist(), reward=0.5, step=step)
                np.testing.assert_allclose(np.asarray(reply["actions"], np.float32)[i], want, atol=1e-6)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_vector_stream_row_errors_and_error_frames_keep_it_open(http: TestClient, binary: bool) -> None:
    good, conflict = new_sessions(http, 2)
    with http.websocket_connect("/v1/stream", headers=A) as ws:
        reply = vector_frame(
            ws,
            {"session_ids": [good, conflict, "0" * 32], "observations": OBS[:3], "steps": [0, 4, 0]},
            binary,
        )
        codes = [(e["row"], e["error"]["code"]) for e in reply["errors"]]
        assert codes == [(1, "step_conflict"), (2, "unknown_session")]
        assert np.isnan(np.asarray(reply["actions"], np.float32)[1:]).all()
        malformed = [
            {"session_ids": [good, good], "observations": OBS[:2]},
            {"session_ids": [good], "observations": [[0.0, 0.0, 0.0]]},
            {"session_ids": [good], "observations": OBS[:1], "rewards": [1.0, 2.0]},
            {"observations": OBS[:1]},
        ]
        for frame in malformed:
            error = vector_frame(ws, frame, binary)["error"]
            assert error["code"] in {
                "duplicate_session",
                "wrong_observation_length",
                "length_mismatch",
                "missing_field",
            }
        if binary:
            ws.send_bytes(b"\xc1")  # not MessagePack
            assert unpackb(ws.receive_bytes())["error"]["code"] == "malformed_msgpack"
        else:
            ws.send_text("{")
            assert json.loads(ws.receive_text())["error"]["code"] == "malformed_json"
        after = vector_frame(
            ws, {"session_ids": [good, conflict], "observations": OBS[:2], "steps": [1, 0]}, binary
        )
        assert after["errors"] == []  # still open, and the refused rows changed nothing
    assert http.get(f"/v1/sessions/{conflict}").json()["steps"] == 1


def test_vector_stream_refuses_an_unknown_model_and_a_missing_key(http: TestClient) -> None:
    assert refused(http, "/v1/stream?model=nope", A).status_code == 404
    assert refused(http, "/v1/stream", {"Authorization": "Bearer wrong"}).status_code == 401


def test_vector_stream_sessions_stay_private(http: TestClient) -> None:
    mine = new_sessions(http, 1)
    with http.websocket_connect("/v1/stream", headers=B) as ws:
        reply = vector_frame(ws, {"session_ids": mine, "observations": OBS[:1]}, True)
        assert [e["error"]["code"] for e in reply["errors"]] == ["unknown_session"]
