"""The FastAPI application: ``create_app(settings)`` builds it; its lifespan loads and warms the models."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

import trmrl
from service.api.deps import BODY_SCHEMAS
from service.api.fastpath import hot_handler, serve_hot
from service.api.replies import error_reply
from service.api.routes import act, health, models, sessions
from service.config import Settings
from service.errors import ApiError, from_validation_errors
from service.registry import ModelRegistry

log = logging.getLogger("trmrl.service")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load every checkpoint and warm it up (off the event loop), then report ready."""
    settings: Settings = app.state.settings
    if settings.api_keys or settings.api_keys_file:
        # Refuse rather than serve openly while the operator believes keys protect the service.
        raise RuntimeError("API keys are configured, but this build does not enforce them yet")
    log.warning("no API keys configured: every client can reach every session")
    registry = app.state.registry
    if registry is None:
        registry = await asyncio.to_thread(ModelRegistry.load, settings)
        app.state.registry = registry
    await registry.start()
    app.state.ready = True
    try:
        yield
    finally:
        app.state.ready = False
        await registry.stop()


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_reply(exc)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return error_reply(ApiError(exc.status_code, code, str(exc.detail)))

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_reply(from_validation_errors(list(exc.errors())))

    async def internal_error(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_reply(ApiError(500, "internal_error", "The service failed on this request."))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


class ServiceApp(FastAPI):
    """FastAPI, with the act routes answered before its middleware stack (see ``service.api.fastpath``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = hot_handler(scope)
        if handler is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # what FastAPI would set: handlers reach the settings and models through it
        await serve_hot(handler, scope, receive, send)


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """Build the service. ``registry``: already-loaded models (tests); otherwise the lifespan loads them."""
    settings = settings or Settings()
    app = ServiceApp(
        title="trmrl policy service",
        version=trmrl.__version__,
        summary="Meta-trained TrMRL policies with per-session memory, all sessions stepped in one batch.",
        lifespan=lifespan,
        # The service exports its own metrics; FastAPI's OpenTelemetry hooks would only add a
        # provider lookup to every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.ready = False
    _install_error_handlers(app)
    for module in (health, models, sessions, act):
        app.include_router(module.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(BODY_SCHEMAS)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
