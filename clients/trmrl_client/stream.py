"""A session over a WebSocket stream (``/v1/sessions/{id}/stream``): one connection, one frame per step.

Needs the ``stream`` extra (websockets, msgpack). Frames are MessagePack (binary, numpy arrays as
msgpack-numpy maps) or JSON (text). The session itself is created, reset and, if the service loses
it, recovered over HTTP with the same protocol as :class:`trmrl_client.PolicyClient`; a dropped or
timed-out connection is reopened and the step re-sent with the same step number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import quote

from trmrl_client.errors import ServiceError, ServiceUnavailable
from trmrl_client.http import AsyncPolicyClient, _AsyncSessionDriver, _jsonable
from trmrl_client.protocol import ROUTE_HEADER, Flow, Reply, SessionLedger, status_of_error
from trmrl_client.retry import Outcome, Try, drive_async, with_retries

try:
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import InvalidStatus, WebSocketException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "StreamingSession needs the 'stream' extra: pip install 'trmrl-client[stream]'"
    ) from exc

FrameEncoding = Literal["json", "msgpack"]
#: Largest frame of a session's stream, and of the vectorised stream (a tick of every env).
STREAM_MAX_BYTES = 16 * 1024 * 1024
VECTOR_MAX_BYTES = 64 * 1024 * 1024


class StreamingSession(_AsyncSessionDriver):
    """A policy session whose steps travel over one WebSocket.

    Use :meth:`open` to create it (it owns an :class:`AsyncPolicyClient` unless given one).

    Example:
        >>> async def main() -> None:  # doctest: +SKIP
        ...     async with await StreamingSession.open("http://127.0.0.1:8000", "point-nav") as s:
        ...         action = await s.act(np.zeros(2, np.float32), episode_start=True)
    """

    def __init__(
        self,
        client: AsyncPolicyClient,
        ledger: SessionLedger,
        *,
        encoding: FrameEncoding = "msgpack",
        own_client: bool = False,
    ) -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"encoding must be 'json' or 'msgpack', got {encoding!r}")
        self.client = client
        self.ledger = ledger
        self.encoding = encoding
        self._own_client = own_client
        self._ws: ClientConnection | None = None
        self._ws_session: str | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        model: str | None = None,
        *,
        deterministic: bool = True,
        seed: int | None = None,
        ttl_s: float | None = None,
        api_key: str | None = None,
        encoding: FrameEncoding = "msgpack",
        timeout: float = 10.0,
        retries: int = 3,
        client: AsyncPolicyClient | None = None,
    ) -> StreamingSession:
        """Create a session and return its stream (connected on the first step).

        Example:
            >>> s = await StreamingSession.open("http://127.0.0.1:8000", encoding="json")  # doctest: +SKIP
        """
        own = client is None
        http = client or AsyncPolicyClient(url, api_key=api_key, timeout=timeout, retries=retries)
        try:
            session = await http.session(model, deterministic=deterministic, seed=seed, ttl_s=ttl_s)
        except BaseException:
            if own:
                await http.aclose()
            raise
        return cls(http, session.ledger, encoding=encoding, own_client=own)

    async def __aenter__(self) -> StreamingSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- API (act, reset, snapshot: as an AsyncSession's) ---------------------------------------------
    async def close(self, *, delete: bool = True) -> None:
        """Close the stream, delete the session (unless ``delete=False``) and the owned HTTP client.

        Example:
            >>> await stream.close()  # doctest: +SKIP
        """
        await self._disconnect()
        try:
            if delete:
                with contextlib.suppress(ServiceError):  # a session already gone, or not ours, is fine
                    await self._run(self.ledger.close_flow())
        finally:
            if self._own_client:
                await self.client.aclose()

    # -- transport ---------------------------------------------------------------------------------------
    async def _run(self, flow: Flow) -> Any:
        return await drive_async(with_retries(flow, self.client.policy), self._attempt)

    async def _attempt(self, step: Try) -> Outcome:
        """One try: an act as a frame of the stream, any other call over HTTP."""
        call = step.call
        if not (call.method == "POST" and call.path == "/v1/act"):
            return await self.client.attempt(step)
        frame = {k: v for k, v in (call.body or {}).items() if k != "session_id"}
        return await _try_frame(self._exchange(frame), step.timeout, self._disconnect, self._what)

    @property
    def _what(self) -> str:
        return f"stream of session {self.session_id}"

    async def _exchange(self, frame: dict[str, Any]) -> Reply:
        body = await _exchange(await self._connection(), frame, self.encoding, STREAM_MAX_BYTES)
        if isinstance(body, dict) and "error" in body:
            return Reply(status_of_error(body), body)
        return Reply(200, body)

    async def _connection(self) -> ClientConnection:
        if self._ws is not None and self._ws_session == self.ledger.session_id:
            return self._ws
        await self._disconnect()
        url = self.client.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            self._ws = await connect(
                f"{url}/v1/sessions/{self.ledger.session_id}/stream",
                additional_headers={**self.client.api_key_headers, ROUTE_HEADER: self.ledger.route_key},
                max_size=STREAM_MAX_BYTES,
            )
        except InvalidStatus as exc:
            # The handshake was answered with an HTTP error (404 unknown_session, 401...): a reply.
            raise _Refused(_handshake_reply(exc, "/v1/sessions/{id}/stream")) from None
        self._ws_session = self.ledger.session_id
        return self._ws

    async def _disconnect(self) -> None:
        ws, self._ws, self._ws_session = self._ws, None, None
        if ws is not None:
            with contextlib.suppress(OSError, WebSocketException):
                await ws.close()


class VectorLink:
    """The vectorised stream ``WS /v1/stream?model=...`` under an :class:`AsyncVectorSession`.

    Columnar ticks (``POST /v1/act/batch`` calls with ``session_ids``) travel as frames of one
    connection; every other call (creation, recovery of single rows) goes over HTTP. A dropped or
    timed-out connection is reopened and the tick re-sent: its step numbers make that safe.

    Example:
        >>> envs = await client.vector(256, "point-nav", transport="stream")  # doctest: +SKIP
    """

    def __init__(
        self, client: AsyncPolicyClient, model: str, route_key: str, encoding: FrameEncoding = "msgpack"
    ) -> None:
        self.client = client
        self.model = model
        self.route_key = route_key
        self.encoding = encoding
        self._ws: ClientConnection | None = None

    async def attempt(self, step: Try) -> Outcome:
        """One try: a columnar tick as a frame of the stream, any other call over HTTP."""
        body = step.call.body or {}
        if not (step.call.method == "POST" and step.call.path == "/v1/act/batch" and "session_ids" in body):
            return await self.client.attempt(step)
        what = f"vectorised stream of model {self.model}"
        return await _try_frame(self._exchange(body), step.timeout, self.close, what)

    async def _exchange(self, frame: dict[str, Any]) -> Reply:
        if self._ws is None:
            url = self.client.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
            try:
                self._ws = await connect(
                    f"{url}/v1/stream?model={quote(self.model)}",
                    additional_headers={**self.client.api_key_headers, ROUTE_HEADER: self.route_key},
                    max_size=VECTOR_MAX_BYTES,
                )
            except InvalidStatus as exc:
                raise _Refused(_handshake_reply(exc, "/v1/stream")) from None
        body = await _exchange(self._ws, frame, self.encoding, VECTOR_MAX_BYTES)
        if isinstance(body, dict) and "error" in body and "session_ids" not in body:
            return Reply(status_of_error(body), body)
        return Reply(200, body)

    async def close(self) -> None:
        ws, self._ws = self._ws, None
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
        from trmrl_client.codec import packb

        await ws.send(packb(frame))
    else:
        await ws.send(json.dumps(_jsonable(frame), separators=(",", ":")))
    raw = await ws.recv()
    if isinstance(raw, bytes):
        from trmrl_client.codec import unpackb

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


__all__ = ["StreamingSession", "VectorLink"]
