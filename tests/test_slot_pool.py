"""The slot pool against an independent per-slot reference, and its window bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trmrl.memory import fit_windows
from trmrl.model import ModelConfig, TrMRL
from trmrl.slot_pool import SlotPool


class ReferenceSlot:
    """A plain-Python model of one slot's memory, written from the method's description."""

    def __init__(self, window: int, scope: str, act_dim: int) -> None:
        self.window, self.scope = window, scope
        self.tokens: list[np.ndarray] = []
        self.prev_action = np.zeros(act_dim, np.float32)

    def step(self, obs: np.ndarray, reward: float, start: bool, applied: np.ndarray | None) -> None:
        if applied is not None:
            self.prev_action = applied
        if start and self.scope == "episode":
            self.tokens = []
        done = 1.0 if (start and self.tokens) else 0.0
        if start:
            prev_a, prev_r = np.zeros_like(self.prev_action), 0.0
        else:
            prev_a, prev_r = self.prev_action, reward
        self.tokens.append(np.concatenate([obs, prev_a, [prev_r, done]]).astype(np.float32))
        self.tokens = self.tokens[-self.window :]

    def padded(self, token_dim: int) -> tuple[np.ndarray, int]:
        w = np.zeros((self.window, token_dim), np.float32)
        w[: len(self.tokens)] = np.stack(self.tokens)
        return w, len(self.tokens) - 1


@pytest.mark.parametrize("scope", ["episode", "trial"])
@pytest.mark.parametrize("window", [1, 3, 5])
def test_pool_equals_batch_of_full_windows_on_interleaved_multi_episode_trajectories(
    scope: str, window: int
) -> None:
    obs_dim, act_dim, n_slots, capacity = 3, 2, 12, 40
    cfg = ModelConfig.from_preset(
        "small", obs_dim=obs_dim, act_dim=act_dim, window=window, memory_scope=scope
    )
    net = TrMRL(cfg).eval()
    pool = SlotPool(net, capacity)
    rng = np.random.default_rng(1)
    slot_ids = rng.choice(capacity, n_slots, replace=False)
    refs = {int(s): ReferenceSlot(window, scope, act_dim) for s in slot_ids}
    started = set()
    checked_slides = 0
    for _tick in range(80):
        stepping = rng.choice(slot_ids, rng.integers(1, n_slots + 1), replace=False)
        obs = rng.normal(size=(len(stepping), obs_dim)).astype(np.float32)
        reward = rng.normal(size=len(stepping)).astype(np.float32)
        start = np.array([int(s) not in started or rng.random() < 0.08 for s in stepping])
        applied_mask = rng.random(len(stepping)) < 0.2
        applied = rng.normal(size=(len(stepping), act_dim)).astype(np.float32)
        with torch.no_grad():
            result = pool.step(
                torch.as_tensor(stepping),
                torch.as_tensor(obs),
                torch.as_tensor(reward),
                torch.as_tensor(start),
                torch.as_tensor(applied),
                torch.as_tensor(applied_mask),
            )
        actions = result.output.mean + 0.3 * torch.randn_like(result.output.mean)
        pool.record_actions(torch.as_tensor(stepping), actions)

        windows, newest = [], []
        for i, s in enumerate(stepping.tolist()):
            refs[s].step(obs[i], float(reward[i]), bool(start[i]), applied[i] if applied_mask[i] else None)
            refs[s].prev_action = actions[i].numpy().copy()
            started.add(s)
            w, n = refs[s].padded(cfg.token_dim)
            windows.append(w)
            newest.append(n)
            checked_slides += n == window - 1
        expected_windows = torch.as_tensor(np.stack(windows))
        expected_newest = torch.as_tensor(newest)
        torch.testing.assert_close(result.windows, expected_windows, rtol=0, atol=0)
        torch.testing.assert_close(result.newest, expected_newest)
        with torch.no_grad():
            reference = net(expected_windows, expected_newest)
        torch.testing.assert_close(result.output.mean, reference.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(result.output.value, reference.value, rtol=0, atol=1e-5)
    assert checked_slides > 50  # the windows really filled and slid


def _pool(window: int = 3, scope: str = "episode") -> SlotPool:
    cfg = ModelConfig.from_preset("small", obs_dim=2, act_dim=1, window=window, memory_scope=scope)
    return SlotPool(TrMRL(cfg).eval(), capacity=4)


def _step(pool: SlotPool, slot: int, obs: float, reward: float = 0.0, start: bool = False) -> None:
    with torch.no_grad():
        pool.step(
            torch.tensor([slot]), torch.full((1, 2), obs), torch.tensor([reward]), torch.tensor([start])
        )
    pool.record_actions(torch.tensor([slot]), torch.tensor([[obs * 10]]))


def test_window_fills_then_slides_dropping_the_oldest() -> None:
    pool = _pool(window=3)
    _step(pool, 2, 1.0, start=True)
    assert pool.lengths.tolist() == [0, 0, 1, 0]
    _step(pool, 2, 2.0, reward=0.5)
    _step(pool, 2, 3.0, reward=0.7)
    assert pool.lengths[2] == 3
    assert pool.windows[2, :, 0].tolist() == [1.0, 2.0, 3.0]
    _step(pool, 2, 4.0, reward=0.9)
    assert pool.lengths[2] == 3
    assert pool.windows[2, :, 0].tolist() == [2.0, 3.0, 4.0]
    # newest token: obs, previous action (10 * previous obs), previous reward, done flag
    assert pool.windows[2, 2].tolist() == pytest.approx([4.0, 4.0, 30.0, 0.9, 0.0])
    # the first token of the episode carries zeros for action, reward and flag
    _step(pool, 1, 5.0, reward=3.0, start=True)
    assert pool.windows[1, 0].tolist() == [5.0, 5.0, 0.0, 0.0, 0.0]
    assert torch.count_nonzero(pool.windows[[0, 3]]) == 0  # untouched slots stay empty


def test_episode_scope_clears_at_episode_start_and_trial_scope_keeps_memory() -> None:
    episode, trial = _pool(scope="episode"), _pool(scope="trial")
    for pool in (episode, trial):
        _step(pool, 0, 1.0, start=True)
        _step(pool, 0, 2.0, reward=1.0)
        _step(pool, 0, 3.0, reward=1.0, start=True)
    assert episode.lengths[0] == 1
    assert episode.windows[0, 0].tolist() == [3.0, 3.0, 0.0, 0.0, 0.0]
    assert trial.lengths[0] == 3
    # in a trial the new episode's first memory is flagged; previous action and reward are zero
    assert trial.windows[0, 2].tolist() == [3.0, 3.0, 0.0, 0.0, 1.0]


def test_clear_forgets_a_slot() -> None:
    pool = _pool()
    _step(pool, 1, 1.0, start=True)
    _step(pool, 1, 2.0)
    pool.clear(torch.tensor([1]))
    assert pool.lengths[1] == 0
    assert torch.count_nonzero(pool.windows[1]) == 0
    assert torch.count_nonzero(pool.prev_action[1]) == 0


def test_memoryless_tokens_carry_the_observation_only() -> None:
    cfg = ModelConfig.from_preset("small", obs_dim=2, act_dim=1, window=1, include_previous=False)
    pool = SlotPool(TrMRL(cfg), capacity=1)
    _step(pool, 0, 1.0, start=True)
    _step(pool, 0, 2.0, reward=5.0)
    assert pool.windows[0, 0].tolist() == [2.0, 2.0, 0.0, 0.0, 0.0]


def test_read_write_reproduces_the_next_output() -> None:
    pool = _pool(window=3)
    for i in range(4):
        _step(pool, 0, float(i), reward=0.1 * i, start=i == 0)
    memory = pool.read(torch.tensor([0]))
    pool.write(torch.tensor([3]), memory)
    with torch.no_grad():
        a = pool.step(torch.tensor([0]), torch.ones(1, 2), torch.tensor([0.2]), torch.tensor([False]))
        b = pool.step(torch.tensor([3]), torch.ones(1, 2), torch.tensor([0.2]), torch.tensor([False]))
    torch.testing.assert_close(a.output.mean, b.output.mean, rtol=0, atol=0)
    before = pool.read(torch.tensor([1]))
    with pytest.raises(ValueError, match="windows shape"):
        pool.write(torch.tensor([1]), memory._replace(windows=torch.zeros(1, 2, 5)))
    with pytest.raises(ValueError, match="lengths"):
        pool.write(torch.tensor([1]), memory._replace(lengths=torch.tensor([9])))
    after = pool.read(torch.tensor([1]))
    for old, new in zip(before, after, strict=True):
        torch.testing.assert_close(old, new, rtol=0, atol=0)


def test_a_batched_read_and_write_move_many_slots_at_once() -> None:
    pool = _pool(window=3)
    for i in range(5):
        _step(pool, 0, float(i), start=i == 0)
        _step(pool, 1, -float(i), start=i == 0)
    pool.write(torch.tensor([3, 2]), pool.read(torch.tensor([0, 1])))
    moved, kept = pool.read(torch.tensor([2, 3])), pool.read(torch.tensor([1, 0]))
    for a, b in zip(moved, kept, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_failed_forward_leaves_the_pool_unchanged() -> None:
    pool = _pool()
    _step(pool, 0, 1.0, start=True)
    before = (pool.windows.clone(), pool.lengths.clone(), pool.prev_action.clone())
    with pytest.raises(RuntimeError):
        pool.step(torch.tensor([0]), torch.ones(1, 7), torch.zeros(1), torch.tensor([False]))  # wrong width
    for saved, now in zip(before, (pool.windows, pool.lengths, pool.prev_action), strict=True):
        assert torch.equal(saved, now)


def test_bytes_per_slot_is_the_window_plus_counters() -> None:
    pool = _pool(window=5)
    assert pool.bytes_per_slot == 5 * 5 * 4 + 8 + 1 * 4


def test_windows_refitted_to_another_length_keep_the_newest_memories() -> None:
    windows = torch.arange(1.0, 5.0).view(1, 4, 1).repeat(2, 1, 1)
    windows[1, 2:] = 0.0  # the second window holds two memories
    lengths = torch.tensor([4, 2])
    shorter, short_lengths = fit_windows(windows, lengths, 3)
    assert shorter.squeeze(-1).tolist() == [[2.0, 3.0, 4.0], [1.0, 2.0, 0.0]]
    assert short_lengths.tolist() == [3, 2]
    longer, long_lengths = fit_windows(windows, lengths, 6)
    assert longer.squeeze(-1).tolist() == [[1.0, 2.0, 3.0, 4.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0, 0.0, 0.0]]
    assert long_lengths.tolist() == [4, 2]
