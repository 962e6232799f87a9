"""The v1 HTTP API in process (httpx over ASGI): routes, semantics and every error path.

Every refused request is checked twice: the exact status and code, and that the session it aimed at
is unchanged -- same counters, and the same next action as an untouched twin with the same history.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from service_support import (
    BOUND,
    OBS,
    ServiceClient,
    Twins,
    act,
    action,
    assert_error,
    info,
    new_session,
)
from trmrl_client.codec import unpackb

pytestmark = pytest.mark.anyio


# -- probes and models ------------------------------------------------------------------------------------
async def test_health_and_readiness(client: ServiceClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert (r.status_code, r.json()) == (200, {"status": "ready"})


async def test_models_lists_every_loaded_model_with_its_facts(client: ServiceClient) -> None:
    models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
    assert set(models) == {"point-nav", "point-nav-trial"}
    m = models["point-nav"]
    assert m["default"] is True and models["point-nav-trial"]["default"] is False
    assert len(m["version"]) == 12 and int(m["version"], 16) >= 0
    assert (m["task_family"], m["obs_dim"], m["act_dim"], m["window"]) == ("point-nav", 2, 2, 5)
    assert m["action_low"] == [-BOUND, -BOUND] and m["action_high"] == [BOUND, BOUND]
    assert m["memory_scope"] == "episode" and models["point-nav-trial"]["memory_scope"] == "trial"
    assert m["policy"] == "trmrl"
    assert m["metrics"] == {}


async def test_openapi_documents_the_act_routes_and_their_bodies(client: ServiceClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    for path in ("/v1/act", "/act", "/v1/act/batch", "/v1/sessions", "/v1/sessions/{session_id}/reset"):
        assert path in doc["paths"], path
    body = doc["paths"]["/v1/act"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ActRequest"}
    assert "observation" in doc["components"]["schemas"]["ActRequest"]["properties"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/nowhere", 404, "not_found"), ("GET", "/v1/act", 405, "method_not_allowed")],
)
async def test_unknown_routes_and_methods_answer_in_the_error_shape(
    client: ServiceClient, method: str, path: str, status: int, code: str
) -> None:
    assert_error(await client.request(method, path), status, code)


# -- sessions --------------------------------------------------------------------------------------------
async def test_create_get_delete_a_session(client: ServiceClient) -> None:
    r = await client.post(
        "/v1/sessions", json={"model": "point-nav-trial", "deterministic": False, "seed": 5, "ttl_s": 30}
    )
    assert r.status_code == 201
    body = r.json()
    assert body["model"]["name"] == "point-nav-trial" and body["ttl_s"] == 30
    sid = body["session_id"]
    got = await info(client, sid)
    assert got["steps"] == 0 and got["episodes"] == 0
    assert (got["model"], got["deterministic"], got["seed"]) == ("point-nav-trial", False, 5)
    assert got["model_version"] == body["model"]["version"]
    assert got["created_at"].endswith("+00:00")
    r = await client.delete(f"/v1/sessions/{sid}")
    assert r.status_code == 204 and r.content == b""
    assert_error(await client.get(f"/v1/sessions/{sid}"), 404, "unknown_session")
    assert_error(await client.delete(f"/v1/sessions/{sid}"), 404, "unknown_session")


async def test_create_with_an_empty_body_uses_the_defaults(client: ServiceClient) -> None:
    r = await client.post("/v1/sessions")
    assert r.status_code == 201
    body = r.json()
    assert body["model"]["name"] == "point-nav" and body["ttl_s"] == 3600
    assert (await info(client, body["session_id"]))["deterministic"] is True


@pytest.mark.parametrize("name", ["nope", "../point-nav", "/etc/passwd", "point-nav/../point-nav"])
async def test_unknown_model_is_404_and_creates_nothing(client: ServiceClient, name: str) -> None:
    before = sum(len(e.table) for e in client.registry.engines.values())
    error = assert_error(await client.post("/v1/sessions", json={"model": name}), 404, "unknown_model")
    assert error["detail"]["model"] == name and "point-nav" in error["detail"]["known"]
    assert_error(await act(client, None, [0.0, 0.0], model=name), 404, "unknown_model")
    assert sum(len(e.table) for e in client.registry.engines.values()) == before


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"deterministic": "yes"}, "wrong_type"),
        ({"seed": -1}, "invalid_value"),
        ({"ttl_s": 0}, "invalid_value"),
        ({"modle": "point-nav"}, "unknown_field"),
    ],
)
async def test_invalid_session_options_are_422(
    client: ServiceClient, body: dict[str, Any], code: str
) -> None:
    assert_error(await client.post("/v1/sessions", json=body), 422, code)


async def test_idle_sessions_expire(client: ServiceClient) -> None:
    sid = await new_session(client, ttl_s=0.05)
    await asyncio.sleep(0.1)
    assert_error(await client.get(f"/v1/sessions/{sid}"), 404, "unknown_session")
    assert_error(await act(client, sid, [0.0, 0.0]), 404, "unknown_session")


async def test_full_service_refuses_new_sessions_with_429(
    make_client: Callable[..., Awaitable[ServiceClient]],
) -> None:
    c = await make_client(max_sessions=2, evict_idle_s=600)
    a, b = await new_session(c), await new_session(c)
    r = await c.post("/v1/sessions", json={})
    assert_error(r, 429, "capacity_exhausted")
    assert r.headers["retry-after"] == "1"
    assert_error(await act(c, None, [0.0, 0.0]), 429, "capacity_exhausted")
    assert (await info(c, a))["steps"] == 0 and (await info(c, b))["steps"] == 0


async def test_full_service_evicts_the_least_recently_used_idle_session(
    make_client: Callable[..., Awaitable[ServiceClient]],
) -> None:
    c = await make_client(max_sessions=2, evict_idle_s=0)
    old, recent = await new_session(c), await new_session(c)
    await action(c, old, [0.1, 0.1])
    await action(c, recent, [0.1, 0.1])  # now ``old`` is the least recently used
    newest = await new_session(c)
    assert_error(await c.get(f"/v1/sessions/{old}"), 404, "unknown_session")
    assert (await info(c, recent))["steps"] == 1
    assert (await info(c, newest))["steps"] == 0


# -- acting ------------------------------------------------------------------------------------------------
async def test_act_without_a_session_creates_one_and_numbers_its_first_step_0(client: ServiceClient) -> None:
    r = await act(client, None, [0.2, 0.1])
    assert r.status_code == 200
    body = r.json()
    assert body["step"] == 0 and len(body["action"]) == 2
    assert body["model_version"] == client.registry.engines["point-nav"].version
    assert isinstance(body["server_timing_us"], int) and body["server_timing_us"] >= 0
    got = await info(client, body["session_id"])
    assert (got["steps"], got["episodes"]) == (1, 1)


async def test_act_without_a_session_may_name_the_model(client: ServiceClient) -> None:
    r = await act(client, None, [0.2, 0.1], model="point-nav-trial")
    assert r.status_code == 200
    assert (await info(client, r.json()["session_id"]))["model"] == "point-nav-trial"


async def test_the_act_alias_is_the_same_route(client: ServiceClient) -> None:
    sid = await new_session(client)
    r = await client.post("/act", json={"session_id": sid, "observation": [0.3, 0.3], "step": 0})
    assert r.status_code == 200 and r.json()["step"] == 0
    r = await client.post("/act", json={"session_id": sid, "observation": [0.3, 0.3], "step": 5})
    assert_error(r, 409, "step_conflict")


async def test_steps_count_up_and_the_response_echoes_them(client: ServiceClient) -> None:
    sid = await new_session(client)
    for step, obs in enumerate(OBS):
        r = await act(client, sid, obs, step=step)
        assert r.json()["step"] == step
    r = await act(client, sid, [0.0, 0.0])  # without a step number: the next one
    assert r.json()["step"] == len(OBS)
    assert (await info(client, sid))["steps"] == len(OBS) + 1


async def test_actions_stay_within_the_bounds_and_some_reach_them(client: ServiceClient) -> None:
    sid = await new_session(client)
    observations = np.random.default_rng(3).normal(scale=30.0, size=(30, 2))
    actions = [await action(client, sid, obs.tolist(), reward=float(obs[0])) for obs in observations]
    stacked = np.stack(actions)
    assert np.all(np.abs(stacked) <= BOUND + 1e-7)
    assert np.any(np.isclose(np.abs(stacked), BOUND))


async def test_a_retried_step_returns_the_same_action_without_advancing(client: ServiceClient) -> None:
    sid, twin = await new_session(client), await new_session(client)
    first = await action(client, sid, OBS[0], step=0)
    second = await action(client, sid, OBS[1], reward=1.0, step=1)
    again = await action(client, sid, OBS[1], reward=1.0, step=1)
    np.testing.assert_array_equal(second, again)
    assert (await info(client, sid))["steps"] == 2
    # memory advanced once: the twin that sent step 1 once agrees on step 2
    np.testing.assert_array_equal(first, await action(client, twin, OBS[0], step=0))
    await action(client, twin, OBS[1], reward=1.0, step=1)
    np.testing.assert_array_equal(
        await action(client, sid, OBS[2], step=2), await action(client, twin, OBS[2], step=2)
    )


async def test_a_retry_racing_its_original_gets_the_same_action(client: ServiceClient) -> None:
    sid = await new_session(client)
    await action(client, sid, OBS[0], step=0)
    replies = await asyncio.gather(*(act(client, sid, OBS[1], step=1) for _ in range(3)))
    assert {r.status_code for r in replies} == {200}
    assert len({tuple(r.json()["action"]) for r in replies}) == 1
    assert (await info(client, sid))["steps"] == 2


async def test_sampled_actions_are_reproducible_from_the_seed(client: ServiceClient) -> None:
    a, b = [await new_session(client, deterministic=False, seed=42) for _ in range(2)]
    c = await new_session(client, deterministic=False, seed=43)
    d = await new_session(client)
    runs: dict[str, list[np.ndarray]] = {a: [], b: [], c: [], d: []}
    for step, obs in enumerate(OBS):
        for sid in runs:
            runs[sid].append(await action(client, sid, obs, reward=0.1, step=step))
    np.testing.assert_array_equal(np.stack(runs[a]), np.stack(runs[b]))
    assert not np.allclose(np.stack(runs[a]), np.stack(runs[c]))
    assert not np.allclose(np.stack(runs[a]), np.stack(runs[d]))
    assert np.all(np.abs(np.stack(runs[a])) <= BOUND + 1e-7)


async def test_applied_action_enters_memory(client: ServiceClient) -> None:
    plain, applied, same = [await new_session(client) for _ in range(3)]
    for sid in (plain, applied, same):
        await action(client, sid, OBS[0], step=0)
    returned = await action(client, same, OBS[1], step=1)
    await action(client, plain, OBS[1], step=1)
    await action(client, applied, OBS[1], step=1)
    nxt = {"reward": 0.5, "step": 2}
    base = await action(client, plain, OBS[2], **nxt)
    changed = await action(client, applied, OBS[2], applied_action=[-0.05, 0.05], **nxt)
    echoed = await action(client, same, OBS[2], applied_action=returned.tolist(), **nxt)
    assert not np.allclose(base, changed)
    np.testing.assert_allclose(base, echoed, atol=1e-6)


async def test_episode_start_clears_an_episode_scope_window(client: ServiceClient) -> None:
    sid, fresh = await new_session(client), await new_session(client)
    for step, obs in enumerate(OBS[:3]):
        await action(client, sid, obs, reward=1.0, step=step)
    restarted = await action(client, sid, OBS[3], reward=7.0, episode_start=True, step=3)
    np.testing.assert_allclose(restarted, await action(client, fresh, OBS[3], step=0), atol=1e-6)
    assert (await info(client, sid))["episodes"] == 2


# -- reset -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["episode", "trial"])
async def test_reset_on_an_episode_scope_model_clears_the_window(client: ServiceClient, scope: str) -> None:
    sid, fresh = await new_session(client), await new_session(client)
    for step, obs in enumerate(OBS[:3]):
        await action(client, sid, obs, reward=1.0, step=step)
    r = await client.post(f"/v1/sessions/{sid}/reset", json={"scope": scope})
    assert r.status_code == 200 and r.json()["steps"] == 3
    got = await action(client, sid, OBS[3], reward=5.0, step=3)
    np.testing.assert_allclose(got, await action(client, fresh, OBS[3], step=0), atol=1e-6)
    assert (await info(client, sid))["episodes"] == 2


async def test_reset_on_a_trial_scope_model_keeps_memory_for_an_episode_only(client: ServiceClient) -> None:
    episode, flagged, trial, fresh = [await new_session(client, model="point-nav-trial") for _ in range(4)]
    for sid in (episode, flagged, trial):
        for step, obs in enumerate(OBS[:2]):
            await action(client, sid, obs, reward=1.0, step=step)
    await client.post(f"/v1/sessions/{episode}/reset", json={"scope": "episode"})
    await client.post(f"/v1/sessions/{trial}/reset", json={"scope": "trial"})
    after_episode = await action(client, episode, OBS[3], step=2)
    after_flag = await action(client, flagged, OBS[3], episode_start=True, step=2)
    after_trial = await action(client, trial, OBS[3], step=2)
    first = await action(client, fresh, OBS[3], step=0)
    np.testing.assert_allclose(after_episode, after_flag, atol=1e-6)  # reset == episode_start flag
    assert not np.allclose(after_episode, first, atol=1e-6)  # the trial's memory was kept
    np.testing.assert_allclose(after_trial, first, atol=1e-6)  # a new trial starts from nothing


async def test_reset_without_a_body_is_an_episode_reset(client: ServiceClient) -> None:
    sid = await new_session(client)
    assert (await client.post(f"/v1/sessions/{sid}/reset")).status_code == 200


async def test_reset_errors(client: ServiceClient, twins: Twins) -> None:
    assert_error(
        await client.post("/v1/sessions/deadbeef/reset", json={"scope": "trial"}), 404, "unknown_session"
    )
    r = await client.post(f"/v1/sessions/{twins.target}/reset", json={"scope": "life"})
    assert_error(r, 422, "invalid_value")
    await twins.assert_untouched()


# -- every way an act can be refused, and the session unchanged after it -----------------------------------
def _raw(target: str, step: int, tail: str) -> bytes:
    return f'{{"session_id":"{target}","step":{step},{tail}}}'.encode()


BAD_ACTS: list[tuple[str, Callable[[str, int], dict[str, Any]], int, str]] = [
    (
        "obs too long",
        lambda t, s: {"json": {"session_id": t, "step": s, "observation": [0.1, 0.2, 0.3]}},
        422,
        "wrong_observation_length",
    ),
    (
        "obs empty",
        lambda t, s: {"json": {"session_id": t, "step": s, "observation": []}},
        422,
        "wrong_observation_length",
    ),
    ("NaN obs", lambda t, s: {"content": _raw(t, s, '"observation":[NaN,0.1]')}, 422, "non_finite"),
    (
        "Infinity reward",
        lambda t, s: {"content": _raw(t, s, '"observation":[0.1,0.1],"reward":Infinity')},
        422,
        "non_finite",
    ),
    ("1e400 obs", lambda t, s: {"content": _raw(t, s, '"observation":[1e400,0.1]')}, 422, "non_finite"),
    (
        "float32 overflow",
        lambda t, s: {"json": {"session_id": t, "step": s, "observation": [1e39, 0.0]}},
        422,
        "non_finite",
    ),
    (
        "obs beyond the input limit",
        lambda t, s: {"json": {"session_id": t, "step": s, "observation": [2e6, 0.0]}},
        422,
        "out_of_range",
    ),
    (
        "reward beyond the input limit",
        lambda t, s: {"json": {"session_id": t, "step": s, "observation": [0.1, 0.1], "reward": -1e7}},
        422,
        "out_of_range",
    ),
    (
        "step beyond int64",
        lambda t, s: {"json": {"session_id": t, "step": 2**63, "observation": [0.1, 0.1]}},
        422,
        "invalid_value",
    ),
    (
        "obs a string",
        lambda t, s: {"json": {"session_id": t, "step": s, "observation": "0.1,0.2"}},
        422,
        "wrong_type",
    ),
    (
        "obs holds a string",
        lambda t, s: {"json": {"session_id": t, "step": s, "observation": [0.1, "x"]}},
        422,
        "wrong_type",
    ),
    (
        "reward a string",
        lambda t, s: {"json": {"session_id": t, "step": s, "observation": [0.1, 0.1], "reward": "1"}},
        422,
        "wrong_type",
    ),
    (
        "step a float",
        lambda t, s: {"json": {"session_id": t, "step": s + 0.5, "observation": [0.1, 0.1]}},
        422,
        "wrong_type",
    ),
    (
        "episode_start an int",
        lambda t, s: {"json": {"session_id": t, "step": s, "observation": [0.1, 0.1], "episode_start": 1}},
        422,
        "wrong_type",
    ),
    ("body an array", lambda t, s: {"json": [t, s]}, 422, "wrong_type"),
    (
        "unknown field",
        lambda t, s: {"json": {"session_id": t, "step": s, "observation": [0.1, 0.1], "episode_star": True}},
        422,
        "unknown_field",
    ),
    ("no observation", lambda t, s: {"json": {"session_id": t, "step": s}}, 422, "missing_field"),
    (
        "negative step",
        lambda t, s: {"json": {"session_id": t, "step": -1, "observation": [0.1, 0.1]}},
        422,
        "invalid_value",
    ),
    (
        "applied too short",
        lambda t, s: {
            "json": {"session_id": t, "step": s, "observation": [0.1, 0.1], "applied_action": [0.1]}
        },
        422,
        "wrong_action_length",
    ),
    (
        "applied NaN",
        lambda t, s: {"content": _raw(t, s, '"observation":[0.1,0.1],"applied_action":[NaN,0]')},
        422,
        "non_finite",
    ),
    (
        "malformed JSON",
        lambda t, s: {"content": _raw(t, s, '"observation":[0.1,0.1]')[:-3]},
        400,
        "malformed_json",
    ),
    ("empty body", lambda t, s: {"content": b""}, 400, "malformed_json"),
    (
        "step ahead",
        lambda t, s: {"json": {"session_id": t, "step": s + 1, "observation": [0.1, 0.1]}},
        409,
        "step_conflict",
    ),
    (
        "step behind",
        lambda t, s: {"json": {"session_id": t, "step": s - 2, "observation": [0.1, 0.1]}},
        409,
        "step_conflict",
    ),
    ("form body", lambda t, s: {"data": {"session_id": t}}, 415, "unsupported_media_type"),
    (
        "text body",
        lambda t, s: {
            "content": _raw(t, s, '"observation":[0.1,0.1]'),
            "headers": {"content-type": "text/plain"},
        },
        415,
        "unsupported_media_type",
    ),
]


@pytest.mark.parametrize(("case", "request_of", "status", "code"), BAD_ACTS, ids=[c[0] for c in BAD_ACTS])
async def test_a_refused_act_leaves_the_session_untouched(
    client: ServiceClient,
    twins: Twins,
    case: str,
    request_of: Callable[[str, int], dict[str, Any]],
    status: int,
    code: str,
) -> None:
    r = await client.post("/v1/act", **request_of(twins.target, twins.steps))
    error = assert_error(r, status, code)
    if code == "step_conflict":
        assert error["detail"]["expected_step"] == twins.steps
    if code == "wrong_observation_length":
        assert (error["detail"]["expected"], error["detail"]["field"]) == (2, "observation")
    await twins.assert_untouched()


async def test_a_refused_act_without_a_session_creates_none(client: ServiceClient) -> None:
    before = len(client.registry.engines["point-nav"].table)
    assert_error(await act(client, None, [0.1]), 422, "wrong_observation_length")
    assert_error(await act(client, None, [0.1, 0.1], step=3), 409, "step_conflict")
    assert len(client.registry.engines["point-nav"].table) == before


async def test_unknown_session_is_404(client: ServiceClient) -> None:
    error = assert_error(await act(client, "0" * 32, [0.1, 0.1]), 404, "unknown_session")
    assert error["detail"]["session_id"] == "0" * 32


async def test_oversized_body_is_413_by_declared_length(client: ServiceClient, twins: Twins) -> None:
    limit = client.app.state.settings.max_body_bytes
    body = _raw(twins.target, twins.steps, '"observation":[0.1,0.1],"pad":"' + "x" * limit + '"')
    error = assert_error(await client.post("/v1/act", content=body), 413, "body_too_large")
    assert error["detail"]["max_bytes"] == limit
    await twins.assert_untouched()


async def test_oversized_body_is_413_by_streamed_length(client: ServiceClient, twins: Twins) -> None:
    limit = client.app.state.settings.max_body_bytes

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the size is only known by reading
        yield _raw(twins.target, twins.steps, '"observation":[0.1,0.1],"pad":"')[:-1]
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    r = await client.post("/v1/act", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")
    await twins.assert_untouched()


async def test_a_chunked_body_within_the_limit_is_accepted(client: ServiceClient) -> None:
    sid = await new_session(client)

    async def chunks() -> AsyncIterator[bytes]:
        yield f'{{"session_id":"{sid}",'.encode()
        yield b'"observation":[0.1,0.1]}'

    r = await client.post("/v1/act", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


# -- batch -------------------------------------------------------------------------------------------------
async def test_batch_answers_item_by_item(client: ServiceClient, twins: Twins) -> None:
    probe = await new_session(client)
    items: list[Any] = [
        {"session_id": probe, "observation": OBS[0], "step": 0},
        {"session_id": twins.target, "observation": [0.1, 0.2, 0.3], "step": twins.steps},
        {"observation": OBS[1]},
        {"session_id": twins.target, "observation": "bad", "step": twins.steps},
        {"session_id": "f" * 32, "observation": OBS[1]},
        {"session_id": twins.target, "observation": [0.1, 0.1], "step": twins.steps + 4},
    ]
    r = await client.post("/v1/act/batch", json={"items": items})
    assert r.status_code == 200, r.text
    out = r.json()["items"]
    assert len(out) == len(items)
    assert out[0]["session_id"] == probe and out[0]["step"] == 0
    assert out[1]["error"]["code"] == "wrong_observation_length"
    assert out[2]["step"] == 0 and out[2]["session_id"] not in (probe, twins.target)
    assert out[3]["error"]["code"] == "wrong_type"
    assert out[4]["error"]["code"] == "unknown_session"
    assert out[5]["error"]["code"] == "step_conflict"
    assert out[5]["error"]["detail"]["expected_step"] == twins.steps
    await twins.assert_untouched()


async def test_batch_items_give_the_single_act_actions_and_two_steps_of_a_session_run_in_order(
    client: ServiceClient,
) -> None:
    sids = [await new_session(client) for _ in range(3)]
    twins = [await new_session(client) for _ in range(3)]
    items = [{"session_id": s, "observation": OBS[i], "step": 0} for i, s in enumerate(sids)]
    items.append({"session_id": sids[0], "observation": OBS[3], "reward": 0.5, "step": 1})
    out = (await client.post("/v1/act/batch", json={"items": items})).json()["items"]
    assert [o["step"] for o in out] == [0, 0, 0, 1]
    for i, t in enumerate(twins):
        np.testing.assert_allclose(out[i]["action"], await action(client, t, OBS[i], step=0), atol=1e-6)
    second = await action(client, twins[0], OBS[3], reward=0.5, step=1)
    np.testing.assert_allclose(out[3]["action"], second, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"items": [', 400, "malformed_json"),
        (b'{"items": {"a": 1}}', 422, "wrong_type"),
        (b'{"things": []}', 422, "missing_field"),
        (b"[]", 422, "wrong_type"),
    ],
)
async def test_batch_envelope_errors(client: ServiceClient, body: bytes, status: int, code: str) -> None:
    r = await client.post("/v1/act/batch", content=body, headers={"content-type": "application/json"})
    assert_error(r, status, code)


async def test_empty_batch_is_an_empty_answer(client: ServiceClient) -> None:
    r = await client.post("/v1/act/batch", json={"items": []})
    assert r.json() == {"items": []}


async def test_batch_items_share_one_forward_pass(client: ServiceClient) -> None:
    sids = [await new_session(client) for _ in range(20)]
    engine = client.registry.engines["point-nav"]
    ticks = engine.ticks
    items = [{"session_id": s, "observation": OBS[0]} for s in sids]
    r = await client.post("/v1/act/batch", json={"items": items})
    assert r.status_code == 200
    assert engine.ticks == ticks + 1


async def test_error_bodies_are_json_with_the_documented_shape(client: ServiceClient) -> None:
    r = await client.post("/v1/act", content=b"{", headers={"content-type": "application/json"})
    assert r.headers["content-type"] == "application/json"
    assert set(json.loads(r.content)) == {"error"}


async def test_openapi_has_an_example_for_every_route(client: ServiceClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]

    def has_example(content: dict[str, Any]) -> bool:
        for media in content.values():
            if "example" in media or "examples" in media:
                return True
            ref = media.get("schema", {}).get("$ref", "")
            if ref and "examples" in schemas[ref.rsplit("/", 1)[1]]:
                return True
        return False

    operations = [(path, m, op) for path, item in doc["paths"].items() for m, op in item.items()]
    assert len(operations) >= 12
    for path, method, op in operations:
        ok = op["responses"].get("200") or op["responses"].get("201") or op["responses"].get("204")
        assert ok is not None, (path, method)
        if "content" in ok:
            assert has_example(ok["content"]), (path, method)
        if "requestBody" in op:
            assert has_example(op["requestBody"]["content"]), (path, method)
            assert "application/msgpack" in op["requestBody"]["content"], (path, method)
    for path in ("/v1/sessions/{session_id}/state", "/metrics"):
        assert path in doc["paths"]
    assert "/v1/openpi" in doc["info"]["description"]


async def test_an_integral_float_is_an_integer(client: ServiceClient) -> None:
    """JSON Schema's ``integer`` includes ``4.0``: what the document allows, validation takes."""
    r = await client.post("/v1/sessions", json={"seed": 4.0, "deterministic": False})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    assert (await info(client, sid))["seed"] == 4
    assert (await act(client, sid, OBS[0], step=0.0)).status_code == 200
    assert_error(await act(client, sid, OBS[1], step=1.5), 422, "wrong_type")


