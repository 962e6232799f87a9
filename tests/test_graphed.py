"""The fixed-shape step (:mod:`trmrl.graphed`) against the trainer's ``act``: bit for bit unpadded,
within rounding when padded to a bucket, padded rows confined to the scratch slot, reduced precision
within a bound of float32; CUDA graphs where a GPU is present."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from trmrl.checkpoint import load_checkpoint
from trmrl.graphed import BucketedStep, bucket_of, buckets_for
from trmrl.model import ModelConfig, TrMRL
from trmrl.policy import act, counter_normal
from trmrl.slot_pool import SlotPool

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints"
CAPACITY = 48
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Tick(NamedTuple):
    slots: np.ndarray
    obs: np.ndarray
    reward: np.ndarray
    start: np.ndarray
    clear: np.ndarray
    deterministic: np.ndarray
    noise: np.ndarray | None
    applied: np.ndarray | None
    applied_mask: np.ndarray | None


def ticks(obs_dim: int, act_dim: int, count: int, max_batch: int, seed: int = 0) -> list[Tick]:
    """Random ticks over distinct slots: resets, episode starts, sampled rows, applied actions."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(count):
        n = int(rng.integers(1, max_batch + 1))
        slots = rng.choice(CAPACITY, n, replace=False)
        deterministic = rng.random(n) < 0.5
        noise = None
        if not deterministic.all():
            noise = counter_normal(torch.from_numpy(slots), torch.full((n,), t), act_dim).numpy()
        applied = applied_mask = None
        if rng.random() < 0.4:
            applied = rng.uniform(-1, 1, (n, act_dim)).astype(np.float32)
            applied_mask = rng.random(n) < 0.5
        out.append(
            Tick(
                slots,
                rng.normal(size=(n, obs_dim)).astype(np.float32),
                rng.normal(size=n).astype(np.float32),
                rng.random(n) < 0.15,
                (rng.random(n) < 0.1) | (t == 0),
                deterministic,
                noise,
                applied,
                applied_mask,
            )
        )
    return out


@torch.inference_mode()
def reference(pool: SlotPool, low: torch.Tensor, high: torch.Tensor, tick: Tick) -> np.ndarray:
    """The service's eager path: clear, then one ``act`` (on the pool's device)."""

    def dev(array: np.ndarray | None) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(array).to(pool.device)

    slots = torch.from_numpy(tick.slots).to(pool.device)
    if tick.clear.any():
        pool.clear(slots[torch.from_numpy(tick.clear).to(pool.device)])
    obs, reward, start, deterministic = (
        dev(a) for a in (tick.obs, tick.reward, tick.start, tick.deterministic)
    )
    assert obs is not None and reward is not None and start is not None and deterministic is not None
    result = act(
        pool,
        slots,
        obs,
        reward,
        start,
        low=low,
        high=high,
        deterministic=deterministic,
        noise=dev(tick.noise),
        applied_action=dev(tick.applied),
        applied_mask=dev(tick.applied_mask),
    )
    return result.actions.cpu().numpy()


def fixed(step: BucketedStep, tick: Tick) -> np.ndarray:
    return step.run(
        tick.slots,
        tick.obs,
        tick.reward,
        tick.start,
        tick.clear,
        tick.deterministic,
        tick.noise,
        tick.applied,
        tick.applied_mask,
    )


def model(seed: int = 0) -> TrMRL:
    torch.manual_seed(seed)
    # A policy gain of 1 spreads the actions over the bounds, so differences are not hidden by tiny means.
    return TrMRL(ModelConfig.from_preset("small", obs_dim=5, act_dim=3, policy_out_gain=1.0)).eval()


def pools(net: TrMRL, device: str = "cpu") -> tuple[SlotPool, SlotPool]:
    """A reference pool and one with the scratch slot (slot ``CAPACITY``), identical contents."""
    return SlotPool(net, CAPACITY, device), SlotPool(net, CAPACITY + 1, device)


