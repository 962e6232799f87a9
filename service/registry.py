"""The loaded models by name, and the session operations that span them.

A model name is only ever a key of :attr:`ModelRegistry.engines`; it never reaches the file system.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from trmrl_client.codec import finite_float32

from service import errors
from service.api.columnar import ColumnarResult, ColumnarTick
from service.config import Settings
from service.engine import Engine, EngineLimits, RowTickets, Ticket
from service.errors import ApiError
from service.schemas import (
    SEED_LIMIT,
    ActRequest,
    ActResponse,
    CreateSessionRequest,
    ModelInfo,
    SessionInfo,
    SessionState,
)
from trmrl.checkpoint import load_checkpoint

log = logging.getLogger("trmrl.service")

#: How often idle sessions past their TTL are swept (lookups also expire them lazily).
SWEEP_INTERVAL_S = 1.0


def pick_device(choice: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; asking for CUDA without one is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TRMRL_DEVICE=cuda but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def model_name(path: Path) -> str:
    """A checkpoint's model name: its directory's (or archive's) name."""
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(suffix)
    return name


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


class ModelRegistry:
    """Every engine of the service; the first one loaded is the default model."""

    def __init__(self, engines: Iterable[Engine]) -> None:
        self.engines: dict[str, Engine] = {}
        for engine in engines:
            if engine.name in self.engines:
                raise ValueError(f"two checkpoints are both named {engine.name!r}")
            self.engines[engine.name] = engine
        if not self.engines:
            raise ValueError("no models to serve")
        self.default = next(iter(self.engines))
        self._sweeper: asyncio.Task[None] | None = None
        self.draining = False
        """Set on shutdown: no new sessions; steps of existing ones are still answered."""

    @classmethod
    def load(cls, settings: Settings) -> ModelRegistry:
        """Load, place and warm up every checkpoint the settings name (blocking)."""
        paths = settings.checkpoint_paths()
        if not paths:
            raise RuntimeError(
                f"no checkpoints to serve: none given (--checkpoint or TRMRL_MODELS) and none bundled "
                f"under {settings.checkpoints_dir}"
            )
        device = pick_device(settings.device)
        limits = EngineLimits(
            max_sessions=settings.max_sessions,
            max_batch=settings.max_batch,
            batch_wait_s=settings.batch_wait_ms / 1000.0,
            session_ttl_s=settings.session_ttl_s,
            evict_idle_s=settings.evict_idle_s,
            max_queued_steps=settings.max_queued_steps,
            precision=settings.dtype,
            cuda_graphs=settings.cuda_graphs,
        )
        engines = []
        for path in paths:
            checkpoint = load_checkpoint(path, device)
            engine = Engine(model_name(path), checkpoint, limits, device)
            engine.warmup()
            log.info(
                "model %s (version %s, %s) on %s: %d session slots, %d bytes each",
                engine.name,
                engine.version,
                checkpoint.info.task_family,
                device,
                settings.max_sessions,
                engine.bytes_per_session,
            )
            engines.append(engine)
        return cls(engines)

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        for engine in self.engines.values():
            await engine.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="session-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for engine in self.engines.values():
            await engine.stop()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            for engine in self.engines.values():
                engine.table.expire()

    # -- models ----------------------------------------------------------------------------------------
    def engine(self, name: str | None) -> Engine:
        """The named model, or the default one (404 ``unknown_model`` for a name not loaded)."""
        if name is None:
            return self.engines[self.default]
        engine = self.engines.get(name)
        if engine is None:
            raise errors.unknown_model(name, list(self.engines))
        return engine

    def models(self) -> list[ModelInfo]:
        return [e.info(default=name == self.default) for name, e in self.engines.items()]

    # -- sessions --------------------------------------------------------------------------------------
    def find(self, session_id: str, owner: str | None = None) -> tuple[Engine, int]:
        """The engine and slot of a live session the caller may see (404 ``unknown_session`` otherwise).

        With API keys on, a session belongs to the key that created it: to any other key it does not
        exist, so its id cannot even be confirmed.
        """
        for engine in self.engines.values():
            slot = engine.table.find(session_id)
            if slot is not None:
                if engine.table.owners[slot] != owner:
                    break
                return engine, slot
        raise errors.unknown_session(session_id)

    def _locate(self, session_id: str) -> tuple[Engine, int] | None:
        """The session with this id whoever owns it (for ids a caller asks to create)."""
        for engine in self.engines.values():
            slot = engine.table.find(session_id)
            if slot is not None:
                return engine, slot
        return None

    def create_session(self, request: CreateSessionRequest, owner: str | None = None) -> tuple[Engine, str]:
        if self.draining:
            raise errors.draining()
        engine = self.engine(request.model)
        session_id, _ = engine.table.create(
            deterministic=request.deterministic, seed=request.seed, ttl_s=request.ttl_s, owner=owner
        )
        log.info("session created", extra={"session_id": session_id, "model": engine.name})
        return engine, session_id

    def create_sessions(
        self, request: CreateSessionRequest, count: int, owner: str | None = None
    ) -> tuple[Engine, list[str]]:
        """``count`` sessions of one model in one call: all of them, or none (429 if they do not fit).

        With a ``seed``, session ``i`` gets ``seed + i``: distinct noise streams, reproducible.
        """
        if self.draining:
            raise errors.draining()
        engine = self.engine(request.model)
        table = engine.table
        created: list[str] = []
        try:
            for i in range(count):
                seed = None if request.seed is None else (request.seed + i) % SEED_LIMIT
                session_id, _ = table.create(
                    deterministic=request.deterministic, seed=seed, ttl_s=request.ttl_s, owner=owner
                )
                created.append(session_id)
        except ApiError:
            for session_id in created:
                table.delete(session_id)
            raise
        log.info("sessions created", extra={"sessions": count, "model": engine.name})
        return engine, created

    def session_info(self, session_id: str, owner: str | None = None) -> SessionInfo:
        engine, slot = self.find(session_id, owner)
        table = engine.table
        wall_offset = time.time() - time.monotonic()
        return SessionInfo(
            session_id=session_id,
            model=engine.name,
            model_version=engine.version,
            steps=table.expected_step(slot),
            episodes=int(table.episodes[slot]),
            deterministic=bool(table.deterministic[slot]),
            seed=int(table.seed[slot]),
            ttl_s=float(table.ttl_s[slot]),
            created_at=_iso(float(table.created_at[slot])),
            last_active_at=_iso(float(table.last_active[slot]) + wall_offset),
        )

    def delete_session(self, session_id: str, owner: str | None = None) -> None:
        engine, _ = self.find(session_id, owner)
        engine.table.delete(session_id)
        log.info("session deleted", extra={"session_id": session_id, "model": engine.name})

    def reset_session(self, session_id: str, scope: str, owner: str | None = None) -> SessionInfo:
        engine, slot = self.find(session_id, owner)
        engine.table.reset(slot, scope)
        return self.session_info(session_id, owner)

    # -- snapshots ---------------------------------------------------------------------------------------
    async def get_state(self, session_id: str, owner: str | None = None) -> SessionState:
        engine, slot = self.find(session_id, owner)
        return await engine.snapshot(slot)

    async def put_state(self, session_id: str, state: SessionState, owner: str | None = None) -> bool:
        """Restore ``state`` under ``session_id``; returns ``True`` if the session was created.

        An existing session (of the caller) is overwritten; a missing one is created under that id,
        which is how a client moves a session to another replica or recovers one the service lost.
        Every check runs before anything changes.
        """
        if state.session_id != session_id:
            raise errors.invalid_snapshot(
                "its 'session_id' differs from the one in the path",
                {"field": "session_id", "expected": session_id, "got": state.session_id},
            )
        engine = self.engine(state.model)
        engine.check_state(state)
        existing = self._locate(session_id)
        if existing is not None and existing[0].table.owners[existing[1]] != owner:
            # Taken by another key: to this caller the id does not exist, nor can it be claimed.
            raise errors.unknown_session(session_id)
        if existing is not None and existing[0] is engine:
            await engine.restore(existing[1], state)
            log.info("session restored", extra={"session_id": session_id, "model": engine.name})
            return False
        if self.draining:
            raise errors.draining()
        if existing is not None and existing[0].table.queued[existing[1]]:
            raise errors.session_busy(session_id)
        _, slot = engine.table.create(
            deterministic=state.deterministic,
            seed=state.seed,
            ttl_s=state.ttl_s,
            owner=owner,
            session_id=session_id,
        )
        try:
            await engine.restore(slot, state)
        except Exception:
            engine.table.delete(session_id)
            raise
        if existing is not None:
            existing[0].table.delete(session_id)
        log.info("session restored", extra={"session_id": session_id, "model": engine.name})
        return True

    async def export_all(self) -> list[dict[str, Any]]:
        """Every live session, one block of columns per model (committed steps)."""
        return [await engine.export_sessions() for engine in self.engines.values()]

    async def import_all(self, blocks: Iterable[dict[str, Any]]) -> int:
        """Restore saved blocks of sessions; a block that no longer fits is skipped with a warning."""
        restored = 0
        for block in blocks:
            name = block.get("model")
            engine = self.engines.get(name) if isinstance(name, str) else None
            if engine is None:
                log.warning("saved sessions of model %r not restored: it is not loaded", name)
                continue
            try:
                restored += await engine.import_sessions(block)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("saved sessions of model %s not restored: %s", name, exc)
        return restored

    # -- acting ------------------------------------------------------------------------------------------
    def submit(self, request: ActRequest, owner: str | None = None) -> tuple[Engine, str, Ticket]:
        """Validate and queue one act request, creating its session when it names none.

        Every check runs before anything changes: a refused request leaves its session (or the
        session table, for a would-be new session) exactly as it was.
        """
        if request.session_id is not None:
            engine, slot = self.find(request.session_id, owner)
            session_id = request.session_id
        else:
            if self.draining:
                raise errors.draining()
            engine = self.engine(request.model)
            slot = -1
            session_id = ""
        obs = engine.validate(request.observation, request.reward, request.applied_action)
        if slot < 0:
            if request.step not in (None, 0):
                raise errors.step_conflict(0, request.step)
            if engine.queued_steps >= engine.limits.max_queued_steps:
                raise errors.overloaded(engine.limits.max_queued_steps)
            session_id, slot = engine.table.create(deterministic=True, seed=None, ttl_s=None, owner=owner)
        ticket = engine.submit(
            slot, obs, request.reward, request.episode_start, request.step, request.applied_action
        )
        return engine, session_id, ticket

    async def act(self, request: ActRequest, started_ns: int, owner: str | None = None) -> ActResponse:
        """One act request, start to finish."""
        engine, session_id, ticket = self.submit(request, owner)
        action = await ticket.action()
        return reply(engine, session_id, ticket.step, action.tolist(), started_ns)

    async def act_batch(
        self, requests: list[ActRequest], started_ns: int, owner: str | None = None
    ) -> list[ActResponse | ApiError]:
        """Many act requests: all queued first (so they share a forward pass), then awaited in order."""
        queued: list[tuple[Engine, str, Ticket] | ApiError] = []
        for request in requests:
            try:
                queued.append(self.submit(request, owner))
            except ApiError as exc:
                queued.append(exc)
        results: list[ActResponse | ApiError] = []
        for item in queued:
            if isinstance(item, ApiError):
                results.append(item)
                continue
            engine, session_id, ticket = item
            try:
                action = await ticket.action()
            except ApiError as exc:
                results.append(exc)
                continue
            results.append(reply(engine, session_id, ticket.step, action.tolist(), started_ns))
        return results

    def _tick_engine(self, tick: ColumnarTick, model: str | None) -> Engine:
        """The model a tick steps: the one it (or its stream) names, else the first named session's."""
        name = tick.model if tick.model is not None else model
        if name is not None or len(self.engines) == 1:
            return self.engine(name)
        for session_id in tick.session_ids:
            for engine in self.engines.values():
                if session_id in engine.table.ids:
                    return engine
        return self.engine(None)

    async def act_columnar(
        self, tick: ColumnarTick, started_ns: int, owner: str | None = None, model: str | None = None
    ) -> ColumnarResult:
        """One step of each session of a columnar tick; every row gets its action or its own error.

        The tick steps one model (``model``: the stream's, when the tick names none). A row that
        fails -- a number out of float32's range, an unknown session or one of another model, a step
        conflict -- gets NaN actions and an error, and its session is untouched; the other rows are
        served. A tick whose shapes do not fit the model is refused as a whole (422).
        """
        engine = self._tick_engine(tick, model)
        rows = tick.size
        obs = tick.observations
        if obs.shape[1] != engine.obs_dim:
            raise errors.wrong_length("observation", engine.obs_dim, int(obs.shape[1]))
        applied = tick.applied_actions
        if applied is not None and applied.shape[1] != engine.act_dim:
            raise errors.wrong_length("applied_action", engine.act_dim, int(applied.shape[1]))
        failed: dict[int, ApiError] = {}

        def fail(mask: np.ndarray, error: ApiError) -> None:
            for row in np.flatnonzero(mask).tolist():
                failed.setdefault(row, error)

        ok = finite_float32(obs)
        if not ok.all():
            fail(~ok, errors.non_finite("observations"))
        rewards = tick.rewards
        if rewards is not None:
            fine = finite_float32(rewards)
            if not fine.all():
                fail(~fine, errors.non_finite("rewards"))
                ok &= fine
        if applied is not None:
            fine = finite_float32(applied)
            if not fine.all():
                fail(~fine, errors.non_finite("applied_actions"))
                ok &= fine
        slots = engine.table.lookup(tick.session_ids, owner)
        missing = slots < 0
        if missing.any():
            for row in np.flatnonzero(missing & ok).tolist():
                session_id = tick.session_ids[row]
                other = self._locate(session_id)
                if other is not None and other[0] is not engine and other[0].table.owners[other[1]] == owner:
                    failed[row] = ApiError(
                        409,
                        "model_mismatch",
                        f"Session {session_id} runs model {other[0].name!r}, not {engine.name!r}.",
                        {"session_id": session_id, "session_model": other[0].name, "model": engine.name},
                    )
                else:
                    failed[row] = errors.unknown_session(session_id)
            ok &= ~missing
        take = np.flatnonzero(ok)
        every = len(take) == rows
        given = tick.steps
        tickets: RowTickets | None = None
        if len(take):
            with np.errstate(over="ignore", invalid="ignore"):
                obs32 = obs.astype(np.float32, copy=False)
                applied32 = None if applied is None else applied.astype(np.float32, copy=False)
                rewards32 = (
                    np.zeros(rows, np.float32) if rewards is None else rewards.astype(np.float32, copy=False)
                )
            starts = tick.episode_starts if tick.episode_starts is not None else np.zeros(rows, bool)
            tickets = engine.submit_rows(
                slots if every else slots[take],
                obs32 if every else obs32[take],
                rewards32 if every else rewards32[take],
                starts if every else starts[take],
                None if given is None else (given if every else given[take]),
                None if applied32 is None else (applied32 if every else applied32[take]),
            )
        actions = np.full((rows, engine.act_dim), np.nan, np.float32)
        steps = np.full(rows, -1, np.int64) if given is None else given.copy()
        if tickets is not None:
            answered = tickets.steps
            if tickets.conflict.any():
                assert given is not None  # only a given step number can conflict
                answered = answered.copy()
                for index in np.flatnonzero(tickets.conflict).tolist():
                    row = int(take[index])
                    failed[row] = errors.step_conflict(int(tickets.steps[index]), int(given[row]))
                    answered[index] = given[row]
            steps[take] = answered
            if len(tickets.cached_rows):
                actions[take[tickets.cached_rows]] = tickets.cached
            for future, part, batch_rows in tickets.parts:
                try:
                    computed = await future
                except ApiError as exc:
                    for row in take[part].tolist():
                        failed[row] = exc
                    continue
                actions[take[part]] = computed[batch_rows]
        return ColumnarResult(
            session_ids=tick.session_ids,
            steps=steps,
            actions=actions,
            model_version=engine.version,
            server_timing_us=(time.perf_counter_ns() - started_ns) // 1000,
            errors=sorted(failed.items()),
        )


def reply(engine: Engine, session_id: str, step: int, action: list[float], started_ns: int) -> ActResponse:
    """An act response."""
    return ActResponse(
        session_id=session_id,
        step=step,
        action=action,
        model_version=engine.version,
        server_timing_us=(time.perf_counter_ns() - started_ns) // 1000,
    )
