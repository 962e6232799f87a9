"""Retries without I/O: the one retry policy of every transport, and the two loops that run it.

A flow of :mod:`trmrl_client.protocol` says which calls to send and what to do with their replies;
:func:`with_retries` turns each of its calls into tries (:class:`Try`) with pauses between them
(:class:`Pause`): a try that got no reply (a timeout, a dropped connection) is tried again after a
backoff, a transient refusal (``429``/``503``) after the wait the service asked for, all within the
call's deadline; a call out of tries is thrown into the flow as :class:`ServiceUnavailable`. Resending
is safe because every act carries the session's step number.

A transport only makes one try at a time -- ``attempt(try) -> Reply | ServiceUnavailable`` -- and a
driver runs the whole: :func:`drive` blocking, :func:`drive_async` under asyncio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any

from trmrl_client.errors import ServiceUnavailable
from trmrl_client.protocol import Call, Flow, Reply

#: First pause after a try that got no reply; it doubles with every further try, up to ``MAX_BACKOFF_S``.
BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0


@dataclass(frozen=True)
class RetryPolicy:
    """How long one try may wait for its reply, and how many tries follow the first.

    Example:
        >>> RetryPolicy(timeout=10.0, retries=3).retries
        3
    """

    timeout: float
    retries: int

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError("retries must be >= 0")


@dataclass(frozen=True)
class Try:
    """Send ``call`` once and wait at most ``timeout`` seconds for its reply.

    Example:
        >>> Try(Call("GET", "/v1/models"), 10.0).timeout
        10.0
    """

    call: Call
    timeout: float


@dataclass(frozen=True)
class Pause:
    """Wait ``seconds`` before the next try.

    Example:
        >>> Pause(0.05).seconds
        0.05
    """

    seconds: float


Outcome = Reply | ServiceUnavailable
"""What one try gave: the reply, or why there was none."""
Io = Generator[Try | Pause, Outcome | None, Any]
"""A flow with its retries: it yields tries and pauses, and receives each try's outcome."""


def tries(call: Call, policy: RetryPolicy) -> Io:
    """Try ``call`` until it gets a reply worth returning; raise :class:`ServiceUnavailable` without one.

    Example:
        >>> io = tries(Call("GET", "/v1/models"), RetryPolicy(timeout=1.0, retries=0))
        >>> step = next(io)
        >>> (step.call.path, step.timeout)
        ('/v1/models', 1.0)
    """
    last: ServiceUnavailable | None = None
    for attempt in range(policy.retries + 1):
        budget = _budget(call)
        if budget is not None and budget <= 0:
            break
        outcome = yield Try(call, policy.timeout if budget is None else min(policy.timeout, budget))
        if isinstance(outcome, Reply):
            if outcome.retry_after is None or attempt == policy.retries:
                return outcome
            pause, last = outcome.retry_after, None
        else:
            assert outcome is not None, "a driver answers every try"
            pause, last = min(BACKOFF_S * 2**attempt, MAX_BACKOFF_S), outcome
        if attempt < policy.retries:
            budget = _budget(call)
            yield Pause(pause if budget is None else max(0.0, min(pause, budget)))
    raise last or ServiceUnavailable("timeout", f"{call.method} {call.path}: no reply in time")


def with_retries(flow: Flow, policy: RetryPolicy) -> Io:
    """``flow`` with every call sent by :func:`tries`; a call out of tries is thrown into the flow.

    Example:
        >>> actions = drive(with_retries(batch_flow(books, transitions), policy), attempt)  # doctest: +SKIP
    """
    reply: Reply | None = None
    failure: ServiceUnavailable | None = None
    while True:
        try:
            call = flow.throw(failure) if failure is not None else flow.send(reply)  # type: ignore[arg-type]
        except StopIteration as stop:
            return stop.value
        failure = None
        try:
            reply = yield from tries(call, policy)
        except ServiceUnavailable as exc:
            failure, reply = exc, None


def drive(io: Io, attempt: Callable[[Try], Outcome]) -> Any:
    """Run ``io`` to its end, blocking: make its tries with ``attempt``, sleep its pauses.

    Example:
        >>> reply = drive(tries(Call("GET", "/v1/models"), policy), client.attempt)  # doctest: +SKIP
    """
    done, step = _advance(io, None)
    while not done:
        done, step = _advance(io, attempt(step) if isinstance(step, Try) else _sleep(step))
    return step


async def drive_async(io: Io, attempt: Callable[[Try], Awaitable[Outcome]]) -> Any:
    """Run ``io`` to its end under asyncio (see :func:`drive`).

    Example:
        >>> reply = await drive_async(tries(call, policy), client.attempt)  # doctest: +SKIP
    """
    done, step = _advance(io, None)
    while not done:
        done, step = _advance(io, await attempt(step) if isinstance(step, Try) else await _asleep(step))
    return step


def _advance(io: Io, outcome: Outcome | None) -> tuple[bool, Any]:
    """Hand ``outcome`` to ``io``: ``(False, its next try or pause)``, or ``(True, its result)``."""
    try:
        return False, io.send(outcome)
    except StopIteration as stop:
        return True, stop.value


def _sleep(pause: Pause) -> Outcome | None:
    time.sleep(pause.seconds)
    return None


async def _asleep(pause: Pause) -> Outcome | None:
    await asyncio.sleep(pause.seconds)
    return None


def _budget(call: Call) -> float | None:
    """Seconds left for ``call`` (``None``: no deadline of its own)."""
    return None if call.deadline is None else call.deadline - time.monotonic()
