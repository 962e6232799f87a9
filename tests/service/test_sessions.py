"""The session table on its own: ids, slots, step numbers, expiry, eviction."""

from __future__ import annotations

import time

import numpy as np
import pytest

from service.api.errors import status_of
from service.core.errors import ServiceError
from service.core.session_table import SessionTable


def table(capacity: int = 4, *, ttl: float = 60.0, evict_idle: float = 60.0) -> SessionTable:
    return SessionTable(capacity, act_dim=2, default_ttl_s=ttl, evict_idle_s=evict_idle)


def test_ids_are_random_128_bit_hex_and_slots_distinct() -> None:
    t = table()
    made = [t.create(deterministic=True, seed=None, ttl_s=None) for _ in range(4)]
    ids = [sid for sid, _ in made]
    assert all(len(sid) == 32 and int(sid, 16) >= 0 for sid in ids)
    assert len(set(ids)) == 4
    assert sorted(slot for _, slot in made) == [0, 1, 2, 3]
    assert len(t) == 4


def test_new_session_starts_an_episode_on_a_cleared_window() -> None:
    t = table()
    _, slot = t.create(deterministic=False, seed=7, ttl_s=5.0)
    assert t.pending_start[slot] and t.pending_clear[slot]
    assert t.expected_step(slot) == 0
    assert not t.deterministic[slot] and t.seed[slot] == 7 and t.ttl_s[slot] == 5.0


def test_delete_frees_the_slot_and_forgets_the_id() -> None:
    t = table(capacity=1)
    sid, slot = t.create(deterministic=True, seed=None, ttl_s=None)
    t.delete(sid)
    assert t.find(sid) is None
    with pytest.raises(ServiceError) as err:
        t.delete(sid)
    assert err.value.code == "unknown_session"
    _, again = t.create(deterministic=True, seed=None, ttl_s=None)
    assert again == slot


def test_a_slot_with_queued_steps_is_reused_only_after_they_complete() -> None:
    t = table(capacity=1, evict_idle=0.0)
    sid, slot = t.create(deterministic=True, seed=None, ttl_s=None)
    generation, _, _, _ = t.begin_step(slot, 0, 0)
    t.delete(sid)
    assert t.generation[slot] == generation + 1
    with pytest.raises(ServiceError) as err:
        t.create(deterministic=True, seed=None, ttl_s=None)
    assert err.value.code == "capacity_exhausted"
    slots = np.array([slot])
    t.commit(slots, t.alive(slots, np.array([generation])), np.array([True]), np.zeros((1, 2), np.float32))
    assert t.next_step[slot] == 0  # the ended session's step is not counted
    _, again = t.create(deterministic=True, seed=None, ttl_s=None)
    assert again == slot


def test_a_step_begins_then_commits_or_rolls_back() -> None:
    t = table()
    _, slot = t.create(deterministic=True, seed=None, ttl_s=None)
    slots = np.array([slot])
    generation, pending, clear, context = t.begin_step(slots, 7, np.array([3]))
    assert pending.tolist() == [True] and clear.tolist() == [True]
    assert t.expected_step(slot) == 1 and t.last_batch[slot] == 7 and t.last_row[slot] == 3
    assert not t.pending_start[slot] and not t.pending_clear[slot]
    t.roll_back(slots, generation, pending, clear, context)
    assert t.expected_step(slot) == 0 and t.pending_start[slot] and t.pending_clear[slot]
    generation, pending, clear, _ = t.begin_step(slots, 8, np.array([0]))
    t.commit(slots, t.alive(slots, generation), pending, np.ones((1, 2), np.float32))
    assert t.expected_step(slot) == 1 and t.episodes[slot] == 1 and t.episode_step[slot] == 1
    assert t.last_action[slot].tolist() == [1.0, 1.0]


def test_a_trial_context_is_counted_and_a_step_past_max_context_refused_with_nothing_changed() -> None:
    t = table()
    t.max_context = 2
    _, slot = t.create(deterministic=True, seed=None, ttl_s=None)
    slots = np.array([slot])
    for _ in range(2):
        generation, pending, clear, _ = t.begin_step(slots, 0, np.array([0]), np.array([False]))
        t.commit(slots, t.alive(slots, generation), pending, np.zeros((1, 2), np.float32))
    assert t.context[slot] == 2
    assert t.context_full(slots, np.array([True])).tolist() == [True]  # an episode start keeps the trial
    with pytest.raises(ServiceError) as err:
        t.check_context(slot, False)
    assert err.value.code == "context_full" and status_of(err.value) == 409
    assert err.value.detail["max_context"] == 2
    assert t.context[slot] == 2 and t.expected_step(slot) == 2 and t.queued[slot] == 0
    # A failed forward pass gives the count back; a trial reset starts the context again.
    t.reset(slot, "trial")
    assert t.context_full(slots, np.array([False])).tolist() == [False]
    generation, pending, clear, context = t.begin_step(slots, 1, np.array([0]), np.array([False]))
    assert t.context[slot] == 1
    t.roll_back(slots, generation, pending, clear, context)
    assert t.context[slot] == 2 and t.pending_clear[slot]
    t.check_context(slot, False)  # still allowed: the reset is pending again
    # With episode scope, an episode start starts the context again as well.
    t.episode_scope = True
    t.pending_clear[slot] = False
    t.pending_start[slot] = False
    assert t.context_full(slots, np.array([True])).tolist() == [False]
    assert t.context_full(slots, np.array([False])).tolist() == [True]


