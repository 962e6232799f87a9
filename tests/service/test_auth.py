"""API keys: every /v1 route and /act (fast path included) need one; sessions belong to their key."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from service_support import ServiceClient, assert_error

from service.app import create_app
from service.config import Settings

pytestmark = pytest.mark.anyio

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}

MakeClient = Callable[..., Awaitable[ServiceClient]]


@pytest.fixture
async def keyed(make_client: MakeClient) -> ServiceClient:
    return await make_client(api_keys=["key-a", "key-b"])


ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/sessions", {}),
    ("GET", "/v1/sessions/abc", None),
    ("DELETE", "/v1/sessions/abc", None),
    ("POST", "/v1/sessions/abc/reset", {}),
    ("GET", "/v1/sessions/abc/state", None),
    ("PUT", "/v1/sessions/abc/state", {}),
    ("POST", "/v1/act", {"observation": [0.0, 0.0]}),
    ("POST", "/act", {"observation": [0.0, 0.0]}),
    ("POST", "/v1/act/batch", {"items": []}),
]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic a2V5LWE="},
        {"Authorization": "Api-Key key-a"},
    ],
    ids=["missing", "wrong-key", "other-scheme", "api-key-scheme-http"],
)
async def test_every_v1_route_and_act_needs_a_valid_key(
    keyed: ServiceClient, headers: dict[str, str]
) -> None:
    for method, path, body in ROUTES:
        r = await keyed.request(method, path, json=body, headers=headers)
        assert_error(r, 401, "unauthorized")
    assert len(keyed.registry.engines["point-nav"].table) == 0


async def test_probes_metrics_and_docs_are_open(keyed: ServiceClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await keyed.get(path)).status_code == 200, path


async def test_sessions_are_visible_only_to_the_key_that_created_them(keyed: ServiceClient) -> None:
    r = await keyed.post("/v1/act", json={"observation": [0.1, 0.2]}, headers=A)
    assert r.status_code == 200
    sid = r.json()["session_id"]
    for method, path, body in [
        ("GET", f"/v1/sessions/{sid}", None),
        ("POST", f"/v1/sessions/{sid}/reset", {}),
        ("GET", f"/v1/sessions/{sid}/state", None),
        ("DELETE", f"/v1/sessions/{sid}", None),
    ]:
        assert_error(await keyed.request(method, path, json=body, headers=B), 404, "unknown_session")
    r = await keyed.post("/v1/act", json={"session_id": sid, "observation": [0.1, 0.2], "step": 1}, headers=B)
    assert_error(r, 404, "unknown_session")
    r = await keyed.post(
        "/v1/act/batch", json={"items": [{"session_id": sid, "observation": [0.1, 0.2]}]}, headers=B
    )
    assert r.json()["items"][0]["error"]["code"] == "unknown_session"
    # Another key's snapshot PUT cannot claim the id either.
    state = (await keyed.get(f"/v1/sessions/{sid}/state", headers=A)).json()
    assert_error(await keyed.put(f"/v1/sessions/{sid}/state", json=state, headers=B), 404, "unknown_session")
    # The owner still sees an untouched session.
    info = (await keyed.get(f"/v1/sessions/{sid}", headers=A)).json()
    assert info["steps"] == 1
    r = await keyed.post("/v1/act", json={"session_id": sid, "observation": [0.1, 0.2], "step": 1}, headers=A)
    assert r.status_code == 200


async def test_keys_from_a_file_are_accepted(make_client: MakeClient, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("file-key\n")
    client = await make_client(api_keys_file=keys)
    assert (await client.get("/v1/models", headers={"Authorization": "Bearer file-key"})).status_code == 200
    assert_error(await client.get("/v1/models"), 401, "unauthorized")


async def test_no_keys_logs_a_warning(checkpoints: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(models=list(checkpoints.values())))
    with caplog.at_level(logging.WARNING, logger="trmrl.service"):
        async with app.router.lifespan_context(app):
            pass
    assert any("no API keys" in r.getMessage() for r in caplog.records)
    caplog.clear()
    app = create_app(Settings(models=list(checkpoints.values()), api_keys=["k"]))
    with caplog.at_level(logging.WARNING, logger="trmrl.service"):
        async with app.router.lifespan_context(app):
            pass
    assert not any("no API keys" in r.getMessage() for r in caplog.records)
