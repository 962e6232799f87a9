"""Snapshots: sessions' state taken out of the service and put back.

* one session: :func:`snapshot` takes its portable :class:`~service.core.records.SessionState`,
  :func:`check_state` and :func:`restore` load one back; :func:`get_state` and :func:`put_state`
  do so by id across the registry (``GET``/``PUT /v1/sessions/{id}/state``);
* every session of a model, column by column: :func:`export_sessions` and :func:`import_sessions`,
  and of every model :func:`export_all` and :func:`import_all` (the state directory,
  :mod:`service.core.snapshot_file`).

Each runs between two batches (under the engine's step lock, or with the engine drained), when the
slot pool and the session table agree; it reads and writes them through their own methods only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from trmrl_client.codec import INPUT_LIMIT

from service.core import errors
from service.core.engine import Engine, all_in_range
from service.core.errors import ServiceError
from service.core.records import SessionState
from service.core.registry import ModelRegistry
from trmrl.slot_pool import SlotMemory
from trmrl.trial_pool import CacheExhausted, TrialPool

log = logging.getLogger("trmrl.service")

#: Per-session scalar columns of :func:`export_sessions`.
_COUNTERS = (
    "length",
    "steps",
    "episodes",
    "episode_start_pending",
    "deterministic",
    "seed",
    "ttl_s",
    "created_at",
)


def _memories(engine: Engine, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of the sessions' windows, lengths and previous actions (hold the step lock).

    A new session (or a trial reset) clears its slot at its next step, not before: until then
    the slot still holds its previous tenant's memory, which is not this session's, so such a
    session's memory is reported empty.
    """
    memory = engine.pool.read(torch.from_numpy(slots).to(engine.device))
    windows = memory.windows.cpu().numpy()
    lengths = memory.lengths.cpu().numpy().astype(np.int64)
    prev = memory.prev_action.cpu().numpy()
    fresh = engine.table.pending_clear[slots]
    windows[fresh], lengths[fresh], prev[fresh] = 0.0, 0, 0.0
    return windows, lengths, prev


def context_of(engine: Engine) -> str:
    """The engine's kind of memory: ``trial`` (a trial-context model) or ``window``."""
    return "trial" if isinstance(engine.pool, TrialPool) else "window"


def _load(engine: Engine, slots: np.ndarray, columns: dict[str, Any]) -> None:
    """Load sessions' memories and counters (columns as :func:`export_sessions` writes them). A fixed
    key/value cache budget without the blocks for them: 503 ``cache_exhausted``, nothing changed."""
    try:
        engine.pool.write(
            torch.from_numpy(slots).to(engine.device),
            SlotMemory(
                torch.as_tensor(columns["window"], dtype=torch.float32),
                torch.as_tensor(columns["length"], dtype=torch.long),
                torch.as_tensor(columns["prev_action"], dtype=torch.float32),
            ),
        )
    except CacheExhausted as exc:
        raise errors.cache_exhausted(exc.blocks, exc.needed) from None
    engine.table.load(
        slots,
        steps=columns["steps"],
        episodes=columns["episodes"],
        episode_start_pending=columns["episode_start_pending"],
        deterministic=columns["deterministic"],
        seed=columns["seed"],
        ttl_s=columns["ttl_s"],
        created_at=columns["created_at"],
        last_action=columns["last_action"],
        context=np.asarray(columns["length"], np.int64),
    )


# -- one session ----------------------------------------------------------------------------------------
async def snapshot(engine: Engine, slot: int) -> SessionState:
    """The portable state of one session: its committed steps (a queued step is not in it)."""
    async with engine.step_lock:
        windows, lengths, prev = _memories(engine, np.asarray([slot], np.int64))
        table = engine.table
        trial = context_of(engine) == "trial"
        return SessionState(
            session_id=table.session_id(slot),
            model=engine.name,
            model_version=engine.version,
            context=context_of(engine),
            # A trial's working memories only: its context is not a fixed window.
            window=(windows[0, : lengths[0]] if trial else windows[0]).tolist(),
            length=int(lengths[0]),
            prev_action=prev[0].tolist(),
            last_action=table.last_action[slot].tolist(),
            steps=int(table.next_step[slot]),
            episodes=int(table.episodes[slot]),
            episode_start_pending=bool(table.pending_start[slot]),
            deterministic=bool(table.deterministic[slot]),
            seed=int(table.seed[slot]),
            ttl_s=float(table.ttl_s[slot]),
            created_at=float(table.created_at[slot]),
        )


