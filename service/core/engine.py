"""One loaded model: its forward pass and slot pool, its session table and its batcher.

A step's way through an engine: :meth:`Engine.validate` checks its numbers against the model, the
:class:`~service.core.batcher.Batcher` queues it into a batch, :class:`~service.core.forward.Forward`
computes the batch in one forward pass, and :meth:`Engine._commit` counts it (the adaptation signal,
the recording, the session table). Session state in and out of an engine (snapshots, exports,
imports, moves between versions) is :mod:`service.core.snapshots`' and :mod:`service.core.migration`'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from trmrl_client.codec import INPUT_LIMIT

from service.core import errors
from service.core.adaptation import AdaptationCurves
from service.core.background import cancel
from service.core.batch import Batch
from service.core.batcher import Batcher
from service.core.errors import ServiceError
from service.core.forward import Forward
from service.core.recording import Recorder
from service.core.records import EngineLimits, ModelInfo
from service.core.session_table import SessionTable
from trmrl.checkpoint import Checkpoint
from trmrl.tasks.trials import EARLY_STEPS as ADAPTATION_STEPS
from trmrl.trial_pool import TrialPool

log = logging.getLogger("trmrl.service")


def all_in_range(values: Sequence[float]) -> bool:
    """Every value within ``INPUT_LIMIT``; NaN fails.

    In three C loops rather than a comparison per value in Python: the extremes bound every value
    that is a number, and a NaN (which ``min``/``max`` may pass over) makes the sum NaN, never equal
    to itself (the sum of values within the limit is finite).
    """
    if len(values) == 0:
        return True
    total = sum(values)
    return min(values) >= -INPUT_LIMIT and max(values) <= INPUT_LIMIT and total == total


class Engine:
    """A model, its slot pool, its session table and the batcher that steps them."""

    def __init__(self, name: str, checkpoint: Checkpoint, limits: EngineLimits, device: torch.device) -> None:
        self.name = name
        self.checkpoint = checkpoint
        self.limits = limits
        self.device = device
        cfg = checkpoint.model.config
        self.obs_dim = cfg.obs_dim
        self.act_dim = cfg.act_dim
        self.version = checkpoint.info.version
        self.forward = Forward(checkpoint, device, limits)
        self.model = self.forward.model
        self.pool = self.forward.pool
        self.low, self.high = self.forward.low, self.forward.high
        self.table = SessionTable(
            limits.max_sessions,
            cfg.act_dim,
            default_ttl_s=limits.session_ttl_s,
            evict_idle_s=limits.evict_idle_s,
        )
        if self.trial_context:  # a trial context does not slide: count it
            self.table.max_context = cfg.max_context
            self.table.episode_scope = cfg.memory_scope == "episode"
        self.batcher = Batcher(
            name,
            self.table,
            self.obs_dim,
            limits,
            compute=self.forward.run,
            commit=self._commit,
            refusal=self._cache_refusal,
        )
        self.submit = self.batcher.submit
        self.submit_rows = self.batcher.submit_rows
        self.step_lock = self.batcher.step_lock
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0
        self.cache_refused_steps = 0
        """Steps refused for want of a key/value cache block (a fixed ``TRMRL_CACHE_MIB`` budget)."""
        self.stepped = 0
        self.reward_sums = np.zeros(2)
        """Rewards received for an episode's first ``ADAPTATION_STEPS`` actions, and for later ones."""
        self.reward_counts = np.zeros(2, np.int64)
        self.curves = AdaptationCurves()
        """Mean reward by step in episode, first episode and later ones, and each session's returns."""
        self.recorder: Recorder | None = None
        """Where the steps of recorded sessions go (``TRMRL_RECORD_DIR``); ``None``: nowhere."""

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
            context="trial" if self.trial_context else "window",
            max_context=cfg.max_context if self.trial_context else None,
        )

    @property
    def queued_steps(self) -> int:
        """Steps accepted and not yet computed."""
        return self.batcher.queued_steps

    @queued_steps.setter
    def queued_steps(self, count: int) -> None:
        self.batcher.queued_steps = count

    @property
    def on_batch(self) -> Callable[[int, float], None] | None:
        """Called after each forward pass with its batch size and the oldest step's queue wait (s)."""
        return self.batcher.on_batch

    @on_batch.setter
    def on_batch(self, hook: Callable[[int, float], None] | None) -> None:
        self.batcher.on_batch = hook

    @property
    def bytes_per_session(self) -> int:
        """Device memory one resident session occupies."""
        return self.pool.bytes_per_slot

    @property
    def trial_context(self) -> bool:
        """The model attends over the whole trial, through a key/value cache that grows block by block
        (:class:`~trmrl.trial_pool.TrialPool`); otherwise its slot pool is allocated once."""
        return isinstance(self.pool, TrialPool)

    def stats(self) -> dict[str, Any]:
        """Counters for logs now and metrics later."""
        stats: dict[str, Any] = {
            "sessions": len(self.table),
            "ticks": self.ticks,
            "steps": self.stepped,
            "evictions": self.table.evictions,
            "expirations": self.table.expirations,
            "queued_steps": self.queued_steps,
            "device_bytes": self.device_bytes,
        }
        cache = self.cache_stats()
        if cache is not None:
            stats["cache_blocks_free"] = cache["blocks_free"]
            stats["cache_blocks_held"] = cache["blocks_held"]
            stats["cache_refused_steps"] = cache["refused_steps"]
        return stats

    def cache_stats(self) -> dict[str, Any] | None:
        """A trial-context model's key/value cache: blocks held and free, its fixed budget (``None``: it
        grows), steps refused for want of a block. ``None`` for other models."""
        if not isinstance(self.pool, TrialPool):
            return None
        free = self.pool.free_blocks
        return {
            "blocks_held": self.pool.blocks - 1 - free,
            "blocks_free": free,
            "budget_blocks": self.forward.cache_blocks,
            "refused_steps": self.cache_refused_steps,
        }

    def cache_room(self) -> int | None:
        """Free key/value cache blocks under a fixed budget (``TRMRL_CACHE_MIB``) once ended sessions'
        blocks are back (else they go back at the next forward pass); ``None``: no budget, the cache
        grows. Hold the step lock."""
        if self.forward.cache_blocks is None:
            return None
        assert isinstance(self.pool, TrialPool)
        released = self.table.take_released()
        if len(released):
            with torch.inference_mode():
                self.pool.clear(torch.from_numpy(released).to(self.device))
        return self.pool.free_blocks

    def cache_blocks_for(self, lengths: np.ndarray) -> int:
        """Key/value cache blocks contexts of ``lengths`` working memories hold in this model's pool."""
        assert isinstance(self.pool, TrialPool)
        size = self.pool.block_size
        return int(((np.asarray(lengths, np.int64) + size - 1) // size).sum())

    @property
    def device_bytes(self) -> int:
        """Device memory held by the weights and the slot pool (a trial cache: what its block store has
        allocated now)."""
        weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        if isinstance(self.pool, TrialPool):
            return weights + self.pool.device_bytes
        return weights + self.pool.capacity * self.pool.bytes_per_slot

    # -- lifecycle -------------------------------------------------------------------------------------
    def warmup(self, sizes: tuple[int, ...] = (1, 8, 64)) -> None:
        """Capture the CUDA graphs (if any), then run the batched step at a few batch sizes on free
        slots and clear them (blocking)."""
        self.forward.capture(self.name)
        for size in sizes:
            n = min(size, self.limits.max_batch, self.limits.max_sessions)
            batch = Batch(n, self.obs_dim, self.act_dim)
            batch.size = n
            batch.slots[:] = np.arange(n)
            batch.start[:] = True
            batch.clear[:] = True
            deterministic = np.arange(n) % 2 == 0
            self.forward.run(batch, n, deterministic, np.arange(n, dtype=np.int64))
        self.forward.clear(min(max(sizes), self.limits.max_sessions))

    async def start(self) -> None:
        self._task = asyncio.create_task(self.batcher.run(), name=f"batcher-{self.name}")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Finish every queued step (waiting at most ``timeout_s``), then stop the batcher and its thread."""
        deadline = time.monotonic() + timeout_s
        while (
            self.batcher.inflight
            and self._task is not None
            and not self._task.done()
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.001)
        await cancel(self._task)
        self.batcher.executor.shutdown(wait=True)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until no step of this model is queued or computing (new steps must be held back)."""
        deadline = time.monotonic() + timeout_s
        while self.queued_steps or self.batcher.inflight:
            if time.monotonic() > deadline:
                raise ServiceError("busy", "The model's queued steps did not finish in time; nothing moved.")
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

    # -- counting a computed batch ---------------------------------------------------------------------
    def _cache_refusal(self, count: int) -> ServiceError:
        self.cache_refused_steps += count
        return errors.cache_exhausted(self.forward.cache_blocks or 0)

    def _commit(self, batch: Batch, n: int, actions: np.ndarray) -> None:
        """Count a computed batch (event loop): the adaptation signal, the recording, the table. Rows
        the pass refused (``batch.refused``) were rolled back and are not counted."""
        table = self.table
        slots, start, rewards = batch.slots[:n], batch.start[:n], batch.reward[:n]
        live = table.alive(slots, batch.generation[:n])
        refused = batch.refused[:n]
        served = ~refused if refused.any() else None
        if served is not None:
            live = live & served  # for the recording, which reads the batch's rows itself
        if self.recorder is not None:
            recorded = table.record[slots] & live
            if recorded.any():
                before = np.where(start, 0, table.episode_step[slots])
                self.recorder.submit(self._recorded(batch, n, actions, recorded, before))
        if served is not None:
            slots, start, live = slots[served], start[served], live[served]
            rewards, actions = rewards[served], actions[served]
        self._count_rewards(slots, start, live, rewards)
        self.curves.count(table, slots, start, live, rewards)
        table.commit(slots, live, start, actions)
        self.ticks += 1
        self.stepped += len(slots)

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
        self, batch: Batch, n: int, actions: np.ndarray, rows: np.ndarray, before: np.ndarray
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
