"""Request bodies: the one place a body is read, size-checked, decoded and validated.

Routes take raw ``Request`` objects and call :func:`parse_body` instead of letting FastAPI decode
JSON itself, so that every body -- JSON now, MessagePack next -- goes through the same limit and the
same mapping of failures to error codes.
"""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from service import errors
from service.errors import ApiError
from service.schemas import ActBatchRequest, ActRequest

M = TypeVar("M", bound=BaseModel)

JSON = "application/json"


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
            raise ApiError(400, "bad_content_length", "The Content-Length header is not a number.") from None
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


async def _raw_body(request: Request, limit: int) -> bytes:
    kind, declared = _content_headers(request)
    if kind != JSON and not kind.endswith("+json"):
        raise errors.unsupported_media_type(kind)
    return await read_body(request, declared, limit)


async def parse_body(request: Request, model: type[M], limit: int, *, empty_ok: bool = False) -> M:
    """Decode and validate a body as ``model``; ``empty_ok``: an empty body means ``{}``."""
    raw = await _raw_body(request, limit)
    if empty_ok and not raw.strip():
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise errors.from_validation(exc) from None


async def parse_act_batch(request: Request, limit: int) -> list[ActRequest | ApiError]:
    """Decode ``{"items": [...]}``; each item becomes a validated act request or its own error.

    The whole body is validated in one pass first (the common, all-valid case); only when that fails
    are the items validated one by one, so that one bad item does not sink the others.
    """
    raw = await _raw_body(request, limit)
    try:
        return list(ActBatchRequest.model_validate_json(raw).items)
    except ValidationError as exc:
        failure = errors.from_validation(exc)
    if failure.code == "malformed_json":
        raise failure
    data = json.loads(raw)
    if not (isinstance(data, dict) and set(data) == {"items"} and isinstance(data["items"], list)):
        raise failure
    out: list[ActRequest | ApiError] = []
    for entry in data["items"]:
        try:
            out.append(ActRequest.model_validate(entry))
        except ValidationError as item_exc:
            out.append(errors.from_validation(item_exc))
    return out
