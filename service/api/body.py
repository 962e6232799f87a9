"""Request bodies: the one place a body is read, size-checked, decoded and validated.

Routes take raw ``Request`` objects and call :func:`parse_body` instead of letting FastAPI decode
JSON itself, so that every body -- JSON or MessagePack -- goes through the same limit and the same
mapping of failures to error codes.

MessagePack bodies are decoded by the one codec client and service share
(:mod:`trmrl_client.codec`): arrays may be plain lists or msgpack-numpy maps, object dtypes are
refused and nothing is ever unpickled. Decoded arrays become lists, and the result is validated by
the same strict models as JSON.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Scope
from trmrl_client.codec import CodecError, unpackb

from service.api import errors
from service.api.columnar import decode_columnar, is_columnar
from service.api.schemas.act import ActBatchRequest, ActRequest
from service.core.errors import ServiceError
from service.core.records import ColumnarTick

M = TypeVar("M", bound=BaseModel)

JSON = "application/json"
MSGPACK = "application/msgpack"
MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})


def wants_msgpack(scope: Scope) -> bool:
    """Reply in MessagePack: ``Accept`` names it, or the body is MessagePack and ``Accept`` wants no JSON."""
    kind = accept = b""
    for name, value in scope["headers"]:
        if name == b"accept":
            accept = value
        elif name == b"content-type":
            kind = value
    if b"msgpack" in accept:
        return True
    return b"msgpack" in kind and b"json" not in accept


def plain(value: Any) -> Any:
    """A decoded MessagePack value with numpy arrays and scalars turned into lists and numbers.

    The openpi codec writes a numpy scalar as ``{"__npgeneric__": true, "data": x, "dtype": ...}``;
    that becomes ``x``.
    """
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, dict):
        if value.get(b"__npgeneric__", value.get("__npgeneric__")) is True:
            return plain(value.get(b"data", value.get("data")))
        return {plain_key(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def plain_key(key: Any) -> Any:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key


def decode_msgpack(raw: bytes, *, arrays: bool = False) -> Any:
    """Decode a MessagePack body (400 ``malformed_msgpack`` if it is not one).

    ``arrays``: keep msgpack-numpy arrays as numpy arrays (the columnar form); otherwise everything
    becomes plain Python values for the pydantic models.
    """
    try:
        data = unpackb(raw)
    except CodecError as exc:
        raise errors.malformed_msgpack(str(exc)) from None
    return data if arrays else plain(data)


def decode_json(raw: bytes | str) -> Any:
    """Parse JSON (400 ``malformed_json`` if it is not)."""
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise errors.malformed_json(str(exc)) from None


def decode_tick(raw: bytes | str, is_msgpack: bool) -> ColumnarTick:
    """A columnar tick from a body or a stream frame (4xx for a malformed one)."""
    data = decode_msgpack(raw, arrays=True) if is_msgpack else decode_json(raw)  # type: ignore[arg-type]
    if not isinstance(data, dict):
        raise errors.not_a_map(data)
    return decode_columnar(data)


def _content_headers(request: Request) -> tuple[str, bytes | None]:
    """Content type and declared length, in one pass over the raw ASGI headers (names are lower case)."""
    kind, length = b"", None
    for name, value in request.scope["headers"]:
        if name == b"content-type":
            kind = value
        elif name == b"content-length":
            length = value
    return kind.split(b";", 1)[0].strip().lower().decode("latin-1") or JSON, length


async def read_body(request: Request, declared: bytes | None, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    ``Content-Length`` is checked first; the streamed size is checked too, since a chunked request
    declares none and a client may lie.
    """
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ServiceError("bad_content_length", "The Content-Length header is not a number.") from None
        if size > limit:
            raise errors.body_too_large(limit)
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise errors.body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _raw_body(request: Request, limit: int) -> tuple[bytes, bool]:
    """The body and whether it is MessagePack (else JSON)."""
    kind, declared = _content_headers(request)
    is_msgpack = kind in MSGPACK_TYPES
    if not is_msgpack and kind != JSON and not kind.endswith("+json"):
        raise errors.unsupported_media_type(kind)
    return await read_body(request, declared, limit), is_msgpack


def validate(model: type[M], data: Any) -> M:
    """Validate decoded values as ``model`` (the strict models refuse what JSON would refuse)."""
    if not isinstance(data, dict):
        raise errors.not_a_map(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise errors.from_validation(exc) from None


async def parse_body(request: Request, model: type[M], limit: int, *, empty_ok: bool = False) -> M:
    """Decode and validate a body as ``model``; ``empty_ok``: an empty body means ``{}``."""
    raw, is_msgpack = await _raw_body(request, limit)
    if empty_ok and not raw.strip():
        return model.model_validate({})
    if is_msgpack:
        return validate(model, decode_msgpack(raw))
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise errors.from_validation(exc) from None


async def parse_act_batch(request: Request, limit: int) -> list[ActRequest | ServiceError] | ColumnarTick:
    """Decode a batch: the columnar form as a :class:`ColumnarTick`, or ``{"items": [...]}``, each
    item a validated act request or its own error.

    Items are validated in one pass first (the common, all-valid case); only when that fails are
    they validated one by one, so that one bad item does not sink the others.
    """
    raw, is_msgpack = await _raw_body(request, limit)
    data: Any = None
    if is_msgpack:
        data = decode_msgpack(raw, arrays=True)
        if is_columnar(data):
            return decode_columnar(data)
        data = plain(data)
    elif b'"session_ids"' in raw or b'"observations"' in raw:
        # Only a columnar body names these fields; an item list goes to pydantic's parser unparsed.
        data = decode_json(raw)
        if is_columnar(data):
            return decode_columnar(data)
    try:
        if data is not None:
            return list(validate(ActBatchRequest, data).items)
        return list(ActBatchRequest.model_validate_json(raw).items)
    except ValidationError as exc:
        failure = errors.from_validation(exc)
    except ServiceError as exc:
        failure = exc
    if failure.code == "malformed_json":
        raise failure
    if data is None:
        data = json.loads(raw)
    if not (isinstance(data, dict) and set(data) == {"items"} and isinstance(data["items"], list)):
        raise failure
    out: list[ActRequest | ServiceError] = []
    for entry in data["items"]:
        try:
            out.append(ActRequest.model_validate(entry))
        except ValidationError as item_exc:
            out.append(errors.from_validation(item_exc))
    return out
