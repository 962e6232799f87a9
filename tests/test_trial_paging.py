"""The trial pool's paged key/value cache: blocks taken as contexts grow, returned and reused, counted."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from trial_support import assert_step_equals_full_re_encode

from trmrl.model import ModelConfig, TrMRL
from trmrl.slot_pool import SlotMemory
from trmrl.trial_pool import CacheExhausted, ContextFull, TrialPool

OBS, ACT = 3, 2


def _net(seed: int = 0, **kw: Any) -> TrMRL:
    values: dict[str, Any] = {"context": "trial", "window": 1, "max_context": 40, **kw}
    torch.manual_seed(seed)
    net = TrMRL(ModelConfig.from_preset("small", obs_dim=OBS, act_dim=ACT, **values)).eval()
    with torch.no_grad():
        net.obs_mean.copy_(torch.randn(OBS) * 0.3)
        net.obs_std.copy_(torch.rand(OBS) + 0.5)
    return net


def _step(pool: TrialPool, slots: list[int], start: list[bool], **kw: Any) -> torch.Tensor:
    n = len(slots)
    with torch.no_grad():
        out = pool.step(torch.tensor(slots), torch.randn(n, OBS), torch.randn(n), torch.tensor(start), **kw)
    pool.record_actions(torch.tensor(slots), out.output.mean)
    return out.output.mean


def _state(pool: TrialPool) -> list[torch.Tensor]:
    """Everything a refused call must leave as it was."""
    memory = pool.read(torch.arange(pool.capacity))
    return [*memory, pool.table.clone(), pool.held.clone(), *(t.clone() for t in (*pool.keys, *pool.values))]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "variant",
    [
        {"memory_scope": "trial"},
        {"memory_scope": "episode"},
        {"memory_scope": "trial", "value_input": "encoder"},
    ],
    ids=lambda v: "-".join(map(str, v.values())),
)
def test_every_paged_step_equals_a_full_re_encode_with_resets_interleaved(variant: dict[str, Any]) -> None:
    """Sessions at different lengths, stepping out of turn across block boundaries (block_size 4), some
    cleared (a new trial, by ``clear`` or by the step's ``clear`` mask) mid-way; the store starts small
    and grows while they run."""
    net = _net(**variant)
    episode_scope = variant["memory_scope"] == "episode"
    capacity, episode = 6, 9
    pool = TrialPool(net, capacity, block_size=4)
    assert pool.blocks == 1 + capacity
    rng = np.random.default_rng(1)
    contexts: dict[int, list[torch.Tensor]] = {s: [] for s in range(capacity)}
    steps = {s: int(rng.integers(0, 2 * episode)) for s in range(capacity)}  # different trial lengths
    for s in range(capacity):  # each slot starts part-way through its trial, its memories written
        length = steps[s] % episode if episode_scope else steps[s]
        windows = torch.zeros(1, 40, net.config.token_dim)
        windows[0, :length] = torch.randn(length, net.config.token_dim)
        pool.write(torch.tensor([s]), SlotMemory(windows, torch.tensor([length]), torch.zeros(1, ACT)))
        contexts[s] = list(windows[0, :length])
    checked = resets = 0
    for tick in range(60):
        stepping = [s for s in range(capacity) if rng.random() < 0.75]
        if not stepping:
            continue
        if tick in (20, 41):  # a new trial for one slot between steps, for another inside a step
            pool.clear(torch.tensor([stepping[0]]))
            contexts[stepping[0]], steps[stepping[0]] = [], 0
            resets += 1
        cleared = [tick == 30 and i == len(stepping) - 1 for i in range(len(stepping))]
        for s, c in zip(stepping, cleared, strict=True):
            if c:
                contexts[s], steps[s] = [], 0
        start = [steps[s] % episode == 0 for s in stepping]
        slots = torch.tensor(stepping)
        with torch.no_grad():
            result = pool.step(
                slots,
                torch.randn(len(stepping), OBS),
                torch.randn(len(stepping)),
                torch.tensor(start),
                clear=torch.tensor(cleared),
            )
        pool.record_actions(slots, result.output.mean + 0.1 * torch.randn(len(stepping), ACT))
        for i, s in enumerate(stepping):
            if episode_scope and start[i]:
                contexts[s] = []
            contexts[s].append(result.windows[i, 0])
            steps[s] = steps[s] + 1 if steps[s] + 1 < 2 * episode else 0
            assert_step_equals_full_re_encode(net, contexts[s], result, i)
            checked += 1
            if steps[s] == 0:  # the trial is over: a new one
                pool.clear(torch.tensor([s]))
                contexts[s] = []
        # Every slot holds exactly the blocks its context needs, no block twice, and the rest are free.
        held = (pool.lengths + 3) // 4
        assert torch.equal(pool.held, held)
        owned = torch.cat([pool.table[s, : int(held[s])] for s in range(capacity)])
        assert len(set(owned.tolist())) == len(owned) and 0 not in owned.tolist()
        assert int(held.sum()) + pool.free_blocks == pool.blocks - 1
    assert checked > 200 and resets == 2
    assert pool.blocks > 1 + capacity  # the store grew on demand


def test_blocks_go_back_on_clear_and_a_new_trial_and_are_handed_out_again_zeroed() -> None:
    net = _net()
    pool = TrialPool(net, 4, block_size=4, blocks=12)
    for t in range(10):  # slot 0: 10 memories in 3 blocks
        _step(pool, [0], [t == 0])
    first = pool.table[0, :3].tolist()
    assert pool.held.tolist() == [3, 0, 0, 0] and pool.free_blocks == 9
    # Something a session must never see again (a NaN its network produced, say) in its blocks.
    for store in (*pool.keys, *pool.values):
        store[pool.table[0, :3]] = float("nan")
    pool.clear(torch.tensor([0]))
    assert (
        pool.held.tolist() == [0, 0, 0, 0] and pool.free_blocks == 12 and int(pool.table[0].abs().sum()) == 0
    )
    for t in range(10):  # slot 2 takes the same blocks, zeroed: its steps equal a full re-encode
        mean = _step(pool, [2], [t == 0])
        assert torch.isfinite(mean).all()
    assert sorted(pool.table[2, :3].tolist()) == sorted(first) and pool.blocks == 13
    window = pool.read(torch.tensor([2])).windows[:, :10]
    with torch.no_grad():
        torch.testing.assert_close(mean[0], net(window, torch.tensor([9])).mean[0], atol=1e-5, rtol=1e-5)
    # A step's clear mask starts a new trial: the slot keeps its first block and returns the others.
    _step(pool, [2], [True], clear=torch.tensor([True]))
    assert pool.held[2] == 1 and int(pool.table[2, 0]) in first
    assert pool.free_blocks == 11 and pool.lengths[2] == 1


def test_memory_held_grows_with_the_trial_and_the_store_only_when_free_blocks_run_out() -> None:
    net = _net(max_context=40)
    pool = TrialPool(net, 3, block_size=8)
    block = pool.block_bytes
    # small preset: 2 layers x keys and values x 64 floats per position, and the working memory itself
    token = net.config.token_dim * 4
    assert block == 8 * (2 * 2 * 64 * 4 + token) and pool.cache_bytes_per_memory() == 2 * 2 * 64 * 4
    assert block == TrialPool.block_bytes_of(net, block_size=8)
    fixed = pool.bytes_at_length(0)
    # What a slot holds whatever its length: counters, previous action and table row -- no working
    # memories (they are in the blocks).
    assert fixed == 8 + net.config.act_dim * 4 + pool.table[0].numel() * 8 + 8
    assert pool.bytes_at_length(1) == pool.bytes_at_length(8) == fixed + block
    assert pool.bytes_at_length(9) == fixed + 2 * block
    assert pool.bytes_per_slot == pool.bytes_at_length(40) == fixed + 5 * block
    held = []
    for t in range(40):
        _step(pool, [0, 1], [t == 0, t == 0])
        held.append(int(pool.bytes_held(torch.tensor([0]))[0]))
        assert held[-1] == pool.bytes_at_length(t + 1)
    assert held == sorted(held) and held[0] == fixed + block and held[-1] == pool.bytes_per_slot
    assert int(pool.bytes_held(torch.tensor([2]))[0]) == fixed
    # 10 blocks held, the store grew from 4 (null block included) to what they need and no further
    # than an eighth more each time; device_bytes counts all of it.
    assert 11 <= pool.blocks <= 13
    assert pool.device_bytes >= 3 * fixed + pool.blocks * block
    before = pool.blocks
    pool.clear(torch.tensor([0, 1]))
    for t in range(40):  # the same again: the freed blocks serve, the store stays
        _step(pool, [1, 2], [t == 0, t == 0])
    assert pool.blocks == before


def test_a_fixed_budget_refuses_what_it_cannot_hold_and_changes_nothing() -> None:
    net = _net(max_context=40)
    pool = TrialPool(net, 3, block_size=4, blocks=5)
    for t in range(12):  # slot 0: 3 blocks
        _step(pool, [0], [t == 0])
    for t in range(8):  # slot 1: 2 blocks; the budget is spent
        _step(pool, [1], [t == 0])
    assert pool.free_blocks == 0
    before = _state(pool)
    with pytest.raises(CacheExhausted, match="needs 2 more block"):  # both open a block at once
        _step(pool, [0, 1], [False, False])
    assert _same(before, _state(pool))
    with pytest.raises(CacheExhausted):  # a fresh session has no first block either
        _step(pool, [2], [True])
    assert _same(before, _state(pool))
    # A write that needs more blocks than it frees is refused too, and changes nothing.
    memory = pool.read(torch.tensor([1]))
    with pytest.raises(CacheExhausted):
        pool.write(torch.tensor([2]), memory)
    assert _same(before, _state(pool))
    # Steps that need no new block go on; a clear makes room.
    pool.clear(torch.tensor([0]))
    assert pool.free_blocks == 3
    _step(pool, [1, 2], [False, True])
    assert pool.held.tolist() == [0, 3, 1]


def test_context_full_leaves_the_paged_pool_unchanged() -> None:
    net = _net(max_context=6)
    pool = TrialPool(net, 3, block_size=4)
    for t in range(6):
        _step(pool, [0], [t == 0])
    _step(pool, [1], [True])
    before = _state(pool)
    free = pool.free_blocks
    with pytest.raises(ContextFull, match=r"slots \[0\] hold max_context=6"):
        _step(pool, [0, 1], [False, False])
    assert _same(before, _state(pool)) and pool.free_blocks == free
    pool.clear(torch.tensor([0]))
    _step(pool, [0, 1], [True, False])
    assert pool.lengths[:2].tolist() == [1, 2] and pool.held[:2].tolist() == [1, 1]


def test_write_read_round_trip_and_rebuild_restore_the_cache() -> None:
    net = _net(value_input="encoder")
    pool = TrialPool(net, 5, block_size=4)
    for t in range(13):
        _step(pool, [0, 1], [t == 0, t == 0])
    for t in range(3):
        _step(pool, [3], [t == 0])
    memory = pool.read(torch.tensor([0, 1]))
    # Into slots that hold fewer (4) and more blocks than needed (3 holds 1, needs 4): exactly 4 each.
    _step(pool, [4], [True])
    for _ in range(30):
        _step(pool, [4], [False])
    assert pool.held[4] == 8
    pool.write(torch.tensor([3, 4]), memory)
    assert pool.held.tolist() == [4, 4, 0, 4, 4]
    assert _same(list(pool.read(torch.tensor([3, 4]))), list(memory))
    obs, reward, start = torch.randn(2, OBS), torch.randn(2), torch.tensor([False, False])
    with torch.no_grad():
        here = pool.step(torch.tensor([0, 1]), obs, reward, start).output
        there = pool.step(torch.tensor([3, 4]), obs, reward, start).output
    torch.testing.assert_close(here.mean, there.mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(here.value, there.value, atol=1e-6, rtol=1e-6)
    # The cache is derived state: spoilt, rebuild restores it from the working memories.
    length = int(pool.lengths[0])
    reference = _cache_of(pool, 0, length)
    for store in (*pool.keys, *pool.values):
        store[pool.table[0, :4]] = 7.0
    assert not any(torch.allclose(a, b) for a, b in zip(_cache_of(pool, 0, length), reference, strict=True))
    pool.rebuild(torch.tensor([0]))
    for got, want in zip(_cache_of(pool, 0, length), reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _cache_of(pool: TrialPool, slot: int, length: int) -> list[torch.Tensor]:
    """Each layer's keys, then values, of a slot's first ``length`` positions: ``[length, H, dh]``."""
    blocks = pool.table[slot, : int(pool.held[slot])]
    keys = [k[blocks].permute(0, 3, 1, 2) for k in pool.keys]  # [n, block_size, H, dh]
    values = [v[blocks].permute(0, 2, 1, 3) for v in pool.values]
    return [t.reshape(-1, *t.shape[2:])[:length] for t in (*keys, *values)]


def test_a_bfloat16_paged_cache_chooses_nearly_the_actions_of_float32() -> None:
    net = _net(max_context=120)
    with torch.no_grad():  # actions that span [-1, 1] (the initial output layer gives ~0.01)
        net.policy_mean[-1].weight.mul_(100.0)
    full = TrialPool(net, 4, block_size=16)
    half = TrialPool(net, 4, block_size=16, cache_dtype=torch.bfloat16)
    assert half.cache_bytes_per_memory() * 2 == full.cache_bytes_per_memory()  # working memories stay fp32
    assert full.block_bytes - half.block_bytes == 16 * half.cache_bytes_per_memory()
    slots = torch.arange(4)
    worst = spread = 0.0
    with torch.no_grad():
        for t in range(120):  # two 60-step episodes
            obs, reward = torch.randn(4, OBS), torch.randn(4)
            start = torch.full((4,), t % 60 == 0)
            a = full.step(slots, obs, reward, start).output.mean.clamp(-1, 1)
            b = half.step(slots, obs, reward, start).output.mean.clamp(-1, 1)
            full.record_actions(slots, a)
            half.record_actions(slots, a)  # the same contexts: each pool remembers fp32's actions
            worst = max(worst, float((a - b).abs().max()))
            spread = max(spread, float(a.abs().max()))
    assert spread > 0.5 and 0 < worst < 0.02, (spread, worst)


def test_an_empty_step_returns_nothing_and_changes_nothing() -> None:
    pool = TrialPool(_net(), 2, block_size=4)
    _step(pool, [1], [True])
    before = _state(pool)
    none = torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        out = pool.step(none, torch.zeros(0, OBS), torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert out.output.mean.shape == (0, ACT) and _same(before, _state(pool))


def test_starved_names_the_rows_a_fixed_budget_cannot_serve_earlier_rows_first() -> None:
    net = _net(max_context=40, memory_scope="trial")
    pool = TrialPool(net, 5, block_size=4, blocks=3)
    for t in range(4):  # slot 0: 4 memories, its one block full
        _step(pool, [0], [t == 0])
    _step(pool, [1], [True])  # slot 1: one memory in one block
    assert pool.free_blocks == 1
    slots, start = torch.tensor([2, 0, 1, 3]), torch.tensor([True, False, False, True])
    # Slot 2 (a new trial), slot 0 (at a block's end) and slot 3 (new) need a block; slot 1 has room.
    starved = pool.starved(slots, start)
    assert starved.tolist() == [False, True, False, True]
    before = _state(pool)
    _step(pool, [2, 1], [True, False])  # the served rows alone fit
    assert pool.free_blocks == 0 and not _same(before, _state(pool))
    # A trial-scope episode start does not restart the context: slot 0 still needs a block.
    assert pool.starved(torch.tensor([0]), torch.tensor([True])).tolist() == [True]
    # A cleared row restarts in the block it holds; a cleared slot with none needs one.
    clear = torch.tensor([True, True])
    assert pool.starved(torch.tensor([0, 4]), torch.tensor([True, True]), clear).tolist() == [False, True]
    # Under episode scope an episode start restarts the context in its first block.
    episodic = TrialPool(_net(max_context=40, memory_scope="episode"), 2, block_size=4, blocks=1)
    for t in range(4):
        _step(episodic, [0], [t == 0])
    assert episodic.starved(torch.tensor([0, 0]), torch.tensor([True, False])).tolist() == [False, True]
    # Without a budget the store grows: nothing is starved.
    growing = TrialPool(net, 5, block_size=4)
    assert not growing.starved(slots, start).any()
