"""The learner's options, offered to TrMRL and RL² alike where they apply: value targets independent of
the return's scale (PopArt), what the value reads and how the memory learns from it, the encoder block,
and window and memory scope -- each trained, checkpointed and resumed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from trainer.config import TrainConfig, preset_config
from trainer.ppo import (
    Batch,
    SequenceBatch,
    ValueTargetStats,
    compute_gae,
    flatten,
    forward,
    make_optimizers,
    policy_loss,
    sequences,
    value_loss,
)
from trainer.rollout import Rollout, TrialSampler
from trainer.run import Trainer, check_compatible, model_config_for
from trmrl.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from trmrl.model import ModelConfig, TrMRL, log_prob
from trmrl.networks import Network, build_model, make_pool
from trmrl.recurrent import RL2
from trmrl.tasks import get_family

VALUE_INPUTS = ["memory", "memory_detached", "encoder", "observation"]


def _trmrl(**kw: object) -> TrMRL:
    return TrMRL(ModelConfig.from_preset("small", obs_dim=2, act_dim=2, **kw))  # type: ignore[arg-type]


def _rl2(**kw: object) -> RL2:
    cfg = ModelConfig(obs_dim=2, act_dim=2, window=1, policy="rl2", rnn_hidden=16, **kw)  # type: ignore[arg-type]
    return RL2(cfg)


def _windows(net: TrMRL, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    windows = torch.randn(batch, net.config.window, net.config.token_dim, generator=g)
    return windows, torch.randint(0, net.config.window, (batch,), generator=g)


def _rollout(model: Network, n_envs: int = 3, seed: int = 0) -> Rollout:
    family = get_family("point-nav")
    sampler = TrialSampler(family, model, n_envs=n_envs, episodes_per_trial=2)
    try:
        model.eval()
        tasks = family.sample_tasks("train", n_envs, seed=seed)
        return sampler.run(tasks, seed=seed, generator=torch.Generator().manual_seed(seed))
    finally:
        sampler.close()


# ------------------------------------------------------------------------------------------ PopArt
def test_popart_statistics_move_without_changing_any_output() -> None:
    torch.manual_seed(0)
    net = _trmrl(value_norm="popart")
    windows, newest = _windows(net)
    before = net(windows, newest).value
    stats = ValueTargetStats(beta=0.5)
    returns = 400.0 + 150.0 * torch.randn(500, generator=torch.Generator().manual_seed(2))
    stats.update(net, returns)
    # The first update adopts the targets' moments outright.
    assert float(net.value.shift) == pytest.approx(float(returns.mean()), rel=1e-5)
    assert float(net.value.scale) == pytest.approx(float(returns.std(unbiased=False)), rel=1e-4)
    torch.testing.assert_close(net(windows, newest).value, before, atol=1e-3, rtol=1e-5)
    # Later updates average: half way to the new moments, and still no output moves.
    shifted = returns - 200.0
    stats.update(net, shifted)
    assert float(net.value.shift) == pytest.approx(float(returns.mean()) - 100.0, rel=1e-4)
    torch.testing.assert_close(net(windows, newest).value, before, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("norm", ["none", "popart"])
def test_only_popart_makes_the_value_gradient_independent_of_the_returns_scale(norm: str) -> None:
    torch.manual_seed(0)
    base = _trmrl(value_norm=norm, value_input="memory")
    windows, newest = _windows(base, 64)
    returns = 2.0 + torch.randn(64, generator=torch.Generator().manual_seed(3))
    grads = []
    # The same value function and the same returns, in units 1000 times smaller.
    for factor in (1.0, 1000.0):
        net = copy.deepcopy(base)
        with torch.no_grad():
            net.value[-1].weight.mul_(factor)
            net.value[-1].bias.mul_(factor)
        target = returns * factor
        ValueTargetStats().update(net, target)
        loss = value_loss(net(windows, newest).value, target, "mse", torch.zeros(()), net.value.scale)
        (grad,) = torch.autograd.grad(loss, [net.layers[0].linear1.weight])
        grads.append(grad)
    ratio = float(grads[1].norm() / grads[0].norm())
    if norm == "popart":
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-7)
    else:
        assert ratio > 100.0  # the raw squared error grows with the scale


def test_popart_statistics_travel_with_the_checkpoint_and_older_ones_still_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _trmrl(value_norm="popart")
    ValueTargetStats().update(net, torch.tensor([10.0, 30.0, 50.0]))
    info = CheckpointInfo("point-nav", (-0.1, -0.1), (0.1, 0.1))
    save_checkpoint(tmp_path / "popart", net, info)
    loaded = load_checkpoint(tmp_path / "popart").model
    assert isinstance(loaded, TrMRL)
    assert float(loaded.value.shift) == pytest.approx(30.0) and float(loaded.value.scale) > 1.0
    windows, newest = _windows(net)
    torch.testing.assert_close(loaded(windows, newest).value, net(windows, newest).value)
    # Without PopArt the head has no statistics in its state: checkpoints written before the option load.
    plain = _trmrl()
    assert not any(k.startswith("value.") and k.endswith(("shift", "scale")) for k in plain.state_dict())


# ------------------------------------------------------------------------ what the value reads
def _value_and_policy_grads(net: Network, parameters: list[torch.nn.Parameter]) -> tuple[float, float]:
    """Gradient norms the value loss and the policy loss send into ``parameters``."""
    rollout = _rollout(net)
    advantages, returns = compute_gae(rollout, 0.9, 0.8)
    if isinstance(net, TrMRL):
        batch: Batch | SequenceBatch = flatten(rollout, advantages, returns)
    else:
        batch = sequences(rollout, advantages, returns, 50)
    net.train()

    def norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        return sum(float(g.norm()) for g in grads if g is not None)

    out, flat = forward(net, batch)
    value_norm = norm(value_loss(out.value, flat.returns, "mse", torch.zeros(())))
    out, flat = forward(net, batch)
    policy_norm = norm(policy_loss(out, flat, 0.2, True)[0])
    return value_norm, policy_norm


@pytest.mark.parametrize("kind", ["trmrl", "rl2"])
@pytest.mark.parametrize("value_input", VALUE_INPUTS)
def test_the_value_gradient_reaches_the_shared_memory_only_where_asked(kind: str, value_input: str) -> None:
    torch.manual_seed(0)
    net: Network = _trmrl(value_input=value_input) if kind == "trmrl" else _rl2(value_input=value_input)
    shared_value, shared_policy = _value_and_policy_grads(net, net.encoder_parameters())
    assert shared_policy > 0
    if value_input == "memory":
        assert shared_value > 0
    else:
        assert shared_value == 0
    own = [p for p in net.value_parameters() if all(p is not q for q in net.value.parameters())]
    assert bool(own) == (value_input == "encoder")
    if own:
        own_value, own_policy = _value_and_policy_grads(net, own)
        assert own_value > 0 and own_policy == 0


@pytest.mark.parametrize("value_input", VALUE_INPUTS)
def test_separate_optimisers_give_the_value_what_it_reads(value_input: str) -> None:
    net = _trmrl(value_input=value_input)
    opts = make_optimizers(net, 1e-3, 1e-3, 0.0, optimization="separate")
    assert opts.value is not None
    policy_ids = {id(p) for g in opts.policy.param_groups for p in g["params"]}
    value_ids = {id(p) for g in opts.value.param_groups for p in g["params"]}
    encoder = {id(p) for p in net.encoder_parameters()}
    own = {id(p) for p in net.value_parameters()}
    assert encoder <= policy_ids and not own & policy_ids and own <= value_ids
    assert (encoder <= value_ids) == (value_input == "memory")
    assert policy_ids | value_ids == {id(p) for p in net.parameters()}


def test_an_rl2_value_encoder_is_a_second_gru_carried_in_the_state() -> None:
    torch.manual_seed(0)
    net = _rl2(value_input="encoder", memory_scope="trial")
    assert net.config.state_width == 32
    pool = make_pool(net, 4)
    assert pool.windows.shape == (4, 1, 32)
    rollout = _rollout(net)
    assert rollout.states is not None and rollout.states.shape == (200, 3, 32)
    # Both halves of the recorded state move: the value's GRU remembers as the policy's does.
    assert rollout.states[50:, :, :16].abs().sum() > 0 and rollout.states[50:, :, 16:].abs().sum() > 0
    advantages, returns = compute_gae(rollout, 0.9, 0.8)
    batch = sequences(rollout, advantages, returns, 48)
    with torch.no_grad():
        out, flat = forward(net, batch)
    torch.testing.assert_close(log_prob(out, flat.actions), flat.old_log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.value, flat.returns - flat.advantages, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ encoder block
def test_a_prenorm_encoder_is_causal_and_has_its_norms() -> None:
    torch.manual_seed(0)
    net = _trmrl(block="prenorm", init="xavier", window=8)
    names = set(net.state_dict())
    assert {"layers.0.norm1.weight", "layers.1.norm2.bias", "final_norm.weight"} <= names
    windows, _ = _windows(net, 16)
    newest = torch.full((16,), 5)
    full = net(windows, newest)
    # Later working memories cannot change what the newest one sees.
    changed = windows.clone()
    changed[:, 6:] = torch.randn(16, 2, net.config.token_dim)
    torch.testing.assert_close(net(changed, newest).mean, full.mean)
    torch.testing.assert_close(net(windows[:, :6], newest).mean, full.mean, atol=1e-5, rtol=1e-5)
    # The authors' block has no norms, so its checkpoints keep their keys.
    assert not any("norm" in k for k in _trmrl().state_dict())


def test_contradictory_settings_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="block=prenorm with init=t-fixup"):
        TrainConfig(block="prenorm", init="t-fixup")
    with pytest.raises(ValueError, match="block=prenorm with init=t-fixup"):
        ModelConfig(obs_dim=2, act_dim=2, block="prenorm", init="t-fixup")
    family = get_family("point-nav")
    long = preset_config("small-point-nav", {"window": str(family.episode_length + 1)})
    with pytest.raises(ValueError, match=r"window=\d+ with memory_scope=episode"):
        check_compatible(long, family, 1)
    # Kept across the trial, a window longer than an episode means something.
    check_compatible(preset_config("small-point-nav", {"window": "150", "memory_scope": "trial"}), family, 1)
    # init=auto picks what suits the block; RL² has neither block nor initialisation to choose.
    assert model_config_for(preset_config("small-point-nav", {"block": "prenorm"}), family).init == "xavier"
    assert model_config_for(preset_config("small-point-nav"), family).init == "t-fixup"
    rl2 = model_config_for(preset_config("small-point-nav-rl2", {"block": "prenorm"}), family)
    assert (rl2.block, rl2.window) == ("post", 1)


# ----------------------------------------------------------------- trained, checkpointed, resumed
@pytest.mark.slow
@pytest.mark.parametrize(
    ("preset", "sets"),
    [
        ("small-point-nav", {"value_norm": "popart", "value_input": "encoder", "optimization": "separate"}),
        ("small-point-nav", {"block": "prenorm", "window": "12", "memory_scope": "trial"}),
        ("small-point-nav", {"value_input": "memory_detached", "value_norm": "popart"}),
        ("small-point-nav-rl2", {"value_norm": "popart", "value_input": "encoder"}),
    ],
)
def test_each_option_trains_checkpoints_and_resumes(
    tmp_path: Path, preset: str, sets: dict[str, str]
) -> None:
    torch.set_num_threads(1)
    base = {"tasks_per_update": "4", "eval_every": "0", "eval_tasks": "2", "checkpoint_every": "1"}
    cfg = preset_config(preset, {**base, **sets, "total_steps": "800"})
    first = Trainer(cfg, tmp_path / "run", progress=False)
    try:
        first.train()
        state = {k: v.clone() for k, v in first.model.state_dict().items()}
    finally:
        first.close()
    if sets.get("value_norm") == "popart":
        assert float(state["value.scale"]) != 1.0 and float(state["value.shift"]) != 0.0
    again = Trainer(cfg, tmp_path / "run", progress=False)
    try:
        assert again.update == 1
        for key, value in again.model.state_dict().items():
            assert torch.equal(value, state[key]), key
    finally:
        again.close()
    final = load_checkpoint(tmp_path / "run" / "final")
    assert final.model.config == model_config_for(cfg, get_family(cfg.family))
    assert isinstance(build_model(final.model.config), type(final.model))