def check_state(engine: Engine, state: SessionState) -> None:
    """Refuse a snapshot that was not taken with this model or does not fit it (before any change)."""
    context = context_of(engine)
    if state.context != context:
        raise errors.invalid_snapshot(
            f"it holds a {state.context}-context memory and model {engine.name!r} has a {context} context",
            {"field": "context", "expected": context, "got": state.context},
        )
    if state.model_version != engine.version:
        raise errors.model_version_mismatch(engine.name, engine.version, state.model_version)
    # A TrMRL window: N working memories; an RL² memory: its hidden state as one row; a trial: its
    # working memories, up to max_context.
    n, width = engine.pool.memory_shape
    widths = {len(row) for row in state.window}
    if context == "trial" and (len(state.window) > n or widths - {width}):
        raise errors.invalid_snapshot(
            f"'window' must be at most max_context={n} working memories of {width} numbers",
            {"field": "window", "expected_max": [n, width], "got_rows": len(state.window)},
        )
    if context == "trial" and state.length != len(state.window):
        raise errors.invalid_snapshot(
            f"'length' must be the trial's {len(state.window)} working memories",
            {"field": "length", "expected": len(state.window)},
        )
    if context == "window" and (len(state.window) != n or widths != {width}):
        raise errors.invalid_snapshot(
            f"'window' must be {n} rows of {width} numbers", {"field": "window", "expected": [n, width]}
        )
    if state.length > n:
        raise errors.invalid_snapshot(f"'length' must be at most {n}", {"field": "length", "expected_max": n})
    for field in ("prev_action", "last_action"):
        values = getattr(state, field)
        if len(values) != engine.act_dim:
            raise errors.wrong_length(field, engine.act_dim, len(values))
        if not all_in_range(values):
            raise errors.out_of_range(field, values, INPUT_LIMIT)
    for row in state.window:
        if not all_in_range(row):
            raise errors.out_of_range("window", row, INPUT_LIMIT)


async def restore(engine: Engine, slot: int, state: SessionState) -> None:
    """Load a checked snapshot into ``slot``, a session with no steps in flight."""
    async with engine.step_lock:
        if engine.table.queued[slot]:
            raise errors.session_busy(engine.table.session_id(slot))
        engine.cache_room()  # ended sessions' blocks back first: they count as free
        n, width = engine.pool.memory_shape
        window = np.zeros((1, n, width), np.float32)  # a trial's memories, padded to max_context rows
        window[0, : len(state.window)] = np.asarray(state.window, np.float32).reshape(-1, width)
        _load(
            engine,
            np.asarray([slot], np.int64),
            {
                "window": window,
                "length": [state.length],
                "prev_action": [state.prev_action],
                "last_action": [state.last_action],
                "steps": state.steps,
                "episodes": state.episodes,
                "episode_start_pending": state.episode_start_pending,
                "deterministic": state.deterministic,
                "seed": state.seed,
                "ttl_s": state.ttl_s,
                "created_at": state.created_at,
            },
        )


# -- every session of a model -------------------------------------------------------------------------
async def export_sessions(engine: Engine) -> dict[str, Any]:
    """Every session of the engine's model, column by column (the state directory's format).

    Array copies only, under the step lock: cheap on the event loop even for many sessions; the
    caller encodes them elsewhere.
    """
    async with engine.step_lock:
        table = engine.table
        slots = np.asarray(sorted(table.ids.values()), np.int64)
        window, length, prev = _memories(engine, slots)
        return {
            "model": engine.name,
            "model_version": engine.version,
            "session_ids": [table.slot_ids[slot] for slot in slots.tolist()],
            "owners": [table.owners[slot] for slot in slots.tolist()],
            "window": window,
            "length": length,
            "prev_action": prev,
            "last_action": table.last_action[slots],
            "steps": table.next_step[slots],
            "episodes": table.episodes[slots],
            "episode_start_pending": table.pending_start[slots],
            "deterministic": table.deterministic[slots],
            "seed": table.seed[slots],
            "ttl_s": table.ttl_s[slots],
            "created_at": table.created_at[slots],
        }


