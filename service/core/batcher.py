"""The micro-batcher of one model: steps in, batches out, one forward pass per batch.

1. :meth:`Batcher.submit` (one step) or :meth:`Batcher.submit_rows` (a columnar tick): check the step
   number, write the step into the open batch's preallocated rows and begin it in the session table
   (nothing changes unless all checks pass); returns where each action will be (:class:`Ticket`,
   :class:`RowTickets`). A single step takes the one-row path; it costs less than a one-row tick.
2. :meth:`Batcher.run` (one asyncio task) hands the oldest open batch to ``compute`` on a worker
   thread while the event loop fills the next one; then ``commit`` counts it (or, if the forward
   pass failed, the table rolls its steps back so a retry behaves like the first try) and the
   batch's one future, which every step in it awaits, is resolved.

A batch never holds two steps of one session, so a session's memory advances in order. The batcher
knows nothing of the model, of HTTP or of recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.core import errors
from service.core.batch import Batch, Computed
from service.core.errors import ServiceError
from service.core.records import EngineLimits
from service.core.session_table import SessionTable

log = logging.getLogger("trmrl.service")


class _SharedFuture(asyncio.Future[Computed]):
    """A batch's result, awaited by every step in it. It cannot be cancelled: a client gone away must
    not cancel its neighbours' result (this costs less than an ``asyncio.shield`` per request)."""

    def cancel(self, msg: object = None) -> bool:
        return False


class Ticket:
    """A step's place in the batcher: await :meth:`action` for its (clipped) action."""

    __slots__ = ("_cached", "_future", "_row", "step")

    def __init__(
        self, step: int, future: asyncio.Future[Computed] | None, row: int, cached: np.ndarray | None
    ) -> None:
        self.step = step
        self._future = future
        self._row = row
        self._cached = cached

    async def action(self) -> np.ndarray:
        if self._future is None:
            assert self._cached is not None
            return self._cached
        computed = await self._future
        return computed.action(self._row)


@dataclass
class RowTickets:
    """Where the rows of a columnar tick went (:meth:`Batcher.submit_rows`); rows index the tick's
    accepted rows, in order."""

    steps: np.ndarray
    """``[n]`` the step number each row answers (the expected one for a conflicting row)."""
    conflict: np.ndarray
    """``[n]`` bool: the row's step is neither the next nor a retry of the newest (nothing queued)."""
    full: np.ndarray
    """``[n]`` bool: the row's session's context is full (a trial-context model; nothing queued)."""
    cached_rows: np.ndarray
    """Rows that retry a completed step: their action is in :attr:`cached`."""
    cached: np.ndarray
    parts: list[tuple[asyncio.Future[Computed], np.ndarray, np.ndarray]]
    """``(future, rows, batch rows)``: the batches computing the other rows, and where in them
    (:meth:`Computed.action`: a row may be refused by the pass, as a whole batch may fail)."""


Compute = Callable[[Batch, int, np.ndarray, np.ndarray], np.ndarray]
"""A forward pass: ``(batch, n, deterministic, seeds)`` -> the ``n`` rows' clipped actions; it leaves
the rows marked in ``batch.refused`` uncomputed, and marks (and leaves) those it cannot take (no key/value
cache block)."""
Commit = Callable[[Batch, int, np.ndarray], None]
"""Count a computed batch: ``(batch, n, actions)``, on the event loop (its refused rows are not
counted: they are rolled back)."""
Refusal = Callable[[int], ServiceError]
"""The error the rows a forward pass refused get (called with how many there are)."""


