"""A session of the policy service, over any transport: :class:`Session` (blocking), :class:`AsyncSession`.

A session keeps its :class:`~trmrl_client.protocol.SessionLedger` (id, step numbers, recent history,
snapshot) and runs the protocol's flows over a transport -- anything with one ``attempt`` and a retry
policy (:class:`~trmrl_client.transport.Transport`): the HTTP client it came from, a stream with HTTP
beside it, or a test's fake.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from trmrl_client.errors import ServiceUnavailable
from trmrl_client.protocol import FloatArray, Flow, ModelInfo, Scope, SessionLedger
from trmrl_client.transport import AsyncTransport, Transport, run, run_async


class _SessionFacts:
    """What every session tells about itself (from its :class:`SessionLedger`)."""

    ledger: SessionLedger

    @property
    def session_id(self) -> str:
        """The service's id of the session (changes when the client recovers a lost session)."""
        return self.ledger.session_id

    @property
    def model(self) -> ModelInfo:
        return self.ledger.model

    @property
    def step(self) -> int:
        """The number the next step is sent as."""
        return self.ledger.next_step

    @property
    def recoveries(self) -> int:
        """How many times the session was recreated after the service lost it."""
        return self.ledger.recoveries

    def _prepare(
        self,
        observation: ArrayLike,
        reward: float,
        episode_start: bool,
        applied_action: ArrayLike | None,
        timeout: float | None,
    ) -> Flow:
        """The act flow of one step (validated now), with its deadline."""
        tr = self.ledger.prepare(observation, reward, episode_start, applied_action)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self.ledger.act_flow(tr, deadline)


class Session(_SessionFacts):
    """One session: a robot's or environment's memory on the service (made by
    :meth:`trmrl_client.PolicyClient.session`).

    Example:
        >>> session = client.session("point-nav")  # doctest: +SKIP
        >>> a0 = session.act([0.0, 0.0], episode_start=True)  # doctest: +SKIP
        >>> a1 = session.act([0.01, 0.02], reward=-0.9)  # doctest: +SKIP
    """

    def __init__(self, client: Transport, ledger: SessionLedger) -> None:
        self.client = client
        self.ledger = ledger

    def act(
        self,
        observation: ArrayLike,
        reward: float = 0.0,
        episode_start: bool = False,
        applied_action: ArrayLike | None = None,
        *,
        timeout: float | None = None,
    ) -> FloatArray:
        """The action for ``observation``; ``reward`` is the reward for the previous action.

        Args:
            observation: ``obs_dim`` numbers.
            reward: Reward received for the previous action (ignored at an episode start).
            episode_start: ``observation`` is the first of an episode.
            applied_action: What the robot executed for the previous step, if not the action returned.
            timeout: Seconds this call may take in all (retries included); ``None``: the client's policy.

        Raises:
            ServiceUnavailable: No reply in time; the step is kept and sorted out by the next call.
            ServiceError: The service refused the step (bad input, unknown model...).

        Example:
            >>> session.act(np.array([0.1, 0.2]), reward=-0.8).shape  # doctest: +SKIP
            (2,)
        """
        flow = self._prepare(observation, reward, episode_start, applied_action, timeout)
        return np.asarray(run(self.client, flow), np.float32)

    def reset(self, scope: Scope = "episode") -> None:
        """Start a new episode (memory kept for ``trial``-scope models) or a new trial (memory cleared).

        Example:
            >>> session.reset("trial")  # doctest: +SKIP
        """
        run(self.client, self.ledger.reset_flow(scope))

    def snapshot(self) -> Any:
        """Fetch the session's portable snapshot; the client keeps it for recovery.

        Example:
            >>> snapshot = session.snapshot()  # doctest: +SKIP
        """
        return run(self.client, self.ledger.snapshot_flow())

    def info(self) -> dict[str, Any]:
        """The service's view of the session (steps, episodes, times, model version).

        Example:
            >>> session.info()["steps"]  # doctest: +SKIP
            2
        """
        info: dict[str, Any] = run(self.client, self.ledger.info_flow())
        return info

    def close(self) -> None:
        """Delete the session on the service (a session already gone is fine).

        Example:
            >>> session.close()  # doctest: +SKIP
        """
        with contextlib.suppress(ServiceUnavailable):
            run(self.client, self.ledger.close_flow())


class AsyncSession(_SessionFacts):
    """One session under asyncio (methods as :class:`Session`, awaitable; made by
    :meth:`trmrl_client.AsyncPolicyClient.session`).

    ``client`` is the transport its calls go over unless a subclass sets another ``transport``
    (:class:`trmrl_client.stream.StreamingSession` sends its steps over a WebSocket).

    Example:
        >>> action = await session.act([0.0, 0.0], episode_start=True)  # doctest: +SKIP
    """

    def __init__(self, client: AsyncTransport, ledger: SessionLedger) -> None:
        self.client = client
        self.ledger = ledger
        self.transport: AsyncTransport = client

    async def act(
        self,
        observation: ArrayLike,
        reward: float = 0.0,
        episode_start: bool = False,
        applied_action: ArrayLike | None = None,
        *,
        timeout: float | None = None,
    ) -> FloatArray:
        """The action for ``observation`` (see :meth:`Session.act`).

        Example:
            >>> await session.act([0.1, 0.2], reward=-0.8)  # doctest: +SKIP
        """
        flow = self._prepare(observation, reward, episode_start, applied_action, timeout)
        return np.asarray(await run_async(self.transport, flow), np.float32)

    async def reset(self, scope: Scope = "episode") -> None:
        """Start a new episode or trial.

        Example:
            >>> await session.reset()  # doctest: +SKIP
        """
        await run_async(self.transport, self.ledger.reset_flow(scope))

    async def snapshot(self) -> Any:
        """Fetch and keep the session's snapshot.

        Example:
            >>> await session.snapshot()  # doctest: +SKIP
        """
        return await run_async(self.transport, self.ledger.snapshot_flow())

    async def close(self) -> None:
        """Delete the session on the service.

        Example:
            >>> await session.close()  # doctest: +SKIP
        """
        with contextlib.suppress(ServiceUnavailable):
            await run_async(self.transport, self.ledger.close_flow())


__all__ = ["AsyncSession", "Session"]
