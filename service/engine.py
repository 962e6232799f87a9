"""One loaded model: its slot pool on the device, its session table and the micro-batcher.

The hot path, for every waiting step of every session of this model at once:

1. ``submit`` (event loop, per request) or ``submit_rows`` (a columnar tick): validate at the edge,
   check the step number, write the step into the open batch's preallocated numpy rows and begin it
   in the session table. Nothing about the session changes unless all checks pass.
2. the batcher (one asyncio task): takes the oldest open batch and runs ``_compute`` on a dedicated
   worker thread -- one :func:`trmrl.policy.act` call, i.e. one forward pass, for the whole batch --
   while the event loop keeps parsing requests into the next batch.
3. ``_commit`` (event loop): counts the batch in the session table with array operations (or rolls
   it back if the forward pass failed) and resolves the batch's single future, which every request
   in it awaits.

A batch never holds two steps of one session: a session's second step goes to a later batch, so its
memory advances in order. Session state in and out of an engine (snapshots, exports, imports,
moves between versions) is :mod:`service.session_state`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from trmrl_client.codec import INPUT_LIMIT

from service import errors
from service.errors import ApiError
from service.fleet import AdaptationCurves
from service.recording import Recorder
from service.schemas import ModelInfo
from service.sessions import SessionTable
from trmrl.checkpoint import Checkpoint, CheckpointError
from trmrl.graphed import BucketedStep, Precision
from trmrl.model import TrMRL
from trmrl.networks import make_pool
from trmrl.policy import act, counter_normal
from trmrl.slot_pool import SlotPool
from trmrl.tasks.trials import EARLY_STEPS as ADAPTATION_STEPS

log = logging.getLogger("trmrl.service")


def all_in_range(values: Sequence[float]) -> bool:
    """Every value within ``INPUT_LIMIT`` (NaN fails every comparison, so it fails here too)."""
    return all(-INPUT_LIMIT <= v <= INPUT_LIMIT for v in values)


@dataclass(frozen=True)
class EngineLimits:
    """The knobs of one engine (from :class:`service.config.Settings`)."""

    max_sessions: int
    max_batch: int
    batch_wait_s: float
    session_ttl_s: float
    evict_idle_s: float
    max_queued_steps: int = 16_384
    precision: Precision = "fp32"
    """Forward-pass precision (``TRMRL_DTYPE``); the slot pool and the actions stay float32."""
    cuda_graphs: bool = True
    """On CUDA, replay captured graphs of the batched step (``TRMRL_CUDA_GRAPHS``)."""


class _Batch:
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
        self.applied = np.zeros((rows, act_dim), np.float32)
        self.applied_mask = np.zeros(rows, bool)
        self.id = -1
        self.size = 0
        self.opened_at = 0.0
        self.future: asyncio.Future[np.ndarray] | None = None

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
        self.generation[at], self.start_was_pending[at], self.clear[at] = table.begin_step(
            slots, self.id, rows
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


class _SharedFuture(asyncio.Future[np.ndarray]):
    """A batch's result, awaited by every request in the batch.

    It cannot be cancelled: a cancelled request (a client gone away) must not cancel its neighbours'
    result. Its task is cancelled when the batch completes instead, which costs less than an
    ``asyncio.shield`` per request.
    """

    def cancel(self, msg: object = None) -> bool:
        return False


class Ticket:
    """A step's place in the engine: await :meth:`action` for its (clipped) action."""

    __slots__ = ("_cached", "_future", "_row", "step")

    def __init__(
        self, step: int, future: asyncio.Future[np.ndarray] | None, row: int, cached: np.ndarray | None
    ) -> None:
        self.step = step
        self._future = future
        self._row = row
        self._cached = cached

    async def action(self) -> np.ndarray:
        if self._future is None:
            assert self._cached is not None
            return self._cached
        actions = await self._future
        return actions[self._row]


@dataclass
class RowTickets:
    """Where the rows of a columnar tick went (:meth:`Engine.submit_rows`); rows index the tick's
    accepted rows, in order."""

    steps: np.ndarray
    """``[n]`` the step number each row answers (the expected one for a conflicting row)."""
    conflict: np.ndarray
    """``[n]`` bool: the row's step is neither the next nor a retry of the newest (nothing queued)."""
    cached_rows: np.ndarray
    """Rows that retry a completed step: their action is in :attr:`cached`."""
    cached: np.ndarray
    parts: list[tuple[asyncio.Future[np.ndarray], np.ndarray, np.ndarray]]
    """``(future, rows, batch rows)``: the batches computing the other rows, and where in them."""


