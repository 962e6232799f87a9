"""The engine without HTTP: batched steps against a one-session-at-a-time reference, tick rules,
failures, and the event loop staying responsive while the model computes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.api.errors import status_of
from service.core.engine import Engine, EngineLimits
from service.core.errors import ServiceError
from trmrl.checkpoint import load_checkpoint
from trmrl.policy import act, counter_normal
from trmrl.slot_pool import SlotPool

pytestmark = pytest.mark.anyio


def limits(**overrides: Any) -> EngineLimits:
    base = {
        "max_sessions": 64,
        "max_batch": 256,
        "batch_wait_s": 0.0,
        "session_ttl_s": 60.0,
        "evict_idle_s": 60.0,
    }
    return EngineLimits(**{**base, **overrides})


@pytest.fixture
async def engine(checkpoints: dict[str, Path]) -> AsyncIterator[Engine]:
    e = Engine("point-nav", load_checkpoint(checkpoints["point-nav"]), limits(), torch.device("cpu"))
    e.warmup()
    await e.start()
    yield e
    await e.stop()


class Reference:
    """One session stepped alone through its own pool: what the engine must reproduce in a batch."""

    def __init__(self, engine: Engine, deterministic: bool, seed: int) -> None:
        self.pool = SlotPool(engine.model, 1)
        self.engine, self.deterministic, self.seed, self.steps = engine, deterministic, seed, 0

    @torch.no_grad()
    def step(self, obs: np.ndarray, reward: float, start: bool, applied: list[float] | None) -> np.ndarray:
        noise = None
        if not self.deterministic:
            noise = counter_normal(torch.tensor([self.seed]), torch.tensor([self.steps]), self.engine.act_dim)
        result = act(
            self.pool,
            torch.zeros(1, dtype=torch.long),
            torch.as_tensor(obs, dtype=torch.float32)[None],
            torch.tensor([reward], dtype=torch.float32),
            torch.tensor([start or self.steps == 0]),
            low=self.engine.low,
            high=self.engine.high,
            deterministic=self.deterministic,
            noise=noise,
            applied_action=None if applied is None else torch.tensor([applied], dtype=torch.float32),
        )
        self.steps += 1
        return result.actions[0].numpy()


def new(engine: Engine, *, deterministic: bool = True, seed: int | None = None) -> int:
    _, slot = engine.table.create(deterministic=deterministic, seed=seed, ttl_s=None)
    return slot


async def test_batched_steps_equal_each_session_stepped_alone(
    engine: Engine, rng: np.random.Generator
) -> None:
    specs = [(True, 0), (True, 0), (False, 11), (False, 12), (True, 0), (False, 13)]
    slots = [new(engine, deterministic=d, seed=s) for d, s in specs]
    refs = [Reference(engine, d, s) for d, s in specs]
    steps = [0] * len(slots)
    for _tick in range(40):
        chosen = rng.choice(len(slots), size=rng.integers(1, len(slots) + 1), replace=False)
        tickets, wanted = [], []
        for i in chosen:
            obs = rng.normal(size=2).astype(np.float32)
            reward = float(rng.normal())
            start = bool(rng.random() < 0.1)
            applied = rng.uniform(-0.1, 0.1, size=2).tolist() if rng.random() < 0.2 else None
            tickets.append(engine.submit(slots[i], obs, reward, start, steps[i], applied))
            wanted.append(refs[i].step(obs, reward, start, applied))
            steps[i] += 1
        got = [await t.action() for t in tickets]
        np.testing.assert_allclose(np.stack(got), np.stack(wanted), atol=1e-6)
    assert engine.table.next_step[slots].tolist() == steps


async def test_one_forward_pass_per_tick_however_many_sessions_wait(engine: Engine) -> None:
    slots = [new(engine) for _ in range(40)]
    ticks = engine.ticks
    tickets = [engine.submit(s, np.zeros(2, np.float32), 0.0, False, None, None) for s in slots]
    await asyncio.gather(*(t.action() for t in tickets))
    assert engine.ticks == ticks + 1
    assert engine.table.next_step[slots].tolist() == [1] * 40


async def test_max_batch_bounds_a_forward_pass(checkpoints: dict[str, Path]) -> None:
    e = Engine(
        "point-nav", load_checkpoint(checkpoints["point-nav"]), limits(max_batch=8), torch.device("cpu")
    )
    await e.start()
    try:
        tickets = [e.submit(new(e), np.zeros(2, np.float32), 0.0, False, None, None) for _ in range(20)]
        await asyncio.gather(*(t.action() for t in tickets))
        assert e.ticks == 3
    finally:
        await e.stop()


async def test_two_steps_of_one_session_go_to_consecutive_ticks_in_order(engine: Engine) -> None:
    slot, other = new(engine), new(engine)
    ref = Reference(engine, True, 0)
    obs = [np.array([0.1, 0.2], np.float32), np.array([-0.3, 0.4], np.float32)]
    ticks = engine.ticks
    first = engine.submit(slot, obs[0], 0.0, True, 0, None)
    second = engine.submit(slot, obs[1], 1.0, False, 1, None)
    third = engine.submit(other, obs[0], 0.0, True, 0, None)  # joins the first tick
    got = [await t.action() for t in (first, second, third)]
    assert engine.ticks == ticks + 2
    assert (first.step, second.step) == (0, 1)
    np.testing.assert_allclose(got[0], ref.step(obs[0], 0.0, True, None), atol=1e-6)
    np.testing.assert_allclose(got[1], ref.step(obs[1], 1.0, False, None), atol=1e-6)
    np.testing.assert_allclose(got[2], got[0], atol=1e-6)


async def test_a_retry_of_a_queued_step_shares_its_result(engine: Engine) -> None:
    slot = new(engine)
    obs = np.array([0.5, -0.5], np.float32)
    first = engine.submit(slot, obs, 0.0, True, 0, None)
    retry = engine.submit(slot, obs, 0.0, True, 0, None)
    a, b = await first.action(), await retry.action()
    np.testing.assert_array_equal(a, b)
    assert engine.table.next_step[slot] == 1
    later = engine.submit(slot, obs, 0.0, True, 0, None)  # answered from the cache
    np.testing.assert_array_equal(await later.action(), a)


async def test_the_event_loop_keeps_running_while_the_model_computes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = engine.pool.step
    computing, loop_ran = threading.Event(), threading.Event()
    released: list[bool] = []

    def slow_step(*args: Any, **kwargs: Any) -> Any:
        computing.set()
        # Only the event loop releases the forward pass: if the pass blocked the loop, nothing
        # would, and the wait would time out (no timing luck either way: the timeout is only the
        # failure's cost).
        released.append(loop_ran.wait(timeout=60))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine.pool, "step", slow_step)
    ticket = engine.submit(new(engine), np.zeros(2, np.float32), 0.0, False, None, None)
    waiting = asyncio.ensure_future(ticket.action())
    while not computing.is_set():
        await asyncio.sleep(0.001)
    loop_ran.set()  # the loop runs while the forward pass is in progress
    await waiting
    assert released == [True]


async def test_a_failed_forward_pass_leaves_sessions_as_they_were(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = new(engine)
    ref = Reference(engine, True, 0)
    obs = np.array([0.2, 0.1], np.float32)
    real_step = engine.pool.step
    monkeypatch.setattr(
        engine.pool, "step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
    )
    ticket = engine.submit(slot, obs, 0.0, False, 0, None)
    with pytest.raises(ServiceError) as err:
        await ticket.action()
    assert (status_of(err.value), err.value.code) == (500, "internal_error")
    assert engine.table.next_step[slot] == 0 and engine.table.queued[slot] == 0
    assert engine.table.pending_start[slot] and engine.table.pending_clear[slot]
    monkeypatch.setattr(engine.pool, "step", real_step)
    again = engine.submit(slot, obs, 0.0, False, 0, None)
    np.testing.assert_allclose(await again.action(), ref.step(obs, 0.0, True, None), atol=1e-6)
    assert engine.table.episodes[slot] == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # the eager step, and the fixed-shape one
async def test_steps_queued_behind_a_failed_one_are_refused_too_and_the_session_is_as_before(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    engine = Engine(
        "point-nav",
        load_checkpoint(checkpoints["point-nav"]),
        limits(precision=precision),
        torch.device("cpu"),
    )
    engine.warmup()
    await engine.start()
    try:
        await _queued_behind_a_failure(engine, monkeypatch, atol=1e-6 if precision == "fp32" else 2e-2)
    finally:
        await engine.stop()


async def _queued_behind_a_failure(engine: Engine, monkeypatch: pytest.MonkeyPatch, atol: float) -> None:
    slot, neighbour = new(engine), new(engine)
    ref, alone = Reference(engine, True, 0), Reference(engine, True, 0)
    obs = [np.array([0.2 * t, 0.1 - 0.05 * t], np.float32) for t in range(4)]
    first = await engine.submit(slot, obs[0], 0.0, True, 0, None).action()
    np.testing.assert_allclose(first, ref.step(obs[0], 0.0, True, None), atol=atol)
    real_run = engine.batcher.compute
    failures = [RuntimeError("device lost")]

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real_run(*args, **kwargs)

    monkeypatch.setattr(engine.batcher, "compute", fail_once)
    # Steps 1, 2 and 3 of the session queued at once (three batches: a batch holds one step of a
    # session); the first pass fails, and the two after it build on its step: refused too, though
    # their passes run, and the session's memory keeps step 0 alone. The neighbour's step in the second
    # batch is served.
    tickets = [engine.submit(slot, obs[t], 0.5, False, t, None) for t in (1, 2, 3)]
    other = engine.submit(neighbour, obs[0], 0.0, True, 0, None)
    for ticket in tickets:
        with pytest.raises(ServiceError) as err:
            await ticket.action()
        assert err.value.code == "internal_error"
    np.testing.assert_allclose(await other.action(), alone.step(obs[0], 0.0, True, None), atol=atol)
    assert engine.table.next_step[slot] == 1 and engine.table.queued[slot] == 0
    assert int(engine.pool.lengths[slot]) == 1
    # Resent, the steps give what the session stepped alone gives.
    for t in (1, 2, 3):
        got = await engine.submit(slot, obs[t], 0.5, False, t, None).action()
        np.testing.assert_allclose(got, ref.step(obs[t], 0.5, False, None), atol=atol)


async def test_a_slot_ended_with_a_step_in_flight_is_not_reused_until_it_completes(engine: Engine) -> None:
    sid, slot = engine.table.create(deterministic=True, seed=None, ttl_s=None)
    ticket = engine.submit(slot, np.zeros(2, np.float32), 0.0, False, None, None)
    engine.table.delete(sid)
    _, other = engine.table.create(deterministic=True, seed=None, ttl_s=None)
    assert other != slot
    await ticket.action()
    assert engine.table.next_step[slot] == 0  # the ended session's result was not committed
    assert slot in engine.table._free


async def test_warmup_leaves_the_pool_empty(checkpoints: dict[str, Path]) -> None:
    e = Engine("point-nav", load_checkpoint(checkpoints["point-nav"]), limits(), torch.device("cpu"))
    e.warmup()
    memory = e.pool.read(torch.arange(e.pool.capacity))
    assert not any(tensor.any() for tensor in memory)


async def test_stop_finishes_queued_steps(checkpoints: dict[str, Path]) -> None:
    e = Engine("point-nav", load_checkpoint(checkpoints["point-nav"]), limits(), torch.device("cpu"))
    await e.start()
    tickets = [e.submit(new(e), np.zeros(2, np.float32), 0.0, False, None, None) for _ in range(5)]
    waiting = asyncio.gather(*(t.action() for t in tickets))
    await e.stop()
    assert len(await waiting) == 5


def test_device_memory_per_session_is_the_slot(checkpoints: dict[str, Path]) -> None:
    e = Engine("point-nav", load_checkpoint(checkpoints["point-nav"]), limits(), torch.device("cpu"))
    cfg = e.model.config
    assert e.bytes_per_session == 4 * (cfg.window * cfg.token_dim + cfg.act_dim) + 8


async def test_a_cancelled_request_does_not_cancel_the_rest_of_its_batch(engine: Engine) -> None:
    tickets = [engine.submit(new(engine), np.zeros(2, np.float32), 0.0, False, None, None) for _ in range(3)]
    waiting = [asyncio.ensure_future(t.action()) for t in tickets]
    await asyncio.sleep(0)
    waiting[0].cancel()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(isinstance(r, np.ndarray) and r.shape == (2,) for r in results[1:])
