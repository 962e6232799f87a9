"""Serialising replies straight to bytes (pydantic's serializer; no ``jsonable_encoder`` pass)."""

from __future__ import annotations

import json

from fastapi import Response
from pydantic import BaseModel

from service.errors import ApiError


def json_reply(body: BaseModel, status: int = 200) -> Response:
    return Response(body.model_dump_json().encode(), status_code=status, media_type="application/json")


def error_reply(error: ApiError) -> Response:
    # Capacity and readiness are transient: tell well-behaved clients when to come back.
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    body = json.dumps(error.body(), separators=(",", ":")).encode()
    return Response(body, status_code=error.status, media_type="application/json", headers=headers)
