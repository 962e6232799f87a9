"""Which network a config describes, and the memory pool that serves it.

Every path that builds a policy from a :class:`~trmrl.model.ModelConfig` -- the trainer, checkpoint
loading, evaluation -- goes through :func:`build_model` and :func:`make_pool`, so TrMRL and the RL²
baseline run the same rollouts, PPO, evaluation and checkpoints.
"""

from __future__ import annotations

import torch

from trmrl.model import ModelConfig, TrMRL
from trmrl.recurrent import RL2, RecurrentPool
from trmrl.slot_pool import SlotPool, SlotStore
from trmrl.trial_pool import TrialPool

Network = TrMRL | RL2


def build_model(config: ModelConfig) -> Network:
    """The network ``config`` describes (freshly initialised).

    Example:
        >>> type(build_model(ModelConfig(obs_dim=2, act_dim=2, window=1, policy="rl2"))).__name__
        'RL2'
    """
    return RL2(config) if config.policy == "rl2" else TrMRL(config)


def make_pool(
    model: Network,
    capacity: int,
    device: torch.device | str | None = None,
    *,
    cache_blocks: int | None = None,
) -> SlotStore:
    """A pool of ``capacity`` memories for ``model``: windows for TrMRL, each trial's working memories
    with their keys and values for a ``context="trial"`` TrMRL (``cache_blocks``: a fixed budget of
    cache blocks; ``None``: the cache grows on demand), hidden states for RL²."""
    if isinstance(model, RL2):
        return RecurrentPool(model, capacity, device)
    if model.config.context == "trial":
        return TrialPool(model, capacity, device, blocks=cache_blocks)
    return SlotPool(model, capacity, device)
