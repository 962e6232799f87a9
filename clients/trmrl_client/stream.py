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
import time
from typing import Any, Literal
from urllib.parse import quote

import numpy as np
from numpy.typing import ArrayLike

from trmrl_client.errors import ServiceUnavailable
from trmrl_client.http import AsyncPolicyClient, drive_async
from trmrl_client.protocol import (
    ROUTE_HEADER,
    Call,
    FloatArray,
    ModelInfo,
    Reply,
    Scope,
    SessionState,
    status_of_error,
)

try:
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import InvalidStatus, WebSocketException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "StreamingSession needs the 'stream' extra: pip install 'trmrl-client[stream]'"
    ) from exc

FrameEncoding = Literal["json", "msgpack"]


class StreamingSession:
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
        state: SessionState,
        *,
        encoding: FrameEncoding = "msgpack",
        own_client: bool = False,
    ) -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"encoding must be 'json' or 'msgpack', got {encoding!r}")
        self.client = client
        self.state = state
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
        return cls(http, session.state, encoding=encoding, own_client=own)

    @property
    def session_id(self) -> str:
        return self.state.session_id

    @property
    def model(self) -> ModelInfo:
        return self.state.model

    @property
    def recoveries(self) -> int:
        return self.state.recoveries

    async def __aenter__(self) -> StreamingSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- API -------------------------------------------------------------------------------------------
    async def act(
        self,
        observation: ArrayLike,
        reward: float = 0.0,
        episode_start: bool = False,
        applied_action: ArrayLike | None = None,
        *,
        timeout: float | None = None,
    ) -> FloatArray:
        """The action for ``observation`` (arguments as :meth:`trmrl_client.Session.act`).

        Example:
            >>> await stream.act([0.1, 0.2], reward=-0.8)  # doctest: +SKIP
        """
        tr = self.state.prepare(observation, reward, episode_start, applied_action)
        deadline = None if timeout is None else time.monotonic() + timeout
        return np.asarray(await drive_async(self.state.act_flow(tr, deadline), self._send), np.float32)

    async def reset(self, scope: Scope = "episode") -> None:
        """Start a new episode or trial (over HTTP).

        Example:
            >>> await stream.reset("trial")  # doctest: +SKIP
        """
        await drive_async(self.state.reset_flow(scope), self._send)

    async def snapshot(self) -> Any:
        """Fetch and keep the session's snapshot (over HTTP).

        Example:
            >>> await stream.snapshot()  # doctest: +SKIP
        """
        return await drive_async(self.state.snapshot_flow(), self._send)

    async def close(self, *, delete: bool = True) -> None:
        """Close the stream, delete the session (unless ``delete=False``) and the owned HTTP client.

        Example:
            >>> await stream.close()  # doctest: +SKIP
        """
        await self._disconnect()
        try:
            if delete:
                await self.client.send(self.state.call("DELETE", f"/v1/sessions/{self.session_id}"))
        except ServiceUnavailable:
            pass
        finally:
            if self._own_client:
                await self.client.aclose()

    # -- transport ---------------------------------------------------------------------------------------
    async def _send(self, call: Call) -> Reply:
        if not (call.method == "POST" and call.path == "/v1/act"):
            return await self.client.send(call)
        frame = {k: v for k, v in (call.body or {}).items() if k != "session_id"}
        last: Exception | None = None
        for attempt in range(self.client.retries + 1):
            budget = None if call.deadline is None else call.deadline - time.monotonic()
            if budget is not None and budget <= 0:
                break
            wait = self.client.timeout if budget is None else min(self.client.timeout, budget)
            try:
                return await asyncio.wait_for(self._exchange(frame), wait)
            except _Refused as refused:
                return refused.reply
            except (TimeoutError, OSError, WebSocketException) as exc:
                # The connection's state is unknown (a late reply could still arrive on it): start over.
                last = exc
                await self._disconnect()
                if attempt < self.client.retries:
                    await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        code = "timeout" if last is None or isinstance(last, TimeoutError) else "unreachable"
        raise ServiceUnavailable(code, f"stream of session {self.session_id}: {last or 'no reply in time'}")

    async def _exchange(self, frame: dict[str, Any]) -> Reply:
        ws = await self._connection()
        if self.encoding == "msgpack":
            from trmrl_client.codec import packb

            await ws.send(packb(frame))
        else:
            await ws.send(json.dumps(frame, separators=(",", ":")))
        raw = await ws.recv()
        if isinstance(raw, bytes):
            from trmrl_client.codec import unpackb

            body = unpackb(raw)
        else:
            body = json.loads(raw)
        if isinstance(body, dict) and "error" in body:
            return Reply(status_of_error(body), body)
        return Reply(200, body)

    async def _connection(self) -> ClientConnection:
        if self._ws is not None and self._ws_session == self.state.session_id:
            return self._ws
        await self._disconnect()
        url = self.client.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            self._ws = await connect(
                f"{url}/v1/sessions/{self.state.session_id}/stream",
                additional_headers={**self.client.api_key_headers, ROUTE_HEADER: self.state.route_key},
                max_size=16 * 1024 * 1024,
            )
        except InvalidStatus as exc:
            # The handshake was answered with an HTTP error (404 unknown_session, 401...): a reply.
            raise _Refused(_handshake_reply(exc, "/v1/sessions/{id}/stream")) from None
        self._ws_session = self.state.session_id
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

    async def send(self, call: Call) -> Reply:
        body = call.body or {}
        if not (call.method == "POST" and call.path == "/v1/act/batch" and "session_ids" in body):
            return await self.client.send(call)
        last: Exception | None = None
        for attempt in range(self.client.retries + 1):
            try:
                return await asyncio.wait_for(self._exchange(body), self.client.timeout)
            except _Refused as refused:
                return refused.reply
            except (TimeoutError, OSError, WebSocketException) as exc:
                last = exc
                await self.close()
                if attempt < self.client.retries:
                    await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        code = "timeout" if last is None or isinstance(last, TimeoutError) else "unreachable"
        raise ServiceUnavailable(
            code, f"vectorised stream of model {self.model}: {last or 'no reply in time'}"
        )

    async def _exchange(self, frame: dict[str, Any]) -> Reply:
        if self._ws is None:
            url = self.client.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
            try:
                self._ws = await connect(
                    f"{url}/v1/stream?model={quote(self.model)}",
                    additional_headers={**self.client.api_key_headers, ROUTE_HEADER: self.route_key},
                    max_size=64 * 1024 * 1024,
                )
            except InvalidStatus as exc:
                raise _Refused(_handshake_reply(exc, "/v1/stream")) from None
        ws = self._ws
        if self.encoding == "msgpack":
            from trmrl_client.codec import packb

            await ws.send(packb(frame))
        else:
            await ws.send(
                json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in frame.items()})
            )
        raw = await ws.recv()
        if isinstance(raw, bytes):
            from trmrl_client.codec import unpackb

            body = unpackb(raw, max_bytes=64 * 1024 * 1024)
        else:
            body = json.loads(raw)
        if isinstance(body, dict) and "error" in body and "session_ids" not in body:
            return Reply(status_of_error(body), body)
        return Reply(200, body)

    async def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(OSError, WebSocketException):
                await ws.close()


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
