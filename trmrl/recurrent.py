"""The RL² baseline: a recurrent policy over the same working memories, trained by the same trainer.

RL² (Duan et al., 2016; Wang et al., 2016) feeds a recurrent network the observation, the previous
action, the previous reward and the done flag -- exactly a TrMRL working memory -- and carries its hidden
state across the episodes of a trial. Its memory is therefore one vector per session, not a window:
:class:`RecurrentPool` holds ``[capacity, rnn_hidden]`` hidden states and offers the same step as
:class:`~trmrl.slot_pool.SlotPool`, so rollouts, evaluation and :func:`trmrl.policy.act` run it
unchanged. PPO trains it with truncated backpropagation through time over stored sequences
(:meth:`RL2.unroll` from the hidden state recorded during the rollout).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trmrl.memory import begin_step
from trmrl.model import ModelConfig, PolicyOutput, mlp, normalize_tokens
from trmrl.slot_pool import PoolStep, SlotMemory


class RL2(nn.Module):
    """A GRU over working memories with a Gaussian policy head and a value head.

    ``value_input="memory"`` puts the value head on the hidden state, ``"observation"`` on the newest
    working memory alone, as for TrMRL.

    Example:
        >>> cfg = ModelConfig(obs_dim=2, act_dim=2, window=1, policy="rl2", rnn_hidden=16)
        >>> net = RL2(cfg)
        >>> out, h = net.step(torch.zeros(3, cfg.token_dim), torch.zeros(3, 16))
        >>> out.mean.shape, h.shape
        (torch.Size([3, 2]), torch.Size([3, 16]))
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.policy != "rl2":
            raise ValueError(f"RL2 needs a config with policy='rl2' (got {config.policy!r})")
        self.config = config
        c = config
        self.obs_mean: Tensor
        self.obs_std: Tensor
        self.gru = nn.GRU(c.token_dim, c.rnn_hidden)
        self.policy_mean = mlp([c.rnn_hidden, *c.head_hidden, c.act_dim], out_gain=c.policy_out_gain)
        self.log_std = nn.Parameter(torch.full((c.act_dim,), math.log(c.init_std)))
        value_in = c.rnn_hidden if c.value_input == "memory" else c.token_dim
        self.value = mlp([value_in, *c.head_hidden, 1], out_gain=1.0)
        self.register_buffer("obs_mean", torch.zeros(c.obs_dim))
        self.register_buffer("obs_std", torch.ones(c.obs_dim))
        with torch.no_grad():
            for name, param in self.gru.named_parameters():
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(param)
                elif name.startswith("weight_hh"):
                    for gate in param.chunk(3, 0):  # reset, update, new: each its own orthogonal block
                        nn.init.orthogonal_(gate)
                else:
                    nn.init.zeros_(param)

    def unroll(
        self, tokens: Tensor, hidden: Tensor, episode_starts: Tensor | None = None
    ) -> tuple[PolicyOutput, Tensor]:
        """Run ``L`` steps for ``B`` sequences.

        Args:
            tokens: ``[L, B, token_dim]`` working memories, oldest first.
            hidden: ``[B, rnn_hidden]`` the state before the first of them (already cleared where the
                first step starts an episode of an ``episode``-scoped policy).
            episode_starts: ``[L, B]`` bool, steps that start an episode: with ``memory_scope="episode"``
                the state is cleared before them, as the pool does.

        Returns:
            The policy output of every step (``mean [L, B, act_dim]``, ``value [L, B]``) and the final
            hidden state ``[B, rnn_hidden]``.
        """
        x = normalize_tokens(tokens, self.obs_mean, self.obs_std)
        h = hidden.unsqueeze(0).contiguous()
        resets = episode_starts if self.config.memory_scope == "episode" else None
        if resets is None or not bool(resets[1:].any()):
            states, last = self.gru(x, h)
        else:
            # A sequence crosses an episode start: step through it, clearing the state there.
            outputs = []
            for t in range(x.shape[0]):
                if t:
                    h = torch.where(resets[t].view(1, -1, 1), torch.zeros_like(h), h)
                out_t, h = self.gru(x[t : t + 1], h)
                outputs.append(out_t)
            states, last = torch.cat(outputs), h
        value_in = states if self.config.value_input == "memory" else x
        return PolicyOutput(self.policy_mean(states), self.log_std, self.value(value_in).squeeze(-1)), last[0]

    def step(self, tokens: Tensor, hidden: Tensor) -> tuple[PolicyOutput, Tensor]:
        """One step for a batch: ``tokens [B, token_dim]``, ``hidden [B, rnn_hidden]``."""
        out, last = self.unroll(tokens.unsqueeze(0), hidden)
        return PolicyOutput(out.mean[0], out.log_std, out.value[0]), last


