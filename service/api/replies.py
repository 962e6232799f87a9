"""Serialising replies straight to bytes: JSON by pydantic's serializer, MessagePack by the shared codec.

In the service a *reply* is what goes back to a client on the wire -- an HTTP response built here, or a
stream's frame; its body is a model of :mod:`service.api.schemas`, or a record of the core
(:mod:`service.core.records`) with the same fields, serialised by the same serializer.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Response
from pydantic import BaseModel, TypeAdapter
from trmrl_client.codec import packb

from service.api.columnar import columnar_body
from service.api.errors import status_of
from service.core.errors import ServiceError
from service.core.records import ColumnarResult

MSGPACK = "application/msgpack"


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(kind: type) -> TypeAdapter[Any]:
    """The serializer of a core record (a dataclass), built once per type."""
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


class JSONBytes(Response):
    """Serialised JSON as a response: the headers Starlette's ``Response(payload,
    media_type="application/json")`` builds (``content-length``, then ``content-type``), set directly
    rather than through its general header handling (a few µs on the act routes)."""

    media_type = "application/json"

    def __init__(self, payload: bytes, status_code: int = 200) -> None:
        self.status_code = status_code
        self.background = None
        self.body = payload
        self.raw_headers = [(b"content-length", b"%d" % len(payload)), (b"content-type", b"application/json")]


def json_reply(body: Any, status: int = 200) -> Response:
    """``body`` (a schema model or a core record) as JSON, whatever the request asked for (health probes)."""
    if isinstance(body, BaseModel):
        payload = body.model_dump_json().encode()
    else:
        payload = _adapter(type(body)).dump_json(body)
    return JSONBytes(payload, status)


def reply(body: Any, status: int = 200, *, msgpack: bool = False) -> Response:
    """``body`` as JSON, or as MessagePack (same field names, arrays as lists) when ``msgpack``."""
    if msgpack:
        fields = body.model_dump() if isinstance(body, BaseModel) else _adapter(type(body)).dump_python(body)
        return Response(packb(fields), status_code=status, media_type=MSGPACK)
    return json_reply(body, status)


def columnar_reply(result: ColumnarResult, *, msgpack: bool = False) -> Response:
    """A columnar tick's answer: arrays as msgpack-numpy maps, or nested lists in JSON."""
    if msgpack:
        return Response(packb(columnar_body(result, arrays=True)), media_type=MSGPACK)
    payload = json.dumps(columnar_body(result, arrays=False), separators=(",", ":"), allow_nan=False).encode()
    return Response(payload, media_type="application/json")


def error_reply(
    error: ServiceError, *, msgpack: bool = False, headers: dict[str, str] | None = None
) -> Response:
    # Capacity, overload and readiness are transient: tell well-behaved clients when to come back.
    status = status_of(error)
    if status in (429, 503):
        headers = {**(headers or {}), "Retry-After": "1"}
    body: dict[str, Any] = error.body()
    if msgpack:
        return Response(packb(body), status_code=status, media_type=MSGPACK, headers=headers)
    payload = json.dumps(body, separators=(",", ":")).encode()
    return Response(payload, status_code=status, media_type="application/json", headers=headers)
