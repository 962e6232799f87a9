"""The RL² baseline: a recurrent policy over the same working memories, trained by the same trainer.

RL² (Duan et al., 2016; Wang et al., 2016) feeds a recurrent network the observation, the previous
action, the previous reward and the done flag -- exactly a TrMRL working memory -- and carries its hidden
state across the episodes of a trial. Its memory is therefore one vector per session, not a window:
:class:`RecurrentPool` holds each slot's hidden state as its one memory row and shares the store and the
step of :class:`~trmrl.slot_pool.SlotPool`, so rollouts, evaluation and :func:`trmrl.policy.act` run it
unchanged. PPO trains it with truncated backpropagation through time over stored sequences
(:meth:`RL2.unroll` from the hidden state recorded during the rollout).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trmrl.model import ModelConfig, PolicyOutput, heads, memory_for_value, normalize_tokens
from trmrl.slot_pool import PoolStep, SlotStore


class RL2(nn.Module):
    """A GRU over working memories with a Gaussian policy head and a value head.

    ``value_input`` as for TrMRL: ``memory`` puts the value head on the hidden state, ``memory_detached``
    on the hidden state without its gradient, ``encoder`` on the hidden state of a second GRU of its own
    (the recurrent state is then both GRUs' states side by side), ``observation`` on the newest working
    memory alone.

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
        self.policy_mean, self.log_std, self.value = heads(c, c.rnn_hidden)
        self.register_buffer("obs_mean", torch.zeros(c.obs_dim))
        self.register_buffer("obs_std", torch.ones(c.obs_dim))
        _init_gru(self.gru)
        self.value_gru = nn.GRU(c.token_dim, c.rnn_hidden) if c.value_input == "encoder" else None
        if self.value_gru is not None:
            _init_gru(self.value_gru)

    def unroll(
        self, tokens: Tensor, hidden: Tensor, episode_starts: Tensor | None = None
    ) -> tuple[PolicyOutput, Tensor]:
        """Run ``L`` steps for ``B`` sequences.

        Args:
            tokens: ``[L, B, token_dim]`` working memories, oldest first.
            hidden: ``[B, state_width]`` the state before the first of them (already cleared where the
                first step starts an episode of an ``episode``-scoped policy).
            episode_starts: ``[L, B]`` bool, steps that start an episode: with ``memory_scope="episode"``
                the state is cleared before them, as the pool does.

        Returns:
            The policy output of every step (``mean [L, B, act_dim]``, ``value [L, B]``) and the final
            state ``[B, state_width]``.
        """
        x = normalize_tokens(tokens, self.obs_mean, self.obs_std)
        resets = episode_starts if self.config.memory_scope == "episode" else None
        width = self.config.rnn_hidden
        states, last = _run(self.gru, x, hidden[:, :width], resets)
        value_in = memory_for_value(self.config.value_input, states)
        if value_in is None and self.value_gru is not None:
            value_in, value_last = _run(self.value_gru, x, hidden[:, width:], resets)
            last = torch.cat([last, value_last], -1)
        elif value_in is None:
            value_in = x
        return PolicyOutput(self.policy_mean(states), self.log_std, self.value(value_in).squeeze(-1)), last

    def step(self, tokens: Tensor, hidden: Tensor) -> tuple[PolicyOutput, Tensor]:
        """One step for a batch: ``tokens [B, token_dim]``, ``hidden [B, state_width]``."""
        out, last = self.unroll(tokens.unsqueeze(0), hidden)
        return PolicyOutput(out.mean[0], out.log_std, out.value[0]), last

    def value_parameters(self) -> list[nn.Parameter]:
        """What only the value function uses: its head and, with ``value_input="encoder"``, its GRU."""
        extra = list(self.value_gru.parameters()) if self.value_gru is not None else []
        return [*self.value.parameters(), *extra]

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters that produce the shared memory (the policy's GRU)."""
        return list(self.gru.parameters())


def _init_gru(gru: nn.GRU) -> None:
    with torch.no_grad():
        for name, param in gru.named_parameters():
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(param)
            elif name.startswith("weight_hh"):
                for gate in param.chunk(3, 0):  # reset, update, new: each its own orthogonal block
                    nn.init.orthogonal_(gate)
            else:
                nn.init.zeros_(param)


def _run(gru: nn.GRU, x: Tensor, hidden: Tensor, resets: Tensor | None) -> tuple[Tensor, Tensor]:
    """``gru`` over ``x [L, B, D]`` from ``hidden [B, H]``, the state cleared before the steps where
    ``resets [L, B]`` is set (after the first: the caller clears the first); all states and the last."""
    h = hidden.unsqueeze(0).contiguous()
    if resets is None or not bool(resets[1:].any()):
        states, last = gru(x, h)
        return states, last[0]
    # A sequence crosses an episode start: step through it, clearing the state there.
    outputs = []
    for t in range(x.shape[0]):
        if t:
            h = torch.where(resets[t].view(1, -1, 1), torch.zeros_like(h), h)
        out_t, h = gru(x[t : t + 1], h)
        outputs.append(out_t)
    return torch.cat(outputs), h[0]


class RecurrentPool(SlotStore):
    """Every session's (or environment's) hidden state as the one memory row of its slot.

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
        cfg = model.config
        super().__init__(model, cfg, capacity, 1, cfg.state_width, device)
        self.model = model

    @property
    def hidden(self) -> Tensor:
        """``[capacity, state_width]``: the slots' hidden states (a view of their one memory row)."""
        return self.windows[:, 0]

    def _advance(self, memory: Tensor, lengths: Tensor, tokens: Tensor) -> tuple[PoolStep, Tensor, Tensor]:
        hidden = memory[:, 0]
        output, new_hidden = self.model.step(tokens, hidden)
        newest = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
        step = PoolStep(output, tokens.unsqueeze(1), newest, hidden)
        return step, new_hidden.unsqueeze(1), torch.ones_like(lengths)
