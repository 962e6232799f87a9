"""The RL² baseline: a GRU over the same working memories, trained by the same trainer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from trial_support import parameters_moved_by_update

from trainer.cli import eval_main
from trainer.config import PRESETS, preset_config
from trainer.ppo import compute_gae, flatten, forward, sequences
from trainer.rollout import Rollout, TrialSampler
from trainer.run import model_config_for, train
from trmrl.checkpoint import load_checkpoint
from trmrl.model import ModelConfig, log_prob
from trmrl.policy import act
from trmrl.recurrent import RL2, RecurrentPool
from trmrl.tasks import get_family


def _config(**kw: object) -> ModelConfig:
    return ModelConfig(obs_dim=2, act_dim=2, window=1, policy="rl2", rnn_hidden=16, **kw)  # type: ignore[arg-type]


def _rollout(model: RL2, n_envs: int = 3, seed: int = 0) -> Rollout:
    family = get_family("point-nav")
    sampler = TrialSampler(family, model, n_envs=n_envs, episodes_per_trial=2)
    try:
        model.eval()
        return sampler.run(
            family.sample_tasks("train", n_envs, seed=seed),
            seed=seed,
            generator=torch.Generator().manual_seed(seed),
        )
    finally:
        sampler.close()


def test_the_pool_steps_what_an_unroll_computes_and_carries_memory_across_the_trial() -> None:
    torch.manual_seed(0)
    net = RL2(_config(memory_scope="trial")).eval()
    pool = RecurrentPool(net, capacity=4)
    slots = torch.tensor([1, 3])
    obs = torch.randn(6, 2, 2)
    rewards = torch.randn(6, 2)
    starts = torch.zeros(6, 2, dtype=torch.bool)
    starts[0] = True
    starts[3, 0] = True  # slot 1 starts its second episode at t=3: same trial, memory kept
    one = torch.ones(2)
    means, tokens = [], []
    with torch.no_grad():
        for t in range(6):
            r = act(
                pool, slots, obs[t], rewards[t], starts[t], low=-one, high=one, deterministic=True, noise=None
            )
            means.append(r.step.output.mean)
            tokens.append(r.step.windows[:, 0])
            if t == 0:
                assert not r.step.state.any()  # type: ignore[union-attr]
        unrolled, last = net.unroll(torch.stack(tokens), torch.zeros(2, 16))
    torch.testing.assert_close(torch.stack(means), unrolled.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.hidden[slots], last, atol=1e-5, rtol=1e-5)
    # The new episode's working memory carries the done flag and nothing of the previous action.
    assert tokens[3][0, -1] == 1.0 and not tokens[3][0, 2:4].any()
    assert tokens[3][1, -1] == 0.0
    # Untouched slots stay empty; a cleared slot forgets.
    assert not pool.hidden[[0, 2]].any()
    pool.clear(slots[:1])
    assert not pool.hidden[1].any() and pool.hidden[3].any()


def test_episode_scope_resets_the_hidden_state_at_each_episode_start() -> None:
    torch.manual_seed(0)
    net = RL2(_config(memory_scope="episode")).eval()
    pool = RecurrentPool(net, capacity=1)
    slot = torch.tensor([0])
    one = torch.ones(2)
    with torch.no_grad():
        first = pool.step(slot, torch.ones(1, 2), torch.zeros(1), torch.ones(1, dtype=torch.bool))
        pool.record_actions(slot, torch.full((1, 2), 0.5))
        pool.step(slot, torch.zeros(1, 2), torch.ones(1), torch.zeros(1, dtype=torch.bool))
        again = act(
            pool,
            slot,
            torch.ones(1, 2),
            torch.zeros(1),
            torch.ones(1, dtype=torch.bool),
            low=-one,
            high=one,
            deterministic=True,
            noise=None,
        )
    assert not again.step.state.any()  # type: ignore[union-attr]
    torch.testing.assert_close(again.step.output.mean, first.output.mean)


def test_memories_read_and_write_by_slot_and_wrong_shapes_change_nothing() -> None:
    torch.manual_seed(0)
    net = RL2(_config()).eval()
    pool = RecurrentPool(net, capacity=3)
    with torch.no_grad():
        pool.step(torch.tensor([0]), torch.ones(1, 2), torch.zeros(1), torch.ones(1, dtype=torch.bool))
    memory = pool.read(torch.tensor([0]))
    assert memory.windows.shape == (1, 1, 16)
    pool.write(torch.tensor([2]), memory)
    assert torch.equal(pool.hidden[2], pool.hidden[0]) and int(pool.lengths[2]) == 1
    with pytest.raises(ValueError, match="windows shape"):
        pool.write(torch.tensor([1]), memory._replace(windows=torch.ones(1, 1, 15)))
    with pytest.raises(ValueError, match="lengths"):
        pool.write(torch.tensor([1]), memory._replace(lengths=torch.tensor([2])))
    assert not pool.hidden[1].any() and int(pool.lengths[1]) == 0


@pytest.mark.parametrize("scope", ["episode", "trial"])
def test_sequences_unrolled_from_the_recorded_state_find_the_stored_log_probs_and_values(scope: str) -> None:
    torch.manual_seed(0)
    net = RL2(_config(memory_scope=scope))
    rollout = _rollout(net)
    assert rollout.states is not None and rollout.states.shape == (200, 3, 16)
    advantages, returns = compute_gae(rollout, 0.9, 0.8)
    # 200 steps in sequences of 48: four full and one padded per env.
    batch = sequences(rollout, advantages, returns, 48)
    assert len(batch) == 15 and int(batch.mask.sum()) == 600
    net.train()
    with torch.no_grad():
        out, flat = forward(net, batch)
    torch.testing.assert_close(log_prob(out, flat.actions), flat.old_log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.value, flat.returns - flat.advantages, atol=1e-5, rtol=1e-5)
    # The same steps as the flat batch, in another order.
    plain = flatten(rollout, advantages, returns)
    assert sorted(flat.old_log_probs.tolist()) == sorted(plain.old_log_probs.tolist())


def test_the_update_backpropagates_through_the_sequence_and_moves_the_gru() -> None:
    torch.manual_seed(0)
    net = RL2(_config(memory_scope="trial"))
    rollout = _rollout(net)
    advantages, returns = compute_gae(rollout, 0.9, 0.8)
    batch = sequences(rollout, advantages, returns, 32)
    net.train()
    # One sequence's loss at its last step reaches the GRU's input weights through all 32 steps.
    out, _ = net.unroll(batch.tokens[:1].transpose(0, 1), batch.hidden[:1])
    grads = torch.autograd.grad(out.mean[-1].sum(), [net.gru.weight_ih_l0])
    assert grads[0].abs().sum() > 0
    moved = parameters_moved_by_update(net, batch, minibatch_size=256)
    assert {"gru.weight_ih_l0", "gru.weight_hh_l0", "policy_mean.0.weight", "value.0.weight"} <= moved


def test_every_preset_has_an_rl2_twin_with_the_same_budget() -> None:
    for name in (
        "small-point-nav",
        "small-halfcheetah-vel",
        "small-halfcheetah-dir",
        "paper-halfcheetah-vel",
    ):
        base, twin = PRESETS[name], PRESETS[f"{name}-rl2"]
        assert twin["policy"] == "rl2" and twin["memory_scope"] == "trial"
        assert {k: v for k, v in twin.items() if k not in ("policy", "memory_scope")} == {
            k: v for k, v in base.items() if k != "memory_scope"
        }
    cfg = preset_config("small-halfcheetah-vel-rl2")
    model_cfg = model_config_for(cfg, get_family("halfcheetah-vel"))
    assert model_cfg.policy == "rl2" and model_cfg.window == 1 and model_cfg.rnn_hidden == cfg.rnn_hidden


def test_rl2_settings_that_contradict_themselves_are_refused() -> None:
    with pytest.raises(ValueError, match="policy=rl2 is a baseline"):
        preset_config("small-point-nav-oracle", {"policy": "rl2"})
    with pytest.raises(ValueError, match="rnn_hidden and bptt"):
        preset_config("small-point-nav-rl2", {"bptt": "0"})
    with pytest.raises(ValueError, match="window must be 1"):
        ModelConfig(obs_dim=2, act_dim=2, window=5, policy="rl2")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny networks train fastest on one thread, and one thread is not starved on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_an_rl2_run_trains_checkpoints_and_evaluates_beside_trmrl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = {"total_steps": "6400", "eval_every": "0", "eval_tasks": "2", "tasks_per_update": "8"}
    train(preset_config("small-point-nav-rl2", {**overrides, "bptt": "25"}), tmp_path / "rl2", progress=False)
    train(preset_config("small-point-nav", overrides), tmp_path / "trmrl", progress=False)
    ckpt = load_checkpoint(tmp_path / "rl2" / "final")
    assert isinstance(ckpt.model, RL2) and ckpt.info.training["policy"] == "rl2"
    runs = [str(tmp_path / "trmrl" / "final"), str(tmp_path / "rl2" / "final")]
    assert eval_main([*runs, "--tasks", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    kinds = [line.split()[1] for line in lines[2:]]
    assert kinds == ["trmrl", "rl2"]
