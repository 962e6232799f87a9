"""MessagePack bodies on the act routes: lists or msgpack-numpy maps in, MessagePack out; bad ones refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from service_support import OBS, ServiceClient, Twins, action, new_session
from trmrl_client.codec import packb, unpackb

pytestmark = pytest.mark.anyio

MSGPACK = {"Content-Type": "application/msgpack"}


async def post_msgpack(client: httpx.AsyncClient, path: str, body: Any, **headers: str) -> httpx.Response:
    return await client.post(path, content=packb(body), headers={**MSGPACK, **headers})


@pytest.mark.parametrize("path", ["/v1/act", "/act"])
@pytest.mark.parametrize("as_array", [False, True], ids=["lists", "ndarrays"])
async def test_act_in_msgpack_matches_json(client: ServiceClient, path: str, as_array: bool) -> None:
    json_sid, mp_sid = await new_session(client), await new_session(client)
    for step, obs in enumerate(OBS):
        want = await action(client, json_sid, obs, reward=0.5, step=step)
        observation: Any = np.asarray(obs, np.float32) if as_array else obs
        reward: Any = np.float32(0.5) if as_array else 0.5
        r = await post_msgpack(
            client, path, {"session_id": mp_sid, "observation": observation, "reward": reward, "step": step}
        )
        assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
        got = unpackb(r.content)
        assert (got["session_id"], got["step"]) == (mp_sid, step)
        np.testing.assert_allclose(got["action"], want, rtol=0, atol=1e-6)


async def test_batch_in_msgpack(client: ServiceClient) -> None:
    sids = [await new_session(client) for _ in range(3)]
    items = [{"session_id": s, "observation": np.asarray(OBS[i], np.float32)} for i, s in enumerate(sids)]
    items.append({"session_id": sids[0], "observation": [1.0]})  # a bad item among good ones
    r = await post_msgpack(client, "/v1/act/batch", {"items": items})
    assert r.status_code == 200
    got = unpackb(r.content)["items"]
    assert [g.get("session_id") for g in got[:3]] == sids
    assert got[3]["error"]["code"] == "wrong_observation_length"


async def test_accept_header_picks_the_reply_encoding(client: ServiceClient) -> None:
    r = await client.post(
        "/v1/act", json={"observation": [0.1, 0.2]}, headers={"Accept": "application/msgpack"}
    )
    assert r.headers["content-type"] == "application/msgpack" and len(unpackb(r.content)["action"]) == 2
    r = await post_msgpack(client, "/v1/act", {"observation": [0.1, 0.2]}, Accept="application/json")
    assert r.headers["content-type"] == "application/json" and len(r.json()["action"]) == 2


def _array_map(data: bytes, dtype: str, shape: list[int]) -> dict[bytes, Any]:
    """A msgpack-numpy map written by hand, so that it can lie."""
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def _raw(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


Body = Callable[[str, int], bytes]

BAD_BODIES: list[tuple[str, Body, int, str]] = [
    ("reserved-byte", lambda sid, step: b"\xc1", 400, "malformed_msgpack"),
    (
        "truncated",
        lambda sid, step: packb({"session_id": sid, "observation": [0.1, 0.2]})[:-3],
        400,
        "malformed_msgpack",
    ),
    (
        "trailing-data",
        lambda sid, step: packb({"session_id": sid, "observation": [0.1, 0.2]}) + b"\x00",
        400,
        "malformed_msgpack",
    ),
    (
        "object-dtype",
        lambda sid, step: _raw({"session_id": sid, "observation": _array_map(b"\x00" * 16, "|O", [2])}),
        400,
        "malformed_msgpack",
    ),
    (
        "short-data",
        lambda sid, step: _raw({"session_id": sid, "observation": _array_map(b"\x00" * 3, "<f4", [2])}),
        400,
        "malformed_msgpack",
    ),
    ("not-a-map", lambda sid, step: packb([sid, 1, 2]), 422, "wrong_type"),
    (
        "string-observation",
        lambda sid, step: packb({"session_id": sid, "step": step, "observation": "ab"}),
        422,
        "wrong_type",
    ),
    (
        "short-observation",
        lambda sid, step: packb({"session_id": sid, "step": step, "observation": [0.1]}),
        422,
        "wrong_observation_length",
    ),
    (
        "nan",
        lambda sid, step: packb(
            {"session_id": sid, "step": step, "observation": np.array([np.nan, 0], np.float32)}
        ),
        422,
        "non_finite",
    ),
    (
        "unknown-field",
        lambda sid, step: packb({"session_id": sid, "step": step, "observation": [0.1, 0.2], "bogus": 1}),
        422,
        "unknown_field",
    ),
    (
        "2-d-observation",
        lambda sid, step: packb(
            {"session_id": sid, "step": step, "observation": np.zeros((1, 2), np.float32)}
        ),
        422,
        "wrong_type",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "code"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES]
)
async def test_bad_msgpack_bodies_are_refused_and_the_session_is_unchanged(
    twins: Twins,
    body: Body,
    status: int,
    code: str,
) -> None:
    for path in ("/v1/act", "/act"):
        r = await twins.client.post(path, content=body(twins.target, twins.steps), headers=MSGPACK)
        assert r.status_code == status, r.content
        error = unpackb(r.content)["error"]
        assert error["code"] == code and error["message"]
    await twins.assert_untouched()


async def test_sessions_routes_speak_msgpack_too(client: ServiceClient) -> None:
    r = await post_msgpack(client, "/v1/sessions", {"model": "point-nav-trial", "seed": 3})
    assert r.status_code == 201 and unpackb(r.content)["model"]["name"] == "point-nav-trial"
    r = await client.post("/v1/sessions", content=b"\xc1", headers=MSGPACK)
    assert r.status_code == 400 and unpackb(r.content)["error"]["code"] == "malformed_msgpack"