class Engine:
    """A model, its slot pool, its session table and the micro-batcher that steps them."""

    def __init__(self, name: str, checkpoint: Checkpoint, limits: EngineLimits, device: torch.device) -> None:
        self.name = name
        self.checkpoint = checkpoint
        self.limits = limits
        self.device = device
        # On a GPU (or in reduced precision) the step runs at fixed shapes through BucketedStep, whose
        # padded rows need a slot of their own: one past the sessions'. The CPU float32 path is the
        # trainer's own `act`, bit for bit, and needs none. An RL² policy (a GRU whose memory is its
        # hidden state) runs that eager path on every device, in float32.
        recurrent = not isinstance(checkpoint.model, TrMRL)
        if recurrent and limits.precision != "fp32":
            raise CheckpointError(
                f"{checkpoint.path}: an rl2 policy is served in fp32 only (TRMRL_DTYPE={limits.precision})"
            )
        cfg = checkpoint.model.config
        self.obs_dim = cfg.obs_dim
        self.act_dim = cfg.act_dim
        self.version = checkpoint.info.version
        self.model = checkpoint.model.to(device).eval()
        self.low = torch.tensor(checkpoint.info.action_low, dtype=torch.float32, device=device)
        self.high = torch.tensor(checkpoint.info.action_high, dtype=torch.float32, device=device)
        fixed_shapes = not recurrent and (device.type == "cuda" or limits.precision != "fp32")
        scratch = limits.max_sessions
        self.pool = make_pool(self.model, limits.max_sessions + (1 if fixed_shapes else 0), device)
        self._fixed: BucketedStep | None = None
        if fixed_shapes:
            assert isinstance(self.pool, SlotPool)
            self._fixed = BucketedStep(
                self.pool,
                self.low,
                self.high,
                limits.max_batch,
                scratch_slot=scratch,
                graphs=device.type == "cuda" and limits.cuda_graphs,
                precision=limits.precision,
            )
        self.table = SessionTable(
            limits.max_sessions,
            cfg.act_dim,
            default_ttl_s=limits.session_ttl_s,
            evict_idle_s=limits.evict_idle_s,
        )
        # One thread: forward passes of this model run one at a time and in order, and the pool is
        # only ever touched from it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{name}")
        self._open: deque[_Batch] = deque()
        self._spare: list[_Batch] = []
        self._inflight: dict[int, asyncio.Future[np.ndarray]] = {}
        """Futures of batches not yet completed (open or computing), by batch id."""
        self._next_batch_id = 0
        self._wake = asyncio.Event()
        self._filled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.step_lock = asyncio.Lock()
        """Held from a batch's forward pass to its commit: while another holder has it, the pool and
        the table's counters agree and no forward pass runs (``service.session_state`` takes it)."""
        self.queued_steps = 0
        self.ticks = 0
        self.stepped = 0
        self.reward_sums = np.zeros(2)
        """Rewards received for an episode's first ``ADAPTATION_STEPS`` actions, and for later ones."""
        self.reward_counts = np.zeros(2, np.int64)
        self.curves = AdaptationCurves()
        """Mean reward by step in episode, first episode and later ones, and each session's returns."""
        self.recorder: Recorder | None = None
        """Where the steps of recorded sessions go (``TRMRL_RECORD_DIR``); ``None``: nowhere."""
        self.on_batch: Callable[[int, float], None] | None = None
        """Called after each forward pass with its batch size and the oldest step's queue wait (s)."""

    # -- facts ---------------------------------------------------------------------------------------
    def info(self, *, default: bool) -> ModelInfo:
        """What ``GET /v1/models`` says of this model (``default``: it is the service's default)."""
        cfg, info = self.model.config, self.checkpoint.info
        return ModelInfo(
            name=self.name,
            version=self.version,
            task_family=info.task_family,
            obs_dim=cfg.obs_dim,
            act_dim=cfg.act_dim,
            action_low=list(info.action_low),
            action_high=list(info.action_high),
            window=cfg.window,
            memory_scope=cfg.memory_scope,
            policy=cfg.policy,
            task_params_in_obs=info.task_params_in_obs,
            metrics=info.metrics,
            default=default,
        )

    @property
    def bytes_per_session(self) -> int:
        """Device memory one resident session occupies."""
        return self.pool.bytes_per_slot

    def stats(self) -> dict[str, Any]:
        """Counters for logs now and metrics later."""
        return {
            "sessions": len(self.table),
            "ticks": self.ticks,
            "steps": self.stepped,
            "evictions": self.table.evictions,
            "expirations": self.table.expirations,
            "queued_steps": self.queued_steps,
            "device_bytes": self.device_bytes,
        }

    @property
    def device_bytes(self) -> int:
        """Device memory held by the weights and the slot pool."""
        weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        return weights + self.pool.capacity * self.pool.bytes_per_slot

    # -- lifecycle -------------------------------------------------------------------------------------
    def warmup(self, sizes: tuple[int, ...] = (1, 8, 64)) -> None:
        """Capture the CUDA graphs (if any), then run the batched step at a few batch sizes on free
        slots and clear them (blocking)."""
        if self._fixed is not None and self._fixed.graphs:
            began = time.perf_counter()
            try:
                self._fixed.capture()
            except Exception:
                # A driver or library that cannot capture must not keep the model from serving.
                log.exception("model %s: CUDA graph capture failed; serving without graphs", self.name)
                self._fixed.graphs = False
            else:
                log.info(
                    "model %s: captured CUDA graphs for batch sizes %s in %.1f s",
                    self.name,
                    ",".join(map(str, self._fixed.captured)),
                    time.perf_counter() - began,
                )
        for size in sizes:
            n = min(size, self.limits.max_batch, self.limits.max_sessions)
            batch = _Batch(n, self.obs_dim, self.act_dim)
            batch.size = n
            batch.slots[:] = np.arange(n)
            batch.start[:] = True
            batch.clear[:] = True
            deterministic = np.arange(n) % 2 == 0
            self._compute(batch, n, deterministic, np.arange(n, dtype=np.int64))
        with torch.inference_mode():
            self.pool.clear(torch.arange(min(max(sizes), self.limits.max_sessions), device=self.device))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Finish every queued step (waiting at most ``timeout_s``), then stop the batcher and its thread."""
        deadline = time.monotonic() + timeout_s
        while (
            self._inflight
            and self._task is not None
            and not self._task.done()
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.001)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until no step of this model is queued or computing (new steps must be held back)."""
        deadline = time.monotonic() + timeout_s
        while self.queued_steps or self._inflight:
            if time.monotonic() > deadline:
                raise ApiError(503, "busy", "The model's queued steps did not finish in time; nothing moved.")
            await asyncio.sleep(0.0005)

    # -- the edge ----------------------------------------------------------------------------------------
    def validate(
        self, observation: list[float], reward: float, applied_action: list[float] | None
    ) -> np.ndarray:
        """Check a step's numbers against this model; returns the observation as float32."""
        if len(observation) != self.obs_dim:
            raise errors.wrong_length("observation", self.obs_dim, len(observation))
        if not all_in_range(observation):
            raise errors.out_of_range("observation", observation, INPUT_LIMIT)
        if not -INPUT_LIMIT <= reward <= INPUT_LIMIT:
            raise errors.out_of_range("reward", [reward], INPUT_LIMIT)
        if applied_action is not None:
            if len(applied_action) != self.act_dim:
                raise errors.wrong_length("applied_action", self.act_dim, len(applied_action))
            if not all_in_range(applied_action):
                raise errors.out_of_range("applied_action", applied_action, INPUT_LIMIT)
        return np.asarray(observation, np.float32)

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
        return), without touching the memory.
        """
        table = self.table
        retry = table.check_step(slot, step)
        if not retry and self.queued_steps >= self.limits.max_queued_steps:
            raise errors.overloaded(self.limits.max_queued_steps)
        table.touch(slot)
        if retry:
            assert step is not None
            if table.queued[slot]:
                return Ticket(
                    step, self._inflight_future(int(table.last_batch[slot])), int(table.last_row[slot]), None
                )
            return Ticket(step, None, 0, table.last_action[slot].copy())
        batch = self._batch_for(slot)
        row = batch.size
        batch.size = row + 1
        number = table.expected_step(slot)
        batch.put(row, slot, table, number, obs, reward, episode_start, applied_action)
        self.queued_steps += 1
        if batch.size == self.limits.max_batch:
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
        is answered from that step. Raises 503 ``overloaded`` for the whole tick, before any change,
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
        fresh = np.flatnonzero(new)
        if len(fresh) and self.queued_steps + len(fresh) > self.limits.max_queued_steps:
            raise errors.overloaded(self.limits.max_queued_steps)
        table.touch(slots[~conflict])
        parts: list[tuple[asyncio.Future[np.ndarray], np.ndarray, np.ndarray]] = []
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
                room = self.limits.max_batch - newest.size
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
                take = fresh[placed : placed + self.limits.max_batch]
                parts.append(
                    self._fill(self._new_batch(), take, slots, expected, obs, reward, episode_start, applied)
                )
                placed += len(take)
            self._wake.set()
        return RowTickets(
            steps=expected if steps is None else np.where(retry, steps, expected),
            conflict=conflict,
            cached_rows=cached_rows,
            cached=cached,
            parts=parts,
        )

    def _fill(
        self,
        batch: _Batch,
        rows: np.ndarray,
        slots: np.ndarray,
        expected: np.ndarray,
        obs: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        applied: np.ndarray | None,
    ) -> tuple[asyncio.Future[np.ndarray], np.ndarray, np.ndarray]:
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
        if stop == self.limits.max_batch:
            self._filled.set()
        assert batch.future is not None
        assert isinstance(batch_rows, np.ndarray)
        return batch.future, rows, batch_rows

    def _inflight_future(self, batch_id: int) -> asyncio.Future[np.ndarray]:
        future = self._inflight.get(batch_id)
        if future is None:
            raise ApiError(500, "internal_error", "A queued step lost its batch.")
        return future

    def _batch_for(self, slot: int) -> _Batch:
        """The open batch a new step of ``slot`` goes to: the newest, unless full or already holding it."""
        if self._open:
            newest = self._open[-1]
            holds_slot = self.table.queued[slot] and self.table.last_batch[slot] == newest.id
            if newest.size < self.limits.max_batch and not holds_slot:
                return newest
        return self._new_batch()

    def _new_batch(self) -> _Batch:
        """Open an empty batch (a spare one when there is one) behind the open ones."""
        batch = (
            self._spare.pop() if self._spare else _Batch(self.limits.max_batch, self.obs_dim, self.act_dim)
        )
        batch.id = self._next_batch_id
        self._next_batch_id += 1
        batch.size = 0
        batch.opened_at = time.perf_counter()
        batch.future = _SharedFuture(loop=asyncio.get_running_loop())
        self._inflight[batch.id] = batch.future
        self._open.append(batch)
        return batch

    # -- the batcher ---------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._open:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.limits.batch_wait_s > 0 and self._open[0].size < self.limits.max_batch:
                self._filled.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._filled.wait(), self.limits.batch_wait_s)
            await self._dispatch(loop, self._open.popleft())

    async def _dispatch(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> None:
        n = batch.size
        future = batch.future
        assert future is not None
        slots = batch.slots[:n]
        deterministic = self.table.deterministic[slots]
        seeds = self.table.seed[slots]
        waited = time.perf_counter() - batch.opened_at
        await self.step_lock.acquire()
        try:
            actions = await loop.run_in_executor(
                self._executor, self._compute, batch, n, deterministic, seeds
            )
        except Exception:
            log.exception("forward pass of model %s failed for %d steps", self.name, n)
            # Undo what ``submit`` consumed, so a retry behaves like the first try.
            self.table.roll_back(slots, batch.generation[:n], batch.start_was_pending[:n], batch.clear[:n])
            if not future.done():
                future.set_exception(
                    ApiError(
                        500,
                        "internal_error",
                        "The model failed to compute this step; the session is unchanged.",
                    )
                )
                future.exception()  # retrieved here: requests that went away must not log it again
        else:
            self._commit(batch, n, actions)
            if not future.done():
                future.set_result(actions)
            if self.on_batch is not None:
                self.on_batch(n, waited)
        finally:
            self.step_lock.release()
            self.queued_steps -= n
            del self._inflight[batch.id]
            batch.future = None
            self._spare.append(batch)

    def _compute(self, batch: _Batch, n: int, deterministic: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """One forward pass for the batch's ``n`` steps (worker thread); returns clipped actions."""
        if self._fixed is not None:
            return self._compute_fixed(batch, n, deterministic, seeds)
        device = self.device
        with torch.inference_mode():
            slots = torch.from_numpy(batch.slots[:n]).to(device)
            clear = batch.clear[:n]
            if clear.any():
                # New sessions and trial resets start from an empty window. This is the one write
                # before the forward pass; if the pass then fails, the session has lost only what
                # its reset asked to forget, and the rollback re-arms the clear for the retry.
                self.pool.clear(slots[torch.from_numpy(clear).to(device)])
            applied: torch.Tensor | None = None
            applied_mask: torch.Tensor | None = None
            if batch.applied_mask[:n].any():
                applied = torch.from_numpy(batch.applied[:n]).to(device)
                applied_mask = torch.from_numpy(batch.applied_mask[:n]).to(device)
            noise: torch.Tensor | None = None
            sample: torch.Tensor | bool = True
            if not deterministic.all():
                steps = torch.from_numpy(batch.steps[:n])
                noise = counter_normal(torch.from_numpy(seeds), steps, self.act_dim).to(device)
                sample = torch.from_numpy(deterministic).to(device)
            result = act(
                self.pool,
                slots,
                torch.from_numpy(batch.obs[:n]).to(device),
                torch.from_numpy(batch.reward[:n]).to(device),
                torch.from_numpy(batch.start[:n]).to(device),
                low=self.low,
                high=self.high,
                deterministic=sample,
                noise=noise,
                applied_action=applied,
                applied_mask=applied_mask,
            )
            return result.actions.cpu().numpy()

    def _compute_fixed(
        self, batch: _Batch, n: int, deterministic: np.ndarray, seeds: np.ndarray
    ) -> np.ndarray:
        """:meth:`_compute` at fixed shapes (GPU, reduced precision): the same step, with resets as a
        mask and the noise drawn on the host exactly as there."""
        assert self._fixed is not None
        noise = None
        if not deterministic.all():
            steps = torch.from_numpy(batch.steps[:n])
            noise = counter_normal(torch.from_numpy(seeds), steps, self.act_dim).numpy()
        applied_mask = batch.applied_mask[:n]
        return self._fixed.run(
            batch.slots[:n],
            batch.obs[:n],
            batch.reward[:n],
            batch.start[:n],
            batch.clear[:n],
            deterministic,
            noise,
            batch.applied[:n] if applied_mask.any() else None,
            applied_mask,
        )

    def _commit(self, batch: _Batch, n: int, actions: np.ndarray) -> None:
        """Count a computed batch (event loop): the adaptation signal, the recording, the table."""
        table = self.table
        slots = batch.slots[:n]
        live = table.alive(slots, batch.generation[:n])
        start = batch.start[:n]
        self._count_rewards(slots, start, live, batch.reward[:n])
        self.curves.count(table, slots, start, live, batch.reward[:n])
        if self.recorder is not None:
            recorded = table.record[slots] & live
            if recorded.any():
                before = np.where(start, 0, table.episode_step[slots])
                self.recorder.submit(self._recorded(batch, n, actions, recorded, before))
        table.commit(slots, live, start, actions)
        self.ticks += 1
        self.stepped += n

    def _count_rewards(
        self, slots: np.ndarray, start: np.ndarray, live: np.ndarray, rewards: np.ndarray
    ) -> None:
        """Add a batch's rewards to the adaptation signal: those for an episode's first
        ``ADAPTATION_STEPS`` actions, and those for later ones (a row's reward is for the action
        before it; an episode's first row has none)."""
        steps = self.table.episode_step
        if len(slots) < 32:
            # A few rows (one robot's step): plain Python costs a fraction of the array operations.
            sums, counts = self.reward_sums, self.reward_counts
            rows = zip(start.tolist(), live.tolist(), slots.tolist(), rewards.tolist(), strict=True)
            for first, alive, slot, reward in rows:
                if alive and not first:
                    k = 0 if steps[slot] <= ADAPTATION_STEPS else 1
                    sums[k] += reward
                    counts[k] += 1
            return
        rewarded = ~start & live
        early = rewarded & (steps[slots] <= ADAPTATION_STEPS)
        later = rewarded & ~early
        self.reward_sums[0] += float(rewards[early].sum())
        self.reward_sums[1] += float(rewards[later].sum())
        self.reward_counts[0] += int(early.sum())
        self.reward_counts[1] += int(later.sum())

    def _recorded(
        self, batch: _Batch, n: int, actions: np.ndarray, rows: np.ndarray, before: np.ndarray
    ) -> dict[str, Any]:
        """The recorded rows of a committed batch, as the block :class:`Recorder` writes."""
        table = self.table
        slots = batch.slots[:n][rows]
        now = time.perf_counter()
        applied = batch.applied[:n][rows].copy()
        applied[~batch.applied_mask[:n][rows]] = np.nan
        received = time.time() - (now - batch.opened_at)
        return {
            "session_id": [table.slot_ids[slot] for slot in slots.tolist()],
            "model": self.name,
            "version": self.version,
            # Counted before this batch's starts are: a start row opens episode ``episodes``.
            "episode": table.episodes[slots] - 1 + batch.start[:n][rows],
            "step_in_episode": before[rows],
            "step": batch.steps[:n][rows].copy(),
            "observation": batch.obs[:n][rows].copy(),
            "reward": np.where(batch.start[:n][rows], 0.0, batch.reward[:n][rows]).astype(np.float32),
            "action": actions[rows].copy(),
            "applied_action": applied,
            "episode_start": batch.start[:n][rows].copy(),
            "received_at": np.full(len(slots), received),
            "server_timing_us": np.full(len(slots), int((now - batch.opened_at) * 1e6), np.int64),
        }
