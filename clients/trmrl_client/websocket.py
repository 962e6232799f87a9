"""The WebSocket streams of the policy service as transports: one try = one frame out, one frame back.

Needs the ``stream`` extra (websockets, msgpack). Frames are MessagePack (binary, numpy arrays as
msgpack-numpy maps) or JSON (text). A stream carries only the act routes
(:class:`~trmrl_client.transport.Stream`); a session runs over it beside HTTP
(:class:`~trmrl_client.transport.Routed`). A dropped or timed-out connection is closed and the next
try opens a new one: the step numbers in every frame make the resend safe.

* :class:`SessionStream`: ``WS /v1/sessions/{id}/stream``, one session's steps (``POST /v1/act``).
* :class:`VectorStream`: ``WS /v1/stream?model=...``, columnar ticks of many sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import quote

from trmrl_client import routes
from trmrl_client.codec import jsonable, packb, unpackb
from trmrl_client.errors import ServiceUnavailable
from trmrl_client.protocol import ROUTE_HEADER, TRANSIENT, Reply, status_of_error
from trmrl_client.retry import Outcome, Try
from trmrl_client.routes import Route

try:
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import InvalidStatus, WebSocketException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "WebSocket streams need the 'stream' extra: pip install 'trmrl-client[stream]'"
    ) from exc

FrameEncoding = Literal["json", "msgpack"]
#: Largest frame of a session's stream, and of the vectorised stream (a tick of every env).
STREAM_MAX_BYTES = 16 * 1024 * 1024
VECTOR_MAX_BYTES = 64 * 1024 * 1024
FRAME_RETRY_S = 1.0
"""Wait before a frame refused for now is sent again: the service's ``Retry-After`` for such refusals."""
_MAX_BYTES = {routes.SESSION_STREAM: STREAM_MAX_BYTES, routes.VECTOR_STREAM: VECTOR_MAX_BYTES}


class SessionStream:
    """One session's steps as frames of ``WS /v1/sessions/{id}/stream`` (carries :data:`routes.ACT`).

    The connection follows the session named in each act: after a recovery gave the session a new
    id, the next step opens the new session's stream.

    Example:
        >>> stream = SessionStream("http://127.0.0.1:8000", {}, "json")
        >>> [route.name for route in stream.routes]
        ['act']
    """

    routes: frozenset[Route] = frozenset({routes.ACT})

    def __init__(self, url: str, headers: dict[str, str], encoding: FrameEncoding = "msgpack") -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"encoding must be 'json' or 'msgpack', got {encoding!r}")
        self.url = routes.websocket_url(url)
        self.headers = headers
        self.encoding = encoding
        self._ws: ClientConnection | None = None
        self._ws_session: str | None = None

    async def attempt(self, step: Try) -> Outcome:
        """One try: the act's body, less its session id (the stream names it), as one frame."""
        body = step.call.body or {}
        session_id = str(body.get("session_id"))
        frame = {k: v for k, v in body.items() if k != "session_id"}
        exchange = self._exchange(session_id, step.call.route_key, frame)
        return await _try_frame(exchange, step.timeout, self.aclose, f"stream of session {session_id}")

    async def _exchange(self, session_id: str, route_key: str | None, frame: dict[str, Any]) -> Reply:
        if self._ws is None or self._ws_session != session_id:
            await self.aclose()
            path = routes.SESSION_STREAM.path(session_id=session_id)
            self._ws = await _connect(self.url + path, self.headers, route_key, routes.SESSION_STREAM)
            self._ws_session = session_id
        body = await _exchange(self._ws, frame, self.encoding, STREAM_MAX_BYTES)
        if isinstance(body, dict) and "error" in body:
            return _refusal(body)
        return Reply(200, body)

    async def aclose(self) -> None:
        """Close the connection (the next step opens a new one)."""
        ws, self._ws, self._ws_session = self._ws, None, None
        await _close(ws)


