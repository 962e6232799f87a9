"""A batch's preallocated rows: what :class:`~service.core.batcher.Batcher` fills and
:class:`~service.core.forward.Forward` computes in one forward pass."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from service.core.errors import ServiceError
from service.core.session_table import SessionTable


class Computed(NamedTuple):
    """What a batch's forward pass gives every step in it."""

    actions: np.ndarray
    """``[n, act_dim]`` clipped actions (NaN in refused rows)."""
    refused: np.ndarray | None = None
    """``[n]`` bool: rows not computed (``None``: none), each answered with :meth:`error_of`."""
    error: ServiceError | None = None
    """The refusal of a refused row not in :attr:`row_errors`."""
    row_errors: dict[int, ServiceError] | None = None
    """Refused rows with a refusal of their own (a step queued behind one that failed)."""

    def error_of(self, row: int) -> ServiceError:
        own = self.row_errors.get(row) if self.row_errors else None
        error = own or self.error
        assert error is not None
        return error

    def action(self, row: int) -> np.ndarray:
        """Row ``row``'s action, or its refusal raised."""
        if self.refused is not None and self.refused[row]:
            raise self.error_of(row)
        return self.actions[row]


class Batch:
    """Preallocated rows for up to ``max_batch`` steps; reused once its forward pass is done."""

    def __init__(self, rows: int, obs_dim: int, act_dim: int) -> None:
        self.slots = np.zeros(rows, np.int64)
        self.generation = np.zeros(rows, np.int64)
        self.steps = np.zeros(rows, np.int64)
        self.obs = np.zeros((rows, obs_dim), np.float32)
        self.reward = np.zeros(rows, np.float32)
        self.start = np.zeros(rows, bool)
        self.start_was_pending = np.zeros(rows, bool)
        self.clear = np.zeros(rows, bool)
        self.context = np.zeros(rows, np.int64)
        """The session's context count before the step (the session table's, for a roll-back)."""
        self.applied = np.zeros((rows, act_dim), np.float32)
        self.applied_mask = np.zeros(rows, bool)
        self.refused = np.zeros(rows, bool)
        """Rows the forward pass left out and the batcher rolls back: queued behind a step of their session
        that was not taken (marked before the pass), or without a block of a fixed key/value cache
        budget (marked by the pass)."""
        self.released = np.zeros(0, np.int64)
        """Slots of ended sessions whose trial cache the pass gives back first (taken at dispatch)."""
        self.id = -1
        self.size = 0
        self.opened_at = 0.0
        self.future: asyncio.Future[Computed] | None = None

    def put(
        self,
        at: int | slice,
        slots: int | np.ndarray,
        table: SessionTable,
        steps: int | np.ndarray,
        obs: np.ndarray,
        reward: float | np.ndarray,
        episode_start: bool | np.ndarray,
        applied: Sequence[float] | np.ndarray | None,
    ) -> int | np.ndarray:
        """Write steps of ``slots`` into rows ``at`` (one row or a run of them), beginning them in the
        session table: a pending episode start or window clear is consumed into the row. Returns the
        rows written."""
        rows = at if isinstance(at, int) else np.arange(at.start, at.stop)
        self.generation[at], self.start_was_pending[at], self.clear[at], self.context[at] = table.begin_step(
            slots, self.id, rows, episode_start
        )
        self.slots[at] = slots
        self.steps[at] = steps
        self.obs[at] = obs
        self.reward[at] = reward
        self.start[at] = episode_start
        # In place, from the row: a numpy bool or-ed with a Python bool costs a microsecond.
        self.start[at] |= self.start_was_pending[at]
        if applied is None:
            self.applied_mask[at] = False
        else:
            self.applied_mask[at] = True
            self.applied[at] = applied
        return rows
