"""PPO as TrMRL trains it: GAE over whole trials, the clipped objective, minibatches of stored windows.

TrMRL needs no backpropagation through time: every stored step carries the window the policy read, so a
minibatch is just a set of windows re-evaluated independently. The RL² baseline's memory is a hidden
state, so its minibatches are stored sequences (:class:`SequenceBatch`) unrolled from the hidden state
recorded at their start: truncated backpropagation through time, with the same losses and optimisers.
A ``context="trial"`` TrMRL reads the same :class:`SequenceBatch`, one whole trial per sequence, in one
causal forward (:meth:`~trmrl.model.TrMRL.forward_sequence`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.config import Optimization, TrainConfig, ValueLoss
from trainer.rollout import Rollout
from trmrl.model import PolicyOutput, TrMRL, log_prob
from trmrl.networks import Network
from trmrl.recurrent import RL2


class Batch(NamedTuple):
    """Flattened valid steps of a rollout, ready for minibatching."""

    windows: Tensor
    newest: Tensor
    actions: Tensor
    old_log_probs: Tensor
    advantages: Tensor
    returns: Tensor

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def take(self, index: Tensor) -> Batch:
        return Batch(*(t[index] for t in self))


class SequenceBatch(NamedTuple):
    """A rollout cut into sequences of ``L`` steps per environment, for a recurrent policy."""

    tokens: Tensor
    """``[C, L, token_dim]`` working memories."""
    hidden: Tensor
    """``[C, H]`` hidden state before each sequence's first step, as recorded during the rollout."""
    actions: Tensor
    """``[C, L, A]``."""
    old_log_probs: Tensor
    """``[C, L]``."""
    advantages: Tensor
    returns: Tensor
    mask: Tensor
    """``[C, L]`` bool: steps that were valid (a sequence past its trial's end is padded)."""
    episode_starts: Tensor
    """``[C, L]`` bool: steps that start an episode (an ``episode``-scoped policy clears its state)."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, index: Tensor) -> SequenceBatch:
        return SequenceBatch(*(t[index] for t in self))


AnyBatch = Batch | SequenceBatch


class UpdateStats(NamedTuple):
    policy_loss: float
    value_loss: float
    approx_kl: float
    clip_fraction: float
    grad_norm: float
    """Mean gradient norm of the policy parameters before clipping (after averaging over ranks)."""


def compute_gae(
    rollout: Rollout, gamma: float, lam: float, reward_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns over each whole trial.

    A trial is one sequence: the episodes of a trial are concatenated (RL²), so credit flows from a
    later episode back into the exploration of an earlier one. After an env's last valid step the
    continuation value is ``rollout.last_values`` -- ``V(s_T)`` when a time limit cut the episode, 0
    when it terminated. With ``delta_t = r_t + gamma * V_{t+1} - V_t``,
    ``A_t = delta_t + gamma * lam * A_{t+1}``, and ``A`` is zero past the end. ``reward_scale``
    multiplies ``r_t`` (the values are then estimates of scaled returns).
    """
    values, valid = rollout.values, rollout.valid
    steps = values.shape[0]
    time = torch.arange(steps, device=values.device).unsqueeze(1)
    is_last = time == (rollout.lengths - 1).unsqueeze(0)
    next_values = torch.cat([values[1:], torch.zeros_like(values[:1])])
    next_values = torch.where(is_last, rollout.last_values.unsqueeze(0), next_values)
    deltas = (rollout.rewards * reward_scale + gamma * next_values - values) * valid
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[0])
    for t in range(steps - 1, -1, -1):
        running = deltas[t] + gamma * lam * running * valid[t]
        advantages[t] = running
    return advantages, (advantages + values) * valid


def flatten(rollout: Rollout, advantages: Tensor, returns: Tensor) -> Batch:
    """Keep the valid steps only, as one flat batch."""
    mask = rollout.valid
    return Batch(
        rollout.windows[mask],
        rollout.newest[mask],
        rollout.actions[mask],
        rollout.log_probs[mask],
        advantages[mask],
        returns[mask],
    )