class RecurrentPool:
    """Every session's (or environment's) hidden state in one ``[capacity, rnn_hidden]`` tensor.

    The same interface as :class:`~trmrl.slot_pool.SlotPool`: :meth:`step` clears the slots that start
    a trial (or an episode, with ``memory_scope="episode"``), builds their working memories, advances
    their hidden states in one forward pass and writes the pool only after it succeeds. The step's
    ``windows`` are the working memories it read (``[B, 1, token_dim]``) and its ``state`` the hidden
    states before the step: what truncated backpropagation through time starts from.

    Example:
        >>> cfg = ModelConfig(obs_dim=2, act_dim=2, window=1, policy="rl2", rnn_hidden=8)
        >>> pool = RecurrentPool(RL2(cfg), capacity=4)
        >>> slots = torch.tensor([0, 3])
        >>> step = pool.step(slots, torch.ones(2, 2), torch.zeros(2), torch.ones(2, dtype=torch.bool))
        >>> bool(pool.hidden[slots].abs().sum() > 0), bool(pool.hidden[1].abs().sum() == 0)
        (True, True)
    """

    def __init__(self, model: RL2, capacity: int, device: torch.device | str | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (got {capacity})")
        cfg = model.config
        self.model = model
        self.capacity = capacity
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.hidden = torch.zeros(capacity, cfg.rnn_hidden, device=self.device)
        self.lengths = torch.zeros(capacity, dtype=torch.long, device=self.device)
        """1 once a slot has taken a step since it was cleared, else 0 (a window's fill count, capped)."""
        self.prev_action = torch.zeros(capacity, cfg.act_dim, device=self.device)

    @property
    def bytes_per_slot(self) -> int:
        """Device memory one slot occupies."""
        tensors = (self.hidden, self.lengths, self.prev_action)
        return sum(t[0].numel() * t.element_size() for t in tensors)

    def clear(self, slots: Tensor) -> None:
        """Forget everything the given slots hold (a new trial, a freed session)."""
        self.hidden[slots] = 0.0
        self.lengths[slots] = 0
        self.prev_action[slots] = 0.0

    def step(
        self,
        slots: Tensor,
        obs: Tensor,
        reward: Tensor,
        episode_start: Tensor,
        applied_action: Tensor | None = None,
        applied_mask: Tensor | None = None,
        clear: Tensor | None = None,
    ) -> PoolStep:
        """Advance ``slots`` by one step; the arguments mean what they mean for ``SlotPool.step``."""
        cfg = self.model.config
        hidden, _, prev_action, tokens = begin_step(
            self.hidden[slots],
            self.lengths[slots],
            self.prev_action[slots],
            obs,
            reward,
            episode_start,
            applied_action,
            applied_mask,
            clear,
            episode_scope=cfg.memory_scope == "episode",
            include_previous=cfg.include_previous,
        )
        output, new_hidden = self.model.step(tokens, hidden)
        self.hidden[slots] = new_hidden
        self.lengths[slots] = 1
        self.prev_action[slots] = prev_action
        newest = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
        return PoolStep(output, tokens.unsqueeze(1), newest, hidden)

    def record_actions(self, slots: Tensor, actions: Tensor) -> None:
        """Remember the actions returned for ``slots``: they enter the next working memories."""
        self.prev_action[slots] = actions.to(self.prev_action.dtype)

    def read(self, slots: Tensor) -> SlotMemory:
        """Copies of the given slots' memories: each hidden state as a one-row ``windows`` entry."""
        return SlotMemory(self.hidden[slots].unsqueeze(1), self.lengths[slots], self.prev_action[slots])

    def write(self, slots: Tensor, memory: SlotMemory) -> None:
        """Load the given slots' memories (shapes and lengths are checked first: a refused write
        changes nothing)."""
        cfg = self.model.config
        count = len(slots)
        if tuple(memory.windows.shape) != (count, 1, cfg.rnn_hidden):
            raise ValueError(
                f"hidden state shape {tuple(memory.windows.shape)} != {(count, 1, cfg.rnn_hidden)}"
            )
        if tuple(memory.prev_action.shape) != (count, cfg.act_dim):
            raise ValueError(f"prev_action shape {tuple(memory.prev_action.shape)} != {(count, cfg.act_dim)}")
        if tuple(memory.lengths.shape) != (count,) or ((memory.lengths < 0) | (memory.lengths > 1)).any():
            raise ValueError(f"lengths must be {count} values in [0, 1]")
        self.hidden[slots] = memory.windows[:, 0].to(self.device, self.hidden.dtype)
        self.lengths[slots] = memory.lengths.to(self.device, self.lengths.dtype)
        self.prev_action[slots] = memory.prev_action.to(self.device, self.prev_action.dtype)

    def addresses(self) -> tuple[int, ...]:
        """Where the pool's tensors live on the device."""
        return tuple(t.data_ptr() for t in (self.hidden, self.lengths, self.prev_action))
