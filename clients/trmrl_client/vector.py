"""Many sessions as arrays: one columnar request (or stream frame) per tick of a vectorised simulator.

A gymnasium vector env (or an Isaac-style batch of robots) steps ``num_envs`` environments at once;
:class:`VectorLedger` keeps their ``num_envs`` sessions as arrays -- ids, step counters, last actions
and a ring of recent transitions per row -- and builds each tick's columnar body
(``POST /v1/act/batch`` with ``session_ids``, ``observations [B, obs_dim]``, ...) with array
operations only. Arrays stay arrays: MessagePack carries them as msgpack-numpy maps.

Rows that fail are recovered one by one exactly as a single session is (:mod:`trmrl_client.protocol`):
the row's history becomes a :class:`~trmrl_client.protocol.SessionLedger`, the same flows run
(restore by replay after a lost session, catch-up after a missed step), and the outcome is written
back into the arrays. A tick that got no answer at all is remembered per row, and those rows' next
step goes through the single-session flow that resends unanswered steps first.

The drivers are :class:`VectorSession` (blocking) and :class:`AsyncVectorSession` (asyncio), over any
transport (:mod:`trmrl_client.transport`): HTTP, or the vectorised stream ``WS /v1/stream`` for the
ticks beside HTTP for the rest.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from trmrl_client import routes
from trmrl_client.codec import INPUT_LIMIT, within_limit
from trmrl_client.errors import ServiceError, ServiceUnavailable
from trmrl_client.protocol import (
    Call,
    FloatArray,
    Flow,
    ModelInfo,
    Reply,
    SessionLedger,
    Transition,
    status_of_error,
)
from trmrl_client.transport import AsyncTransport, Routed, Stream, Transport, run, run_async


def _rows_of(
    values: ArrayLike | None, rows: int, width: int | None, what: str, dtype: Any
) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=dtype)
    shape = (rows,) if width is None else (rows, width)
    if array.shape != shape:
        if width is None and array.size == rows:
            return array.reshape(rows)
        raise ValueError(f"{what} must have shape {list(shape)}, got {list(array.shape)}")
    return array


class VectorLedger:
    """The client's bookkeeping of ``num_envs`` sessions of one model, as arrays (no I/O).

    Example:
        >>> info = ModelInfo("m", "v", "point-nav", 2, 2, (-1, -1), (1, 1), 5, "episode")
        >>> ledger = VectorLedger(info, ["a", "b"], {"model": "m"}, "key")
        >>> body, _ = ledger.prepare(np.zeros((2, 2)), None, None, None, np.arange(2))
        >>> (body["session_ids"], body["steps"].tolist())
        (['a', 'b'], [0, 0])
    """

    def __init__(
        self, model: ModelInfo, session_ids: Sequence[str], create_body: dict[str, Any], route_key: str
    ) -> None:
        n, depth = len(session_ids), model.window + 1
        self.model = model
        self.session_ids = list(session_ids)
        self.create_body = create_body
        self.route_key = route_key
        self.next_step = np.zeros(n, np.int64)
        self.transitions = np.zeros(n, np.int64)
        self.last_action = np.zeros((n, model.act_dim), np.float32)
        self.has_action = np.zeros(n, bool)
        self.start_next = np.ones(n, bool)
        self.unconfirmed = np.zeros(n, np.int64)
        self.assert_previous = np.zeros(n, bool)
        # The last window + 1 transitions of each row, as recovery needs them (slot: index % depth).
        self.h_index = np.full((n, depth), -1, np.int64)
        self.h_step = np.zeros((n, depth), np.int64)
        self.h_obs = np.zeros((n, depth, model.obs_dim), np.float32)
        self.h_reward = np.zeros((n, depth), np.float32)
        self.h_start = np.zeros((n, depth), bool)
        self.h_prev = np.zeros((n, depth, model.act_dim), np.float32)
        self.h_has_prev = np.zeros((n, depth), bool)
        self.recoveries = 0
        self.catch_ups = 0

    @property
    def num_envs(self) -> int:
        return len(self.session_ids)

    # -- a tick ------------------------------------------------------------------------------------------
    def prepare(
        self,
        observations: ArrayLike,
        rewards: ArrayLike | None,
        episode_starts: ArrayLike | None,
        applied_actions: ArrayLike | None,
        rows: np.ndarray,
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Validate a tick of ``rows`` and build its columnar body; nothing changes until :meth:`record`.

        Raises ``ValueError`` for wrong shapes or a number the service would refuse (NaN, infinity, or
        beyond float32's range), naming the row.
        """
        n = len(rows)
        obs = _rows_of(observations, n, self.model.obs_dim, "observations", np.float64)
        assert obs is not None
        reward = _rows_of(rewards, n, None, "rewards", np.float64)
        start = _rows_of(episode_starts, n, None, "episode_starts", bool)
        applied = _rows_of(applied_actions, n, self.model.act_dim, "applied_actions", np.float64)
        for what, values in (("observations", obs), ("rewards", reward), ("applied_actions", applied)):
            if values is not None:
                ok = within_limit(values)
                if not ok.all():
                    row = int(np.flatnonzero(~ok)[0])
                    raise ValueError(
                        f"{what} of env {int(rows[row])} holds NaN, an infinite value or a number beyond "
                        f"±{INPUT_LIMIT:g}"
                    )
        columns = {
            "obs": obs.astype(np.float32),
            "reward": np.zeros(n, np.float32) if reward is None else reward.astype(np.float32),
            "start": (np.zeros(n, bool) if start is None else start) | self.start_next[rows],
            "step": self.next_step[rows].copy(),
        }
        if applied is not None:
            columns["prev"] = applied.astype(np.float32)
            columns["has_prev"] = np.ones(n, bool)
        else:
            columns["prev"] = self.last_action[rows]
            columns["has_prev"] = self.has_action[rows].copy()
        body: dict[str, Any] = {
            "model": self.model.name,
            "session_ids": [self.session_ids[i] for i in rows.tolist()],
            "observations": columns["obs"],
            "rewards": columns["reward"],
            "episode_starts": columns["start"],
            "steps": columns["step"],
        }
        if applied is not None:
            body["applied_actions"] = columns["prev"]
        return body, columns

    def record(self, rows: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        """Add a tick's transitions to the rows' histories (the robots lived through them)."""
        index = self.transitions[rows]
        at = index % self.h_index.shape[1]
        self.h_index[rows, at] = index
        self.h_step[rows, at] = columns["step"]
        self.h_obs[rows, at] = columns["obs"]
        self.h_reward[rows, at] = columns["reward"]
        self.h_start[rows, at] = columns["start"]
        self.h_prev[rows, at] = columns["prev"]
        self.h_has_prev[rows, at] = columns["has_prev"]
        self.transitions[rows] = index + 1
        self.next_step[rows] = columns["step"] + 1
        self.start_next[rows] = False

    def commit(self, rows: np.ndarray, actions: np.ndarray) -> None:
        self.last_action[rows] = actions
        self.has_action[rows] = True
        self.unconfirmed[rows] = 0
        self.assert_previous[rows] = False

    # -- one row as a single session, and back ----------------------------------------------------------
    def row_ledger(self, i: int) -> SessionLedger:
        """Row ``i`` as a :class:`SessionLedger`, for the single-session flows."""
        ledger = SessionLedger(self.model, self.session_ids[i], self.create_body, self.route_key)
        order = np.argsort(self.h_index[i])
        kept = [int(j) for j in order if self.h_index[i, j] >= 0]
        ledger.history = deque(
            (
                Transition(
                    index=int(self.h_index[i, j]),
                    step=int(self.h_step[i, j]),
                    observation=tuple(self.h_obs[i, j].astype(np.float64).tolist()),
                    reward=float(self.h_reward[i, j]),
                    episode_start=bool(self.h_start[i, j]),
                    previous_action=tuple(self.h_prev[i, j].astype(np.float64).tolist())
                    if self.h_has_prev[i, j]
                    else None,
                )
                for j in kept
            ),
            maxlen=self.h_index.shape[1],
        )
        ledger.next_step = int(self.next_step[i])
        ledger.transitions = int(self.transitions[i])
        ledger.last_action = self.last_action[i].copy() if self.has_action[i] else None
        ledger.start_next = bool(self.start_next[i])
        ledger.unconfirmed = int(self.unconfirmed[i])
        ledger.assert_previous = bool(self.assert_previous[i])
        return ledger

    def absorb(self, i: int, ledger: SessionLedger) -> None:
        """Write a row's :class:`SessionLedger` back (after a flow ran on it)."""
        self.session_ids[i] = ledger.session_id
        self.next_step[i] = ledger.next_step
        self.transitions[i] = ledger.transitions
        if ledger.last_action is not None:
            self.last_action[i] = ledger.last_action
            self.has_action[i] = True
        self.start_next[i] = ledger.start_next
        self.unconfirmed[i] = ledger.unconfirmed
        self.assert_previous[i] = ledger.assert_previous
        self.recoveries += ledger.recoveries
        self.catch_ups += ledger.catch_ups
        self.h_index[i] = -1
        for tr in ledger.history:
            j = tr.index % self.h_index.shape[1]
            self.h_index[i, j] = tr.index
            self.h_step[i, j] = tr.step
            self.h_obs[i, j] = tr.observation
            self.h_reward[i, j] = tr.reward
            self.h_start[i, j] = tr.episode_start
            self.h_has_prev[i, j] = tr.previous_action is not None
            if tr.previous_action is not None:
                self.h_prev[i, j] = tr.previous_action

    # -- the flow -------------------------------------------------------------------------------------------
    def tick_flow(
        self,
        observations: ArrayLike,
        rewards: ArrayLike | None = None,
        episode_starts: ArrayLike | None = None,
        applied_actions: ArrayLike | None = None,
        rows: ArrayLike | None = None,
    ) -> Flow:
        """One step of ``rows`` (default: every env); returns their actions, ``[len(rows), act_dim]``."""
        rows = np.arange(self.num_envs) if rows is None else np.asarray(rows, np.int64).reshape(-1)
        if len(np.unique(rows)) != len(rows) or (
            len(rows) and (rows.min() < 0 or rows.max() >= self.num_envs)
        ):
            raise ValueError(f"rows must be distinct env indices in [0, {self.num_envs})")
        body, columns = self.prepare(observations, rewards, episode_starts, applied_actions, rows)
        actions = np.full((len(rows), self.model.act_dim), np.nan, np.float32)
        # Rows with unanswered steps go through the single-session flow, which resends those first.
        lagging = self.unconfirmed[rows] > 0
        direct = np.flatnonzero(~lagging)
        one_by_one: list[tuple[int, dict[str, Any] | None]] = [
            (j, None) for j in np.flatnonzero(lagging).tolist()
        ]
        if len(direct):
            if lagging.any():
                body = {
                    k: [v[j] for j in direct.tolist()]
                    if k == "session_ids"
                    else v[direct]
                    if isinstance(v, np.ndarray)
                    else v
                    for k, v in body.items()
                }
            try:
                reply = yield Call.to(routes.ACT_COLUMNAR, body, route_key=self.route_key)
            except ServiceUnavailable:
                # The robots lived through this tick: it joins the histories, to be resent.
                self.record(rows, columns)
                self.unconfirmed[rows] += 1
                self.assert_previous[rows] = True
                raise
            if not reply.ok:
                raise reply.error()  # refused as a whole: nothing was stepped
            got = np.asarray(reply.body["actions"], dtype=np.float32).reshape(len(direct), self.model.act_dim)
            failed = {int(e["row"]): e for e in reply.body.get("errors", [])}
            served = np.ones(len(direct), bool)
            served[list(failed)] = False
            self.record(rows, columns)
            actions[direct[served]] = got[served]
            self.commit(rows[direct[served]], got[served])
            one_by_one += [(int(direct[j]), item) for j, item in sorted(failed.items())]
        else:
            self.record(rows, columns)
        refused: ServiceError | None = None
        for n, (j, item) in enumerate(one_by_one):
            i = int(rows[j])
            ledger = self.row_ledger(i)
            tr = ledger.history.pop()
            ledger.transitions, ledger.next_step = tr.index, tr.step
            try:
                if item is None:
                    actions[j] = yield from ledger.act_flow(tr)
                else:
                    actions[j] = yield from ledger.finish_flow(tr, Reply(status_of_error(item), item))
            except ServiceUnavailable:
                # The rows not reached yet are in the same position as this one: unanswered.
                rest = rows[[k for k, _ in one_by_one[n + 1 :]]]
                self.unconfirmed[rest] += 1
                self.assert_previous[rest] = True
                raise
            except ServiceError as exc:
                refused = refused or exc
            finally:
                self.absorb(i, ledger)
        if refused is not None:
            raise refused
        return actions


def create_sessions_flow(num_envs: int, body: dict[str, Any], route_key: str) -> Flow:
    """Create ``num_envs`` sessions in one ``POST /v1/sessions`` (``count``); returns ``(ids, model)``.

    Example:
        >>> ids, info = client.run(create_sessions_flow(8, {"model": "point-nav"}, "key"))  # doctest: +SKIP
    """
    reply = yield Call.to(routes.CREATE_SESSIONS, {**body, "count": num_envs}, route_key=route_key)
    if reply.status != 201:
        raise reply.error()
    return list(reply.body["session_ids"]), ModelInfo.from_json(reply.body["model"])


def delete_flow(ledger: VectorLedger) -> Flow:
    """Delete every session of the vector (a missing one is no error).

    Example:
        >>> client.run(delete_flow(envs.ledger))  # doctest: +SKIP
    """
    for session_id in ledger.session_ids:
        reply = yield Call.to(routes.DELETE_SESSION, route_key=ledger.route_key, session_id=session_id)
        if not reply.ok and reply.status != 404:
            raise reply.error()
    return None


class _VectorFacts:
    """What both vector drivers tell about their sessions (from their :class:`VectorLedger`)."""

    ledger: VectorLedger

    @property
    def session_ids(self) -> list[str]:
        return self.ledger.session_ids

    @property
    def model(self) -> ModelInfo:
        return self.ledger.model

    @property
    def num_envs(self) -> int:
        return self.ledger.num_envs

    @property
    def recoveries(self) -> int:
        return self.ledger.recoveries


class VectorSession(_VectorFacts):
    """``num_envs`` sessions stepped together, one columnar request per tick (blocking).

    Made by :meth:`trmrl_client.PolicyClient.vector`; fits a gymnasium vector env: observations
    ``[num_envs, obs_dim]`` in, actions ``[num_envs, act_dim]`` out.

    Example:
        >>> envs = client.vector(16, "point-nav")  # doctest: +SKIP
        >>> actions = envs.act(obs, rewards, episode_starts)  # doctest: +SKIP
    """

    def __init__(self, client: Transport, ledger: VectorLedger) -> None:
        self.client = client
        self.ledger = ledger

    def act(
        self,
        observations: ArrayLike,
        rewards: ArrayLike | None = None,
        episode_starts: ArrayLike | None = None,
        applied_actions: ArrayLike | None = None,
        *,
        rows: ArrayLike | None = None,
    ) -> FloatArray:
        """Actions for one tick of the envs ``rows`` (default: all), ``[len(rows), act_dim]``.

        ``rewards[i]`` is what env ``rows[i]`` received for its previous action; ``episode_starts[i]``
        marks its first observation of an episode; ``applied_actions`` what the envs really executed
        when it differs from the actions returned.

        Example:
            >>> envs.act(np.zeros((16, 2)), np.zeros(16), np.ones(16, bool)).shape  # doctest: +SKIP
            (16, 2)
        """
        flow = self.ledger.tick_flow(observations, rewards, episode_starts, applied_actions, rows)
        return np.asarray(run(self.client, flow), np.float32)

    def close(self) -> None:
        """Delete the sessions on the service."""
        with contextlib.suppress(ServiceUnavailable):
            run(self.client, delete_flow(self.ledger))


class AsyncVectorSession(_VectorFacts):
    """The asyncio :class:`VectorSession`, over HTTP (``transport="batch"``) or the vectorised stream
    ``WS /v1/stream`` (``transport="stream"``, needs the ``stream`` extra).

    Made by :meth:`trmrl_client.AsyncPolicyClient.vector`.

    Example:
        >>> envs = await client.vector(1024, "halfcheetah-vel", transport="stream")  # doctest: +SKIP
        >>> actions = await envs.act(obs, rewards, episode_starts)  # doctest: +SKIP
    """

    def __init__(self, client: AsyncTransport, ledger: VectorLedger, stream: Stream | None = None) -> None:
        self.client = client
        self.ledger = ledger
        self.stream = stream
        """Carries the columnar ticks when given (every other call goes over ``client``)."""
        self.transport: AsyncTransport = client if stream is None else Routed(stream, client)

    async def act(
        self,
        observations: ArrayLike,
        rewards: ArrayLike | None = None,
        episode_starts: ArrayLike | None = None,
        applied_actions: ArrayLike | None = None,
        *,
        rows: ArrayLike | None = None,
    ) -> FloatArray:
        """As :meth:`VectorSession.act`.

        Example:
            >>> actions = await envs.act(obs, rewards, starts, rows=running)  # doctest: +SKIP
        """
        flow = self.ledger.tick_flow(observations, rewards, episode_starts, applied_actions, rows)
        return np.asarray(await run_async(self.transport, flow), np.float32)

    async def close(self) -> None:
        """Close the stream (if any) and delete the sessions on the service."""
        if self.stream is not None:
            await self.stream.aclose()
        with contextlib.suppress(ServiceUnavailable):
            await run_async(self.client, delete_flow(self.ledger))


__all__ = ["AsyncVectorSession", "VectorLedger", "VectorSession", "create_sessions_flow", "delete_flow"]
