"""The model registry: every loaded version of every model by name, and the sessions across them.

A model name is only ever a key of :attr:`ModelRegistry.engines`; it never reaches the file system.
Acting across versions is :mod:`service.core.acting`'s, moving sessions between versions
:mod:`service.core.migration`'s, snapshots :mod:`service.core.snapshots`'.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import torch

from service.core import errors
from service.core.background import cancel
from service.core.engine import Engine, EngineLimits
from service.core.errors import ServiceError
from service.core.recording import Recorder
from service.core.records import SEED_LIMIT, ModelInfo, NewSession, SessionInfo

log = logging.getLogger("trmrl.service")

#: How often idle sessions past their TTL are swept (lookups also expire them lazily).
SWEEP_INTERVAL_S = 1.0


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
        self.steps_open = asyncio.Event()
        self.steps_open.set()
        """Cleared while sessions move between versions: new steps wait (a few milliseconds)."""
        self.lifecycle_lock = asyncio.Lock()
        self.last_pause_s = 0.0
        """How long the last migration held steps back."""
        self.draining = False
        """Set on shutdown: no new sessions; steps of existing ones are still answered."""

    def all_engines(self) -> list[Engine]:
        """Every loaded version of every model."""
        return [engine for versions in self.versions.values() for engine in versions.values()]

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.steps_open = asyncio.Event()
        self.steps_open.set()
        self.lifecycle_lock = asyncio.Lock()
        for engine in self.all_engines():
            await engine.start()
        self._started = True
        self._sweeper = asyncio.create_task(self._sweep(), name="session-sweeper")

    async def stop(self) -> None:
        await cancel(self._sweeper)
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
        if not self.steps_open.is_set():
            await self.steps_open.wait()

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
            raise ServiceError(
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
                info = engine.info(default=name == self.default)
                out.append(dataclasses.replace(info, active=engine is active, canary_share=share))
        return out

    # -- sessions --------------------------------------------------------------------------------------
    def find(self, session_id: str, owner: str | None = None) -> tuple[Engine, int]:
        """The engine and slot of a live session the caller may see (404 ``unknown_session`` otherwise).

        With API keys on, a session belongs to the key that created it: to any other key it does not
        exist, so its id cannot even be confirmed.
        """
        found = self.locate(session_id)
        if found is None or found[0].table.owners[found[1]] != owner:
            raise errors.unknown_session(session_id)
        return found

    def locate(self, session_id: str) -> tuple[Engine, int] | None:
        """The session with this id whoever owns it (for ids a caller asks to create)."""
        for versions in self.versions.values():  # every step looks here: no list of engines is built
            for engine in versions.values():
                slot = engine.table.find(session_id)
                if slot is not None:
                    return engine, slot
        return None

    def records(self, asked: bool) -> bool:
        """Whether a new session is recorded: it asked, or it falls in the sampled fraction."""
        if asked and self.recorder is None:
            raise ServiceError(
                "recording_disabled",
                "This service records no sessions: it has no recording directory (TRMRL_RECORD_DIR).",
                {"field": "record"},
            )
        return asked or (self.record_fraction > 0 and self._random.random() < self.record_fraction)

    def create_session(self, request: NewSession, owner: str | None = None) -> tuple[Engine, str]:
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
        self, request: NewSession, count: int, owner: str | None = None
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
        except ServiceError:
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

    # -- versions at runtime -----------------------------------------------------------------------------
    def add_version(self, engine: Engine, source: Path | None = None) -> None:
        """Serve a newly loaded (warmed-up, started) version beside the others; not active yet."""
        versions = self.versions.setdefault(engine.name, {})
        if engine.version in versions:
            raise ServiceError(
                "version_exists",
                f"Version {engine.version} of model {engine.name!r} is already loaded.",
                {"model": engine.name, "version": engine.version},
            )
        versions[engine.version] = engine
        self.engines.setdefault(engine.name, engine)
        engine.recorder = self.recorder
        if source is not None:
            self.sources[(engine.name, engine.version)] = source

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
            raise ServiceError(
                "version_in_use",
                f"Version {version} of {name!r} cannot be retired: {reason}.",
                {"model": name, "version": version, "sessions": len(engine.table)},
            )
        async with self.lifecycle_lock:
            del self.versions[name][version]
            self.sources.pop((name, version), None)
            await engine.stop()
        log.info("model %s: version %s retired", name, version)
