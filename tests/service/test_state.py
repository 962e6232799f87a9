"""Session snapshots: ``GET``/``PUT /v1/sessions/{id}/state``, and refusals that change nothing."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from service_support import OBS, ServiceClient, Twins, action, assert_error, new_session
from trmrl_client.codec import packb, unpackb

pytestmark = pytest.mark.anyio


async def state_of(client: ServiceClient, sid: str) -> dict[str, Any]:
    r = await client.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def put_state(client: ServiceClient, sid: str, state: dict[str, Any]) -> Any:
    return await client.put(f"/v1/sessions/{sid}/state", json={**state, "session_id": sid})


@pytest.mark.parametrize("model", ["point-nav", "point-nav-trial"])
@pytest.mark.parametrize("deterministic", [True, False])
async def test_a_restored_copy_continues_exactly_like_the_original(
    client: ServiceClient, model: str, deterministic: bool
) -> None:
    sid = await new_session(client, model=model, deterministic=deterministic, seed=11)
    for step, obs in enumerate(OBS[:3]):
        await action(client, sid, obs, reward=0.1 * step, step=step, episode_start=step == 2)
    state = await state_of(client, sid)
    assert (state["model"], state["steps"], state["episodes"], state["seed"]) == (model, 3, 2, 11)
    assert state["deterministic"] is deterministic and state["format"] == "trmrl.session/1"
    copy_id = "copy-" + sid[:8]
    r = await put_state(client, copy_id, state)
    assert r.status_code == 201 and r.json()["steps"] == 3
    # A retry of the last step answers from the snapshot's last action, on both.
    retry = await action(client, copy_id, OBS[2], step=2)
    np.testing.assert_array_equal(retry, state["last_action"])
    for step, obs in enumerate(OBS[3:], start=3):
        want = await action(client, sid, obs, reward=-0.2, step=step)
        got = await action(client, copy_id, obs, reward=-0.2, step=step)
        np.testing.assert_array_equal(got, want)


async def test_put_over_a_session_rewinds_it(client: ServiceClient) -> None:
    sid = await new_session(client)
    await action(client, sid, OBS[0], step=0)
    saved = await state_of(client, sid)
    first = await action(client, sid, OBS[1], reward=0.3, step=1)
    await action(client, sid, OBS[2], reward=0.3, step=2)
    r = await put_state(client, sid, saved)
    assert r.status_code == 200 and r.json()["steps"] == 1
    np.testing.assert_array_equal(await action(client, sid, OBS[1], reward=0.3, step=1), first)


async def test_a_snapshot_before_the_first_step_holds_an_empty_memory(client: ServiceClient) -> None:
    # The new session reuses the slot of one that stepped: its old memory must not leak into the snapshot.
    old = await new_session(client)
    for step, obs in enumerate(OBS):
        await action(client, old, obs, step=step)
    await client.delete(f"/v1/sessions/{old}")
    sid = await new_session(client)
    state = await state_of(client, sid)
    assert state["length"] == 0 and state["steps"] == 0 and state["episode_start_pending"] is True
    assert not np.any(state["window"]) and not np.any(state["prev_action"])
    twin = "twin-of-" + sid[:8]
    assert (await put_state(client, twin, state)).status_code == 201
    for step, obs in enumerate(OBS[:3]):
        np.testing.assert_array_equal(
            await action(client, twin, obs, step=step), await action(client, sid, obs, step=step)
        )


async def test_state_in_msgpack(client: ServiceClient) -> None:
    sid = await new_session(client)
    await action(client, sid, OBS[0], step=0)
    r = await client.get(f"/v1/sessions/{sid}/state", headers={"Accept": "application/msgpack"})
    state = unpackb(r.content)
    assert state == await state_of(client, sid)
    state["window"] = np.asarray(state["window"], np.float32)  # arrays may travel as msgpack-numpy maps
    state["session_id"] = "mp-" + sid[:8]
    r = await client.put(
        f"/v1/sessions/{state['session_id']}/state",
        content=packb(state),
        headers={"Content-Type": "application/msgpack"},
    )
    assert r.status_code == 201, r.content


def _edit(path: str, value: Any) -> Any:
    def apply(state: dict[str, Any]) -> dict[str, Any]:
        state = copy.deepcopy(state)
        if path == "window.row":
            state["window"][0] = state["window"][0][:-1]
        elif path == "window.rows":
            state["window"] = state["window"][:-1]
        else:
            state[path] = value
        return state

    return apply


BAD_STATES = [
    ("other-version", _edit("model_version", "000000000000"), 409, "model_version_mismatch"),
    ("unknown-model", _edit("model", "nope"), 404, "unknown_model"),
    ("short-row", _edit("window.row", None), 422, "invalid_snapshot"),
    ("missing-row", _edit("window.rows", None), 422, "invalid_snapshot"),
    ("length-beyond-window", _edit("length", 99), 422, "invalid_snapshot"),
    ("short-prev-action", _edit("prev_action", [0.0]), 422, "wrong_action_length"),
    ("huge-prev-action", _edit("prev_action", [1e39, 0.0]), 422, "non_finite"),
    ("negative-steps", _edit("steps", -1), 422, "invalid_value"),
    ("string-seed", _edit("seed", "7"), 422, "wrong_type"),
    ("unknown-field", _edit("extra", 1), 422, "unknown_field"),
    ("other-format", _edit("format", "v0"), 422, "invalid_value"),
    ("created-after-year-9999", _edit("created_at", 1e12), 422, "invalid_value"),
    ("last-action-beyond-the-input-limit", _edit("last_action", [2e6, 0.0]), 422, "out_of_range"),
]


@pytest.mark.parametrize(
    ("edit", "status", "code"), [b[1:] for b in BAD_STATES], ids=[b[0] for b in BAD_STATES]
)
async def test_a_bad_snapshot_is_refused_and_the_session_is_unchanged(
    twins: Twins,
    edit: Any,
    status: int,
    code: str,
) -> None:
    state = await state_of(twins.client, twins.target)
    assert_error(await put_state(twins.client, twins.target, edit(state)), status, code)
    await twins.assert_untouched()


async def test_snapshot_refusals_without_a_session(client: ServiceClient) -> None:
    sid = await new_session(client)
    state = await state_of(client, sid)
    assert_error(await client.get("/v1/sessions/missing/state"), 404, "unknown_session")
    nan = packb({**state, "window": np.full((5, len(state["window"][0])), np.nan, np.float32)})
    r = await client.put(
        f"/v1/sessions/{sid}/state", content=nan, headers={"Content-Type": "application/msgpack"}
    )
    assert r.status_code == 422 and unpackb(r.content)["error"]["code"] == "non_finite"
    r = await client.put(
        f"/v1/sessions/{sid}/state", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert_error(r, 400, "malformed_json")


async def test_a_snapshot_put_under_another_id_copies_the_session(client: ServiceClient) -> None:
    sid = await new_session(client)
    for step, obs in enumerate(OBS[:3]):
        await action(client, sid, obs, reward=-0.5 * step, step=step)
    r = await client.put("/v1/sessions/copy-of-it/state", json=await state_of(client, sid))
    assert r.status_code == 201 and r.json()["steps"] == 3, r.text
    copy = await action(client, "copy-of-it", [0.7, -0.3], reward=0.25, step=3)
    original = await action(client, sid, [0.7, -0.3], reward=0.25, step=3)
    np.testing.assert_array_equal(copy, original)
