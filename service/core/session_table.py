"""The session table of one model: ids, slots and per-slot counters, all in flat numpy arrays.

A session *is* a slot of the model's :class:`~trmrl.slot_pool.SlotPool` plus one row of each array
here; the only per-session Python values are the id -> slot dictionary entry, its reverse and the
session's owner. Others read the arrays; only the table's verbs write them -- a step begins
(:meth:`SessionTable.begin_step`), is committed or rolled back (:meth:`~SessionTable.commit`,
:meth:`~SessionTable.roll_back`), a snapshot is loaded (:meth:`~SessionTable.load`), sessions move
(:meth:`~SessionTable.take_over`) -- each for any set of slots with fancy indexing, never with a loop
over sessions.

Slots are handed out from a free list. A session ends by deletion, by idle expiry (its own
``ttl_s``) or, when the table is full and a new session is wanted, by eviction of the least recently
used session that has been idle at least ``evict_idle_s``; with none such the request gets 429.
A slot whose steps are still queued is released only once they complete, so a newly created session
never inherits a stale step. Under a trial-context model the table also lists the slots released
since the last forward pass (:meth:`SessionTable.take_released`): the pass gives their key/value cache
blocks back, so an ended session's cache does not wait for its slot to be reused.
"""

from __future__ import annotations

import secrets
import time
from itertools import repeat
from typing import Any

import numpy as np

from service.core import errors
from service.core.errors import ServiceError

#: Per-slot columns a session takes along when it moves to another version of its model.
_MOVED = (
    *("next_step", "episodes", "episode_step", "deterministic", "seed", "ttl_s", "created_at"),
    *("last_active", "pending_start", "pending_clear", "last_action", "record", "episode_return"),
    *("last_return", "context"),
)


_NONE = np.zeros(0, np.int64)
_NONE.flags.writeable = False