class Batcher:
    """Queues the steps of one model's sessions into batches and runs one forward pass per batch."""

    def __init__(
        self,
        name: str,
        table: SessionTable,
        obs_dim: int,
        limits: EngineLimits,
        *,
        compute: Compute,
        commit: Commit,
        refusal: Refusal | None = None,
    ) -> None:
        self.name = name
        self.table = table
        self.obs_dim, self.act_dim = obs_dim, table.last_action.shape[1]
        self.max_batch = limits.max_batch
        self.batch_wait_s = limits.batch_wait_s
        self.max_queued_steps = limits.max_queued_steps
        self.compute = compute
        self.commit = commit
        self.refusal = refusal or (lambda _: ServiceError("internal_error", "The model refused this step."))
        self._refusing: dict[int, tuple[int, int, int, ServiceError]] = {}
        """Slots with a refused or failed step whose later steps were already queued: ``(the newest batch
        holding one, the context count to restore, the session's generation, the refusal)``. Those steps
        build on the one that was not taken, so they are refused too (before their pass, with the same
        refusal), and the session ends up as before it."""
        # One thread: forward passes of this model run one at a time and in order, and the slot pool
        # is only ever touched from it.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{name}")
        self._open: deque[Batch] = deque()
        self._spare: list[Batch] = []
        self.inflight: dict[int, asyncio.Future[Computed]] = {}
        """Futures of batches not yet completed (open or computing), by batch id."""
        self._next_batch_id = 0
        self._wake = asyncio.Event()
        self._filled = asyncio.Event()
        self.step_lock = asyncio.Lock()
        """Held from a batch's forward pass to its commit: while another holder has it, the slot pool
        and the table's counters agree and no forward pass runs (``service.core.snapshots`` takes it)."""
        self.queued_steps = 0
        self.on_batch: Callable[[int, float], None] | None = None
        """Called after each forward pass with its batch size and the oldest step's queue wait (s)."""

    # -- steps in ---------------------------------------------------------------------------------------
    def submit(
        self,
        slot: int,
        obs: np.ndarray,
        reward: float,
        episode_start: bool,
        step: int | None,
        applied_action: list[float] | None,
    ) -> Ticket:
        """Queue one validated step of the session in ``slot`` (event loop only).

        A retry of the session's newest step is answered from what that step returned (or will
        return), without touching the memory. A step that a full trial context cannot take is
        refused (409 ``context_full``) with nothing changed.
        """
        table = self.table
        retry = table.check_step(slot, step)
        if not retry and self.queued_steps >= self.max_queued_steps:
            raise errors.overloaded(self.max_queued_steps)
        if not retry:
            table.check_context(slot, episode_start)
        table.touch(slot)
        if retry:
            assert step is not None
            if table.queued[slot]:
                future = self._inflight_future(int(table.last_batch[slot]))
                return Ticket(step, future, int(table.last_row[slot]), None)
            return Ticket(step, None, 0, table.last_action[slot].copy())
        batch = self._batch_for(slot)
        row = batch.size
        batch.size = row + 1
        number = table.expected_step(slot)
        batch.put(row, slot, table, number, obs, reward, episode_start, applied_action)
        self.queued_steps += 1
        if batch.size == self.max_batch:
            self._filled.set()
        self._wake.set()
        assert batch.future is not None
        return Ticket(number, batch.future, row, None)

    def submit_rows(
        self,
        slots: np.ndarray,
        obs: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        steps: np.ndarray | None,
        applied: np.ndarray | None,
    ) -> RowTickets:
        """Queue one validated step of each of many distinct sessions, with array operations.

        The columnar twin of :meth:`submit`: ``slots`` are distinct; ``obs`` is float32 ``[n, D]``;
        ``steps`` (``None``: every row is the next step) are the clients' step numbers. A row whose
        step conflicts is left out (and its session untouched); a retry of a session's newest step
        is answered from that step; a row whose session's trial context is full is left out too
        (:attr:`RowTickets.full`). Refuses the whole tick (``overloaded``), before any change,
        when its new steps do not fit in the queue.
        """
        table = self.table
        expected = table.next_step[slots] + table.queued[slots]
        if steps is None:
            new = np.ones(len(slots), bool)
            retry = np.zeros(len(slots), bool)
        else:
            new = steps == expected
            retry = steps == expected - 1
        conflict = ~(new | retry)
        full = new & table.context_full(slots, episode_start)
        fresh = np.flatnonzero(new & ~full)
        if len(fresh) and self.queued_steps + len(fresh) > self.max_queued_steps:
            raise errors.overloaded(self.max_queued_steps)
        table.touch(slots[~(conflict | full)])
        parts: list[tuple[asyncio.Future[Computed], np.ndarray, np.ndarray]] = []
        cached_rows = np.zeros(0, np.int64)
        cached = np.zeros((0, self.act_dim), np.float32)
        if retry.any():
            again = np.flatnonzero(retry)
            waiting = table.queued[slots[again]] > 0
            cached_rows = again[~waiting]
            cached = table.last_action[slots[cached_rows]].copy()
            queued_rows = again[waiting]
            batch_ids = table.last_batch[slots[queued_rows]]
            for batch_id in np.unique(batch_ids).tolist():
                rows = queued_rows[batch_ids == batch_id]
                parts.append((self._inflight_future(batch_id), rows, table.last_row[slots[rows]]))
        if len(fresh):
            placed = 0
            if self._open:
                newest = self._open[-1]
                room = self.max_batch - newest.size
                if room > 0:
                    # A session already waiting in the newest batch must take a later one.
                    held = (table.queued[slots[fresh]] > 0) & (table.last_batch[slots[fresh]] == newest.id)
                    if held.any():
                        fresh = np.concatenate([fresh[~held], fresh[held]])
                        room = min(room, int((~held).sum()))
                    placed = min(room, len(fresh))
                    if placed:
                        parts.append(
                            self._fill(
                                newest, fresh[:placed], slots, expected, obs, reward, episode_start, applied
                            )
                        )
            while placed < len(fresh):
                take = fresh[placed : placed + self.max_batch]
                parts.append(
                    self._fill(self._new_batch(), take, slots, expected, obs, reward, episode_start, applied)
                )
                placed += len(take)
            self._wake.set()
        return RowTickets(
            steps=expected if steps is None else np.where(retry, steps, expected),
            conflict=conflict,
            full=full,
            cached_rows=cached_rows,
            cached=cached,
            parts=parts,
        )

    def _fill(
        self,
        batch: Batch,
        rows: np.ndarray,
        slots: np.ndarray,
        expected: np.ndarray,
        obs: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        applied: np.ndarray | None,
    ) -> tuple[asyncio.Future[Computed], np.ndarray, np.ndarray]:
        """Write ``rows`` of a tick into ``batch``'s next free rows (one array write per column)."""
        start, stop = batch.size, batch.size + len(rows)
        chosen = slots[rows]
        batch_rows = batch.put(
            slice(start, stop),
            chosen,
            self.table,
            expected[rows],
            obs[rows],
            reward[rows],
            episode_start[rows],
            None if applied is None else applied[rows],
        )
        batch.size = stop
        self.queued_steps += len(rows)
        if stop == self.max_batch:
            self._filled.set()
        assert batch.future is not None
        assert isinstance(batch_rows, np.ndarray)
        return batch.future, rows, batch_rows

    def _inflight_future(self, batch_id: int) -> asyncio.Future[Computed]:
        future = self.inflight.get(batch_id)
        if future is None:
            raise ServiceError("internal_error", "A queued step lost its batch.")
        return future

    def _batch_for(self, slot: int) -> Batch:
        """The open batch a new step of ``slot`` goes to: the newest, unless full or already holding it."""
        if self._open:
            newest = self._open[-1]
            holds_slot = self.table.queued[slot] and self.table.last_batch[slot] == newest.id
            if newest.size < self.max_batch and not holds_slot:
                return newest
        return self._new_batch()

    def _new_batch(self) -> Batch:
        """Open an empty batch (a spare one when there is one) behind the open ones."""
        batch = self._spare.pop() if self._spare else Batch(self.max_batch, self.obs_dim, self.act_dim)
        batch.id = self._next_batch_id
        self._next_batch_id += 1
        batch.size = 0
        batch.opened_at = time.perf_counter()
        batch.future = _SharedFuture(loop=asyncio.get_running_loop())
        self.inflight[batch.id] = batch.future
        self._open.append(batch)
        return batch

    # -- batches out --------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Dispatch the open batches, oldest first, waiting up to ``batch_wait_s`` for one to fill."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._open:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.batch_wait_s > 0 and self._open[0].size < self.max_batch:
                self._filled.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._filled.wait(), self.batch_wait_s)
            await self._dispatch(loop, self._open.popleft())

    def _refuse_followers(self, batch: Batch, n: int) -> dict[int, ServiceError]:
        """Mark the rows of ``batch`` that follow a step of their session that was not taken (event
        loop); returns their refusals by row."""
        errors: dict[int, ServiceError] = {}
        pending = np.fromiter(self._refusing, np.int64, len(self._refusing))
        for row in np.flatnonzero(np.isin(batch.slots[:n], pending)).tolist():
            entry = self._refusing[int(batch.slots[row])]
            if entry[2] == batch.generation[row]:
                batch.refused[row] = True
                errors[row] = entry[3]
        return errors

    def _contexts(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        """The context counts a roll-back of ``rows`` restores: a follower's is what preceded the first
        refused step of its session."""
        context = batch.context[rows].copy()
        if self._refusing:
            for i, (slot, generation) in enumerate(
                zip(batch.slots[rows].tolist(), batch.generation[rows].tolist(), strict=True)
            ):
                entry = self._refusing.get(slot)
                if entry is not None and entry[2] == generation:
                    context[i] = entry[1]
        return context

    def _roll_back(self, batch: Batch, rows: np.ndarray, errors: dict[int, ServiceError]) -> None:
        """Roll back ``rows`` of a batch whose steps were not taken (``errors``: each row's refusal); a
        session with later steps queued has them refused in turn, with the same refusal, and its context
        count goes back to what it was before the first step not taken."""
        table = self.table
        slots = batch.slots[rows]
        context = self._contexts(batch, rows)
        table.roll_back(
            slots, batch.generation[rows], batch.start_was_pending[rows], batch.clear[rows], context
        )
        for i, slot in enumerate(slots.tolist()):
            if table.queued[slot] and table.last_batch[slot] > batch.id:
                row = int(rows[i])
                self._refusing[slot] = (
                    int(table.last_batch[slot]),
                    int(context[i]),
                    int(batch.generation[row]),
                    errors[row],
                )

    def _forget_refusals(self, batch_id: int) -> None:
        """Drop the refusals whose last follower was in batch ``batch_id`` or before."""
        for slot in [s for s, entry in self._refusing.items() if entry[0] <= batch_id]:
            del self._refusing[slot]

    async def _dispatch(self, loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        n = batch.size
        future = batch.future
        assert future is not None
        slots = batch.slots[:n]
        deterministic = self.table.deterministic[slots]
        seeds = self.table.seed[slots]
        waited = time.perf_counter() - batch.opened_at
        await self.step_lock.acquire()
        batch.released = self.table.take_released()
        batch.refused[:n] = False
        followers = self._refuse_followers(batch, n) if self._refusing else {}
        try:
            actions = await loop.run_in_executor(self.executor, self.compute, batch, n, deterministic, seeds)
        except Exception:
            log.exception("forward pass of model %s failed for %d steps", self.name, n)
            # Undo what ``submit`` consumed, so a retry behaves like the first try.
            failure = ServiceError(
                "internal_error", "The model failed to compute this step; the session is unchanged."
            )
            self._roll_back(batch, np.arange(n), {row: followers.get(row, failure) for row in range(n)})
            if not future.done():
                future.set_exception(failure)
                future.exception()  # retrieved here: requests that went away must not log it again
        else:
            refused = batch.refused[:n]
            result = Computed(actions)
            if refused.any():
                # Rows the cache had no block for, or queued behind a step not taken: not taken, so
                # their sessions are as before the step.
                rows = np.flatnonzero(refused)
                error = self.refusal(len(rows) - len(followers))
                self._roll_back(batch, rows, {int(row): followers.get(int(row), error) for row in rows})
                result = Computed(actions, refused.copy(), error, followers or None)
            self.commit(batch, n, actions)
            if not future.done():
                future.set_result(result)
            if self.on_batch is not None:
                self.on_batch(n, waited)
        finally:
            if self._refusing:
                self._forget_refusals(batch.id)
            self.step_lock.release()
            self.queued_steps -= n
            del self.inflight[batch.id]
            batch.future = None
            self._spare.append(batch)
