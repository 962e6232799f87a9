"""Serialising replies straight to bytes: JSON by pydantic's serializer, MessagePack by the shared codec.

In the service a *reply* is what goes back to a client on the wire -- an HTTP response built here, or a
stream's frame; the models of :mod:`service.schemas` (``ActResponse`` and the others) are its bodies.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Response
from pydantic import BaseModel
from trmrl_client.codec import packb

from service.api.columnar import ColumnarResult
from service.errors import ApiError

MSGPACK = "application/msgpack"


def json_reply(body: BaseModel, status: int = 200) -> Response:
    """``body`` as JSON, whatever the request asked for (health probes)."""
    return Response(body.model_dump_json().encode(), status_code=status, media_type="application/json")


def reply(body: BaseModel, status: int = 200, *, msgpack: bool = False) -> Response:
    """``body`` as JSON, or as MessagePack (same field names, arrays as lists) when ``msgpack``."""
    if msgpack:
        return Response(packb(body.model_dump()), status_code=status, media_type=MSGPACK)
    return json_reply(body, status)


def columnar_reply(result: ColumnarResult, *, msgpack: bool = False) -> Response:
    """A columnar tick's answer: arrays as msgpack-numpy maps, or nested lists in JSON."""
    if msgpack:
        return Response(packb(result.body(arrays=True)), media_type=MSGPACK)
    payload = json.dumps(result.body(arrays=False), separators=(",", ":"), allow_nan=False).encode()
    return Response(payload, media_type="application/json")


def error_reply(error: ApiError, *, msgpack: bool = False, headers: dict[str, str] | None = None) -> Response:
    # Capacity, overload and readiness are transient: tell well-behaved clients when to come back.
    if error.status in (429, 503):
        headers = {**(headers or {}), "Retry-After": "1"}
    body: dict[str, Any] = error.body()
    if msgpack:
        return Response(packb(body), status_code=error.status, media_type=MSGPACK, headers=headers)
    payload = json.dumps(body, separators=(",", ":")).encode()
    return Response(payload, status_code=error.status, media_type="application/json", headers=headers)
