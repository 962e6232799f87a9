"""Live model versions: admin keys, loading from the checkpoint root only, activation with canary and
migration (a migrated session continues as a fresh one would after the same transitions), rollback,
retirement, restarts that bring the versions back, and the models listing."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from service_support import (
    ADMIN,
    OBS,
    USER,
    Serve,
    ServiceClient,
    action,
    assert_error,
    info,
    make_checkpoint,
    new_session,
    serve_root,
    versions_root,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint root: version 1 and 2 of ``point-nav``, and one with another observation size."""
    return versions_root(tmp_path_factory.mktemp("root"), wide={"seed": 1, "obs_dim": 3})


@pytest.fixture
def serve(root: Path) -> Serve:
    return serve_root(root, ["point-nav"], USER, admin_keys=["admin-key"], api_keys=["user-key"])


async def load(client: ServiceClient, checkpoint: str, name: str = "point-nav") -> str:
    r = await client.post("/v1/admin/models", json={"name": name, "checkpoint": checkpoint}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return str(r.json()["version"])


async def activate(client: ServiceClient, version: str, **fields: Any) -> dict[str, Any]:
    r = await client.post(
        "/v1/admin/models/point-nav/activate", json={"version": version, **fields}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


async def session_on_v1(client: ServiceClient) -> tuple[str, str]:
    """The active version of ``point-nav``, and a new session of it that has taken its first step."""
    v1 = client.registry.engines["point-nav"].version
    sid = await new_session(client)
    await action(client, sid, OBS[0], step=0)
    return v1, sid


async def test_admin_routes_do_not_exist_without_admin_keys(serve: Serve) -> None:
    async with serve(admin_keys=[]) as client:
        r = await client.post(
            "/v1/admin/models", json={"name": "x", "checkpoint": "point-nav-v2"}, headers=ADMIN
        )
        assert_error(r, 404, "not_found")
        assert len(client.registry.all_engines()) == 1


async def test_admin_routes_need_an_admin_key(serve: Serve) -> None:
    async with serve() as client:
        body = {"name": "point-nav", "checkpoint": "point-nav-v2"}
        assert_error(await client.post("/v1/admin/models", json=body), 403, "forbidden")
        assert_error(
            await client.post("/v1/admin/models", json=body, headers={"Authorization": "Bearer nope"}),
            401,
            "unauthorized",
        )
        assert len(client.registry.all_engines()) == 1


async def test_load_activate_list_and_retire(serve: Serve) -> None:
    async with serve() as client:
        v1 = client.registry.engines["point-nav"].version
        v2 = await load(client, "point-nav-v2")
        assert v2 != v1
        models = (await client.get("/v1/models")).json()["models"]
        assert [(m["name"], m["version"], m["active"]) for m in models] == [
            ("point-nav", v1, True),
            ("point-nav", v2, False),
        ]
        r = await client.post(
            "/v1/admin/models", json={"name": "point-nav", "checkpoint": "point-nav-v2"}, headers=ADMIN
        )
        assert_error(r, 409, "version_exists")
        sid = await new_session(client)
        done = await activate(client, v2)
        assert (done["active_version"], done["migrated_sessions"]) == (v2, 0)
        assert (await info(client, sid))["model_version"] == v1  # not migrated: it stays
        assert (await info(client, await new_session(client)))["model_version"] == v2
        r = await client.delete(f"/v1/admin/models/point-nav/versions/{v1}", headers=ADMIN)
        assert_error(r, 409, "version_in_use")
        await client.delete(f"/v1/sessions/{sid}")
        r = await client.delete(f"/v1/admin/models/point-nav/versions/{v1}", headers=ADMIN)
        assert r.status_code == 204
        assert [m["version"] for m in (await client.get("/v1/models")).json()["models"]] == [v2]
        assert_error(
            await client.delete(f"/v1/admin/models/point-nav/versions/{v2}", headers=ADMIN),
            409,
            "version_in_use",
        )


async def test_a_migrated_session_continues_as_a_fresh_one_after_the_same_transitions(serve: Serve) -> None:
    """The memory moves as it is: the next action of a migrated session equals that of a new session
    of the new version that replays the same transitions, with the same actions executed."""
    async with serve() as client:
        rewards = [0.0, 0.5, -0.25, 1.0]
        moved = await new_session(client)
        executed = []
        for step in range(4):
            got = await action(
                client, moved, OBS[step], reward=rewards[step], step=step, episode_start=step == 0
            )
            executed.append(got.tolist())
        v2 = await load(client, "point-nav-v2")
        done = await activate(client, v2, migrate_sessions=True)
        assert done["migrated_sessions"] == 1 and done["pause_ms"] >= 0
        r = await client.post(
            "/v1/act", json={"session_id": moved, "observation": OBS[4], "reward": 0.3, "step": 4}
        )
        assert r.status_code == 200 and r.json()["model_version"] == v2
        replayed = await new_session(client)  # on v2, the active version now
        for step in range(4):
            applied = None if step == 0 else executed[step - 1]
            await action(
                client,
                replayed,
                OBS[step],
                reward=rewards[step],
                step=step,
                episode_start=step == 0,
                **({"applied_action": applied} if applied else {}),
            )
        want = await action(client, replayed, OBS[4], reward=0.3, step=4, applied_action=executed[3])
        np.testing.assert_allclose(r.json()["action"], want, rtol=0, atol=1e-6)
        state = await info(client, moved)
        assert (state["steps"], state["episodes"]) == (5, 1)


async def test_rollback_moves_sessions_back(serve: Serve) -> None:
    async with serve() as client:
        v1, sid = await session_on_v1(client)
        v2 = await load(client, "point-nav-v2")
        await activate(client, v2, migrate_sessions=True)
        assert (await info(client, sid))["model_version"] == v2
        done = await activate(client, v1, migrate_sessions=True)
        assert done["migrated_sessions"] == 1 and (await info(client, sid))["model_version"] == v1
        r = await client.post("/v1/act", json={"session_id": sid, "observation": OBS[1], "step": 1})
        assert r.json()["model_version"] == v1


async def test_migration_to_another_shape_is_refused_and_changes_nothing(serve: Serve) -> None:
    async with serve() as client:
        v1, sid = await session_on_v1(client)
        wide = await load(client, "wide")
        r = await client.post(
            "/v1/admin/models/point-nav/activate",
            json={"version": wide, "migrate_sessions": True},
            headers=ADMIN,
        )
        assert_error(r, 409, "incompatible_model")
        assert client.registry.engines["point-nav"].version == v1
        assert (await info(client, sid))["model_version"] == v1
        r = await client.post(
            "/v1/admin/models/point-nav/activate",
            json={"version": wide, "canary": 0.5, "migrate_sessions": True},
            headers=ADMIN,
        )
        assert_error(r, 422, "invalid_value")


async def test_a_canary_gets_its_share_of_new_sessions(serve: Serve) -> None:
    async with serve() as client:
        v1 = client.registry.engines["point-nav"].version
        v2 = await load(client, "point-nav-v2")
        done = await activate(client, v2, canary=0.25)
        assert (done["active_version"], done["canary_version"], done["canary_share"]) == (v1, v2, 0.25)
        client.registry._random.seed(0)
        versions = [(await info(client, await new_session(client)))["model_version"] for _ in range(200)]
        share = versions.count(v2) / len(versions)
        assert 0.1 < share < 0.4  # 200 draws at 0.25: outside this band has probability < 1e-4
        listed = {m["version"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert listed[v2]["canary_share"] == 0.25 and listed[v1]["active"]


@pytest.mark.parametrize("requested", ["../outside", "/etc/passwd", "escape", "point-nav/../../outside"])
async def test_checkpoint_paths_outside_the_root_are_refused_unopened(
    serve: Serve, root: Path, tmp_path: Path, requested: str
) -> None:
    outside = root.parent / "outside"
    make_checkpoint(outside, seed=9)
    link = root / "escape"
    if not link.exists():
        os.symlink(outside, link)
    opened: list[str] = []

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            opened.append(os.fsdecode(args[0]))

    async with serve() as client:
        sys.addaudithook(audit)  # hooks cannot be removed: it only collects paths
        start = len(opened)
        r = await client.post(
            "/v1/admin/models", json={"name": "point-nav", "checkpoint": requested}, headers=ADMIN
        )
        assert_error(r, 403, "forbidden_path")
        leaked = [p for p in opened[start:] if p.startswith((str(outside), "/etc"))]
        assert leaked == []
        assert len(client.registry.all_engines()) == 1


async def test_an_unknown_checkpoint_is_404(serve: Serve) -> None:
    async with serve() as client:
        r = await client.post(
            "/v1/admin/models", json={"name": "point-nav", "checkpoint": "nothing-here"}, headers=ADMIN
        )
        assert_error(r, 404, "unknown_checkpoint")


def archive_of(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(directory, arcname=directory.name)
    return buffer.getvalue()


async def test_archives_upload_and_corrupt_ones_are_refused(serve: Serve, root: Path) -> None:
    async with serve() as client:
        gz = {**ADMIN, "Content-Type": "application/gzip"}
        good = archive_of(root / "point-nav-v2")
        corrupt = good[: len(good) // 2]
        r = await client.post("/v1/admin/models?name=point-nav", content=corrupt, headers=gz)
        assert_error(r, 422, "invalid_checkpoint")
        sid = await new_session(client)
        await action(client, sid, OBS[0], step=0)  # still serving
        r = await client.post("/v1/admin/models?name=point-nav", content=good, headers=gz)
        assert r.status_code == 201, r.text
        r = await client.post("/v1/admin/models?name=bad%2Fname", content=good, headers=gz)
        assert_error(r, 422, "invalid_value")


async def test_restarts_bring_back_versions_and_the_sessions_on_them(serve: Serve, tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with serve(state_dir=state) as client:
        sid = await new_session(client)
        before = await action(client, sid, OBS[0], step=0)
        v2 = await load(client, "point-nav-v2")
        await activate(client, v2, migrate_sessions=True)
    async with serve(state_dir=state) as client:
        assert client.registry.engines["point-nav"].version == v2
        assert (await info(client, sid))["model_version"] == v2
        again = await action(client, sid, OBS[0], step=0)  # a retry of the last step answers as before
        np.testing.assert_allclose(again, before, rtol=0, atol=1e-6)


async def test_admin_bodies_are_validated(serve: Serve) -> None:
    async with serve() as client:
        r = await client.post("/v1/admin/models", json={"name": "point-nav"}, headers=ADMIN)
        assert_error(r, 422, "missing_field")
        r = await client.post("/v1/admin/models/point-nav/activate", json={"version": "nope"}, headers=ADMIN)
        assert_error(r, 404, "unknown_version")
        r = await client.post(
            "/v1/admin/models/point-nav/activate", json={"version": "x", "canary": 1.5}, headers=ADMIN
        )
        assert_error(r, 422, "invalid_value")
        r = await client.post(
            "/v1/admin/models", content=b"x", headers={**ADMIN, "Content-Type": "text/plain"}
        )
        assert_error(r, 415, "unsupported_media_type")


async def test_a_watched_directory_serves_what_is_published(serve: Serve, root: Path, tmp_path: Path) -> None:
    """A checkpoint published into the watched directory is served; republished, it becomes the active
    version and the live sessions move to it; a half-written one waits for the next look."""
    watched = tmp_path / "published"
    watched.mkdir()
    async with serve(watch_dir=watched, watch_interval_s=0.05) as client:
        make_checkpoint(watched / "trained", seed=2)
        v1 = await wait_for_version(client, "trained", None)
        r = await client.post("/v1/sessions", json={"model": "trained"})
        sid = r.json()["session_id"]
        await action(client, sid, OBS[0], step=0)
        (watched / "half").mkdir()
        (watched / "half" / "config.json").write_text("{")  # a copy caught half way
        make_checkpoint(watched / "trained", seed=7)  # republished: a new version
        v2 = await wait_for_version(client, "trained", v1)
        assert v2 != v1 and (await info(client, sid))["model_version"] == v2
        assert "half" not in client.registry.versions


async def wait_for_version(client: ServiceClient, name: str, other_than: str | None) -> str:
    """The active version of ``name`` once it exists and differs from ``other_than`` (bounded wait)."""
    for _ in range(400):
        engine = client.registry.engines.get(name)
        if engine is not None and engine.version != other_than:
            return engine.version
        await anyio.sleep(0.05)
    raise AssertionError(f"model {name} did not change from {other_than}")
