"""A session over a WebSocket stream (``/v1/sessions/{id}/stream``): one connection, one frame per step.

Needs the ``stream`` extra (websockets, msgpack). Frames are MessagePack (binary, numpy arrays as
msgpack-numpy maps) or JSON (text). The session itself is created, reset and, if the service loses
it, recovered over HTTP with the same protocol as :class:`trmrl_client.PolicyClient`: its steps go
over a :class:`~trmrl_client.websocket.SessionStream`, every other call over the HTTP client
(:class:`~trmrl_client.transport.Routed`). A dropped or timed-out connection is reopened and the step
re-sent with the same step number.
"""

from __future__ import annotations

import contextlib

from trmrl_client.errors import ServiceError
from trmrl_client.http import AsyncPolicyClient
from trmrl_client.protocol import SessionLedger
from trmrl_client.session import AsyncSession
from trmrl_client.transport import Routed, run_async
from trmrl_client.websocket import FrameEncoding, SessionStream


class StreamingSession(AsyncSession):
    """A policy session whose steps travel over one WebSocket.

    Use :meth:`open` to create it (it owns an :class:`AsyncPolicyClient` unless given one).

    Example:
        >>> async def main() -> None:  # doctest: +SKIP
        ...     async with await StreamingSession.open("http://127.0.0.1:8000", "point-nav") as s:
        ...         action = await s.act(np.zeros(2, np.float32), episode_start=True)
    """

    client: AsyncPolicyClient

    def __init__(
        self,
        client: AsyncPolicyClient,
        ledger: SessionLedger,
        *,
        encoding: FrameEncoding = "msgpack",
        own_client: bool = False,
    ) -> None:
        super().__init__(client, ledger)
        self.stream = SessionStream(client.url, client.api_key_headers, encoding)
        self.transport = Routed(self.stream, client)
        self._own_client = own_client

    @property
    def encoding(self) -> FrameEncoding:
        return self.stream.encoding

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
        await self.stream.aclose()
        try:
            if delete:
                with contextlib.suppress(ServiceError):  # a session already gone, or not ours, is fine
                    await run_async(self.transport, self.ledger.close_flow())
        finally:
            if self._own_client:
                await self.client.aclose()


__all__ = ["StreamingSession"]