async def import_sessions(engine: Engine, block: dict[str, Any]) -> int:
    """Restore sessions written by :func:`export_sessions`; returns how many.

    The block is checked as a whole first (version, shapes, finite numbers) and refused as a
    whole (``ValueError``) if it does not fit; ids already in use are skipped, and sessions beyond the
    capacity or a fixed key/value cache budget are not restored (in the block's order).
    """
    if block.get("model_version") != engine.version:
        raise ValueError(
            f"written by version {block.get('model_version')} of the model, this is {engine.version}"
        )
    n, width = engine.pool.memory_shape
    ids, owners = block["session_ids"], block["owners"]
    count = len(ids)
    shapes = {
        "window": (count, n, width),
        "prev_action": (count, engine.act_dim),
        "last_action": (count, engine.act_dim),
    }
    columns = {name: np.asarray(block[name]) for name in (*shapes, *_COUNTERS)}
    for name, shape in shapes.items():
        if columns[name].shape != shape or not np.isfinite(columns[name]).all():
            raise ValueError(f"column {name!r} is not {shape} finite numbers")
    for name in _COUNTERS:
        if columns[name].shape != (count,):
            raise ValueError(f"column {name!r} does not hold {count} values")
    length = columns["length"]
    if len(owners) != count or ((length < 0) | (length > n)).any() or (columns["steps"] < 0).any():
        raise ValueError("owners, lengths or step counts are out of range")
    table = engine.table
    slots: list[int] = []
    kept: list[int] = []
    async with engine.step_lock:
        room = engine.cache_room()
        for i, (session_id, owner) in enumerate(zip(ids, owners, strict=True)):
            if not isinstance(session_id, str) or session_id in table.ids:
                continue
            if room is not None:
                need = engine.cache_blocks_for(length[i : i + 1])
                if need > room:
                    log.warning(
                        "model %s: its key/value cache is full: %d saved sessions not restored",
                        engine.name,
                        count - i,
                    )
                    break
                room -= need
            try:
                _, slot = table.create(
                    deterministic=bool(columns["deterministic"][i]),
                    seed=int(columns["seed"][i]),
                    ttl_s=float(columns["ttl_s"][i]),
                    owner=owner if isinstance(owner, str) else None,
                    session_id=session_id,
                )
            except ServiceError:
                log.warning("model %s is full: %d saved sessions not restored", engine.name, count - i)
                break
            slots.append(slot)
            kept.append(i)
        if not slots:
            return 0
        rows = np.asarray(kept)
        _load(engine, np.asarray(slots, np.int64), {name: column[rows] for name, column in columns.items()})
    return len(slots)


# -- by session id, across the registry ------------------------------------------------------------
async def get_state(registry: ModelRegistry, session_id: str, owner: str | None = None) -> SessionState:
    engine, slot = registry.find(session_id, owner)
    return await snapshot(engine, slot)


async def put_state(
    registry: ModelRegistry, session_id: str, state: SessionState, owner: str | None = None
) -> bool:
    """Restore ``state`` under ``session_id``; returns ``True`` if the session was created.

    An existing session (of the caller) is overwritten; a missing one is created under that id,
    which is how a client moves a session to another replica or recovers one the service lost.
    The id is the path's: a snapshot taken from another session copies that session's memory.
    Every check runs before anything changes.
    """
    await registry.steps_allowed()  # a session restored mid-migration must not stay behind
    engine = registry.versions.get(state.model, {}).get(state.model_version) or registry.engine(state.model)
    check_state(engine, state)
    existing = registry.locate(session_id)
    if existing is not None and existing[0].table.owners[existing[1]] != owner:
        # Taken by another key: to this caller the id does not exist, nor can it be claimed.
        raise errors.unknown_session(session_id)
    if existing is not None and existing[0] is engine:
        await restore(engine, existing[1], state)
        log.info("session restored", extra={"session_id": session_id, "model": engine.name})
        return False
    if registry.draining:
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
        await restore(engine, slot, state)
    except Exception:
        engine.table.delete(session_id)
        raise
    if existing is not None:
        existing[0].table.delete(session_id)
    log.info("session restored", extra={"session_id": session_id, "model": engine.name})
    return True


async def export_all(registry: ModelRegistry) -> list[dict[str, Any]]:
    """Every live session, one block of columns per model (committed steps)."""
    return [await export_sessions(engine) for engine in registry.all_engines()]


async def import_all(registry: ModelRegistry, blocks: Iterable[dict[str, Any]]) -> int:
    """Restore saved blocks of sessions; a block that no longer fits is skipped with a warning."""
    restored = 0
    for block in blocks:
        name, version = block.get("model"), block.get("model_version")
        versions = registry.versions.get(name, {}) if isinstance(name, str) else {}
        engine = versions.get(version) if isinstance(version, str) else None
        if engine is None:
            log.warning("saved sessions of model %r version %r not restored: it is not loaded", name, version)
            continue
        try:
            restored += await import_sessions(engine, block)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("saved sessions of model %s not restored: %s", name, exc)
    return restored
