"""The loaded models by name, and the session operations that span them.

A model name is only ever a key of :attr:`ModelRegistry.engines`; it never reaches the file system.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from trmrl_client.codec import INPUT_LIMIT, within_limit

from service import errors, session_state
from service.api.columnar import ColumnarResult, ColumnarTick
from service.config import Settings
from service.engine import Engine, EngineLimits, RowTickets, Ticket
from service.errors import ApiError
from service.recording import Recorder
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
from trmrl.device import resolve_device

log = logging.getLogger("trmrl.service")

#: How often idle sessions past their TTL are swept (lookups also expire them lazily).
SWEEP_INTERVAL_S = 1.0


def model_name(path: Path) -> str:
    """A checkpoint's model name: its directory's (or archive's) name."""
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(suffix)
    return name


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


class ModelRegistry:
    """Every engine of the service: one per loaded version of each model.

    :attr:`engines` maps each model name to its *active* version, the one new sessions get (the
    first name loaded is the default model); :attr:`versions` holds every loaded version of each
    name. A session lives on one version until it is migrated (:meth:`activate`).
    """

    def __init__(
        self,
        engines: Iterable[Engine],
        limits: EngineLimits | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.engines: dict[str, Engine] = {}
        self.versions: dict[str, dict[str, Engine]] = {}
        for engine in engines:
            if engine.name in self.engines:
                raise ValueError(f"two checkpoints are both named {engine.name!r}")
            self.engines[engine.name] = engine
            self.versions[engine.name] = {engine.version: engine}
        if not self.engines:
            raise ValueError("no models to serve")
        first = next(iter(self.engines.values()))
        self.limits = limits or first.limits
        self.device = device or first.device
        self.default = first.name
        self.canary: dict[str, tuple[str, float]] = {}
        """Per model name: a version that gets this share of new sessions (a canary)."""
        self.sources: dict[tuple[str, str], Path] = {}
        """Where each version loaded at runtime came from (name, version) -> checkpoint."""
        self._random = random.Random()
        self.recorder: Recorder | None = None
        """Where recorded sessions' steps go; every engine, also one loaded later, writes to it."""
        self.record_fraction = 0.0
        """Share of new sessions recorded without asking (``TRMRL_RECORD_FRACTION``)."""
        self._sweeper: asyncio.Task[None] | None = None
        self._started = False
        self._steps_open = asyncio.Event()
        self._steps_open.set()
        """Cleared while sessions move between versions: new steps wait (a few milliseconds)."""
        self._lifecycle = asyncio.Lock()
        self.last_pause_s = 0.0
        """How long the last migration held steps back."""
        self.draining = False
        """Set on shutdown: no new sessions; steps of existing ones are still answered."""

    def all_engines(self) -> list[Engine]:
        """Every loaded version of every model."""
        return [engine for versions in self.versions.values() for engine in versions.values()]

    @classmethod
    def load(cls, settings: Settings) -> ModelRegistry:
        """Load, place and warm up every checkpoint the settings name (blocking)."""
        paths = settings.checkpoint_paths()
        if not paths:
            raise RuntimeError(
                f"no checkpoints to serve: none given (--checkpoint or TRMRL_MODELS) and none bundled "
                f"under {settings.checkpoints_dir}"
            )
        device = resolve_device(settings.device)
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
        return cls(engines, limits, device)

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._steps_open = asyncio.Event()
        self._steps_open.set()
        self._lifecycle = asyncio.Lock()
        for engine in self.all_engines():
            await engine.start()
        self._started = True
        self._sweeper = asyncio.create_task(self._sweep(), name="session-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for engine in self.all_engines():
            await engine.stop()
        self._started = False

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            for engine in self.all_engines():
                engine.table.expire()

    async def steps_allowed(self) -> None:
        """Return at once, unless sessions are moving between versions: then when they have moved."""
        if not self._steps_open.is_set():
            await self._steps_open.wait()

    # -- models ----------------------------------------------------------------------------------------
    def engine(self, name: str | None) -> Engine:
        """The named model's active version, or the default model's (404 ``unknown_model``)."""
        if name is None:
            return self.engines[self.default]
        engine = self.engines.get(name)
        if engine is None:
            raise errors.unknown_model(name, list(self.engines))
        return engine

    def engine_for_new_session(self, name: str | None) -> Engine:
        """The version a new session of ``name`` goes to: the active one, or the canary by its share."""
        engine = self.engine(name)
        canary = self.canary.get(engine.name)
        if canary is not None and self._random.random() < canary[1]:
            return self.versions[engine.name][canary[0]]
        return engine

    def version(self, name: str, version: str) -> Engine:
        """One loaded version of a model (404 ``unknown_model`` / ``unknown_version``)."""
        versions = self.versions.get(name)
        if versions is None:
            raise errors.unknown_model(name, list(self.engines))
        engine = versions.get(version)
        if engine is None:
            raise ApiError(
                404,
                "unknown_version",
                f"Model {name!r} has no loaded version {version!r}.",
                {"model": name, "version": version, "loaded": list(versions)},
            )
        return engine

    def models(self) -> list[ModelInfo]:
        """Every loaded version, each model's active version first."""
        out = []
        for name, versions in self.versions.items():
            active = self.engines[name]
            canary = self.canary.get(name)
            for engine in sorted(versions.values(), key=lambda e: e is not active):
                share = 0.0
                if canary is not None and engine.version == canary[0]:
                    share = canary[1]
                out.append(
                    engine.info(default=name == self.default).model_copy(
                        update={"active": engine is active, "canary_share": share}
                    )
                )
        return out

    # -- sessions --------------------------------------------------------------------------------------
    def find(self, session_id: str, owner: str | None = None) -> tuple[Engine, int]:
        """The engine and slot of a live session the caller may see (404 ``unknown_session`` otherwise).

        With API keys on, a session belongs to the key that created it: to any other key it does not
        exist, so its id cannot even be confirmed.
        """
        for engine in self.all_engines():
            slot = engine.table.find(session_id)
            if slot is not None:
                if engine.table.owners[slot] != owner:
                    break
                return engine, slot
        raise errors.unknown_session(session_id)

    def _locate(self, session_id: str) -> tuple[Engine, int] | None:
        """The session with this id whoever owns it (for ids a caller asks to create)."""
        for engine in self.all_engines():
            slot = engine.table.find(session_id)
            if slot is not None:
                return engine, slot
        return None

    def records(self, asked: bool) -> bool:
        """Whether a new session is recorded: it asked, or it falls in the sampled fraction."""
        if asked and self.recorder is None:
            raise ApiError(
                422,
                "recording_disabled",
                "This service records no sessions: it has no recording directory (TRMRL_RECORD_DIR).",
                {"field": "record"},
            )
        return asked or (self.record_fraction > 0 and self._random.random() < self.record_fraction)

    def create_session(self, request: CreateSessionRequest, owner: str | None = None) -> tuple[Engine, str]:
        if self.draining:
            raise errors.draining()
        engine = self.engine_for_new_session(request.model)
        session_id, _ = engine.table.create(
            deterministic=request.deterministic,
            seed=request.seed,
            ttl_s=request.ttl_s,
            owner=owner,
            record=self.records(request.record),
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
        engine = self.engine_for_new_session(request.model)
        table = engine.table
        created: list[str] = []
        try:
            for i in range(count):
                seed = None if request.seed is None else (request.seed + i) % SEED_LIMIT
                session_id, _ = table.create(
                    deterministic=request.deterministic,
                    seed=seed,
                    ttl_s=request.ttl_s,
                    owner=owner,
                    record=self.records(request.record),
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
        return await session_state.snapshot(engine, slot)

    async def put_state(self, session_id: str, state: SessionState, owner: str | None = None) -> bool:
        """Restore ``state`` under ``session_id``; returns ``True`` if the session was created.

        An existing session (of the caller) is overwritten; a missing one is created under that id,
        which is how a client moves a session to another replica or recovers one the service lost.
        The id is the path's: a snapshot taken from another session copies that session's memory.
        Every check runs before anything changes.
        """
        await self.steps_allowed()  # a session restored mid-migration must not stay behind
        engine = self.versions.get(state.model, {}).get(state.model_version) or self.engine(state.model)
        session_state.check_state(engine, state)
        existing = self._locate(session_id)
        if existing is not None and existing[0].table.owners[existing[1]] != owner:
            # Taken by another key: to this caller the id does not exist, nor can it be claimed.
            raise errors.unknown_session(session_id)
        if existing is not None and existing[0] is engine:
            await session_state.restore(engine, existing[1], state)
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
            await session_state.restore(engine, slot, state)
        except Exception:
            engine.table.delete(session_id)
            raise
        if existing is not None:
            existing[0].table.delete(session_id)
        log.info("session restored", extra={"session_id": session_id, "model": engine.name})
        return True

    async def export_all(self) -> list[dict[str, Any]]:
        """Every live session, one block of columns per model (committed steps)."""
        return [await session_state.export_sessions(engine) for engine in self.all_engines()]

    async def import_all(self, blocks: Iterable[dict[str, Any]]) -> int:
        """Restore saved blocks of sessions; a block that no longer fits is skipped with a warning."""
        restored = 0
        for block in blocks:
            name, version = block.get("model"), block.get("model_version")
            versions = self.versions.get(name, {}) if isinstance(name, str) else {}
            engine = versions.get(version) if isinstance(version, str) else None
            if engine is None:
                log.warning(
                    "saved sessions of model %r version %r not restored: it is not loaded", name, version
                )
                continue
            try:
                restored += await session_state.import_sessions(engine, block)
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
            engine = self.engine_for_new_session(request.model)
            slot = -1
            session_id = ""
        obs = engine.validate(request.observation, request.reward, request.applied_action)
        if slot < 0:
            if request.step not in (None, 0):
                raise errors.step_conflict(0, request.step)
            if engine.queued_steps >= engine.limits.max_queued_steps:
                raise errors.overloaded(engine.limits.max_queued_steps)
            session_id, slot = engine.table.create(
                deterministic=True, seed=None, ttl_s=None, owner=owner, record=self.records(False)
            )
        ticket = engine.submit(
            slot, obs, request.reward, request.episode_start, request.step, request.applied_action
        )
        return engine, session_id, ticket

    async def act(self, request: ActRequest, started_ns: int, owner: str | None = None) -> ActResponse:
        """One act request, start to finish."""
        if not self._steps_open.is_set():  # sessions are moving between versions: wait for them
            await self._steps_open.wait()
        engine, session_id, ticket = self.submit(request, owner)
        action = await ticket.action()
        return _act_response(engine, session_id, ticket.step, action.tolist(), started_ns)

    async def act_batch(
        self, requests: list[ActRequest], started_ns: int, owner: str | None = None
    ) -> list[ActResponse | ApiError]:
        """Many act requests: all queued first (so they share a forward pass), then awaited in order."""
        await self.steps_allowed()
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
            results.append(_act_response(engine, session_id, ticket.step, action.tolist(), started_ns))
        return results

    def _tick_engine(self, tick: ColumnarTick, model: str | None) -> Engine:
        """The model a tick steps: the one it (or its stream) names, else the first named session's.

        Sessions of that model on another of its versions (a canary, a version not migrated from)
        are stepped by their own version in the same tick.
        """
        name = tick.model if tick.model is not None else model
        if name is not None or len(self.all_engines()) == 1:
            return self.engine(name)
        for session_id in tick.session_ids:
            for engine in self.all_engines():
                if session_id in engine.table.ids:
                    return self.engines[engine.name]
        return self.engine(None)

    async def act_columnar(
        self, tick: ColumnarTick, started_ns: int, owner: str | None = None, model: str | None = None
    ) -> ColumnarResult:
        """One step of each session of a columnar tick; every row gets its action or its own error.

        The tick steps one model (``model``: the stream's, when the tick names none), each session
        on its own version of it. A row that fails -- a number out of float32's range, an unknown
        session or one of another model, a step conflict -- gets NaN actions and an error, and its
        session is untouched; the other rows are served. A tick whose shapes do not fit the model is
        refused as a whole (422).
        """
        await self.steps_allowed()
        engine = self._tick_engine(tick, model)
        rows = tick.size
        obs = tick.observations
        if obs.shape[1] != engine.obs_dim:
            raise errors.wrong_length("observation", engine.obs_dim, int(obs.shape[1]))
        applied = tick.applied_actions
        if applied is not None and applied.shape[1] != engine.act_dim:
            raise errors.wrong_length("applied_action", engine.act_dim, int(applied.shape[1]))
        failed: dict[int, ApiError] = {}

        # The numbers' rule is the client's (``INPUT_LIMIT``); a row beyond it fails alone.
        ok = np.ones(rows, bool)
        for name, values in (("observations", obs), ("rewards", tick.rewards), ("applied_actions", applied)):
            if values is None:
                continue
            fine = within_limit(values)
            if fine.all():
                continue
            for row in np.flatnonzero(~fine & ok).tolist():
                # ``non_finite`` for NaN, infinity or beyond float32; ``out_of_range`` otherwise.
                numbers = np.atleast_1d(values[row]).astype(np.float64).tolist()
                failed[row] = errors.out_of_range(name, numbers, INPUT_LIMIT)
            ok &= fine
        rewards = tick.rewards
        slots = engine.table.lookup(tick.session_ids, owner)
        groups: list[tuple[Engine, np.ndarray, np.ndarray]] = []
        missing = slots < 0
        if missing.any():
            elsewhere: dict[str, list[tuple[int, int]]] = {}
            for row in np.flatnonzero(missing & ok).tolist():
                session_id = tick.session_ids[row]
                other = self._locate(session_id)
                if other is None or other[0].table.owners[other[1]] != owner:
                    failed[row] = errors.unknown_session(session_id)
                elif other[0].name == engine.name:
                    elsewhere.setdefault(other[0].version, []).append((row, other[1]))
                else:
                    failed[row] = ApiError(
                        409,
                        "model_mismatch",
                        f"Session {session_id} runs model {other[0].name!r}, not {engine.name!r}.",
                        {"session_id": session_id, "session_model": other[0].name, "model": engine.name},
                    )
            ok &= ~missing
            for version, found in elsewhere.items():
                at = np.asarray(found, np.int64)
                groups.append((self.versions[engine.name][version], at[:, 0], at[:, 1]))
        take = np.flatnonzero(ok)
        groups.insert(0, (engine, take, slots[take]))
        given = tick.steps
        with np.errstate(over="ignore", invalid="ignore"):
            obs32 = obs.astype(np.float32, copy=False)
            applied32 = None if applied is None else applied.astype(np.float32, copy=False)
            rewards32 = (
                np.zeros(rows, np.float32) if rewards is None else rewards.astype(np.float32, copy=False)
            )
        starts = tick.episode_starts if tick.episode_starts is not None else np.zeros(rows, bool)
        submitted: list[tuple[np.ndarray, RowTickets]] = []
        for owner_engine, picked, picked_slots in groups:
            if not len(picked):
                continue
            every = len(picked) == rows
            submitted.append(
                (
                    picked,
                    owner_engine.submit_rows(
                        picked_slots,
                        obs32 if every else obs32[picked],
                        rewards32 if every else rewards32[picked],
                        starts if every else starts[picked],
                        None if given is None else (given if every else given[picked]),
                        None if applied32 is None else (applied32 if every else applied32[picked]),
                    ),
                )
            )
        actions = np.full((rows, engine.act_dim), np.nan, np.float32)
        steps = np.full(rows, -1, np.int64) if given is None else given.copy()
        for picked, tickets in submitted:
            answered = tickets.steps
            if tickets.conflict.any():
                assert given is not None  # only a given step number can conflict
                answered = answered.copy()
                for index in np.flatnonzero(tickets.conflict).tolist():
                    row = int(picked[index])
                    failed[row] = errors.step_conflict(int(tickets.steps[index]), int(given[row]))
                    answered[index] = given[row]
            steps[picked] = answered
            if len(tickets.cached_rows):
                actions[picked[tickets.cached_rows]] = tickets.cached
            for future, part, batch_rows in tickets.parts:
                try:
                    computed = await future
                except ApiError as exc:
                    for row in picked[part].tolist():
                        failed[row] = exc
                    continue
                actions[picked[part]] = computed[batch_rows]
        versions = None
        if len(submitted) > 1:
            versions = [engine.version] * rows
            for owner_engine, picked, _ in groups[1:]:
                for row in picked.tolist():
                    versions[row] = owner_engine.version
        return ColumnarResult(
            session_ids=tick.session_ids,
            steps=steps,
            actions=actions,
            model_version=engine.version,
            server_timing_us=(time.perf_counter_ns() - started_ns) // 1000,
            errors=sorted(failed.items()),
            model_versions=versions,
        )

    # -- versions at runtime -----------------------------------------------------------------------------
    def add_version(self, engine: Engine, source: Path | None = None) -> None:
        """Serve a newly loaded (warmed-up, started) version beside the others; not active yet."""
        versions = self.versions.setdefault(engine.name, {})
        if engine.version in versions:
            raise ApiError(
                409,
                "version_exists",
                f"Version {engine.version} of model {engine.name!r} is already loaded.",
                {"model": engine.name, "version": engine.version},
            )
        versions[engine.version] = engine
        self.engines.setdefault(engine.name, engine)
        engine.recorder = self.recorder
        if source is not None:
            self.sources[(engine.name, engine.version)] = source

    async def activate(
        self, name: str, version: str, *, canary: float | None = None, migrate: bool = False
    ) -> int:
        """Make ``version`` the one new sessions of ``name`` get (or, with ``canary`` < 1, that share
        of them); with ``migrate``, move every live session of the other versions to it, memory
        intact, between two steps. Returns how many sessions moved.

        Every check runs first: nothing changes when one fails.
        """
        target = self.version(name, version)
        if canary is not None and canary < 1.0 and migrate:
            raise ApiError(
                422,
                "invalid_value",
                "'migrate_sessions' moves every session: it needs a full activation, not a canary.",
                {"field": "migrate_sessions"},
            )
        others = [e for e in self.versions[name].values() if e is not target]
        if migrate:
            for other in others:
                if len(other.table) and not session_state.compatible(target, other):
                    raise ApiError(
                        409,
                        "incompatible_model",
                        f"Version {version} of {name!r} ({target.model.config.policy}, memory "
                        f"{target.pool.memory_shape}) takes {target.obs_dim} observations and gives "
                        f"{target.act_dim} actions; version {other.version} ({other.model.config.policy}, "
                        f"memory {other.pool.memory_shape}) has {other.obs_dim} and {other.act_dim}: "
                        "its sessions cannot move.",
                        {"model": name, "version": version, "from_version": other.version},
                    )
            moving = sum(len(other.table) for other in others)
            free = target.limits.max_sessions - len(target.table)
            if moving > free:
                raise errors.capacity_exhausted(target.limits.max_sessions)
        async with self._lifecycle:
            if canary is not None and canary < 1.0:
                self.canary[name] = (version, canary)
                log.info(
                    "model %s: version %s is a canary for %.0f%% of new sessions", name, version, 100 * canary
                )
                return 0
            self.engines[name] = target
            self.canary.pop(name, None)
            moved = 0
            if migrate and any(len(other.table) for other in others):
                moved = await self._migrate(others, target)
            log.info("model %s: version %s active, %d sessions migrated", name, version, moved)
            return moved

    async def _migrate(self, sources: list[Engine], target: Engine) -> int:
        """Move every session of ``sources`` to ``target`` while no step is taken (a short pause)."""
        self._steps_open.clear()
        started = time.perf_counter()
        moved = 0
        try:
            for source in sources:
                if not len(source.table):
                    continue
                await source.drain()
                async with source.step_lock, target.step_lock:
                    moved += session_state.move_sessions(source, target)
        finally:
            self._steps_open.set()
            self.last_pause_s = time.perf_counter() - started
        return moved

    async def retire(self, name: str, version: str) -> None:
        """Unload a version that is neither active, a canary, nor holding sessions (409 otherwise)."""
        engine = self.version(name, version)
        canary = self.canary.get(name)
        reason = None
        if self.engines[name] is engine:
            reason = "it is the active version"
        elif canary is not None and canary[0] == version:
            reason = "it is the canary"
        elif len(engine.table):
            reason = f"{len(engine.table)} sessions are still on it"
        if reason is not None:
            raise ApiError(
                409,
                "version_in_use",
                f"Version {version} of {name!r} cannot be retired: {reason}.",
                {"model": name, "version": version, "sessions": len(engine.table)},
            )
        async with self._lifecycle:
            del self.versions[name][version]
            self.sources.pop((name, version), None)
            await engine.stop()
        log.info("model %s: version %s retired", name, version)


def _act_response(
    engine: Engine, session_id: str, step: int, action: list[float], started_ns: int
) -> ActResponse:
    """The answer to one act request, timed from ``started_ns`` (the routes turn it into a reply)."""
    return ActResponse(
        session_id=session_id,
        step=step,
        action=action,
        model_version=engine.version,
        server_timing_us=(time.perf_counter_ns() - started_ns) // 1000,
    )