class VectorStream:
    """Columnar ticks of a vector's sessions as frames of ``WS /v1/stream?model=...`` (carries
    :data:`routes.ACT_COLUMNAR`).

    Example:
        >>> stream = VectorStream("http://127.0.0.1:8000", {}, "point-nav")
        >>> [route.name for route in stream.routes]
        ['act_columnar']
    """

    routes: frozenset[Route] = frozenset({routes.ACT_COLUMNAR})

    def __init__(
        self, url: str, headers: dict[str, str], model: str, encoding: FrameEncoding = "msgpack"
    ) -> None:
        self.url = routes.websocket_url(url)
        self.headers = headers
        self.model = model
        self.encoding = encoding
        self._ws: ClientConnection | None = None

    async def attempt(self, step: Try) -> Outcome:
        """One try: the columnar body as one frame."""
        exchange = self._exchange(step.call.route_key, step.call.body or {})
        return await _try_frame(
            exchange, step.timeout, self.aclose, f"vectorised stream of model {self.model}"
        )

    async def _exchange(self, route_key: str | None, frame: dict[str, Any]) -> Reply:
        if self._ws is None:
            path = f"{routes.VECTOR_STREAM.path()}?model={quote(self.model)}"
            self._ws = await _connect(self.url + path, self.headers, route_key, routes.VECTOR_STREAM)
        body = await _exchange(self._ws, frame, self.encoding, VECTOR_MAX_BYTES)
        if isinstance(body, dict) and "error" in body and "session_ids" not in body:
            return _refusal(body)
        return Reply(200, body)

    async def aclose(self) -> None:
        """Close the connection (the next tick opens a new one)."""
        ws, self._ws = self._ws, None
        await _close(ws)


def _refusal(body: dict[str, Any]) -> Reply:
    """An error frame as a reply: a refusal for now (``overloaded``, ``cache_exhausted``) is tried again
    after :data:`FRAME_RETRY_S`, as an HTTP reply is after its ``Retry-After`` (a frame carries none)."""
    status = status_of_error(body)
    return Reply(status, body, FRAME_RETRY_S if status in TRANSIENT else None)


async def _connect(
    url: str, headers: dict[str, str], route_key: str | None, route: Route
) -> ClientConnection:
    """Open a stream; a handshake answered with an HTTP error (404 unknown_session, 401...) is a reply."""
    extra = {**headers, ROUTE_HEADER: route_key} if route_key else dict(headers)
    try:
        return await connect(url, additional_headers=extra, max_size=_MAX_BYTES[route])
    except InvalidStatus as exc:
        raise _Refused(_handshake_reply(exc, route.template)) from None


async def _close(ws: ClientConnection | None) -> None:
    if ws is not None:
        with contextlib.suppress(OSError, WebSocketException):
            await ws.close()


async def _try_frame(
    exchange: Awaitable[Reply], timeout: float, drop: Callable[[], Awaitable[None]], what: str
) -> Outcome:
    """One try of a frame: its reply, or -- after a timeout or a dropped connection -- why there was none."""
    try:
        return await asyncio.wait_for(exchange, timeout)
    except _Refused as refused:
        return refused.reply
    except (TimeoutError, OSError, WebSocketException) as exc:
        # The connection's state is unknown (a late reply could still arrive on it): start over.
        await drop()
        return _unavailable(exc, what)


async def _exchange(
    ws: ClientConnection, frame: dict[str, Any], encoding: FrameEncoding, max_bytes: int
) -> Any:
    """Send one frame, receive and decode the next."""
    if encoding == "msgpack":
        await ws.send(packb(frame))
    else:
        await ws.send(json.dumps(jsonable(frame), separators=(",", ":")))
    raw = await ws.recv()
    if isinstance(raw, bytes):
        return unpackb(raw, max_bytes=max_bytes)
    return json.loads(raw)


def _unavailable(exc: Exception, what: str) -> ServiceUnavailable:
    """The outcome of a try on a stream that got no reply."""
    code = "timeout" if isinstance(exc, TimeoutError) else "unreachable"
    return ServiceUnavailable(code, f"{what}: {str(exc) or 'no reply in time'}")


def _handshake_reply(exc: InvalidStatus, route: str) -> Reply:
    """A WebSocket handshake answered with an HTTP error (404, 401, ...), as a reply."""
    response = exc.response
    try:
        body: Any = json.loads(response.body or b"")
    except ValueError:
        body = {
            "error": {
                "code": f"http_{response.status_code}",
                "message": f"the service refused the WebSocket handshake; does it serve {route}?",
            }
        }
    return Reply(response.status_code, body)


class _Refused(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


__all__ = ["SessionStream", "VectorStream"]
