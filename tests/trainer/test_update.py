"""The PPO update on real rollouts: re-evaluation finds the stored quantities again, and what separate
policy and value optimisers do to the shared encoder."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from trainer.config import preset_config
from trainer.ppo import (
    Batch,
    compute_gae,
    flatten,
    make_optimizers,
    policy_loss,
    ppo_update,
)
from trainer.rollout import TrialSampler
from trainer.run import model_config_for
from trmrl.model import ModelConfig, TrMRL, log_prob
from trmrl.tasks import get_family


def _real_batch(model: TrMRL, family_name: str, n_envs: int, seed: int = 0) -> Batch:
    family = get_family(family_name)
    sampler = TrialSampler(family, model, n_envs=n_envs, episodes_per_trial=2)
    try:
        model.eval()
        rollout = sampler.run(
            family.sample_tasks("train", n_envs, seed=seed),
            seed=seed,
            generator=torch.Generator().manual_seed(seed),
        )
    finally:
        sampler.close()
    advantages, returns = compute_gae(rollout, 0.9, 0.8)
    return flatten(rollout, advantages, returns)


@pytest.mark.parametrize("scope", ["episode", "trial"])
def test_reevaluating_a_flattened_rollout_finds_the_stored_log_probs_and_values(scope: str) -> None:
    torch.manual_seed(0)
    model = TrMRL(ModelConfig.from_preset("small", obs_dim=2, act_dim=2, memory_scope=scope))
    batch = _real_batch(model, "point-nav", n_envs=3)
    # The scope is real: in the second episode, the first window is empty with episode scope and
    # holds the first episode's last memories with trial scope.
    # Flattened time-major: env 0's step 100, the second episode's first step, is row 100 * 3.
    second_start = 100 * 3
    assert int(batch.newest[second_start]) == (0 if scope == "episode" else model.config.window - 1)

    model.train()
    with torch.no_grad():
        out = model(batch.windows, batch.newest)
    torch.testing.assert_close(log_prob(out, batch.actions), batch.old_log_probs, atol=1e-5, rtol=1e-5)
    # The stored values are what GAE was computed from: returns - advantages.
    torch.testing.assert_close(out.value, batch.returns - batch.advantages, atol=1e-5, rtol=1e-5)
    _, stats = policy_loss(out, batch, clip=0.2, normalize_advantages=False)
    assert float(stats["approx_kl"]) < 1e-9  # ratio 1 at the first epoch
    assert float(stats["clip_fraction"]) == 0.0


def _paper_dir_model(seed: int = 0) -> tuple[TrMRL, Any]:
    cfg = preset_config("paper-halfcheetah-dir")
    torch.manual_seed(seed)
    return TrMRL(model_config_for(cfg, get_family(cfg.family))), cfg


def _encoder(model: TrMRL) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.encoder_parameters()])


def _encoder_grad(model: TrMRL, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, model.encoder_parameters())
    return torch.cat([g.reshape(-1) for g in grads])


def _one_update(model: TrMRL, cfg: Any, batch: Batch, optimization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch, one minibatch: the encoder's step from the policy pass and from the value pass (the
    second is zero with one joint optimiser)."""
    log_std = torch.nn.Parameter(torch.zeros(()))
    kind = cfg.value_loss if optimization == "separate" else "mse"
    optimizers = make_optimizers(
        model,
        cfg.policy_lr,
        cfg.value_lr,
        cfg.weight_decay,
        optimization=optimization,
        value_log_std=log_std if kind == "gaussian_nll" else None,
    )
    before = _encoder(model)
    after_policy: list[torch.Tensor] = []
    if optimizers.value is not None:
        optimizers.value.register_step_pre_hook(lambda *_: after_policy.append(_encoder(model)))
    ppo_update(
        model,
        optimizers,
        batch,
        epochs=1,
        minibatch_size=len(batch),
        clip=cfg.clip,
        vf_coef=cfg.vf_coef,
        max_grad_norm=cfg.max_grad_norm,
        normalize_advantages=cfg.normalize_advantages,
        generator=torch.Generator().manual_seed(0),
        value_kind=kind,
        value_log_std=log_std,
    )
    after = _encoder(model)
    middle = after_policy[0] if after_policy else after
    return middle - before, after - middle


