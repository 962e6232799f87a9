"""The act routes' fast path: ``POST /v1/act``, ``/act`` and ``/v1/act/batch`` go straight to their
handlers, ahead of FastAPI's middleware, routing, dependency solving and exception wrapping.

Those layers cost more CPU per request than a session's share of the batched forward pass, and the
act routes carry nearly all the traffic. :class:`service.app.ServiceApp` calls :func:`serve_hot`
first; every other request (and any other method on these paths) goes through FastAPI unchanged.
Errors are answered exactly as the app's exception handlers answer them; the handlers authenticate
with the same function the other routes use, and the reply is recorded by the same metrics hook.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from service.api.body import wants_msgpack
from service.api.errors import internal_error
from service.api.replies import error_reply
from service.api.routes import act as act_routes
from service.core.errors import ServiceError
from service.metrics import ServiceMetrics

log = logging.getLogger("trmrl.service")

Handler = Callable[[Request], Awaitable[Response]]

HOT_ROUTES: dict[str, Handler] = {
    "/v1/act": act_routes.act,
    "/act": act_routes.act,
    "/v1/act/batch": act_routes.act_batch,
}


def hot_handler(scope: Scope) -> Handler | None:
    """The handler for a request on the fast path, or ``None``."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    return HOT_ROUTES.get(scope["path"])


async def serve_hot(handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
    """Run a hot route's handler and send its reply or its error."""
    started = time.perf_counter()
    try:
        response = await handler(Request(scope, receive))
    except ServiceError as exc:
        response = error_reply(exc, msgpack=wants_msgpack(scope))
    except ClientDisconnect:
        return
    except Exception:
        log.exception("unhandled error on %s", scope["path"])
        response = error_reply(internal_error())
    await response(scope, receive, send)
    metrics: ServiceMetrics = scope["app"].state.metrics
    metrics.observe_request(scope["path"], "POST", response.status_code, time.perf_counter() - started)
