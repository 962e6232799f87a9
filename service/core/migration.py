"""Moving sessions between versions of a model: activation, canaries, and migration with memory intact.

A migration holds new steps back (``ModelRegistry.steps_open``) for the few milliseconds it takes to
drain the old versions and copy their sessions' rows and memories across, so no step is taken on
the way. A session's memory is raw working memories, so it means the same to any version.
"""

from __future__ import annotations

import logging
import time

import torch

from service.core import errors
from service.core.engine import Engine
from service.core.errors import ServiceError
from service.core.registry import ModelRegistry
from trmrl.memory import fit_windows
from trmrl.slot_pool import SlotMemory
from trmrl.trial_pool import TrialPool

log = logging.getLogger("trmrl.service")


def compatible(target: Engine, source: Engine) -> bool:
    """Whether sessions can move from ``source`` to ``target``: same observation and action sizes, and
    the same kind of memory (any two TrMRL windows refit; RL² hidden states move between equal widths;
    a trial context moves to a trial-context model whose ``max_context`` holds it)."""
    if (target.obs_dim, target.act_dim) != (source.obs_dim, source.act_dim):
        return False
    kind, other = target.model.config.policy, source.model.config.policy
    trial = isinstance(target.pool, TrialPool)
    if kind != other or trial != isinstance(source.pool, TrialPool):
        return False
    if trial:
        return target.pool.memory_shape[0] >= source.pool.memory_shape[0]
    return kind == "trmrl" or target.pool.memory_shape == source.pool.memory_shape


def check_cache(target: Engine, sources: list[Engine]) -> None:
    """Refuse (503 ``cache_exhausted``) moving the sessions of ``sources`` to a ``target`` whose fixed
    key/value cache budget has too few free blocks for their contexts (hold ``target``'s step lock)."""
    room = target.cache_room()
    if room is None:
        return
    need = 0
    for source in sources:
        slots = torch.as_tensor(list(source.table.ids.values()), dtype=torch.long)
        need += target.cache_blocks_for(source.pool.lengths[slots.to(source.device)].cpu().numpy())
    if need > room:
        assert target.forward.cache_blocks is not None
        raise errors.cache_exhausted(target.forward.cache_blocks, need)


def move_sessions(source: Engine, target: Engine) -> int:
    """Move every session of ``source`` to ``target`` with its memory intact; returns how many moved.

    The caller holds both step locks and has drained ``source``. The window is copied as it is (a
    shorter window keeps the newest memories); a trial context is written whole, and the target's
    pool re-encodes it under its own weights (:meth:`~trmrl.trial_pool.TrialPool.write`). Nothing
    changes if they do not fit (429; 503 ``cache_exhausted`` for a fixed cache budget).
    """
    count = len(source.table)
    if not count:
        return 0
    check_cache(target, [source])
    old, slots = target.table.take_over(source.table)
    memory = source.pool.read(torch.from_numpy(old).to(source.device))
    windows, lengths = fit_windows(memory.windows, memory.lengths, target.pool.memory_shape[0])
    target.pool.write(
        torch.from_numpy(slots).to(target.device), SlotMemory(windows, lengths, memory.prev_action)
    )
    return count


async def activate(
    registry: ModelRegistry, name: str, version: str, *, canary: float | None = None, migrate: bool = False
) -> int:
    """Make ``version`` the one new sessions of ``name`` get (or, with ``canary`` < 1, that share
    of them); with ``migrate``, move every live session of the other versions to it, memory
    intact, between two steps. Returns how many sessions moved.

    Every check runs first: nothing changes when one fails.
    """
    target = registry.version(name, version)
    if canary is not None and canary < 1.0 and migrate:
        raise ServiceError(
            "invalid_value",
            "'migrate_sessions' moves every session: it needs a full activation, not a canary.",
            {"field": "migrate_sessions"},
        )
    others = [e for e in registry.versions[name].values() if e is not target]
    if migrate:
        for other in others:
            if len(other.table) and not compatible(target, other):
                raise ServiceError(
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
        if moving and target.trial_context:
            async with target.step_lock:
                check_cache(target, others)
    async with registry.lifecycle_lock:
        if canary is not None and canary < 1.0:
            registry.canary[name] = (version, canary)
            log.info(
                "model %s: version %s is a canary for %.0f%% of new sessions", name, version, 100 * canary
            )
            return 0
        registry.engines[name] = target
        registry.canary.pop(name, None)
        moved = 0
        if migrate and any(len(other.table) for other in others):
            moved = await _migrate(registry, others, target)
        log.info("model %s: version %s active, %d sessions migrated", name, version, moved)
        return moved


async def _migrate(registry: ModelRegistry, sources: list[Engine], target: Engine) -> int:
    """Move every session of ``sources`` to ``target`` while no step is taken (a short pause)."""
    registry.steps_open.clear()
    started = time.perf_counter()
    moved = 0
    try:
        for source in sources:
            if not len(source.table):
                continue
            await source.drain()
            async with source.step_lock, target.step_lock:
                moved += move_sessions(source, target)
    finally:
        registry.steps_open.set()
        registry.last_pause_s = time.perf_counter() - started
    return moved