def sequences(rollout: Rollout, advantages: Tensor, returns: Tensor, length: int) -> SequenceBatch:
    """Cut each environment's trial into sequences of ``length`` steps (the last one padded), keeping
    those with at least one valid step; each starts from the hidden state the rollout recorded there.

    A ``context="trial"`` TrMRL records no state: its sequences are whole trials (``length`` the
    rollout's steps), each read in one causal forward, and ``hidden`` is empty (``[C, 0]``)."""
    steps, envs = rollout.valid.shape
    chunks = -(-steps // length)
    pad = chunks * length - steps

    def cut(t: Tensor) -> Tensor:
        # [T, E, ...] -> [chunks * E, length, ...], sequences of one env in time order.
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t
        t = t.reshape(chunks, length, envs, *t.shape[2:]).transpose(1, 2)
        return t.reshape(chunks * envs, length, *t.shape[3:])

    mask = cut(rollout.valid)
    keep = mask.any(1)
    if rollout.states is not None:
        hidden = rollout.states[::length].reshape(chunks * envs, -1)
    elif chunks == 1:
        hidden = rollout.actions.new_zeros(envs, 0)
    else:
        raise ValueError(
            f"the rollout holds no hidden states (not sampled by a recurrent policy): its {steps}-step "
            f"trials are read whole, not in sequences of {length}"
        )
    return SequenceBatch(
        cut(rollout.windows[:, :, 0])[keep],
        hidden[keep],
        cut(rollout.actions)[keep],
        cut(rollout.log_probs)[keep],
        cut(advantages)[keep],
        cut(returns)[keep],
        mask[keep],
        cut(rollout.episode_step == 0)[keep],
    )


def forward(model: Network, mb: AnyBatch) -> tuple[PolicyOutput, Batch]:
    """Evaluate a minibatch: the policy output of each valid step and those steps as a flat batch.

    Stored windows are re-read independently; stored sequences are unrolled from their recorded
    hidden state (gradients flow through the whole sequence, not into the recorded state).
    """
    if isinstance(mb, Batch):
        assert isinstance(model, TrMRL)
        return model(mb.windows, mb.newest), mb
    if isinstance(model, TrMRL):  # context="trial": each stored trial in one causal forward
        out = model.forward_sequence(mb.tokens, mb.episode_starts, mb.mask)
        mask = mb.mask
        flat = Batch(
            mb.tokens[mask].unsqueeze(1),
            torch.zeros(int(mask.sum()), dtype=torch.long, device=mask.device),
            mb.actions[mask],
            mb.old_log_probs[mask],
            mb.advantages[mask],
            mb.returns[mask],
        )
        return PolicyOutput(out.mean[mask], out.log_std, out.value[mask]), flat
    assert isinstance(model, RL2)
    out, _ = model.unroll(mb.tokens.transpose(0, 1), mb.hidden, mb.episode_starts.transpose(0, 1))
    mask = mb.mask.transpose(0, 1)
    flat = Batch(
        mb.tokens.transpose(0, 1)[mask].unsqueeze(1),
        torch.zeros(int(mask.sum()), dtype=torch.long, device=mask.device),
        mb.actions.transpose(0, 1)[mask],
        mb.old_log_probs.transpose(0, 1)[mask],
        mb.advantages.transpose(0, 1)[mask],
        mb.returns.transpose(0, 1)[mask],
    )
    return PolicyOutput(out.mean[mask], out.log_std, out.value[mask]), flat


def policy_loss(
    out: PolicyOutput, mb: Batch, clip: float, normalize_advantages: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate objective on one minibatch, and its diagnostics."""
    advantages = mb.advantages
    if normalize_advantages and len(mb) > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    log_ratio = log_prob(out, mb.actions) - mb.old_log_probs
    ratio = log_ratio.exp()
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
            "clip_fraction": ((ratio - 1).abs() > clip).float().mean(),
            "policy_loss": loss.detach(),
        }
    return loss, stats


def value_loss(
    value: Tensor, returns: Tensor, kind: ValueLoss, value_log_std: Tensor, scale: Tensor | float = 1.0
) -> Tensor:
    """The value regression: half squared error, or the Gaussian negative log-likelihood of the return
    with a learned standard deviation ``exp(value_log_std)`` (whose gradient rescales the mean's by
    ``1 / std^2``, so a value function that is often wrong takes smaller steps).

    The error is measured in units of ``scale``: a PopArt value head's target statistics (then the
    loss is the one on normalised targets, whatever the return's scale); 1 otherwise.
    """
    error = (returns - value) / scale
    if kind == "mse":
        return 0.5 * error.pow(2).mean()
    z = error * torch.exp(-value_log_std)
    return (0.5 * z.pow(2) + value_log_std + 0.5 * math.log(2 * math.pi)).mean()


class ValueTargetStats:
    """Running first and second moments of the value targets, for a PopArt value head.

    Each update's targets (all ranks' together) move the moments by an exponential average with weight
    ``beta`` (the first update sets them); :meth:`update` then hands the new shift and scale to the
    value head, which rescales its last layer so that no output changes. The moments live in the value
    head's buffers (``shift``, ``scale``), so checkpoints and resumed runs carry them.
    """

    def __init__(self, beta: float = 0.1, min_scale: float = 1e-2) -> None:
        self.beta = beta
        self.min_scale = min_scale

    def update(self, model: Network, returns: Tensor) -> None:
        head = model.value
        if not head.normalized:
            return
        moments = torch.stack([returns.sum(), returns.pow(2).sum(), torch.tensor(float(len(returns)))])
        moments = _all_reduce_moments(moments.double().cpu())
        count = float(moments[2])
        if count == 0:
            return
        mean, square = moments[0] / count, moments[1] / count
        old_mean = head.shift.double().cpu()
        old_square = head.scale.double().cpu() ** 2 + old_mean**2
        first = bool(head.scale == 1) and bool(head.shift == 0)
        beta = 1.0 if first else self.beta
        new_mean = (1 - beta) * old_mean + beta * mean
        new_square = (1 - beta) * old_square + beta * square
        scale = (new_square - new_mean**2).clamp(min=self.min_scale**2).sqrt()
        device = head.shift.device
        head.renormalize(new_mean.float().to(device), scale.float().to(device))


def _all_reduce_moments(moments: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(moments)
    return moments


def ppo_loss(
    model: Network,
    mb: AnyBatch,
    clip: float,
    vf_coef: float,
    normalize_advantages: bool,
    value_kind: ValueLoss = "mse",
    value_log_std: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate objective plus ``vf_coef`` times the value regression, on one minibatch."""
    out, flat = forward(model, mb)
    loss, stats = policy_loss(out, flat, clip, normalize_advantages)
    log_std = value_log_std if value_log_std is not None else torch.zeros((), device=out.value.device)
    v_loss = value_loss(out.value, flat.returns, value_kind, log_std, model.value.scale)
    stats["value_loss"] = v_loss.detach()
    return loss + vf_coef * v_loss, stats


class Optimizers(NamedTuple):
    """The optimisers of one run: ``value`` is ``None`` when one AdamW holds everything (``joint``)."""

    policy: torch.optim.AdamW
    value: torch.optim.AdamW | None

    def all(self) -> list[torch.optim.AdamW]:
        return [self.policy] if self.value is None else [self.policy, self.value]

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "value": None if self.value is None else self.value.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A run saved before the value optimiser existed stored the one optimiser's state directly.
        if "policy" not in state:
            self.policy.load_state_dict(state)
            return
        self.policy.load_state_dict(state["policy"])
        if self.value is not None and state["value"] is not None:
            self.value.load_state_dict(state["value"])


def make_optimizers(
    model: Network,
    policy_lr: float,
    value_lr: float,
    weight_decay: float,
    *,
    optimization: Optimization = "joint",
    value_log_std: nn.Parameter | None = None,
) -> Optimizers:
    """AdamW for the policy and the value function (TrMRL uses separate learning rates).

    ``joint``: one AdamW, the value head (and the value's learned std) in its own parameter group.
    ``separate``: the policy AdamW holds everything but the value function's own parameters (its head,
    and its encoder with ``value_input="encoder"``); the value AdamW holds those and -- where the value
    reads the episodic memory with its gradient (``memory``) -- the shared encoder as well, which is what
    the authors' code does (its value function wraps the policy's network). Each optimiser keeps its own
    moments for the encoder, so each pass moves an encoder weight by about its learning rate however
    large its gradient: the value loss cannot swamp the policy's update by gradient magnitude.
    """
    own = model.value_parameters()
    value_ids = {id(p) for p in own}
    policy_params = [p for p in model.parameters() if id(p) not in value_ids]
    value_params = own + ([value_log_std] if value_log_std is not None else [])
    if optimization == "joint":
        joint = torch.optim.AdamW(
            [
                {"params": policy_params, "lr": policy_lr, "base_lr": policy_lr, "role": "policy"},
                {"params": value_params, "lr": value_lr, "base_lr": value_lr, "role": "value"},
            ],
            weight_decay=weight_decay,
        )
        return Optimizers(joint, None)
    if model.config.value_input == "memory":
        value_params = model.encoder_parameters() + value_params
    policy = torch.optim.AdamW(
        [{"params": policy_params, "lr": policy_lr, "base_lr": policy_lr, "role": "policy"}],
        weight_decay=weight_decay,
    )
    value = torch.optim.AdamW(
        [{"params": value_params, "lr": value_lr, "base_lr": value_lr, "role": "value"}],
        weight_decay=weight_decay,
    )
    return Optimizers(policy, value)


def decayed_lr_factor(update: int, factor: float, start: int, end: int) -> float:
    """Geometric decay from 1 at update ``start`` to ``factor`` at update ``end``, constant outside."""
    progress = min(max((update - start) / (end - start), 0.0), 1.0)
    return float(factor**progress)


def minibatch_count(batch_size: int, minibatch_size: int) -> int:
    """Minibatches per epoch so that none exceeds ``minibatch_size``, agreed on by every rank.

    Every rank must run the same number of gradient all-reduces, whatever the size of its own batch
    (episodes that terminate early make batches differ): the count is the largest any rank needs, one
    collective before the update, and a rank with fewer steps runs smaller (possibly empty) minibatches.
    """
    local = torch.tensor([-(-batch_size // minibatch_size)], dtype=torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return max(int(local[0]), 1)


def samples(mb: AnyBatch) -> int:
    """Valid steps in a minibatch: what its loss is a mean over."""
    return len(mb) if isinstance(mb, Batch) else int(mb.mask.sum())


def _grad_norm(params: list[nn.Parameter]) -> float:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def average_gradients(params: list[nn.Parameter], count: int) -> None:
    """Make every rank's gradients the mean over all ranks' samples of this minibatch.

    Each rank's gradient is of a mean over its ``count`` samples; weighting by ``count`` before the
    sum makes the result the gradient of the mean over the union (an empty minibatch contributes
    nothing). One all-reduce of one flat buffer per optimiser step. No-op without a process group.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) * count for p in params if p.grad is not None])
    flat = torch.cat([flat, torch.tensor([float(count)], device=flat.device, dtype=flat.dtype)])
    dist.all_reduce(flat)
    total = max(float(flat[-1]), 1.0)
    offset = 0
    for p in params:
        assert p.grad is not None
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p) / total)
        offset += n


def _params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _step(optimizer: torch.optim.Optimizer, count: int, max_grad_norm: float) -> float:
    """Average gradients across ranks, clip each parameter group on its own, step; the first group's
    norm before clipping."""
    average_gradients(_params(optimizer), count)
    norms = []
    for group in optimizer.param_groups:
        if max_grad_norm > 0:
            # Each group (policy, value head) is clipped on its own: a large value-loss gradient must
            # not shrink the policy's step.
            norms.append(float(nn.utils.clip_grad_norm_(group["params"], max_grad_norm)))
        else:
            norms.append(_grad_norm(group["params"]))
    optimizer.step()
    return norms[0]


def update_settings(cfg: TrainConfig, **overrides: Any) -> dict[str, Any]:
    """:func:`ppo_update`'s settings as a run's configuration gives them (``overrides`` replace some)."""
    return {
        "epochs": cfg.epochs,
        "minibatch_size": cfg.minibatch_size,
        "clip": cfg.clip,
        "vf_coef": cfg.vf_coef,
        "max_grad_norm": cfg.max_grad_norm,
        "normalize_advantages": cfg.normalize_advantages,
        "value_kind": cfg.value_loss,
        **overrides,
    }


def ppo_update(
    model: Network,
    optimizers: Optimizers,
    batch: AnyBatch,
    *,
    epochs: int,
    minibatch_size: int,
    clip: float,
    vf_coef: float,
    max_grad_norm: float,
    normalize_advantages: bool,
    generator: torch.Generator,
    value_kind: ValueLoss = "mse",
    value_log_std: Tensor | None = None,
) -> UpdateStats:
    """``epochs`` passes of shuffled minibatches over ``batch``.

    With one optimiser the loss is joint; with two, a policy pass over all epochs and minibatches, then
    a value pass. Under ``torchrun`` every rank runs the same number of steps (see
    :func:`minibatch_count`) and gradients are averaged over all ranks' samples before each step.
    ``minibatch_size`` counts steps; a :class:`SequenceBatch` is cut into minibatches of
    ``minibatch_size // L`` sequences.
    """
    device = batch.windows.device if isinstance(batch, Batch) else batch.tokens.device
    if isinstance(batch, Batch):
        per_minibatch = minibatch_size
    else:
        per_minibatch = max(1, minibatch_size // batch.tokens.shape[1])
    n_mb = minibatch_count(len(batch), per_minibatch)
    log_std = value_log_std if value_log_std is not None else torch.zeros((), device=device)
    totals = {"approx_kl": 0.0, "clip_fraction": 0.0, "policy_loss": 0.0, "value_loss": 0.0}
    weights = {"policy": 0, "value": 0}
    grad_norm, steps = 0.0, 0

    def minibatches() -> Iterator[AnyBatch]:
        for _ in range(epochs):
            order = torch.randperm(len(batch), generator=generator).to(device)
            for index in torch.tensor_split(order, n_mb):
                yield batch.take(index)

    def zero_loss() -> Tensor:
        # An empty local minibatch still takes part in the all-reduce, with zero gradient.
        return sum((p.sum() * 0.0 for p in model.parameters()), torch.zeros((), device=log_std.device))

    policy_opt, value_opt = optimizers
    for mb in minibatches():
        n = samples(mb)
        policy_opt.zero_grad(set_to_none=True)
        if n:
            if value_opt is None:
                loss, stats = ppo_loss(model, mb, clip, vf_coef, normalize_advantages, value_kind, log_std)
            else:
                loss, stats = policy_loss(*forward(model, mb), clip, normalize_advantages)
            loss.backward()
            for key, value in stats.items():
                totals[key] += float(value) * n
            weights["policy"] += n
        else:
            zero_loss().backward()
        grad_norm += _step(policy_opt, n, max_grad_norm)
        steps += 1
    if value_opt is None:
        weights["value"] = weights["policy"]  # the value loss rode along in the joint loss
    else:
        for mb in minibatches():
            n = samples(mb)
            value_opt.zero_grad(set_to_none=True)
            if n:
                out, flat = forward(model, mb)
                v_loss = value_loss(out.value, flat.returns, value_kind, log_std, model.value.scale)
                v_loss.backward()
                totals["value_loss"] += float(v_loss.detach()) * n
                weights["value"] += n
            else:
                zero_loss().backward()
            _step(value_opt, n, max_grad_norm)
    p_weight, v_weight = max(weights["policy"], 1), max(weights["value"], 1)
    return UpdateStats(
        policy_loss=totals["policy_loss"] / p_weight,
        value_loss=totals["value_loss"] / v_weight,
        approx_kl=totals["approx_kl"] / p_weight,
        clip_fraction=totals["clip_fraction"] / p_weight,
        grad_norm=grad_norm / max(steps, 1),
    )


class RunningMeanStd:
    """Running mean and variance of observations (parallel-merge formula), for the network's statistics."""

    def __init__(self, dim: int) -> None:
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.var = torch.ones(dim, dtype=torch.float64)
        self.count = 0.0

    def update(self, batch_mean: Tensor, batch_var: Tensor, batch_count: float) -> None:
        """Merge the moments of a new batch."""
        if batch_count <= 0:
            return
        delta = batch_mean.double() - self.mean
        total = self.count + batch_count
        m2 = (
            self.var * self.count
            + batch_var.double() * batch_count
            + delta**2 * self.count * batch_count / total
        )
        self.mean = self.mean + delta * batch_count / total
        self.var = m2 / total
        self.count = total

    def apply_to(self, model: Network) -> None:
        """Write the statistics into the network (used by every path that evaluates it).

        An oracle's observation ends with the task parameters; those keep identity statistics.
        """
        n = self.mean.shape[0]
        model.obs_mean[:n] = self.mean.float()
        model.obs_std[:n] = self.var.sqrt().clamp(min=1e-4).float()

    def state_dict(self) -> dict[str, Tensor | float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Tensor | float]) -> None:
        mean, var, count = state["mean"], state["var"], state["count"]
        assert isinstance(mean, Tensor) and isinstance(var, Tensor)
        self.mean, self.var, self.count = mean.double(), var.double(), float(count)