class SessionTable:
    """Per-slot session state for one model (``capacity`` = the slot pool's capacity)."""

    def __init__(self, capacity: int, act_dim: int, *, default_ttl_s: float, evict_idle_s: float) -> None:
        self.capacity = capacity
        self.max_context = 0
        """A trial-context model's ``max_context`` (its contexts do not slide); 0: none (a window)."""
        self.episode_scope = False
        """An episode start restarts the context too (``memory_scope="episode"``)."""
        self.default_ttl_s = default_ttl_s
        self.evict_idle_s = evict_idle_s
        self.ids: dict[str, int] = {}
        self.slot_ids: list[str | None] = [None] * capacity
        self.owners: list[str | None] = [None] * capacity
        """The principal (see ``service.auth``) that created each session; ``None`` without keys."""
        # LIFO reuse keeps recently touched slots (and their cache lines) hot.
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self.in_use = np.zeros(capacity, bool)
        self.generation = np.zeros(capacity, np.int64)
        """Bumped when a slot is freed: results of steps queued before that are not committed."""
        self.next_step = np.zeros(capacity, np.int64)
        """Committed steps; the number of the next step once nothing is queued."""
        self.queued = np.zeros(capacity, np.int64)
        """Steps accepted but not yet computed."""
        self.last_batch = np.full(capacity, -1, np.int64)
        """Batch holding the newest queued step (valid while ``queued > 0``)."""
        self.last_row = np.zeros(capacity, np.int64)
        self.episodes = np.zeros(capacity, np.int64)
        self.deterministic = np.ones(capacity, bool)
        self.seed = np.zeros(capacity, np.int64)
        self.ttl_s = np.zeros(capacity, np.float64)
        self.created_at = np.zeros(capacity, np.float64)
        """Wall-clock seconds."""
        self.last_active = np.zeros(capacity, np.float64)
        """Monotonic seconds (expiry must not follow wall-clock jumps)."""
        self.pending_start = np.zeros(capacity, bool)
        """The next step starts an episode (a new session, or after a reset)."""
        self.pending_clear = np.zeros(capacity, bool)
        """The slot's window must be cleared before the next step (a new session or a trial reset)."""
        self.release_when_idle = np.zeros(capacity, bool)
        self.last_action = np.zeros((capacity, act_dim), np.float32)
        """The action last returned, for an idempotent retry."""
        self.episode_step = np.zeros(capacity, np.int64)
        """Committed steps of the current episode (0 before its first)."""
        self.record = np.zeros(capacity, bool)
        """The session's steps are recorded (``service.core.recording``)."""
        self.episode_return = np.zeros(capacity, np.float64)
        """Rewards received so far in the current episode (``service.core.adaptation`` counts them)."""
        self.last_return = np.full(capacity, np.nan)
        """The return of the session's last finished episode; NaN before one has finished."""
        self.context = np.zeros(capacity, np.int64)
        """Working memories the slot's context holds once its queued steps are computed (counted under
        a ``max_context``): a full context is refused before a step is queued, without the device."""
        self.released: set[int] = set()
        """Slots freed since the last :meth:`take_released` (under a ``max_context``), their cache to be
        cleared; a slot handed out again leaves it (its session starts with a clear, or a restore)."""
        self.evictions = 0
        self.expirations = 0
        self.owned = 0
        """Live sessions created under an API key (none: ownership checks can be skipped)."""

    def __len__(self) -> int:
        return len(self.ids)

    # -- lookup -------------------------------------------------------------------------------------
    def find(self, session_id: str, now: float | None = None) -> int | None:
        """The slot of a live session, or ``None``; an expired session is ended on the way."""
        slot = self.ids.get(session_id)
        if slot is None:
            return None
        now = time.monotonic() if now is None else now
        if self.queued[slot] == 0 and now - self.last_active[slot] > self.ttl_s[slot]:
            self._end(slot)
            self.expirations += 1
            return None
        return slot

    def lookup(self, session_ids: list[str], owner: str | None, now: float | None = None) -> np.ndarray:
        """The slots of many sessions at once, ``-1`` where there is no live session the caller may see.

        Like :meth:`find` row by row (an expired session is ended on the way), with one dictionary
        lookup per id and the rest in array operations.
        """
        slots = np.fromiter(map(self.ids.get, session_ids, repeat(-1)), np.int64, len(session_ids))
        found = np.flatnonzero(slots >= 0)
        if not len(found):
            return slots
        at = slots[found]
        now = time.monotonic() if now is None else now
        expired = (self.queued[at] == 0) & (now - self.last_active[at] > self.ttl_s[at])
        if expired.any():
            for slot in at[expired].tolist():
                self._end(slot)
            self.expirations += int(expired.sum())
            slots[found[expired]] = -1
        if owner is not None or self.owned:
            owners = self.owners
            foreign = np.fromiter((owners[s] != owner for s in at.tolist()), bool, len(at))
            slots[found[foreign]] = -1
        return slots

    def get(self, session_id: str) -> int:
        """Like :meth:`find`, but an unknown session is a 404 ``unknown_session``."""
        slot = self.find(session_id)
        if slot is None:
            raise errors.unknown_session(session_id)
        return slot

    def session_id(self, slot: int) -> str:
        """The id of the session in ``slot`` (a 500 if the slot was released under a caller)."""
        session_id = self.slot_ids[slot]
        if session_id is None:
            raise ServiceError("internal_error", "A session's slot was released while in use.")
        return session_id

    # -- lifecycle ----------------------------------------------------------------------------------
    def create(
        self,
        *,
        deterministic: bool,
        seed: int | None,
        ttl_s: float | None,
        owner: str | None = None,
        session_id: str | None = None,
        record: bool = False,
    ) -> tuple[str, int]:
        """Allocate a slot for a new session; returns ``(session_id, slot)``.

        ``session_id``: the id to use (a restored session); it must not be in use. Omitted: a new one.
        """
        now = time.monotonic()
        if not self._free:
            self.expire(now)
        if not self._free and not self._evict_lru(now):
            raise errors.capacity_exhausted(self.capacity)
        if session_id is not None and session_id in self.ids:
            raise ValueError(f"session {session_id} exists")
        slot = self._free.pop()
        self.released.discard(slot)
        if session_id is None:
            session_id = secrets.token_hex(16)
        self.ids[session_id] = slot
        self.slot_ids[slot] = session_id
        self.owners[slot] = owner
        self.owned += owner is not None
        self.in_use[slot] = True
        self.next_step[slot] = 0
        self.episodes[slot] = 0
        self.deterministic[slot] = deterministic
        self.seed[slot] = secrets.randbits(63) if seed is None else seed
        self.ttl_s[slot] = self.default_ttl_s if ttl_s is None else ttl_s
        self.created_at[slot] = time.time()
        self.last_active[slot] = now
        self.pending_start[slot] = True
        self.pending_clear[slot] = True
        self.last_action[slot] = 0.0
        self.episode_step[slot] = 0
        self.record[slot] = record
        self.episode_return[slot] = 0.0
        self.last_return[slot] = np.nan
        self.context[slot] = 0
        return session_id, slot

    def take_over(self, source: SessionTable) -> tuple[np.ndarray, np.ndarray]:
        """Move every session of ``source`` (nothing queued there) into free slots here, counters and
        all; returns their slots there and here, in the same order.

        429 ``capacity_exhausted`` with nothing changed if they do not fit (after ending expired
        sessions; nothing is evicted for a move).
        """
        slots = self._take_free(len(source))
        ids, owners, old = source._release_all()
        self._adopt(ids, owners, slots)
        for name in _MOVED:
            getattr(self, name)[slots] = getattr(source, name)[old]
        return old, slots

    def _take_free(self, count: int) -> np.ndarray:
        """``count`` free slots at once (429 ``capacity_exhausted`` if there are not that many)."""
        if len(self._free) < count:
            self.expire()
        if len(self._free) < count:
            raise errors.capacity_exhausted(self.capacity)
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        self.released.difference_update(taken)
        return np.asarray(taken, np.int64)

    def _adopt(self, session_ids: list[str], owners: list[str | None], slots: np.ndarray) -> None:
        """Register sessions moved in from elsewhere into ``slots`` (from :meth:`_take_free`).

        Only the ids, owners and in-use flags are set here: :meth:`take_over` copies the columns.
        """
        self.ids.update(zip(session_ids, slots.tolist(), strict=True))
        for slot, session_id, owner in zip(slots.tolist(), session_ids, owners, strict=True):
            self.slot_ids[slot] = session_id
            self.owners[slot] = owner
        self.owned += sum(owner is not None for owner in owners)
        self.in_use[slots] = True
        self.queued[slots] = 0
        self.release_when_idle[slots] = False

    def _release_all(self) -> tuple[list[str], list[str | None], np.ndarray]:
        """End every session at once (they move elsewhere); returns their ids, owners and slots.

        The table must have no queued steps (the caller drained it).
        """
        ids = list(self.ids)
        slots = np.asarray([self.ids[i] for i in ids], np.int64)
        owners = [self.owners[s] for s in slots.tolist()]
        for slot in slots.tolist():
            self.slot_ids[slot] = None
            self.owners[slot] = None
        self.ids.clear()
        self.owned = 0
        self.in_use[slots] = False
        self.generation[slots] += 1
        self._free_slots(slots.tolist())
        return ids, owners, slots

    def delete(self, session_id: str) -> None:
        """End a session (404 ``unknown_session`` if there is none)."""
        self._end(self.get(session_id))

    def reset(self, slot: int, scope: str) -> None:
        """Mark the next step as an episode start; a trial reset also clears the window."""
        self.pending_start[slot] = True
        if scope == "trial":
            self.pending_clear[slot] = True
        self.last_active[slot] = time.monotonic()

    def expire(self, now: float | None = None) -> int:
        """End every idle session past its TTL; returns how many."""
        now = time.monotonic() if now is None else now
        stale = np.flatnonzero(self.in_use & (self.queued == 0) & (now - self.last_active > self.ttl_s))
        for slot in stale.tolist():
            self._end(slot)
        self.expirations += len(stale)
        return len(stale)

    def _evict_lru(self, now: float) -> bool:
        idle = self.in_use & (self.queued == 0) & (now - self.last_active >= self.evict_idle_s)
        if not idle.any():
            return False
        candidates = np.flatnonzero(idle)
        self._end(int(candidates[np.argmin(self.last_active[candidates])]))
        self.evictions += 1
        return True

    def _end(self, slot: int) -> None:
        session_id = self.slot_ids[slot]
        if session_id is not None:
            del self.ids[session_id]
        self.slot_ids[slot] = None
        self.owned -= self.owners[slot] is not None
        self.owners[slot] = None
        self.in_use[slot] = False
        self.generation[slot] += 1
        if self.queued[slot]:
            self.release_when_idle[slot] = True
        else:
            self._free_slots([slot])

    def _release_idle(self, slots: np.ndarray) -> None:
        """Return to the free list the ended slots among ``slots`` whose queued steps have completed."""
        done = slots[self.release_when_idle[slots] & (self.queued[slots] == 0)]
        if len(done):
            self.release_when_idle[done] = False
            self._free_slots(done.tolist())

    def _free_slots(self, slots: list[int]) -> None:
        self._free.extend(slots)
        if self.max_context:
            self.released.update(slots)

    def take_released(self) -> np.ndarray:
        """The slots freed since the last call, whose trial cache can go (forward passes only)."""
        if not self.released:
            return _NONE
        slots = np.fromiter(self.released, np.int64, len(self.released))
        self.released.clear()
        return slots

    # -- steps ----------------------------------------------------------------------------------------
    def expected_step(self, slot: int) -> int:
        """The number the session's next new step must carry."""
        return int(self.next_step[slot] + self.queued[slot])

    def check_step(self, slot: int, step: int | None) -> bool:
        """Validate a client's step number; ``True`` if it is a retry of the newest step.

        Raises:
            ServiceError: 409 ``step_conflict`` for a step behind the newest or ahead of the next.
        """
        expected = self.expected_step(slot)
        if step is None or step == expected:
            return False
        if step == expected - 1:
            return True
        raise errors.step_conflict(expected, step)

    def touch(self, slots: int | np.ndarray) -> None:
        """The sessions were active now (a step, a retry): their idle time starts again."""
        self.last_active[slots] = time.monotonic()

    def _restarts(self, slots: int | np.ndarray, episode_start: Any) -> Any:
        """Whether the next step of each of ``slots`` starts its context again (a trial reset or a new
        session; with episode scope, any episode start)."""
        restart = self.pending_clear[slots]
        if self.episode_scope:
            restart = restart | episode_start | self.pending_start[slots]
        return restart

    def context_full(self, slots: np.ndarray, episode_start: np.ndarray) -> np.ndarray:
        """Which of ``slots`` (distinct) cannot take a next step: their context holds ``max_context``
        working memories and the step does not start it again."""
        if not self.max_context:
            return np.zeros(len(slots), bool)
        return ~self._restarts(slots, episode_start) & (self.context[slots] >= self.max_context)

    def check_context(self, slot: int, episode_start: bool) -> None:
        """Refuse (409 ``context_full``) a next step of ``slot`` that its full context cannot take."""
        if self.max_context and self.context_full(np.asarray([slot]), np.asarray([episode_start]))[0]:
            raise errors.context_full(self.session_id(slot), self.max_context)

    def begin_step(
        self, slots: int | np.ndarray, batch_id: int, rows: int | np.ndarray, episode_start: Any = False
    ) -> tuple[Any, Any, Any, Any]:
        """Queue the next step of each of ``slots`` (distinct) at ``rows`` of batch ``batch_id``; one
        slot (a request's step) or an array of them (a tick's rows).

        Returns what the batch keeps of each row, as numpy scalars or arrays: the slot's generation
        (a step of a session ended meanwhile is not committed), whether a pending episode start is
        consumed, whether the window is to be cleared first (both are consumed here;
        :meth:`roll_back` re-arms them) and the context's count before the step.
        """
        generation = self.generation[slots]
        pending = self.pending_start[slots]
        clear = self.pending_clear[slots]
        context = self.context[slots]
        if self.max_context:
            self.context[slots] = np.where(self._restarts(slots, episode_start), 0, context) + 1
        self.pending_start[slots] = False
        self.pending_clear[slots] = False
        self.queued[slots] += 1
        self.last_batch[slots] = batch_id
        self.last_row[slots] = rows
        return generation, pending, clear, context

    def alive(self, slots: np.ndarray, generation: np.ndarray) -> np.ndarray:
        """Which of a batch's rows still belong to the session that queued them."""
        return self.generation[slots] == generation

    def commit(self, slots: np.ndarray, live: np.ndarray, start: np.ndarray, actions: np.ndarray) -> None:
        """Count a computed batch's steps: the live rows' sessions advance (``start``: the step began an
        episode) and remember their actions; the slots of ended sessions are released once idle."""
        self.queued[slots] -= 1
        if not live.all():  # else (the usual case) no copies of the rows
            self._release_idle(slots[~live])
            slots, start, actions = slots[live], start[live], actions[live]
        self.next_step[slots] += 1
        self.episodes[slots] += start
        self.episode_step[slots] = np.where(start, 1, self.episode_step[slots] + 1)
        self.last_action[slots] = actions

    def roll_back(
        self, slots: np.ndarray, generation: np.ndarray, pending: np.ndarray, clear: np.ndarray, context: Any
    ) -> None:
        """Undo :meth:`begin_step` for a batch that failed, so a retry behaves like the first try
        (``pending``, ``clear``, ``context``: what :meth:`begin_step` returned)."""
        self.queued[slots] -= 1
        live = self.alive(slots, generation)
        idle = live & (self.queued[slots] == 0)  # later steps queued: they still count, one memory less
        self.context[slots[idle]] = context[idle]
        self.context[slots[live & ~idle]] = np.maximum(self.context[slots[live & ~idle]] - 1, 0)
        self.pending_start[slots[live & pending]] = True
        self.pending_clear[slots[live & clear]] = True
        self._release_idle(slots[~live])

    def load(
        self,
        slots: np.ndarray,
        *,
        steps: np.ndarray,
        episodes: np.ndarray,
        episode_start_pending: np.ndarray,
        deterministic: np.ndarray,
        seed: np.ndarray,
        ttl_s: np.ndarray,
        created_at: np.ndarray,
        last_action: np.ndarray,
        context: np.ndarray,
    ) -> None:
        """Give sessions the counters of a snapshot or a saved block (``context``: its lengths); their
        memory is loaded into the slot pool alongside, so their windows are not cleared at the next step."""
        self.next_step[slots] = steps
        self.episodes[slots] = episodes
        self.pending_start[slots] = episode_start_pending
        self.pending_clear[slots] = False
        self.deterministic[slots] = deterministic
        self.seed[slots] = seed
        self.ttl_s[slots] = ttl_s
        self.created_at[slots] = created_at
        self.last_action[slots] = last_action
        self.context[slots] = context
        self.last_active[slots] = time.monotonic()
