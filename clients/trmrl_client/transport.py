"""What sessions need from a transport: one try of a call -- one request or one frame out, one reply back.

Sessions and vector sessions program against these interfaces, never against httpx or websockets.
The HTTP transports (:mod:`trmrl_client.http`) carry every route; the WebSocket streams
(:mod:`trmrl_client.websocket`) carry the act routes only, so a session over a stream runs over
:class:`Routed`: its stream's routes as frames, every other call (creation, recovery, deletion) over
HTTP. Retries, step numbering and recovery are the same whatever carries the calls: they are decided
without I/O in :mod:`trmrl_client.protocol` and :mod:`trmrl_client.retry`, and :func:`run` and
:func:`run_async` drive a flow over a transport.
"""

from __future__ import annotations

from typing import Any, Protocol

from trmrl_client.protocol import Flow
from trmrl_client.retry import Outcome, RetryPolicy, Try, drive, drive_async, with_retries
from trmrl_client.routes import Route


class Transport(Protocol):
    """A blocking transport: makes one try of a call, no retry, under its retry policy's timeout.

    Example:
        >>> from trmrl_client.protocol import Reply
        >>> class Canned:
        ...     policy = RetryPolicy(timeout=1.0, retries=0)
        ...     def attempt(self, step: Try) -> Outcome:
        ...         return Reply(200, {"models": []})
        >>> from trmrl_client.protocol import models_flow
        >>> run(Canned(), models_flow())
        []
    """

    @property
    def policy(self) -> RetryPolicy:
        """How long one try may wait, and how many tries follow the first."""
        ...

    def attempt(self, step: Try) -> Outcome:
        """Send ``step.call`` once: its reply, or why none came (:class:`ServiceUnavailable`)."""
        ...


class AsyncTransport(Protocol):
    """An asyncio transport (see :class:`Transport`).

    Example:
        >>> async def main(transport: AsyncTransport) -> None:  # doctest: +SKIP
        ...     models = await run_async(transport, models_flow())
    """

    @property
    def policy(self) -> RetryPolicy:
        """How long one try may wait, and how many tries follow the first."""
        ...

    async def attempt(self, step: Try) -> Outcome:
        """Send ``step.call`` once: its reply, or why none came."""
        ...


class Stream(Protocol):
    """A connection that carries some routes' calls as frames (one frame out, one back per try).

    Example:
        >>> stream.routes  # doctest: +SKIP
        frozenset({Route(name='act', method='POST', template='/v1/act', binary=True)})
    """

    @property
    def routes(self) -> frozenset[Route]:
        """The routes whose calls travel as frames of this stream."""
        ...

    async def attempt(self, step: Try) -> Outcome:
        """Send ``step.call`` as one frame and wait for the next: its reply, or why none came."""
        ...

    async def aclose(self) -> None:
        """Close the connection (the next try opens a new one)."""
        ...


class Routed:
    """An :class:`AsyncTransport` made of a stream and another transport: the stream's routes as
    frames, every other call over ``fallback`` (HTTP), under ``fallback``'s retry policy.

    Example:
        >>> transport = Routed(SessionStream(url, headers), client)  # doctest: +SKIP
    """

    def __init__(self, stream: Stream, fallback: AsyncTransport) -> None:
        self.stream = stream
        self.fallback = fallback

    @property
    def policy(self) -> RetryPolicy:
        return self.fallback.policy

    async def attempt(self, step: Try) -> Outcome:
        """One try over the stream when it carries the call's route, else over the fallback."""
        if step.call.route in self.stream.routes:
            return await self.stream.attempt(step)
        return await self.fallback.attempt(step)

    async def aclose(self) -> None:
        """Close the stream (the fallback belongs to whoever gave it)."""
        await self.stream.aclose()


def run(transport: Transport, flow: Flow) -> Any:
    """Drive a protocol flow to its end over ``transport``, with its retry policy (blocking).

    Example:
        >>> ledger = run(client, create_flow({"model": "point-nav"}, new_route_key()))  # doctest: +SKIP
    """
    return drive(with_retries(flow, transport.policy), transport.attempt)


async def run_async(transport: AsyncTransport, flow: Flow) -> Any:
    """Drive a protocol flow to its end over ``transport``, with its retry policy (asyncio).

    Example:
        >>> models = await run_async(client, models_flow())  # doctest: +SKIP
    """
    return await drive_async(with_retries(flow, transport.policy), transport.attempt)
