"""The columnar batch (``POST /v1/act/batch`` with ``session_ids`` + ``observations [B, D]``) and
``POST /v1/sessions`` with ``count``: same actions as one session at a time, per-row errors that leave
their sessions untouched, whole-request refusals for malformed ticks."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
from service_support import OBS, ServiceClient, Twins, action, assert_error, info, new_session
from trmrl_client.codec import packb, unpackb

pytestmark = pytest.mark.anyio

MSGPACK = {"Content-Type": "application/msgpack"}


async def sessions(client: httpx.AsyncClient, count: int, **body: Any) -> list[str]:
    r = await client.post("/v1/sessions", json={"count": count, **body})
    assert r.status_code == 201, r.text
    ids = r.json()["session_ids"]
    assert len(ids) == count == len(set(ids))
    return list(ids)


async def tick(
    client: httpx.AsyncClient, body: dict[str, Any], *, msgpack: bool
) -> tuple[int, dict[str, Any]]:
    """Post a columnar body; returns the status and the decoded reply (actions as a float32 array)."""
    if msgpack:
        r = await client.post("/v1/act/batch", content=packb(body), headers=MSGPACK)
        assert r.headers["content-type"] == "application/msgpack"
        reply = unpackb(r.content)
    else:
        jsonable = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in body.items()}
        # Python writes NaN as the bare token ``NaN``, which the service's parser reads (and refuses).
        raw = json.dumps(jsonable).encode()
        r = await client.post("/v1/act/batch", content=raw, headers={"Content-Type": "application/json"})
        assert r.headers["content-type"] == "application/json"
        reply = r.json()
    if r.status_code == 200:
        reply["actions"] = np.asarray(reply["actions"], dtype=np.float32)
        reply["steps"] = np.asarray(reply["steps"], dtype=np.int64)
    return r.status_code, reply


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_columnar_ticks_match_single_session_steps(client: ServiceClient, msgpack: bool) -> None:
    """Three ticks of four sessions give, row by row, the actions of four sessions stepped alone."""
    ids = await sessions(client, 4)
    alone = [await new_session(client) for _ in range(4)]
    rng = np.random.default_rng(3)
    for step in range(3):
        obs = rng.uniform(-1, 1, (4, 2)).astype(np.float32)
        rewards = rng.uniform(-1, 1, 4).astype(np.float32)
        starts = np.array([step == 0] * 4)
        body = {
            "session_ids": ids,
            "observations": obs,
            "rewards": rewards,
            "episode_starts": starts,
            "steps": np.full(4, step, np.int64),
        }
        status, reply = await tick(client, body, msgpack=msgpack)
        assert status == 200, reply
        assert reply["errors"] == [] and reply["session_ids"] == ids
        assert reply["steps"].tolist() == [step] * 4
        assert reply["actions"].shape == (4, 2) and reply["actions"].dtype == np.float32
        for i, sid in enumerate(alone):
            want = await action(
                client, sid, obs[i].tolist(), reward=float(rewards[i]), episode_start=step == 0, step=step
            )
            np.testing.assert_allclose(reply["actions"][i], want, rtol=0, atol=1e-6)


async def test_columnar_without_steps_rewards_or_starts(client: ServiceClient) -> None:
    ids = await sessions(client, 3)
    for step in range(2):
        status, reply = await tick(client, {"session_ids": ids, "observations": OBS[:3]}, msgpack=False)
        assert status == 200 and reply["steps"].tolist() == [step] * 3
    assert (await info(client, ids[0]))["episodes"] == 1


async def test_a_retried_tick_returns_the_same_actions_without_advancing(client: ServiceClient) -> None:
    ids = await sessions(client, 3)
    body = {
        "session_ids": ids,
        "observations": np.asarray(OBS[:3], np.float32),
        "steps": np.zeros(3, np.int64),
    }
    _, first = await tick(client, body, msgpack=True)
    _, again = await tick(client, body, msgpack=True)
    np.testing.assert_array_equal(first["actions"], again["actions"])
    assert again["errors"] == [] and (await info(client, ids[0]))["steps"] == 1


async def test_bad_rows_fail_alone_and_leave_their_sessions_untouched(client: ServiceClient) -> None:
    """NaN, a number beyond float32, an unknown session and a step conflict: each row gets its own
    error and NaN actions, its session is unchanged (checked against a twin), the other rows are served."""
    good, bad_obs, bad_reward, conflict = await sessions(client, 4)
    twins = [await new_session(client) for _ in range(3)]
    for sid in (bad_obs, bad_reward, conflict, *twins):
        await action(client, sid, OBS[0], step=0, episode_start=True)
    obs = np.asarray([OBS[1], [np.nan, 0.0], OBS[1], OBS[1], OBS[1]], np.float64)
    rewards = np.asarray([0.5, 0.5, 1e39, 0.5, 0.5])
    body = {
        "session_ids": [good, bad_obs, bad_reward, "f" * 32, conflict],
        "observations": obs,
        "rewards": rewards,
        "steps": np.asarray([0, 1, 1, 0, 5], np.int64),
    }
    for msgpack in (False, True):
        if msgpack:  # the same tick again, so the good row is a retry
            body["steps"] = np.asarray([0, 1, 1, 0, 5], np.int64)
        status, reply = await tick(client, body, msgpack=msgpack)
        assert status == 200, reply
        codes = {e["row"]: e["error"]["code"] for e in reply["errors"]}
        assert codes == {1: "non_finite", 2: "non_finite", 3: "unknown_session", 4: "step_conflict"}
        conflict_error = next(e for e in reply["errors"] if e["row"] == 4)["error"]
        assert conflict_error["detail"]["expected_step"] == 1
        assert np.isnan(reply["actions"][1:]).all() and np.isfinite(reply["actions"][0]).all()
        assert reply["steps"].tolist()[4] == 5
    for sid, twin in zip((bad_obs, bad_reward, conflict), twins, strict=True):
        await Twins(client, sid, twin, steps=1).assert_untouched()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"observations": [[0.0, 0.0]]}, "missing_field"),
        ({"session_ids": ["a"]}, "missing_field"),
        ({"session_ids": [], "observations": []}, "invalid_value"),
        ({"session_ids": ["a", "a"], "observations": [[0, 0], [0, 0]]}, "duplicate_session"),
        ({"session_ids": ["a", "b"], "observations": [[0, 0]]}, "length_mismatch"),
        ({"session_ids": ["a"], "observations": [[0, 0]], "rewards": [0, 0]}, "length_mismatch"),
        ({"session_ids": ["a"], "observations": [0, 0]}, "wrong_shape"),
        ({"session_ids": ["a", "b"], "observations": [[0, 0], [0]]}, "wrong_shape"),
        ({"session_ids": ["a"], "observations": [["x", "y"]]}, "wrong_type"),
        ({"session_ids": ["a"], "observations": [[0, 0]], "episode_starts": [1]}, "wrong_type"),
        ({"session_ids": ["a"], "observations": [[0, 0]], "steps": [1.5]}, "wrong_type"),
        ({"session_ids": ["a"], "observations": [[0, 0]], "steps": [-1]}, "invalid_value"),
        ({"session_ids": [7], "observations": [[0, 0]]}, "wrong_type"),
        ({"session_ids": ["a"], "observations": [[0, 0]], "extra": 1}, "unknown_field"),
        ({"session_ids": ["a"], "observations": [[0, 0, 0]]}, "wrong_observation_length"),
        ({"session_ids": ["a"], "observations": [[0, 0]], "applied_actions": [[0]]}, "wrong_action_length"),
        ({"session_ids": ["a"], "observations": [[0, 0]], "model": "nope"}, "unknown_model"),
    ],
)
@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_malformed_ticks_are_refused_whole(
    client: ServiceClient, body: dict[str, Any], code: str, msgpack: bool
) -> None:
    sid, other = await new_session(client), await new_session(client)
    names = {"a": sid, "b": other}
    if isinstance(body.get("session_ids"), list):
        body = {**body, "session_ids": [names.get(i, i) for i in body["session_ids"]]}
    if msgpack:
        r = await client.post("/v1/act/batch", content=packb(body), headers=MSGPACK)
        error = unpackb(r.content)["error"]
        assert (r.status_code >= 400, error["code"]) == (True, code)
    else:
        assert_error(
            await client.post("/v1/act/batch", json=body), 404 if code == "unknown_model" else 422, code
        )
    assert (await info(client, sid))["steps"] == 0


@pytest.mark.parametrize("dtype", ["<f8", "<i4", "|b1"])
async def test_msgpack_array_dtypes(client: ServiceClient, dtype: str) -> None:
    """Float and integer observations are taken (converted to float32); booleans are not."""
    sid = await new_session(client)
    observations = np.asarray([[1, 0]]).astype(dtype)
    status, reply = await tick(client, {"session_ids": [sid], "observations": observations}, msgpack=True)
    if dtype in ("<f8", "<i4"):
        assert status == 200 and reply["errors"] == []
    else:
        assert status == 422 and reply["error"]["code"] == "wrong_type"


@pytest.mark.parametrize(("dtype", "data"), [("|O", b"\x80\x04N.\x00\x00\x00\x00"), ("<c8", bytes(8))])
async def test_object_and_complex_arrays_are_refused_never_unpickled(
    client: ServiceClient, dtype: str, data: bytes
) -> None:
    sid = await new_session(client)
    crafted = {
        "session_ids": [sid],
        "observations": {"__ndarray__": True, "data": data, "dtype": dtype, "shape": [1, 1]},
    }
    r = await client.post("/v1/act/batch", content=packb(crafted), headers=MSGPACK)
    assert r.status_code == 400 and unpackb(r.content)["error"]["code"] == "malformed_msgpack"


async def test_applied_actions_enter_memory(client: ServiceClient) -> None:
    """A tick's ``applied_actions`` change the next step's memory as ``applied_action`` does."""
    a, b = await sessions(client, 2)
    reference = await new_session(client)
    applied = np.asarray([[0.05, -0.05], [0.05, -0.05]], np.float32)
    await tick(client, {"session_ids": [a, b], "observations": OBS[:2], "steps": [0, 0]}, msgpack=False)
    await action(client, reference, OBS[0], step=0)
    _, reply = await tick(
        client,
        {
            "session_ids": [a, b],
            "observations": [OBS[2], OBS[2]],
            "steps": [1, 1],
            "applied_actions": applied,
        },
        msgpack=True,
    )
    want = await action(client, reference, OBS[2], step=1, applied_action=applied[0].tolist())
    np.testing.assert_allclose(reply["actions"][0], want, rtol=0, atol=1e-6)


async def test_rows_of_another_model_are_refused_per_row(client: ServiceClient) -> None:
    mine = await sessions(client, 1)
    other = await sessions(client, 1, model="point-nav-trial")
    _, reply = await tick(
        client, {"model": "point-nav", "session_ids": mine + other, "observations": OBS[:2]}, msgpack=False
    )
    assert [(e["row"], e["error"]["code"]) for e in reply["errors"]] == [(1, "model_mismatch")]
    assert (await info(client, other[0]))["steps"] == 0


async def test_a_tick_larger_than_a_batch_spans_several_forward_passes(make_client: Any) -> None:
    client = await make_client(max_batch=4)
    ids = await sessions(client, 10)
    alone = await sessions(client, 10)
    obs = np.random.default_rng(0).uniform(-1, 1, (10, 2)).astype(np.float32)
    _, reply = await tick(client, {"session_ids": ids, "observations": obs}, msgpack=True)
    _, single = await tick(client, {"session_ids": alone, "observations": obs}, msgpack=True)
    assert reply["errors"] == [] and client.registry.engine(None).ticks >= 6
    np.testing.assert_array_equal(reply["actions"], single["actions"])


async def test_an_overfull_tick_is_refused_whole(make_client: Any) -> None:
    client = await make_client(max_queued_steps=4)
    ids = await sessions(client, 5)
    assert_error(
        await client.post("/v1/act/batch", json={"session_ids": ids, "observations": [[0, 0]] * 5}),
        503,
        "overloaded",
    )
    assert (await info(client, ids[0]))["steps"] == 0


async def test_count_creates_all_or_none(make_client: Any) -> None:
    client = await make_client(max_sessions=4, evict_idle_s=3600)
    r = await client.post("/v1/sessions", json={"count": 3, "seed": 5, "deterministic": False})
    assert r.status_code == 201 and len(r.json()["session_ids"]) == 3
    assert (await info(client, r.json()["session_ids"][0]))["seed"] == 5
    assert_error(await client.post("/v1/sessions", json={"count": 2}), 429, "capacity_exhausted")
    assert len(client.registry.engine(None).table) == 3
    assert_error(await client.post("/v1/sessions", json={"count": 0}), 422, "invalid_value")


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_optional_columns_sent_as_null_are_columns_not_sent(
    client: ServiceClient, msgpack: bool
) -> None:
    ids = [await new_session(client) for _ in range(2)]
    nulls = {"model": None, "rewards": None, "episode_starts": None, "steps": None, "applied_actions": None}
    status, reply = await tick(
        client, {"session_ids": ids, "observations": OBS[:2], **nulls}, msgpack=msgpack
    )
    assert status == 200 and not reply["errors"]
    assert list(reply["steps"]) == [0, 0]
    # Each session took exactly its one step.
    for sid in ids:
        assert (await client.get(f"/v1/sessions/{sid}")).json()["steps"] == 1
