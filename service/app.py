"""The FastAPI application: ``create_app(settings)`` builds it; its lifespan loads and warms the models."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

import trmrl
from service.api import errors
from service.api.body import wants_msgpack
from service.api.deps import BODY_SCHEMAS
from service.api.fastpath import hot_handler, serve_hot
from service.api.openapi import finish as finish_document
from service.api.replies import error_reply
from service.api.routes import act, admin, fleet, health, models, sessions, streams
from service.auth import Authenticator
from service.config import Settings
from service.core.background import cancel
from service.core.engine import Engine
from service.core.errors import ServiceError
from service.core.recording import Recorder
from service.core.registry import ModelRegistry
from service.core.snapshot_file import count_sessions, read_sessions, write_sessions
from service.core.snapshots import export_all, import_all
from service.fleet import Fleet
from service.lifecycle import (
    apply_activation,
    load_models,
    read_manifest,
    restore_versions,
    watch,
    write_manifest,
)
from service.metrics import ServiceMetrics

log = logging.getLogger("trmrl.service")

DESCRIPTION = """
Every `/v1` route and `/act` need `Authorization: Bearer <api key>` when keys are configured
(`TRMRL_API_KEYS`, `TRMRL_API_KEYS_FILE`); a session is visible only to the key that created it.
Bodies are JSON or MessagePack (`application/msgpack`; arrays as lists or msgpack-numpy maps); the reply
follows `Accept`, else the request's content type.

WebSocket routes (not listed below, as OpenAPI cannot describe them):

* `WS /v1/sessions/{session_id}/stream`: send act frames `{"observation": [...], "reward"?, "episode_start"?,
  "step"?, "applied_action"?}` as JSON text or MessagePack binary frames; each gets the `/v1/act` reply (or an
  error object) in the same encoding. A bad frame gets an error frame and the stream stays open.
* `WS /v1/stream?model=<name>`: the vectorised stream: each frame is a whole tick of many sessions in the
  columnar form of `POST /v1/act/batch` (`session_ids`, `observations [B, obs_dim]`, ...; MessagePack binary
  frames with msgpack-numpy arrays, or JSON text frames), answered by the columnar reply in the same encoding,
  with per-row errors. A malformed frame gets an error frame and the stream stays open.
