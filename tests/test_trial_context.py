"""``context="trial"``: a transformer over the whole trial, its key/value pool and its sequence update."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from trial_support import assert_step_equals_full_re_encode, parameters_moved_by_update

from trainer.config import TrainConfig, preset_config
from trainer.ppo import compute_gae, flatten, forward, sequences
from trainer.rollout import Rollout, TrialSampler
from trainer.run import Trainer, check_compatible, model_config_for
from trmrl.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from trmrl.model import ModelConfig, TrMRL, log_prob
from trmrl.networks import make_pool
from trmrl.policy import act
from trmrl.slot_pool import SlotPool
from trmrl.tasks import get_family
from trmrl.trial_pool import ContextFull, TrialPool

OBS, ACT = 3, 2


def _config(**kw: Any) -> ModelConfig:
    values: dict[str, Any] = {"context": "trial", "window": 1, "max_context": 64, **kw}
    return ModelConfig.from_preset("small", obs_dim=OBS, act_dim=ACT, **values)


def _net(seed: int = 0, **kw: Any) -> TrMRL:
    torch.manual_seed(seed)
    net = TrMRL(_config(**kw)).eval()
    with torch.no_grad():  # statistics that are not the identity, as after training
        net.obs_mean.copy_(torch.randn(OBS) * 0.3)
        net.obs_std.copy_(torch.rand(OBS) + 0.5)
    return net


VARIANTS = [
    {"memory_scope": "trial"},
    {"memory_scope": "episode"},
    {"memory_scope": "trial", "value_input": "encoder", "value_norm": "popart"},
    {"memory_scope": "trial", "block": "prenorm", "init": "xavier", "value_input": "observation"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_every_cached_step_equals_a_full_re_encode_of_the_context(variant: dict[str, Any]) -> None:
    net = _net(**variant)
    scope = variant["memory_scope"]
    capacity, n_slots, episode = 9, 5, 10
    pool = TrialPool(net, capacity)
    rng = np.random.default_rng(0)
    slot_ids = rng.choice(capacity, n_slots, replace=False)
    contexts: dict[int, list[torch.Tensor]] = {int(s): [] for s in slot_ids}
    steps = {int(s): 0 for s in slot_ids}
    checked = 0
    while min(steps.values()) < 2 * episode:  # a two-episode trial per slot, slots stepping out of turn
        stepping = [s for s in slot_ids.tolist() if steps[s] < 2 * episode and rng.random() < 0.7]
        if not stepping:
            continue
        slots = torch.tensor(stepping)
        obs = torch.randn(len(stepping), OBS)
        start = torch.tensor([steps[s] % episode == 0 for s in stepping])
        with torch.no_grad():
            result = pool.step(slots, obs, torch.randn(len(stepping)), start)
        pool.record_actions(slots, result.output.mean + 0.1 * torch.randn(len(stepping), ACT))
        for i, s in enumerate(stepping):
            if scope == "episode" and bool(start[i]):
                contexts[s] = []
            contexts[s].append(result.windows[i, 0])
            steps[s] += 1
            assert_step_equals_full_re_encode(net, contexts[s], result, i)
            checked += 1
        # The second episode's first memory is flagged (trial scope) and the context holds it all.
        assert int(pool.lengths[stepping[0]]) == len(contexts[stepping[0]])
    assert checked == n_slots * 2 * episode


def test_the_sequence_forward_equals_a_re_encode_at_every_step_in_both_scopes() -> None:
    for scope in ("trial", "episode"):
        net = _net(memory_scope=scope, value_input="encoder")
        tokens = torch.randn(3, 20, net.config.token_dim)
        starts = torch.zeros(3, 20, dtype=torch.bool)
        starts[:, 0] = True
        starts[0, 7] = starts[1, 12] = True
        with torch.no_grad():
            seq = net.forward_sequence(tokens, starts)
            for b in range(3):
                for t in range(20):
                    first = int(starts[b, : t + 1].nonzero().max()) if scope == "episode" else 0
                    window = tokens[b : b + 1, first : t + 1]
                    ref = net(window, torch.tensor([t - first]))
                    torch.testing.assert_close(seq.mean[b, t], ref.mean[0], atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(seq.value[b, t], ref.value[0], atol=1e-5, rtol=1e-5)


def _rollout(net: TrMRL, family_name: str = "point-nav", n_envs: int = 3, seed: int = 0) -> Rollout:
    family = get_family(family_name)
    sampler = TrialSampler(family, net, n_envs=n_envs, episodes_per_trial=2)
    assert isinstance(sampler.pool, TrialPool)
    try:
        net.eval()
        return sampler.run(
            family.sample_tasks("train", n_envs, seed=seed),
            seed=seed,
            generator=torch.Generator().manual_seed(1),
        )
    finally:
        sampler.close()


def _trainer_net(scope: str, **kw: Any) -> TrMRL:
    family = get_family("point-nav")
    cfg = TrainConfig(family="point-nav", context="trial", memory_scope=scope, **kw)
    torch.manual_seed(0)
    net = TrMRL(model_config_for(cfg, family))
    assert net.config.window == 1 and net.config.max_context == (2 if scope == "trial" else 1) * 100 + 1
    return net


@pytest.mark.parametrize(("scope", "value_input"), [("trial", "memory"), ("episode", "encoder")])
def test_whole_stored_trials_find_the_rollouts_log_probs_and_values_again(
    scope: str, value_input: str
) -> None:
    net = _trainer_net(scope, value_input=value_input)
    rollout = _rollout(net)
    assert rollout.windows.shape == (200, 3, 1, net.config.token_dim)
    advantages, returns = compute_gae(rollout, 0.9, 0.8)
    batch = sequences(rollout, advantages, returns, 200)
    assert len(batch) == 3 and batch.hidden.shape == (3, 0) and int(batch.mask.sum()) == 600
    net.train()  # dropout 0: train mode changes nothing
    with torch.no_grad():
        out, flat = forward(net, batch)
    ratio = (log_prob(out, flat.actions) - flat.old_log_probs).exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.value, flat.returns - flat.advantages, atol=1e-5, rtol=1e-5)
    plain = flatten(rollout, advantages, returns)
    assert sorted(flat.old_log_probs.tolist()) == sorted(plain.old_log_probs.tolist())
    with pytest.raises(ValueError, match="read whole"):
        sequences(rollout, advantages, returns, 64)


def test_the_update_learns_through_the_whole_trial() -> None:
    net = _trainer_net("trial", value_input="memory")
    rollout = _rollout(net)
    advantages, returns = compute_gae(rollout, 0.9, 0.8)
    batch = sequences(rollout, advantages, returns, 200)
    net.train()
    # The policy's output at the trial's last step reaches the first step's working memory.
    tokens = batch.tokens[:1].clone().requires_grad_(True)
    out = net.forward_sequence(tokens, batch.episode_starts[:1])
    (grad,) = torch.autograd.grad(out.mean[0, -1].sum(), [tokens])
    assert grad[0, 0].abs().sum() > 0
    moved = parameters_moved_by_update(net, batch, minibatch_size=400)
    assert {"embed.weight", "layers.0.attn.qkv.weight", "policy_mean.0.weight", "value.0.weight"} <= moved


def test_a_step_past_max_context_is_refused_and_changes_nothing() -> None:
    net = _net(max_context=4)
    pool = TrialPool(net, 3)
    slots = torch.tensor([0, 2])
    with torch.no_grad():
        for t in range(4):
            pool.step(slots[:1], torch.randn(1, OBS), torch.zeros(1), torch.tensor([t == 0]))
        pool.step(slots[1:], torch.randn(1, OBS), torch.zeros(1), torch.tensor([True]))
        before = pool.read(slots)
        keys = [k.clone() for k in pool.keys]
        with pytest.raises(ContextFull, match=r"slots \[0\] hold max_context=4") as info:
            pool.step(slots, torch.randn(2, OBS), torch.zeros(2), torch.tensor([False, False]))
        assert info.value.slots == [0]
        after = pool.read(slots)
        for a, b in zip(before, after, strict=True):
            assert torch.equal(a, b)
        assert all(torch.equal(a, b) for a, b in zip(keys, pool.keys, strict=True))
        # A new trial (an episode start, with memory_scope=trial, does not clear the context) starts again.
        pool.clear(slots[:1])
        pool.step(slots, torch.randn(2, OBS), torch.zeros(2), torch.tensor([True, False]))
    assert pool.lengths[slots].tolist() == [1, 2]


def test_memories_read_and_written_by_slot_rebuild_the_cache_and_migrate_to_new_weights() -> None:
    net = _net(value_input="encoder")
    pool = TrialPool(net, 4)
    slots = torch.tensor([0, 1])
    steps = [(torch.randn(2, OBS), torch.randn(2), torch.tensor([t == 0, t == 0])) for t in range(9)]
    with torch.no_grad():
        for obs, reward, start in steps:
            result = pool.step(slots, obs, reward, start)
            pool.record_actions(slots, result.output.mean)
        memory = pool.read(slots)
        assert memory.windows.shape == (2, 64, net.config.token_dim) and memory.lengths.tolist() == [9, 9]
        # Restored into other slots (reversed order), the next step is the same.
        pool.write(torch.tensor([3, 2]), memory)
        obs, reward = torch.randn(2, OBS), torch.randn(2)
        start = torch.tensor([False, False])
        here = pool.step(slots, obs, reward, start).output
        there = pool.step(torch.tensor([3, 2]), obs, reward, start).output
        torch.testing.assert_close(here.mean, there.mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(here.value, there.value, atol=1e-6, rtol=1e-6)
        # Migration: the working memories re-encoded under new weights are what a run under those
        # weights would have built.
        new = _net(seed=5, value_input="encoder")
        moved = TrialPool(new, 2)
        moved.write(torch.tensor([0, 1]), pool.read(slots))
        ctx = pool.read(slots).windows[:, : int(pool.lengths[0])]
        obs, reward = torch.randn(2, OBS), torch.randn(2)
        out = moved.step(torch.tensor([0, 1]), obs, reward, start).output
        after = moved.read(torch.tensor([0, 1]))
        full = new(after.windows[:, : int(after.lengths[0])], after.lengths - 1)
        torch.testing.assert_close(out.mean, full.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.value, full.value, atol=1e-5, rtol=1e-5)
        assert torch.equal(after.windows[:, : ctx.shape[1]], ctx)
        # Wrong shapes are refused and change nothing.
        kept = pool.read(torch.tensor([2]))
        with pytest.raises(ValueError, match="windows shape"):
            pool.write(torch.tensor([2]), kept._replace(windows=torch.ones(1, 5, net.config.token_dim)))
        with pytest.raises(ValueError, match="lengths"):
            pool.write(torch.tensor([2]), pool.read(torch.tensor([2]))._replace(lengths=torch.tensor([65])))
        for a, b in zip(kept, pool.read(torch.tensor([2])), strict=True):
            assert torch.equal(a, b)


def test_a_bfloat16_cache_chooses_nearly_the_same_actions() -> None:
    net = _net(max_context=401)
    full, half = TrialPool(net, 4), TrialPool(net, 4, cache_dtype=torch.bfloat16)
    assert half.bytes_per_slot < 0.6 * full.bytes_per_slot
    slots = torch.arange(4)
    one = torch.ones(ACT)
    worst = 0.0
    with torch.no_grad():
        for t in range(400):  # two 200-step episodes
            obs, reward = torch.randn(4, OBS), torch.randn(4)
            start = torch.full((4,), t % 200 == 0)
            a = act(full, slots, obs, reward, start, low=-one, high=one, deterministic=True, noise=None)
            b = act(half, slots, obs, reward, start, low=-one, high=one, deterministic=True, noise=None)
            # Each pool remembers its own actions; feed both the fp32 pool's so the contexts agree.
            half.record_actions(slots, a.actions)
            worst = max(worst, float((a.actions - b.actions).abs().max()))
    assert worst < 0.02, worst


def test_config_says_which_context_and_contradictions_are_refused() -> None:
    assert ModelConfig(obs_dim=2, act_dim=2).context == "window"
    # A checkpoint config written before the option existed reads as the windowed model it was.
    legacy = ModelConfig(obs_dim=2, act_dim=2).to_dict()
    del legacy["context"], legacy["max_context"]
    assert ModelConfig.from_dict(legacy) == ModelConfig(obs_dim=2, act_dim=2)
    with pytest.raises(ValueError, match="window must be 1"):
        ModelConfig(obs_dim=2, act_dim=2, context="trial")
    with pytest.raises(ValueError, match="policy=rl2 remembers"):
        ModelConfig(obs_dim=2, act_dim=2, window=1, context="trial", policy="rl2")
    with pytest.raises(ValueError, match="max_context must be >= 1"):
        ModelConfig(obs_dim=2, act_dim=2, window=1, context="trial", max_context=0)
    with pytest.raises(ValueError, match="context=trial is TrMRL's"):
        preset_config("small-point-nav-rl2", {"context": "trial"})
    with pytest.raises(ValueError, match="reference=memoryless"):
        preset_config("small-point-nav-memoryless", {"context": "trial"})
    cfg = preset_config(
        "small-halfcheetah-vel", {"context": "trial", "memory_scope": "trial", "max_context": "400"}
    )
    with pytest.raises(ValueError, match="holds up to 401 working memories"):
        check_compatible(cfg, get_family("halfcheetah-vel"), 1)
    with pytest.raises(ValueError, match="a context of 9 steps exceeds max_context=8"):
        _net(max_context=8).forward_sequence(torch.zeros(1, 9, _config().token_dim))
    with pytest.raises(ValueError, match="serves context=trial"):
        TrialPool(TrMRL(ModelConfig(obs_dim=2, act_dim=2)), 2)  # type: ignore[arg-type]


def test_a_trial_checkpoint_says_its_context_and_loads_into_a_cached_pool(tmp_path: Path) -> None:
    net = _net()
    info = CheckpointInfo(task_family="point-nav", action_low=(-1.0,) * ACT, action_high=(1.0,) * ACT)
    save_checkpoint(tmp_path / "ckpt", net, info)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.context == "trial" and loaded.config.max_context == 64
    assert isinstance(make_pool(loaded.model, 2), TrialPool)
    windowed = TrMRL(ModelConfig.from_preset("small", obs_dim=OBS, act_dim=ACT))
    assert isinstance(make_pool(windowed, 2), SlotPool)
    tokens = torch.randn(1, 5, net.config.token_dim)
    with torch.no_grad():
        a, b = net.forward_sequence(tokens), loaded.model.forward_sequence(tokens)  # type: ignore[union-attr]
    torch.testing.assert_close(a.mean, b.mean)


def test_a_trial_context_run_trains_and_resumes(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = {
            "context": "trial",
            "memory_scope": "trial",
            "tasks_per_update": "4",
            "epochs": "1",
            "total_steps": "800",
            "eval_every": "0",
            "eval_tasks": "2",
            "checkpoint_every": "1",
        }
        cfg = preset_config("small-point-nav", overrides)
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
        try:
            record = trainer.train_one_update()
            trainer.save("latest", resumable=True)
        finally:
            trainer.close()
        assert record["steps"] == 800 and np.isfinite(record["train/policy_loss"])
        resumed = Trainer(cfg, tmp_path / "run", progress=False)
        try:
            assert resumed.update == 1 and resumed.steps == 800
            assert isinstance(resumed.sampler.pool, TrialPool)
            for a, b in zip(resumed.model.parameters(), trainer.model.parameters(), strict=True):
                assert torch.equal(a, b)
        finally:
            resumed.close()
    finally:
        torch.set_num_threads(threads)


def test_evaluation_refuses_more_episodes_than_the_context_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.cli import eval_main

    cfg = ModelConfig.from_preset("small", obs_dim=2, act_dim=2, context="trial", window=1, max_context=201)
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "memory_scope": "trial"})
    info = CheckpointInfo(task_family="point-nav", action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    save_checkpoint(tmp_path / "ckpt", TrMRL(cfg), info)
    with pytest.raises(SystemExit):
        eval_main([str(tmp_path / "ckpt"), "--episodes", "3", "--tasks", "1"])
    assert "max_context=201 cannot hold 3 episode(s) of 100 steps" in capsys.readouterr().err