@pytest.mark.slow
def test_with_the_paper_settings_the_value_objective_cannot_steer_the_policys_encoder_step() -> None:
    """What the authors' scheme does to the encoder, checked on a real HalfCheetahDir rollout.

    The value function reads the episodic memory and its optimiser holds the encoder (the authors'
    value function wraps the policy network), so the encoder *is* trained by the value objective --
    in a pass of its own, with its own Adam moments. The policy pass never sees the value loss, and
    each pass's first step moves an encoder weight by at most that pass's learning rate (Adam's
    ``lr * g / (|g| + eps)`` plus AdamW's decoupled decay), however large the value gradient grows.
    With one summed loss, by contrast, the size of the returns changes the encoder's step.
    """
    model, cfg = _paper_dir_model()
    batch = _real_batch(model, cfg.family, n_envs=2)
    model.train()
    # Returns 100x larger: a value gradient 100x larger, the advantages (the policy's signal) unchanged.
    loud = Batch(*batch[:5], batch.returns * 100)
    scale = _encoder(model).abs()
    # A step is read back as a difference of float32 weights: allow a few units in their last place
    # (of the weight, and of the step itself).
    rounding = (
        4 * torch.finfo(torch.float32).eps * (scale + 1.0) * cfg.policy_lr
        + 4 * torch.finfo(torch.float32).eps * scale
    )

    steps = {}
    for name, b in (("quiet", batch), ("loud", loud)):
        for optimization in ("separate", "joint"):
            steps[name, optimization] = _one_update(copy.deepcopy(model), cfg, b, optimization)

    quiet_policy, quiet_value = steps["quiet", "separate"]
    loud_policy, loud_value = steps["loud", "separate"]
    torch.testing.assert_close(quiet_policy, loud_policy, atol=0.0, rtol=0.0)
    for step, lr in ((quiet_policy, cfg.policy_lr), (quiet_value, cfg.value_lr), (loud_value, cfg.value_lr)):
        bound = lr * (1 + cfg.weight_decay * (scale + 2 * lr)) + rounding
        assert bool((step.abs() <= bound).all())
        assert float(step.abs().max()) > 0.5 * lr  # a real step, not a vanishing one
    # Equal learning rates on HalfCheetahDir: the two objectives move the encoder by comparable amounts.
    assert cfg.policy_lr == cfg.value_lr
    assert 0.5 < float(quiet_value.norm() / quiet_policy.norm()) < 2.0

    # One summed loss (the joint scheme, here without clipping): the returns' scale steers the step.
    quiet_joint, loud_joint = steps["quiet", "joint"][0], steps["loud", "joint"][0]
    flipped = float((torch.sign(quiet_joint) != torch.sign(loud_joint)).float().mean())
    assert flipped > 0.05


def test_joint_and_separate_optimisers_hold_the_parameters_they_should() -> None:
    model, _ = _paper_dir_model()
    encoder = {id(p) for p in model.encoder_parameters()}
    value_head = {id(p) for p in model.value.parameters()}
    separate = make_optimizers(model, 1e-3, 1e-3, 0.01, optimization="separate")
    assert separate.value is not None
    policy_ids = {id(p) for g in separate.policy.param_groups for p in g["params"]}
    value_ids = {id(p) for g in separate.value.param_groups for p in g["params"]}
    assert encoder <= policy_ids and encoder <= value_ids
    assert value_head <= value_ids and not value_head & policy_ids
    observation_model = copy.deepcopy(model)
    observation_model.config = ModelConfig.from_dict({**model.config.to_dict(), "value_input": "observation"})
    only_head = make_optimizers(observation_model, 1e-3, 1e-3, 0.01, optimization="separate")
    assert only_head.value is not None
    assert not {id(p) for p in observation_model.encoder_parameters()} & {
        id(p) for g in only_head.value.param_groups for p in g["params"]
    }
    joint = make_optimizers(model, 1e-3, 1e-3, 0.0, optimization="joint")
    assert joint.value is None and [g["role"] for g in joint.policy.param_groups] == ["policy", "value"]
