"""The fleet feed (``GET /v1/fleet``) and the page's files (``GET /ui``), in process: the feed's figures
from the service's counters, the adaptation curves and returns, the session list and its filter, bad
input, keys (admin, viewer, API) and the OpenAPI document."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_support import (
    ADMIN,
    OBS,
    USER,
    VIEWER,
    Serve,
    ServiceClient,
    action,
    assert_error,
    new_session,
    serve_root,
    versions_root,
)

from bench import browser
from service.api.routes.fleet import ASSETS, EXAMPLE, FleetFeed
from service.core.adaptation import AdaptationCurves
from service.core.session_table import SessionTable
from service.fleet_readings import quantile

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return versions_root(tmp_path_factory.mktemp("fleet-root"), other={"seed": 2, "policy_out_gain": 0.1})


@pytest.fixture
def serve(root: Path) -> Serve:
    return serve_root(root, ["point-nav", "other"])


async def feed(client: ServiceClient, **params: Any) -> dict[str, Any]:
    r = await client.get("/v1/fleet", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body: dict[str, Any] = r.json()
    FleetFeed.model_validate(body)  # the documented shape, exactly
    return body


async def run_episodes(client: ServiceClient, sid: str, rewards: list[list[float]]) -> None:
    """Episodes of a session: ``rewards[e][k]`` is the reward for the action at step ``k + 1``."""
    step = 0
    for episode in rewards:
        await action(client, sid, OBS[0], episode_start=True, step=step)
        step += 1
        for k, reward in enumerate(episode):
            await action(client, sid, OBS[(k + 1) % len(OBS)], reward=reward, step=step)
            step += 1


async def test_feed_shows_models_traffic_curves_and_sessions(serve: Serve) -> None:
    async with serve() as client:
        sid = await new_session(client, model="point-nav")
        await run_episodes(client, sid, [[1.0, 2.0, 3.0], [4.0, 6.0]])
        # The next episode's start closes the second one.
        await action(client, sid, OBS[0], episode_start=True, step=7)
        client.app.state.fleet.tick()  # the feed's rates come from the newest reading
        body = await feed(client)
        rows = {m["model"]: m for m in body["models"]}
        assert set(rows) == {"point-nav", "other"}
        nav = rows["point-nav"]
        assert nav["active"] and nav["canary_share"] == 0.0
        assert nav["sessions"] == 1 and nav["steps_total"] == 8
        assert nav["actions_per_s"] > 0 and body["totals"]["actions_per_s"] > 0
        assert nav["batch_mean"] == 1.0 and nav["device_bytes"] > 0
        assert nav["cache"] is None  # a window model has no key/value cache
        assert nav["reward_first20"] == pytest.approx(16 / 5)
        assert rows["other"]["sessions"] == 0 and rows["other"]["actions_per_s"] == 0
        act_route = next(r for r in body["routes"] if r["route"] == "/v1/act")
        assert act_route["count"] == 8 and act_route["p99_ms"] > 0 and act_route["errors"] == 0
        curve = next(c for c in body["adaptation"] if c["model"] == "point-nav")
        assert curve["first_episode"] == [1.0, 2.0, 3.0]
        assert curve["later_episodes"] == [4.0, 6.0, None]
        assert (curve["first_rewards"], curve["later_rewards"]) == (3, 2)
        other = next(c for c in body["adaptation"] if c["model"] == "other")
        assert other["first_episode"] == other["later_episodes"] == []
        [row] = body["sessions"]["rows"]
        assert row["id_prefix"] == sid[:8] and len(row["id_prefix"]) == 8
        assert (row["steps"], row["episodes"], row["last_return"]) == (8, 3, 10.0)
        assert row["episode_return"] == 0.0


async def test_errors_by_status_and_series(serve: Serve) -> None:
    async with serve() as client:
        r = await client.post("/v1/act", json={"session_id": "nope", "observation": OBS[0]})
        assert r.status_code == 404
        client.app.state.fleet.tick()
        body = await feed(client)
        [error] = [e for e in body["errors"] if e["route"] == "/v1/act"]
        assert (error["status"], error["method"], error["count"], error["total"]) == (404, "POST", 1, 1)
        assert body["totals"]["errors_per_s"] > 0
        series = body["series"]
        assert len(series["at_s"]) == len(series["requests_per_s"]) == 1
        assert set(series["actions_per_s"]) == {
            f"{e.name}@{e.version}" for e in client.registry.all_engines()
        }


async def test_recent_sessions_newest_first_with_filter_and_limit(serve: Serve) -> None:
    async with serve() as client:
        ids = [await new_session(client, model="point-nav") for _ in range(4)]
        other = await new_session(client, model="other")
        for sid in [*ids, other]:
            await action(client, sid, OBS[0])
        listed = (await feed(client))["sessions"]
        assert listed["matching"] == 5
        assert [r["id_prefix"] for r in listed["rows"]] == [s[:8] for s in [other, *ids[::-1]]]
        two = (await feed(client, limit=2))["sessions"]
        assert [r["id_prefix"] for r in two["rows"]] == [other[:8], ids[-1][:8]] and two["limit"] == 2
        nav = (await feed(client, model="point-nav"))["sessions"]
        assert nav["matching"] == 4 and {r["model"] for r in nav["rows"]} == {"point-nav"}
        version = client.registry.engines["other"].version
        by_version = (await feed(client, version=version[:6]))["sessions"]
        assert by_version["filter"] == {"model": None, "version": version}
        assert [r["id_prefix"] for r in by_version["rows"]] == [other[:8]]


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"model": "no-such-model"}, 404, "unknown_model"),
        ({"model": "point-nav", "version": "abcdef12"}, 404, "unknown_version"),
        ({"version": "0000000000"}, 404, "unknown_version"),
        ({"model": "../etc"}, 422, "invalid_filter"),
        ({"model": ""}, 422, "invalid_filter"),
        ({"version": "XYZ!"}, 422, "invalid_filter"),
        ({"version": "ab"}, 422, "invalid_filter"),
        ({"limit": "0"}, 422, "invalid_filter"),
        ({"limit": "501"}, 422, "invalid_filter"),
        ({"limit": "ten"}, 422, "invalid_filter"),
        ({"limit": "-1"}, 422, "invalid_filter"),
        ({"sort": "steps"}, 422, "invalid_filter"),
        ([("model", "point-nav"), ("model", "other")], 422, "invalid_filter"),
    ],
)
async def test_bad_filters_are_refused_with_a_code(
    serve: Serve, params: dict[str, str] | list[tuple[str, str]], status: int, code: str
) -> None:
    async with serve() as client:
        error = assert_error(await client.get("/v1/fleet", params=params), status, code)
        if code == "invalid_filter":
            assert error["detail"]["field"] in {"model", "version", "limit", "sort"}


async def test_canary_share_and_migration_keep_the_returns(serve: Serve) -> None:
    async with serve(admin_keys=["admin-key"]) as client:
        sid = await new_session(client, model="point-nav")
        await run_episodes(client, sid, [[1.0, 1.0], [0.5]])
        await action(client, sid, OBS[0], episode_start=True, step=5)
        r = await client.post(
            "/v1/admin/models", json={"name": "point-nav", "checkpoint": "point-nav-v2"}, headers=ADMIN
        )
        v2 = r.json()["version"]
        r = await client.post(
            "/v1/admin/models/point-nav/activate", json={"version": v2, "canary": 0.25}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        rows = {m["version"]: m for m in (await _admin_feed(client))["models"]}
        assert rows[v2]["canary_share"] == 0.25 and not rows[v2]["active"]
        r = await client.post(
            "/v1/admin/models/point-nav/activate",
            json={"version": v2, "migrate_sessions": True},
            headers=ADMIN,
        )
        assert r.json()["migrated_sessions"] == 1
        body = await _admin_feed(client)
        rows = {m["version"]: m for m in body["models"]}
        assert rows[v2]["active"] and rows[v2]["canary_share"] == 0.0 and rows[v2]["sessions"] == 1
        [row] = body["sessions"]["rows"]
        assert (row["version"], row["last_return"], row["episodes"]) == (v2, 0.5, 3)


async def _admin_feed(client: ServiceClient, **params: Any) -> dict[str, Any]:
    r = await client.get("/v1/fleet", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    FleetFeed.model_validate(body)
    return body


async def test_keys_admin_and_viewer_open_the_feed_an_api_key_does_not(serve: Serve) -> None:
    async with serve(api_keys=["user-key"], admin_keys=["admin-key"], viewer_keys=["viewer-key"]) as client:
        r = await client.post("/v1/sessions", json={}, headers=USER)
        sid = r.json()["session_id"]
        assert_error(await client.get("/v1/fleet"), 401, "unauthorized")
        assert_error(
            await client.get("/v1/fleet", headers={"Authorization": "Bearer nope"}), 401, "unauthorized"
        )
        assert_error(await client.get("/v1/fleet", headers=USER), 403, "viewer_key_required")
        for key in (ADMIN, VIEWER):
            r = await client.get("/v1/fleet", headers=key)
            assert r.status_code == 200, r.text
            assert r.json()["sessions"]["rows"][0]["id_prefix"] == sid[:8]
        # A viewer key reads the fleet page and nothing else.
        assert_error(await client.get("/v1/models", headers=VIEWER), 403, "viewer_key_read_only")
        assert_error(await client.get(f"/v1/sessions/{sid}", headers=VIEWER), 403, "viewer_key_read_only")
        r = await client.post("/v1/act", json={"observation": OBS[0]}, headers=VIEWER)  # the fast path
        assert_error(r, 403, "viewer_key_read_only")
        r = await client.post(
            "/v1/admin/models", json={"name": "point-nav", "checkpoint": "point-nav-v2"}, headers=VIEWER
        )
        assert_error(r, 403, "viewer_key_read_only")
        assert len(client.registry.all_engines()) == 2
        # The page itself holds no data: it is served to anyone, and asks for a key.
        page = await client.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]


async def test_admin_keys_alone_guard_the_feed_and_no_keys_open_it(serve: Serve) -> None:
    async with serve(admin_keys=["admin-key"]) as client:
        assert_error(await client.get("/v1/fleet"), 401, "unauthorized")
        assert (await client.get("/v1/fleet", headers=ADMIN)).status_code == 200
    async with serve() as client:
        await feed(client)


async def test_page_and_assets_are_package_files(serve: Serve) -> None:
    async with serve() as client:
        for name, kind in ASSETS.items():
            r = await client.get(f"/ui/{name}")
            assert r.status_code == 200 and r.headers["content-type"] == kind
            shipped = resources.files("service.ui").joinpath("static", name).read_bytes()
            assert r.content == shipped
        assert (await client.get("/ui")).content == (await client.get("/ui/index.html")).content
        assert (await client.get("/ui/secrets.txt")).status_code == 404
        assert (await client.get("/ui/..%2Fapp.py")).status_code == 404
        page = (await client.get("/ui")).text
        js = (await client.get("/ui/fleet.js")).text
        # Nothing fetched from elsewhere: no absolute URLs in the page or its script.
        for text in (page, js, (await client.get("/ui/fleet.css")).text):
            assert "https://" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "/v1/fleet" in js and "sessionStorage" in js


async def test_openapi_documents_the_feed(serve: Serve) -> None:
    async with serve(api_keys=["user-key"], viewer_keys=["viewer-key"]) as client:
        document = (await client.get("/openapi.json")).json()
        operation = document["paths"]["/v1/fleet"]["get"]
        ok = operation["responses"]["200"]["content"]
        assert list(ok) == ["application/json"]
        assert ok["application/json"]["schema"]["$ref"].endswith("/FleetFeed")
        assert operation["security"] == [{"fleetKey": []}]
        assert {p["name"] for p in operation["parameters"]} == {"model", "version", "limit"}
        assert {"401", "403", "404", "422"} <= set(operation["responses"])
        assert "/ui" not in document["paths"]
        # With viewer keys, every other keyed route may refuse one.
        refused = document["paths"]["/v1/models"]["get"]["responses"]["403"]
        assert "viewer_key_read_only" in refused["description"] and "application/json" in refused["content"]
    async with serve() as client:
        operation = (await client.get("/openapi.json")).json()["paths"]["/v1/fleet"]["get"]
        assert "security" not in operation


def test_curves_count_the_same_in_python_and_with_arrays() -> None:
    """A batch under 32 rows is counted row by row, a larger one with array operations: same result."""
    rng = np.random.default_rng(0)
    tables = [SessionTable(64, 2, default_ttl_s=60, evict_idle_s=0) for _ in range(2)]
    curves = [AdaptationCurves(steps=8), AdaptationCurves(steps=8)]
    for table in tables:
        for _ in range(48):
            table.create(deterministic=True, seed=0, ttl_s=None)
    slots = np.arange(48)
    for tick in range(30):
        start = rng.random(48) < 0.15 if tick else np.ones(48, bool)
        live = rng.random(48) < 0.95
        rewards = rng.normal(size=48).astype(np.float32)
        for table, curve, chunks in zip(
            tables, curves, ([slice(0, 16), slice(16, 32), slice(32, 48)], [slice(0, 48)]), strict=True
        ):
            for part in chunks:
                curve.count(table, slots[part], start[part], live[part], rewards[part])
            table.commit(slots, live, start, np.zeros((48, 2), np.float32))
    (first, later, n_first, n_later), again = curves[0].curves(), curves[1].curves()
    np.testing.assert_allclose(np.array(first, float), np.array(again[0], float), rtol=1e-9)
    np.testing.assert_allclose(np.array(later, float), np.array(again[1], float), rtol=1e-9)
    assert (n_first, n_later) == again[2:] and n_first > 0 and n_later > 0
    assert len(first) == len(later) == 8  # rewards beyond step 8 are left out of the curves
    for name in ("episode_return", "last_return"):
        np.testing.assert_allclose(getattr(tables[0], name), getattr(tables[1], name), rtol=1e-6)
    assert np.isfinite(tables[0].last_return[:48]).any()


def test_quantile_interpolates_within_buckets() -> None:
    assert quantile(0.5, (1.0, 2.0, 4.0), [0, 0, 10, 0]) == 3.0
    assert quantile(0.99, (1.0, 2.0), [0, 0, 0]) is None
    assert quantile(0.5, (1.0, 2.0), [2, 0, 0]) == 0.5
    assert quantile(0.99, (1.0, 2.0, 4.0), [0, 0, 3, 0], interpolate=False) == 4.0


def test_the_documented_example_is_a_feed() -> None:
    FleetFeed.model_validate(EXAMPLE)


def test_the_browser_test_says_why_it_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    reason = browser.missing()
    assert reason is not None and "apt-get install -y chromium chromium-driver" in reason