def test_sessions_move_to_another_table_with_their_counters() -> None:
    source, target = table(), table()
    sid, slot = source.create(deterministic=False, seed=5, ttl_s=9.0, owner="k")
    target.create(deterministic=True, seed=None, ttl_s=None)
    old, new = target.take_over(source)
    assert old.tolist() == [slot] and len(source) == 0 and source.find(sid) is None
    assert target.find(sid) == int(new[0]) and target.owners[int(new[0])] == "k"
    assert target.seed[new[0]] == 5 and target.ttl_s[new[0]] == 9.0 and target.pending_start[new[0]]
    with pytest.raises(ServiceError) as err:
        table(capacity=1).take_over(target)
    assert err.value.code == "capacity_exhausted"
    assert len(target) == 2  # nothing moved


def test_a_loaded_session_continues_from_its_counters_on_its_own_window() -> None:
    t = table()
    _, slot = t.create(deterministic=True, seed=None, ttl_s=None)
    t.load(
        np.array([slot]),
        steps=np.array([12]),
        episodes=np.array([2]),
        episode_start_pending=np.array([False]),
        deterministic=np.array([False]),
        seed=np.array([3]),
        ttl_s=np.array([30.0]),
        created_at=np.array([1.0]),
        last_action=np.ones((1, 2), np.float32),
        context=np.array([5]),
    )
    assert t.expected_step(slot) == 12 and t.episodes[slot] == 2 and t.context[slot] == 5
    assert not t.pending_start[slot] and not t.pending_clear[slot]
    assert not t.deterministic[slot] and t.seed[slot] == 3 and t.ttl_s[slot] == 30.0


@pytest.mark.parametrize(("step", "retry"), [(None, False), (3, False), (2, True)])
def test_step_numbers_next_or_retry_of_the_newest(step: int | None, retry: bool) -> None:
    t = table()
    _, slot = t.create(deterministic=True, seed=None, ttl_s=None)
    t.next_step[slot] = 3
    assert t.check_step(slot, step) is retry


@pytest.mark.parametrize("step", [0, 1, 4, 100])
def test_step_behind_or_ahead_is_a_conflict_naming_the_expected_step(step: int) -> None:
    t = table()
    _, slot = t.create(deterministic=True, seed=None, ttl_s=None)
    t.next_step[slot] = 3
    with pytest.raises(ServiceError) as err:
        t.check_step(slot, step)
    assert (status_of(err.value), err.value.code) == (409, "step_conflict")
    assert err.value.detail == {"expected_step": 3, "got_step": step}


def test_queued_steps_count_towards_the_expected_step() -> None:
    t = table()
    _, slot = t.create(deterministic=True, seed=None, ttl_s=None)
    t.next_step[slot] = 3
    t.queued[slot] = 2
    assert t.expected_step(slot) == 5
    assert t.check_step(slot, 4) is True


def test_idle_sessions_expire_after_their_own_ttl() -> None:
    t = table(ttl=60.0)
    short, _ = t.create(deterministic=True, seed=None, ttl_s=0.01)
    long, _ = t.create(deterministic=True, seed=None, ttl_s=None)
    time.sleep(0.03)
    assert t.find(short) is None  # expired lazily on lookup
    assert t.find(long) is not None
    assert t.expirations == 1


def test_sweep_expires_in_bulk_but_not_sessions_with_queued_steps() -> None:
    t = table(ttl=0.01)
    made = [t.create(deterministic=True, seed=None, ttl_s=None) for _ in range(3)]
    t.queued[made[0][1]] = 1
    time.sleep(0.03)
    assert t.expire() == 2
    assert len(t) == 1


def test_full_table_evicts_the_least_recently_used_idle_session() -> None:
    t = table(capacity=2, evict_idle=0.0)
    first, _ = t.create(deterministic=True, seed=None, ttl_s=None)
    second, s2 = t.create(deterministic=True, seed=None, ttl_s=None)
    t.last_active[s2] -= 10  # second is now the least recently used
    third, s3 = t.create(deterministic=True, seed=None, ttl_s=None)
    assert s3 == s2
    assert t.find(second) is None and t.find(first) is not None and t.find(third) is not None
    assert t.evictions == 1


def test_full_table_without_an_idle_session_refuses_with_429() -> None:
    t = table(capacity=2, evict_idle=60.0)
    t.create(deterministic=True, seed=None, ttl_s=None)
    t.create(deterministic=True, seed=None, ttl_s=None)
    with pytest.raises(ServiceError) as err:
        t.create(deterministic=True, seed=None, ttl_s=None)
    assert (status_of(err.value), err.value.code) == (429, "capacity_exhausted")
    assert len(t) == 2


def test_reset_marks_an_episode_start_and_a_trial_reset_also_clears() -> None:
    t = table()
    _, slot = t.create(deterministic=True, seed=None, ttl_s=None)
    t.pending_start[slot] = t.pending_clear[slot] = False
    t.reset(slot, "episode")
    assert t.pending_start[slot] and not t.pending_clear[slot]
    t.reset(slot, "trial")
    assert t.pending_start[slot] and t.pending_clear[slot]
