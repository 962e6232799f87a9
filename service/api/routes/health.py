"""Liveness and readiness probes (never authenticated)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.deps import error_docs
from service.api.replies import error_reply, json_reply
from service.errors import ApiError
from service.schemas import Status

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status)
async def healthz() -> Response:
    """Liveness: the process is up and its event loop answers."""
    return json_reply(Status(status="ok"))


@router.get("/readyz", response_model=Status, responses=error_docs(503))
async def readyz(request: Request) -> Response:
    """Readiness: 200 once every model is loaded and warmed up, 503 while starting or stopping."""
    if not request.app.state.ready:
        return error_reply(ApiError(503, "not_ready", "The service is starting or draining."))
    return json_reply(Status(status="ready"))
