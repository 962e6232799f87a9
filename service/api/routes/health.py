"""Liveness and readiness probes and the Prometheus metrics (never authenticated)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.deps import error_docs
from service.api.replies import error_reply, json_reply
from service.api.schemas.common import Status
from service.core.errors import ServiceError
from service.metrics import CONTENT_TYPE, ServiceMetrics

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Status,
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
async def healthz() -> Response:
    """Liveness: the process is up and its event loop answers."""
    return json_reply(Status(status="ok"))


@router.get(
    "/readyz",
    response_model=Status,
    responses={200: {"content": {"application/json": {"example": {"status": "ready"}}}}, **error_docs(503)},
)
async def readyz(request: Request) -> Response:
    """Readiness: 200 once every model is loaded and warmed up, 503 while starting or draining."""
    if not request.app.state.ready:
        return error_reply(ServiceError("not_ready", "The service is starting or draining."))
    return json_reply(Status(status="ready"))


_METRICS_EXAMPLE = (
    "# HELP trmrl_batch_size Steps per forward pass.\n"
    "# TYPE trmrl_batch_size histogram\n"
    'trmrl_batch_size_bucket{le="1.0",model="point-nav"} 12.0\n'
    "...\n"
    'trmrl_active_sessions{model="point-nav"} 256.0\n'
)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {"example": _METRICS_EXAMPLE}}, "description": "Prometheus text."}
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus text: latency per route, batch sizes, queue wait, sessions, evictions, device memory."""
    service_metrics: ServiceMetrics = request.app.state.metrics
    return Response(service_metrics.render(), media_type=CONTENT_TYPE)
