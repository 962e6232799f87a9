"""Turning the network's Gaussian into actions, the same way in training, evaluation and serving."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from trmrl.model import PolicyOutput
from trmrl.slot_pool import PoolStep, SlotStore

_MASK64 = (1 << 64) - 1


def _to_signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64 constants as signed 64-bit integers (torch has no unsigned 64-bit arithmetic).
_GOLDEN = _to_signed64(0x9E3779B97F4A7C15)
_MIX1 = _to_signed64(0xBF58476D1CE4E5B9)
_MIX2 = _to_signed64(0x94D049BB133111EB)


def _splitmix64(x: Tensor) -> Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic, logical shifts emulated)."""
    x = x + _GOLDEN

    def shr(v: Tensor, n: int) -> Tensor:
        return (v >> n) & ((1 << (64 - n)) - 1)

    x = (x ^ shr(x, 30)) * _MIX1
    x = (x ^ shr(x, 27)) * _MIX2
    return x ^ shr(x, 31)


def counter_normal(seeds: Tensor, steps: Tensor, dim: int) -> Tensor:
    """Standard normal noise that is a pure function of ``(seed, step, component)``.

    Each session draws its exploration noise from its own seed and step counter, so a sampled action
    is reproducible -- a retried step, a restored snapshot or a replica that took the session over all
    draw the same noise -- and a whole batch of sessions draws in one vectorised call, with no
    per-session generator objects.

    Args:
        seeds: ``[B]`` int64 session seeds.
        steps: ``[B]`` int64 step counters.
        dim: number of components per row.

    Returns:
        ``[B, dim]`` float32 samples (Box-Muller over two hashed uniforms per component).

    Example:
        >>> a = counter_normal(torch.tensor([7]), torch.tensor([3]), 2)
        >>> torch.equal(a, counter_normal(torch.tensor([7]), torch.tensor([3]), 2))
        True
    """
    component = torch.arange(2 * dim, device=seeds.device, dtype=torch.int64)
    key = _splitmix64(_splitmix64(seeds.to(torch.int64)).unsqueeze(-1) ^ steps.to(torch.int64).unsqueeze(-1))
    bits = _splitmix64(key + component)  # [B, 2*dim]
    # 53 random bits -> uniform in (0, 1]; the +1 keeps log() finite.
    uniform = (((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) + 1.0) / float(1 << 53)
    u1, u2 = uniform[:, :dim], uniform[:, dim:]
    normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return normal.to(torch.float32)


def sample_actions(out: PolicyOutput, deterministic: Tensor | bool, noise: Tensor | None) -> Tensor:
    """Actions before clipping: the mean where deterministic, ``mean + std * noise`` elsewhere."""
    if noise is None:
        return out.mean
    sampled = out.mean + out.log_std.exp() * noise
    if isinstance(deterministic, bool):
        return out.mean if deterministic else sampled
    return torch.where(deterministic.unsqueeze(-1), out.mean, sampled)


def clip_actions(actions: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Clip to the model's action bounds: what an environment or robot executes."""
    return torch.maximum(torch.minimum(actions, high), low)


class ActResult(NamedTuple):
    """One policy step for a set of slots."""

    step: PoolStep
    """The pool step: distribution, value and the windows read."""
    raw: Tensor
    """``[B, act_dim]`` actions before clipping (what a log-probability refers to)."""
    actions: Tensor
    """``[B, act_dim]`` clipped actions: returned to the caller and remembered by the pool."""


def act(
    pool: SlotStore,
    slots: Tensor,
    obs: Tensor,
    reward: Tensor,
    episode_start: Tensor,
    *,
    low: Tensor,
    high: Tensor,
    deterministic: Tensor | bool,
    noise: Tensor | None,
    applied_action: Tensor | None = None,
    applied_mask: Tensor | None = None,
    clear: Tensor | None = None,
) -> ActResult:
    """Advance ``slots`` one step and choose their actions: the single policy step that training
    rollouts, evaluation and the service all run.

    Example:
        >>> from trmrl.model import ModelConfig, TrMRL
        >>> from trmrl.slot_pool import SlotPool
        >>> pool = SlotPool(TrMRL(ModelConfig.from_preset("small", obs_dim=2, act_dim=2)), capacity=2)
        >>> one = torch.ones(2)
        >>> start = torch.ones(2, dtype=torch.bool)
        >>> r = act(pool, torch.tensor([0, 1]), torch.zeros(2, 2), torch.zeros(2), start,
        ...         low=-one, high=one, deterministic=True, noise=None)
        >>> r.actions.shape
        torch.Size([2, 2])
    """
    step = pool.step(slots, obs, reward, episode_start, applied_action, applied_mask, clear)
    raw = sample_actions(step.output, deterministic, noise)
    actions = clip_actions(raw, low, high)
    pool.record_actions(slots, actions)
    return ActResult(step, raw, actions)