def bounds(act_dim: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return -torch.ones(act_dim, device=device), torch.ones(act_dim, device=device)


def test_buckets_are_powers_of_two_capped_at_max_batch() -> None:
    assert buckets_for(1) == (1,)
    assert buckets_for(512) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert buckets_for(300)[-2:] == (256, 300)
    assert [bucket_of(n, buckets_for(300)) for n in (1, 3, 4, 5, 257, 300)] == [1, 4, 4, 8, 300, 300]
    with pytest.raises(ValueError, match="do not fit"):
        bucket_of(301, buckets_for(300))
    with pytest.raises(ValueError, match="do not fit"):
        bucket_of(0, buckets_for(300))


def test_unpadded_fixed_step_is_the_trainers_step_bit_for_bit() -> None:
    net = model()
    low, high = bounds(3)
    ref_pool, pool = pools(net)
    step = BucketedStep(pool, low, high, 32, scratch_slot=CAPACITY, pad=False)
    for tick in ticks(5, 3, 30, 32):
        assert np.array_equal(fixed(step, tick), reference(ref_pool, low, high, tick))
    assert torch.equal(pool.windows[:CAPACITY], ref_pool.windows)
    assert torch.equal(pool.lengths[:CAPACITY], ref_pool.lengths)
    assert torch.equal(pool.prev_action[:CAPACITY], ref_pool.prev_action)


def test_padded_rows_only_touch_the_scratch_slot_and_change_no_action() -> None:
    net = model()
    low, high = bounds(3)
    ref_pool, pool = pools(net)
    step = BucketedStep(pool, low, high, 32, scratch_slot=CAPACITY, pad=True)
    padded_ticks = 0
    for tick in ticks(5, 3, 30, 32, seed=1):
        before = pool.windows.clone(), pool.lengths.clone(), pool.prev_action.clone()
        got = fixed(step, tick)
        # A larger matrix product may sum in another order: equal up to float32 rounding.
        np.testing.assert_allclose(got, reference(ref_pool, low, high, tick), rtol=0, atol=1e-5)
        untouched = np.setdiff1d(np.arange(CAPACITY), tick.slots)
        for now, then in zip((pool.windows, pool.lengths, pool.prev_action), before, strict=True):
            assert torch.equal(now[untouched], then[untouched])
        padded_ticks += bucket_of(len(tick.slots), step.buckets) > len(tick.slots)
    assert padded_ticks > 10  # the padding really ran
    assert pool.lengths[CAPACITY] == 1  # padded rows land in the scratch slot, cleared every step
    torch.testing.assert_close(pool.windows[:CAPACITY], ref_pool.windows, rtol=0, atol=1e-5)
    assert torch.equal(pool.lengths[:CAPACITY], ref_pool.lengths)


def test_a_batch_larger_than_max_batch_is_refused() -> None:
    net = model()
    _, pool = pools(net)
    step = BucketedStep(pool, *bounds(3), 4, scratch_slot=CAPACITY, pad=True)
    n = 5
    flags = [np.ones(n, bool)] * 3
    with pytest.raises(ValueError, match="do not fit"):
        step.run(np.arange(n), np.zeros((n, 5), np.float32), np.zeros(n, np.float32), *flags)


def test_sampled_rows_need_noise_and_graphs_need_cuda() -> None:
    net = model()
    _, pool = pools(net)
    step = BucketedStep(pool, *bounds(3), 4, scratch_slot=CAPACITY)
    n = 2
    with pytest.raises(ValueError, match="noise"):
        step.run(
            np.arange(n),
            np.zeros((n, 5), np.float32),
            np.zeros(n, np.float32),
            np.ones(n, bool),
            np.ones(n, bool),
            np.zeros(n, bool),
        )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            BucketedStep(pool, *bounds(3), 4, scratch_slot=CAPACITY, graphs=True)
    with pytest.raises(ValueError, match="scratch"):
        BucketedStep(pool, *bounds(3), 4, scratch_slot=CAPACITY + 1)


# Closed loop over a trained checkpoint: each precision's actions feed its own next memories, as in
# serving. The bounds are about 2.5x the worst difference seen on a CPU over these ticks (bf16 0.032,
# fp16 0.0052, on actions in [-1, 1]).
@pytest.mark.parametrize(("precision", "bound"), [("bf16", 0.08), ("fp16", 0.013)])
def test_reduced_precision_actions_stay_close_to_float32(precision: str, bound: float) -> None:
    ckpt = load_checkpoint(BUNDLED / "halfcheetah-vel")
    cfg = ckpt.model.config
    low = torch.tensor(ckpt.info.action_low)
    high = torch.tensor(ckpt.info.action_high)
    ref_pool, pool = pools(ckpt.model.eval())
    step = BucketedStep(pool, low, high, 32, scratch_slot=CAPACITY, pad=True, precision=precision)  # type: ignore[arg-type]
    worst = 0.0
    for tick in ticks(cfg.obs_dim, cfg.act_dim, 40, 32, seed=2):
        got = fixed(step, tick)
        want = reference(ref_pool, low, high, tick)
        assert np.isfinite(got).all()
        worst = max(worst, float(np.abs(got - want).max()))
    assert 0.0 < worst <= bound  # nonzero: the reduced precision really ran


def test_unknown_precision_is_refused() -> None:
    _, pool = pools(model())
    with pytest.raises(ValueError, match="precision"):
        BucketedStep(pool, *bounds(3), 4, scratch_slot=CAPACITY, precision="fp8")  # type: ignore[arg-type]


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_replay_the_step(precision: str) -> None:
    net = model().cuda()
    low, high = bounds(3, "cuda")
    ref_pool, pool = pools(net, "cuda")
    eager_pool = SlotPool(net, CAPACITY + 1, "cuda")
    graphed = BucketedStep(pool, low, high, 32, scratch_slot=CAPACITY, graphs=True, precision=precision)  # type: ignore[arg-type]
    eager = BucketedStep(eager_pool, low, high, 32, scratch_slot=CAPACITY, pad=True, precision=precision)  # type: ignore[arg-type]
    graphed.capture()
    assert graphed.captured == buckets_for(32)
    for tick in ticks(5, 3, 30, 32, seed=3):
        before = pool.windows.clone()
        got = fixed(graphed, tick)
        np.testing.assert_allclose(got, fixed(eager, tick), rtol=0, atol=1e-5)
        if precision == "fp32":
            np.testing.assert_allclose(got, reference(ref_pool, low, high, tick), rtol=0, atol=1e-4)
        untouched = torch.from_numpy(np.setdiff1d(np.arange(CAPACITY), tick.slots)).cuda()
        assert torch.equal(pool.windows[untouched], before[untouched])
    # A replaced pool tensor is noticed: the graphs are captured again against the new one.
    pool.windows = pool.windows.clone()
    tick = ticks(5, 3, 1, 32, seed=4)[0]
    eager_pool.windows.copy_(pool.windows)
    np.testing.assert_allclose(fixed(graphed, tick), fixed(eager, tick), rtol=0, atol=1e-5)


@cuda
def test_capture_while_another_step_serves_on_another_thread() -> None:
    """A version loaded at run time captures its graphs while other models keep stepping."""
    import threading

    net = model().cuda()
    low, high = bounds(3, "cuda")
    serving = BucketedStep(
        SlotPool(net, CAPACITY + 1, "cuda"), low, high, 32, scratch_slot=CAPACITY, graphs=True
    )
    serving.capture()
    loading = BucketedStep(
        SlotPool(net, CAPACITY + 1, "cuda"), low, high, 32, scratch_slot=CAPACITY, graphs=True
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    steps = ticks(5, 3, 10, 32, seed=5)

    def serve() -> None:
        try:
            while not stop.is_set():
                for tick in steps:
                    assert np.isfinite(fixed(serving, tick)).all()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        for _ in range(3):
            loading.capture()
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not errors and not worker.is_alive()
    assert loading.captured == buckets_for(32)
    assert np.isfinite(fixed(loading, steps[0])).all()
