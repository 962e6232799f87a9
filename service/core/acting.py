"""Acting across versions: one step of one session, a list of them, or a columnar tick of many.

Each step goes to the version its session lives on (a canary, a version not migrated from), through
that version's batcher; a step that fails answers with its own error and leaves its session as it
was. While sessions move between versions (:mod:`service.core.migration`) new steps wait.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from trmrl_client.codec import INPUT_LIMIT, within_limit

from service.core import errors
from service.core.batcher import RowTickets, Ticket
from service.core.engine import Engine
from service.core.errors import ServiceError
from service.core.records import ActResult, ColumnarResult, ColumnarTick, Step
from service.core.registry import ModelRegistry


def submit(registry: ModelRegistry, request: Step, owner: str | None = None) -> tuple[Engine, str, Ticket]:
    """Validate and queue one act request, creating its session when it names none.

    Every check runs before anything changes: a refused request leaves its session (or the
    session table, for a would-be new session) exactly as it was.
    """
    if request.session_id is not None:
        engine, slot = registry.find(request.session_id, owner)
        session_id = request.session_id
    else:
        if registry.draining:
            raise errors.draining()
        engine = registry.engine_for_new_session(request.model)
        slot = -1
        session_id = ""
    try:
        obs = engine.validate(request.observation, request.reward, request.applied_action)
    except ServiceError as exc:
        if request.session_id is None and request.model is None:
            raise errors.checked_against_default(exc, engine.name, list(registry.engines)) from None
        raise
    if slot < 0:
        if request.step not in (None, 0):
            raise errors.step_conflict(0, request.step)
        if engine.queued_steps >= engine.limits.max_queued_steps:
            raise errors.overloaded(engine.limits.max_queued_steps)
        session_id, slot = engine.table.create(
            deterministic=True, seed=None, ttl_s=None, owner=owner, record=registry.records(False)
        )
    ticket = engine.submit(
        slot, obs, request.reward, request.episode_start, request.step, request.applied_action
    )
    return engine, session_id, ticket


async def act(registry: ModelRegistry, request: Step, started_ns: int, owner: str | None = None) -> ActResult:
    """One act request, start to finish."""
    if not registry.steps_open.is_set():  # sessions are moving between versions: wait for them
        await registry.steps_open.wait()
    engine, session_id, ticket = submit(registry, request, owner)
    action = await ticket.action()
    return _result(engine, session_id, ticket.step, action.tolist(), started_ns)


async def act_batch(
    registry: ModelRegistry, requests: Sequence[Step], started_ns: int, owner: str | None = None
) -> list[ActResult | ServiceError]:
    """Many act requests: all queued first (so they share a forward pass), then awaited in order."""
    await registry.steps_allowed()
    queued: list[tuple[Engine, str, Ticket] | ServiceError] = []
    for request in requests:
        try:
            queued.append(submit(registry, request, owner))
        except ServiceError as exc:
            queued.append(exc)
    results: list[ActResult | ServiceError] = []
    for item in queued:
        if isinstance(item, ServiceError):
            results.append(item)
            continue
        engine, session_id, ticket = item
        try:
            action = await ticket.action()
        except ServiceError as exc:
            results.append(exc)
            continue
        results.append(_result(engine, session_id, ticket.step, action.tolist(), started_ns))
    return results


def _tick_engine(registry: ModelRegistry, tick: ColumnarTick, model: str | None) -> Engine:
    """The model a tick steps: the one it (or its stream) names, else the first named session's.

    Sessions of that model on another of its versions (a canary, a version not migrated from)
    are stepped by their own version in the same tick.
    """
    name = tick.model if tick.model is not None else model
    if name is not None or len(registry.all_engines()) == 1:
        return registry.engine(name)
    for session_id in tick.session_ids:
        for engine in registry.all_engines():
            if session_id in engine.table.ids:
                return registry.engines[engine.name]
    return registry.engine(None)


async def act_columnar(
    registry: ModelRegistry,
    tick: ColumnarTick,
    started_ns: int,
    owner: str | None = None,
    model: str | None = None,
) -> ColumnarResult:
    """One step of each session of a columnar tick; every row gets its action or its own error.

    The tick steps one model (``model``: the stream's, when the tick names none), each session
    on its own version of it. A row that fails -- a number out of float32's range, an unknown
    session or one of another model, a step conflict, a session whose trial context is full -- gets
    NaN actions and an error, and its
    session is untouched; the other rows are served. A tick whose shapes do not fit the model is
    refused as a whole (422).
    """
    await registry.steps_allowed()
    engine = _tick_engine(registry, tick, model)
    rows = tick.size
    obs = tick.observations
    if obs.shape[1] != engine.obs_dim:
        raise errors.wrong_length("observation", engine.obs_dim, int(obs.shape[1]))
    applied = tick.applied_actions
    if applied is not None and applied.shape[1] != engine.act_dim:
        raise errors.wrong_length("applied_action", engine.act_dim, int(applied.shape[1]))
    failed: dict[int, ServiceError] = {}

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
            other = registry.locate(session_id)
            if other is None or other[0].table.owners[other[1]] != owner:
                failed[row] = errors.unknown_session(session_id)
            elif other[0].name == engine.name:
                elsewhere.setdefault(other[0].version, []).append((row, other[1]))
            else:
                failed[row] = ServiceError(
                    "model_mismatch",
                    f"Session {session_id} runs model {other[0].name!r}, not {engine.name!r}.",
                    {"session_id": session_id, "session_model": other[0].name, "model": engine.name},
                )
        ok &= ~missing
        for version, found in elsewhere.items():
            at = np.asarray(found, np.int64)
            groups.append((registry.versions[engine.name][version], at[:, 0], at[:, 1]))
    take = np.flatnonzero(ok)
    groups.insert(0, (engine, take, slots[take]))
    given = tick.steps
    with np.errstate(over="ignore", invalid="ignore"):
        obs32 = obs.astype(np.float32, copy=False)
        applied32 = None if applied is None else applied.astype(np.float32, copy=False)
        rewards32 = np.zeros(rows, np.float32) if rewards is None else rewards.astype(np.float32, copy=False)
    starts = tick.episode_starts if tick.episode_starts is not None else np.zeros(rows, bool)
    submitted: list[tuple[np.ndarray, RowTickets, Engine]] = []
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
                owner_engine,
            )
        )
    actions = np.full((rows, engine.act_dim), np.nan, np.float32)
    steps = np.full(rows, -1, np.int64) if given is None else given.copy()
    for picked, tickets, stepped in submitted:
        answered = tickets.steps
        if tickets.conflict.any():
            assert given is not None  # only a given step number can conflict
            answered = answered.copy()
            for index in np.flatnonzero(tickets.conflict).tolist():
                row = int(picked[index])
                failed[row] = errors.step_conflict(int(tickets.steps[index]), int(given[row]))
                answered[index] = given[row]
        steps[picked] = answered
        for index in np.flatnonzero(tickets.full).tolist():
            row = int(picked[index])
            failed[row] = errors.context_full(tick.session_ids[row], stepped.table.max_context)
        if len(tickets.cached_rows):
            actions[picked[tickets.cached_rows]] = tickets.cached
        for future, part, batch_rows in tickets.parts:
            try:
                computed = await future
            except ServiceError as exc:
                for row in picked[part].tolist():
                    failed[row] = exc
                continue
            actions[picked[part]] = computed.actions[batch_rows]
            if computed.refused is not None and computed.refused[batch_rows].any():
                refused = computed.refused[batch_rows]
                for row, batch_row in zip(
                    picked[part][refused].tolist(), batch_rows[refused].tolist(), strict=True
                ):
                    failed[row] = computed.error_of(batch_row)
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


def _result(engine: Engine, session_id: str, step: int, action: list[float], started_ns: int) -> ActResult:
    """The answer to one step, timed from ``started_ns`` (the API turns it into a reply)."""
    return ActResult(
        session_id=session_id,
        step=step,
        action=action,
        model_version=engine.version,
        server_timing_us=(time.perf_counter_ns() - started_ns) // 1000,
    )