async def test_a_huge_observation_cannot_turn_actions_nan(client: ServiceClient) -> None:
    """Inputs from about 1e18 on overflow the float32 forward pass: refused at the edge instead."""
    sid = await new_session(client)
    assert_error(await act(client, sid, [1e20, 0.0], step=0), 422, "out_of_range")
    got = await action(client, sid, [1e6, -1e6], reward=1e6, step=0)  # the limit itself is taken
    assert np.isfinite(got).all()


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/sessions/some-id", "GET, DELETE"),
        ("GET", "/v1/act", "POST"),
        ("DELETE", "/v1/sessions", "POST"),
        ("TRACE", "/v1/sessions/some-id/state", "GET, PUT"),
    ],
)
async def test_405_names_the_allowed_methods(
    client: ServiceClient, method: str, path: str, allow: str
) -> None:
    r = await client.request(method, path)
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == allow


async def test_msgpack_is_answered_in_msgpack_on_every_v1_route(client: ServiceClient) -> None:
    mp = {"Accept": "application/msgpack"}
    r = await client.get("/v1/models", headers=mp)
    assert r.headers["content-type"] == "application/msgpack"
    assert unpackb(r.content)["models"][0]["name"] == "point-nav"
    r = await client.put("/v1/sessions/x", headers=mp)
    assert r.status_code == 405 and unpackb(r.content)["error"]["code"] == "method_not_allowed"


