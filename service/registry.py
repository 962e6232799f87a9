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

import torch

from service import errors
from service.config import Settings
from service.engine import Engine, EngineLimits, Ticket
from service.errors import ApiError
from service.schemas import (
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
        The id is the path's: a snapshot taken from another session copies that session's memory.
        Every check runs before anything changes.
        """
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


def reply(engine: Engine, session_id: str, step: int, action: list[float], started_ns: int) -> ActResponse:
    """An act response."""
    return ActResponse(
        session_id=session_id,
        step=step,
        action=action,
        model_version=engine.version,
        server_timing_us=(time.perf_counter_ns() - started_ns) // 1000,
    )