* `WS /v1/openpi?model=<name>&session_id=<id>`: the openpi websocket policy protocol (`openpi-client`):
  metadata on connect, then `{"observation", "reward"?, "episode_start"?}` ->
  `{"actions": float32 [1, act_dim], "server_timing": {...}}`. `Authorization: Api-Key <key>` is accepted.
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load every checkpoint and warm it up (off the event loop), restore saved sessions, report ready.

    On shutdown: not ready, no new sessions, queued steps finished, every session written to the
    state directory.
    """
    settings: Settings = app.state.settings
    if not app.state.auth.enabled:
        log.warning("no API keys configured: every client can reach every session")
    registry: ModelRegistry | None = app.state.registry
    if registry is None:
        registry = await asyncio.to_thread(load_models, settings)
        app.state.registry = registry
    saved_models = await asyncio.to_thread(read_manifest, settings.state_dir)
    if saved_models is not None:
        await asyncio.to_thread(restore_versions, registry, saved_models)
        apply_activation(registry, saved_models)
    recorder = None
    if settings.record_dir is not None:
        recorder = Recorder(
            settings.record_dir,
            buffer_rows=settings.record_buffer_rows,
            rotate_rows=settings.record_rotate_rows,
            rotate_s=settings.record_rotate_s,
        )
    registry.recorder = recorder
    registry.record_fraction = settings.record_fraction if recorder is not None else 0.0
    for engine in registry.all_engines():
        engine.recorder = recorder
    app.state.metrics.attach(registry)
    app.state.fleet.start(registry)
    registry.draining = False  # a registry reused by a second lifespan comes back from a drain
    await registry.start()
    if settings.state_dir is not None:
        saved = await asyncio.to_thread(read_sessions, settings.state_dir)
        if saved:
            restored = await import_all(registry, saved)
            log.info(
                "restored %d of %d saved sessions",
                restored,
                count_sessions(saved),
                extra={"path": str(settings.state_dir)},
            )
    watcher: asyncio.Task[None] | None = None
    if settings.watch_dir is not None:

        def loaded(engine: Engine) -> None:
            engine.recorder = registry.recorder
            app.state.metrics.watch(engine)

        def changed() -> None:
            write_manifest(registry, settings.state_dir)

        watcher = asyncio.create_task(
            watch(registry, settings.watch_dir, settings.watch_interval_s, loaded, changed),
            name="model-watcher",
        )
    snapshots: asyncio.Task[None] | None = None
    stop_snapshots = asyncio.Event()
    if settings.state_dir is not None and settings.snapshot_interval_s > 0:
        snapshots = asyncio.create_task(
            _snapshot_periodically(
                registry, settings.state_dir, settings.snapshot_interval_s, stop_snapshots
            ),
            name="snapshots",
        )
    # Everything built so far (modules, models, tables) lives as long as the process: keep the
    # garbage collector from traversing it again and again while it serves.
    gc.freeze()
    app.state.ready = True
    try:
        yield
    finally:
        app.state.ready = False
        registry.draining = True
        await app.state.fleet.stop()
        await cancel(watcher)
        if snapshots is not None:
            # Not cancelled: a write in progress must finish before the final one, or it could
            # land after it and leave an older state behind.
            stop_snapshots.set()
            await snapshots
        await registry.stop()
        if recorder is not None:
            await asyncio.to_thread(recorder.close)
            log.info(
                "recording closed: %d steps written, %d lost",
                recorder.rows_written,
                recorder.rows_dropped + recorder.rows_lost,
            )
        if settings.state_dir is not None:
            await asyncio.to_thread(write_manifest, registry, settings.state_dir)
            await save_sessions(registry, settings.state_dir)


async def save_sessions(registry: ModelRegistry, directory: Path) -> None:
    """Write every session to ``directory`` (the file write runs off the event loop)."""
    blocks = await export_all(registry)
    path = await asyncio.to_thread(write_sessions, directory, blocks)
    count = count_sessions(blocks)
    log.info("wrote %d sessions", count, extra={"path": str(path), "sessions": count})


async def _snapshot_periodically(
    registry: ModelRegistry, directory: Path, interval_s: float, stop: asyncio.Event
) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if stop.is_set():
            return
        try:
            await save_sessions(registry, directory)
        except OSError:
            log.exception("periodic snapshot to %s failed", directory)


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_reply(exc, msgpack=wants_msgpack(request.scope))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        # RFC 9110: a 405 names the methods the resource does support.
        headers = {"Allow": allowed_methods(request.app, request.scope)} if exc.status_code == 405 else None
        error = ServiceError(code, str(exc.detail))
        return error_reply(error, msgpack=wants_msgpack(request.scope), headers=headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_reply(
            errors.from_validation_errors(list(exc.errors())), msgpack=wants_msgpack(request.scope)
        )

    async def internal_error(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_reply(errors.internal_error())

    app.add_exception_handler(ServiceError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


#: The methods a 405's ``Allow`` is chosen from (RFC 9110's, and PATCH).
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def allowed_methods(app: FastAPI, scope: Scope) -> str:
    """The methods some route serves on the request's path (one path may be several routes).

    Asked of the routes themselves, the way the router would match them: included routers and
    path parameters need no bookkeeping here.
    """
    allowed = [
        method
        for method in METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)
    ]
    return ", ".join(allowed)


class ServiceApp(FastAPI):
    """FastAPI, with the act routes answered before its middleware stack (see ``service.api.fastpath``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = hot_handler(scope)
        if handler is None:
            if scope["type"] == "http":
                await self._observed(scope, receive, send)
            else:
                await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # what FastAPI would set: handlers reach the settings and models through it
        await serve_hot(handler, scope, receive, send)

    async def _observed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve through FastAPI and record the reply in the same metrics as the fast path."""
        started = time.perf_counter()
        status = 500

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await super().__call__(scope, receive, send_observed)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics: ServiceMetrics = self.state.metrics
            metrics.observe_request(route, scope["method"], status, time.perf_counter() - started)


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """Build the service. ``registry``: already-loaded models (tests); otherwise the lifespan loads them."""
    settings = settings or Settings()
    app = ServiceApp(
        title="trmrl policy service",
        version=trmrl.__version__,
        summary="Meta-trained TrMRL policies with per-session memory, all sessions stepped in one batch.",
        description=DESCRIPTION,
        lifespan=lifespan,
        # The service exports its own metrics; FastAPI's OpenTelemetry hooks would only add a
        # provider lookup to every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.ready = False
    app.state.auth = Authenticator(
        settings.load_api_keys(), settings.load_admin_keys(), settings.load_viewer_keys()
    )
    app.state.metrics = ServiceMetrics()
    app.state.fleet = Fleet(app.state.metrics)
    _install_error_handlers(app)
    for module in (health, models, sessions, act, streams, admin, fleet):
        app.include_router(module.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(BODY_SCHEMAS)
            registry: ModelRegistry | None = app.state.registry
            engines = None if registry is None else registry.all_engines()
            finish_document(
                schema,
                engines,
                keyed=app.state.auth.enabled,
                admin=app.state.auth.admin_enabled,
                recording=settings.record_dir is not None,
            )
            fleet.document(schema, keyed=app.state.auth.viewer_guarded, viewers=app.state.auth.viewer_enabled)
            if registry is None:
                return schema  # the models' dimensions come once they are loaded: not cached before
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
