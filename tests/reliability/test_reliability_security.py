"""Security, checked: no unsafe deserialisation anywhere, model names never touch the file system,
body and frame size limits hold, and a session is invisible to other keys on every route."""

from __future__ import annotations

import ast
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_support import REPO, A, B
from starlette.testclient import TestClient, WebSocketDenialResponse
from trmrl_client.codec import packb, unpackb

# -- 1. no pickle / eval / exec / unsafe loaders on any code path ----------------------------------------
SCANNED = ["service", "clients/trmrl_client", "clients/sim/trmrl_sim", "trmrl", "trainer", "bench"]
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}
#: Calls that are safe as written here, by file and call: the trainer reloads its *own* training state.
ALLOWED = {("trainer/run.py", "torch.load")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_uses(path: Path, rel: str) -> list[str]:
    """Every unsafe import or call in one source file, as ``file:line what``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in BANNED_MODULES:
                    found.append(f"{where} imports {name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in BANNED_CALLS or (name.split(".")[-1] in {"loads", "load"} and "pickle" in name):
            found.append(f"{where} calls {name}")
        elif name.endswith("torch.load"):
            if not _is_true(_keyword(node, "weights_only")):
                found.append(f"{where} calls torch.load without weights_only=True")
            elif (rel, "torch.load") not in ALLOWED:
                found.append(f"{where} calls torch.load (weights_only, but not on the allow-list)")
        elif name in {"yaml.load", "yaml.unsafe_load", "yaml.full_load"}:
            found.append(f"{where} calls {name}")
        elif name.endswith(("np.load", "numpy.load")) and _is_true(_keyword(node, "allow_pickle")):
            found.append(f"{where} calls np.load with allow_pickle=True")
        elif name.endswith("msgpack.unpackb") and _keyword(node, "ext_hook") is not None:
            found.append(f"{where} decodes MessagePack extension types")
    return found


def test_no_code_path_unpickles_or_evaluates_client_data() -> None:
    files = [p for d in SCANNED for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 40, "the scan found too few files: paths wrong?"
    found = [use for p in files for use in unsafe_uses(p, p.relative_to(REPO).as_posix())]
    assert found == []


def test_the_scan_catches_what_it_bans(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, yaml, numpy as np\n"
        "pickle.loads(b'')\neval('1')\nexec('1')\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
        "yaml.load('')\nnp.load('x', allow_pickle=True)\n"
        "torch.load('x', weights_only=True)\n"
    )
    assert len(unsafe_uses(bad, "bad.py")) == 9  # the last call is safe, but not allow-listed there


# -- 2. model names never reach the file system --------------------------------------------------------
HOSTILE_NAMES = [
    "../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "/etc/passwd",
    "checkpoints/point-nav",
    str(REPO / "checkpoints" / "point-nav"),
    "point-nav/../point-nav",
    "C:\\Windows\\win.ini",
    "point-nav\x00",
    "~root/.ssh/id_rsa",
]


class FileWatch:
    """Records file-system events (``sys.addaudithook``) while armed. A hook cannot be removed, so one
    is installed per process and switched on and off."""

    armed = False
    events: list[str] = []  # noqa: RUF012

    @classmethod
    def hook(cls, event: str, args: tuple[Any, ...]) -> None:
        if cls.armed and (event == "open" or event.startswith(("os.", "shutil.", "pathlib."))):
            cls.events.append(f"{event} {args[:1]!r}")

    @classmethod
    @contextlib.contextmanager
    def watching(cls) -> Iterator[list[str]]:
        if not getattr(sys, "_trmrl_file_watch", False):
            sys.addaudithook(cls.hook)
            sys._trmrl_file_watch = True  # type: ignore[attr-defined]
        cls.events = []
        cls.armed = True
        try:
            yield cls.events
        finally:
            cls.armed = False


def test_the_file_watch_sees_file_access() -> None:
    with FileWatch.watching() as events:
        (REPO / "checkpoints" / "point-nav" / "config.json").read_bytes()
    assert any("config.json" in e for e in events)


def _model_name_requests(name: str, snapshot: dict[str, Any]) -> list[tuple[str, str, Any]]:
    state = {**snapshot, "session_id": "s1", "model": name}  # a valid snapshot but for its model
    return [
        ("POST", "/v1/sessions", {"model": name}),
        ("POST", "/v1/act", {"model": name, "observation": [0.0, 0.0]}),
        ("POST", "/act", {"model": name, "observation": [0.0, 0.0]}),
        ("PUT", "/v1/sessions/s1/state", state),
    ]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_model_names_are_only_dictionary_keys(http: TestClient, name: str) -> None:
    registry = http.app.state.registry  # type: ignore[attr-defined]
    assert type(registry.engines) is dict
    sid = http.post("/v1/sessions", json={}).json()["session_id"]
    snapshot = http.get(f"/v1/sessions/{sid}/state").json()
    before = len(registry.engines["point-nav"].table)
    with FileWatch.watching() as events:
        for method, path, body in _model_name_requests(name, snapshot):
            r = http.request(method, path, json=body)
            assert r.status_code == 404, (path, r.text)
            assert r.json()["error"]["code"] == "unknown_model"
        r = http.post("/v1/act/batch", json={"items": [{"model": name, "observation": [0.0, 0.0]}]})
        assert r.status_code == 200 and r.json()["items"][0]["error"]["code"] == "unknown_model"
        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            http.websocket_connect("/v1/openpi", params={"model": name}, headers=A),
        ):
            pass
        assert denied.value.status_code == 404
    touched = [e for e in events if any(part in e for part in ("passwd", "win.ini", "ssh", "checkpoints"))]
    assert touched == [], touched
    assert len(registry.engines["point-nav"].table) == before


# -- 3. body and frame size limits -----------------------------------------------------------------------
def test_bodies_over_the_limit_are_refused_declared_or_streamed(http: TestClient) -> None:
    big = {"observation": [0.0, 0.0], "pad": "x" * 8192}
    for path in ("/v1/act", "/act", "/v1/act/batch", "/v1/sessions", "/v1/sessions/x/state"):
        method = "PUT" if path.endswith("state") else "POST"
        r = http.request(method, path, json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", path

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size is what counts
        yield b'{"observation": [0.0, 0.0], "pad": "'
        for _ in range(20):
            yield b"x" * 1024
        yield b'"}'

    r = http.post("/v1/act", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = http.post("/v1/act", content=packb(big), headers={"Content-Type": "application/msgpack"})
    assert r.status_code == 413 and unpackb(r.content)["error"]["code"] == "body_too_large"


def test_stream_frames_over_the_limit_get_an_error_frame_and_the_stream_lives(http: TestClient) -> None:
    sid = http.post("/v1/sessions", json={}).json()["session_id"]
    with http.websocket_connect(f"/v1/sessions/{sid}/stream", headers=A) as ws:
        ws.send_text('{"observation": [0.0, 0.0], "pad": "' + "x" * 8192 + '"}')
        assert ws.receive_json()["error"]["code"] == "body_too_large"
        ws.send_bytes(packb({"observation": [0.0, 0.0], "pad": b"x" * 8192}))
        assert unpackb(ws.receive_bytes())["error"]["code"] == "body_too_large"
        ws.send_text('{"observation": [0.0, 0.0], "step": 0}')
        assert ws.receive_json()["step"] == 0
    assert http.get(f"/v1/sessions/{sid}").json()["steps"] == 1


# -- 4. session isolation on every route -----------------------------------------------------------------
def _state(http: TestClient, sid: str) -> dict[str, Any]:
    r = http.get(f"/v1/sessions/{sid}/state", headers=A)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _http(method: str, path: str, body: Callable[[str, dict[str, Any]], Any] | None = None) -> Any:
    def attempt(http: TestClient, sid: str, state: dict[str, Any]) -> None:
        payload = body(sid, state) if body is not None else None
        r = http.request(method, path.format(sid=sid), json=payload, headers=B)
        if path.endswith("batch"):
            assert r.status_code == 200
            r_items = r.json()["items"]
            assert [i["error"]["code"] for i in r_items] == ["unknown_session"]
            return
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "unknown_session"

    return attempt


def _stream(http: TestClient, sid: str, state: dict[str, Any]) -> None:
    with (
        pytest.raises(WebSocketDenialResponse) as denied,
        http.websocket_connect(f"/v1/sessions/{sid}/stream", headers=B),
    ):
        pass
    assert denied.value.status_code == 404


def _openpi(http: TestClient, sid: str, state: dict[str, Any]) -> None:
    for header in (B, {"Authorization": "Api-Key key-b"}):
        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            http.websocket_connect("/v1/openpi", params={"session_id": sid}, headers=header),
        ):
            pass
        assert denied.value.status_code == 404


def _step(sid: str, state: dict[str, Any]) -> dict[str, Any]:
    return {"session_id": sid, "observation": [0.5, -0.5], "step": state["steps"]}


ROUTES: dict[str, Callable[[TestClient, str, dict[str, Any]], None]] = {
    "GET session": _http("GET", "/v1/sessions/{sid}"),
    "DELETE session": _http("DELETE", "/v1/sessions/{sid}"),
    "POST reset episode": _http("POST", "/v1/sessions/{sid}/reset", lambda s, st: {"scope": "episode"}),
    "POST reset trial": _http("POST", "/v1/sessions/{sid}/reset", lambda s, st: {"scope": "trial"}),
    "GET state": _http("GET", "/v1/sessions/{sid}/state"),
    "PUT state (claim)": _http("PUT", "/v1/sessions/{sid}/state", lambda s, st: {**st, "steps": 0}),
    "POST /v1/act": _http("POST", "/v1/act", _step),
    "POST /act": _http("POST", "/act", _step),
    "POST /v1/act (retry of last step)": _http(
        "POST", "/v1/act", lambda s, st: {**_step(s, st), "step": st["steps"] - 1}
    ),
    "POST /v1/act/batch item": _http("POST", "/v1/act/batch", lambda s, st: {"items": [_step(s, st)]}),
    "WS stream": _stream,
    "WS openpi": _openpi,
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_another_key_cannot_see_or_touch_a_session_on_any_route(http: TestClient, route: str) -> None:
    sid = http.post("/v1/sessions", json={}, headers=A).json()["session_id"]
    for step in range(3):
        r = http.post("/v1/act", json={"session_id": sid, "observation": [0.1 * step, 0.2], "step": step})
        assert r.status_code == 200
    before = _state(http, sid)
    ROUTES[route](http, sid, before)
    assert _state(http, sid) == before
    # ... and the owner still steps it.
    r = http.post("/v1/act", json={"session_id": sid, "observation": [0.0, 0.0], "step": 3}, headers=A)
    assert r.status_code == 200, r.text


def test_streams_of_two_keys_interleave_without_crossing(http: TestClient) -> None:
    sa = http.post("/v1/sessions", json={}, headers=A).json()["session_id"]
    sb = http.post("/v1/sessions", json={}, headers=B).json()["session_id"]
    with (
        http.websocket_connect(f"/v1/sessions/{sa}/stream", headers=A) as wa,
        http.websocket_connect(f"/v1/sessions/{sb}/stream", headers=B) as wb,
    ):
        for step in range(4):
            wa.send_text(f'{{"observation": [0.1, 0.2], "step": {step}}}')
            wb.send_text(f'{{"observation": [0.3, 0.4], "step": {step}}}')
            ra, rb = wa.receive_json(), wb.receive_json()
            assert (ra["session_id"], ra["step"]) == (sa, step)
            assert (rb["session_id"], rb["step"]) == (sb, step)


# -- 5. the service image does not run as root ----------------------------------------------------------
def test_the_service_image_runs_as_a_non_root_user() -> None:
    lines = (REPO / "docker" / "service.Dockerfile").read_text(encoding="utf-8").splitlines()
    users = [line.split()[1] for line in lines if line.strip().upper().startswith("USER ")]
    assert users, "the service image sets no USER: it would run as root"
    assert users[-1] not in {"root", "0", "0:0"}