async def test_the_document_carries_what_validation_enforces(client: ServiceClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    observation = schemas["ActRequest"]["properties"]["observation"]
    # Both test models take 2 numbers; each must be within the engine's input limit.
    assert (observation["minItems"], observation["maxItems"]) == (2, 2)
    assert observation["items"]["maximum"] == 1e6 and observation["items"]["minimum"] == -1e6
    window = schemas["SessionState"]["properties"]["window"]
    assert (window["minItems"], window["maxItems"]) == (3, 5)  # point-nav-trial holds 3, point-nav 5
    assert schemas["SessionState"]["properties"]["length"]["maximum"] == 5
    assert schemas["ActRequest"]["properties"]["step"]["anyOf"][0]["exclusiveMaximum"] == 2**63
    replies = doc["paths"]["/v1/act"]["post"]["responses"]
    for status in ("200", "404", "422"):
        assert set(replies[status]["content"]) == {"application/json", "application/msgpack"}
    assert set(doc["paths"]["/healthz"]["get"]["responses"]["200"]["content"]) == {"application/json"}


async def test_the_document_names_the_bearer_scheme_only_when_keys_are_required(
    client: ServiceClient, make_client: Callable[..., Awaitable[ServiceClient]]
) -> None:
    assert "securitySchemes" not in (await client.get("/openapi.json")).json()["components"]
    keyed = await make_client(api_keys=["key-a"])
    doc = (await keyed.get("/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (TRMRL_API_KEYS): `Authorization: Bearer <key>`.",
    }
    assert doc["paths"]["/v1/act"]["post"]["security"] == [{"apiKey": []}]
    assert doc["paths"]["/v1/sessions/{session_id}"]["delete"]["security"] == [{"apiKey": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]


def _sessions(client: ServiceClient) -> dict[str, int]:
    return {name: len(engine.table) for name, engine in client.registry.engines.items()}


async def test_a_step_naming_no_model_says_which_model_checked_it_and_how_to_choose(
    client: ServiceClient,
) -> None:
    before = _sessions(client)
    r = await client.post("/v1/act", json={"observation": [0.1, 0.2, 0.3]})
    error = assert_error(r, 422, "wrong_observation_length")
    message = error["message"]
    assert "\n" not in message and "must hold 2 numbers, got 3" in message
    assert "default model 'point-nav'" in message and "'point-nav-trial'" in message and "'model'" in message
    assert error["detail"]["model"] == "point-nav" and error["detail"]["expected"] == 2
    assert error["detail"]["models"] == ["point-nav", "point-nav-trial"]
    assert _sessions(client) == before  # no session was created for the refused step
    # A step that names its model (or its session) hears the plain message.
    r = await client.post("/v1/act", json={"model": "point-nav", "observation": [0.1, 0.2, 0.3]})
    assert "default" not in assert_error(r, 422, "wrong_observation_length")["message"]
    assert _sessions(client) == before


async def test_an_integral_float_count_is_an_integer(client: ServiceClient) -> None:
    before = _sessions(client)
    r = await client.post("/v1/sessions", json={"count": 3.0})
    assert r.status_code == 201, r.text
    assert len(r.json()["session_ids"]) == 3
    assert _sessions(client)["point-nav"] == before["point-nav"] + 3
    for refused in (2.5, 0.0, "3"):
        r = await client.post("/v1/sessions", json={"count": refused})
        assert r.status_code == 422, r.text
    assert _sessions(client)["point-nav"] == before["point-nav"] + 3
