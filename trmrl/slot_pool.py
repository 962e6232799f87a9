"""The slot pool: every session's (or environment's) window in one preallocated device tensor.

A slot holds one window of working memories, its fill count and the last action executed from it.
:meth:`SlotPool.step` advances any set of slots by one step -- clearing those that start an episode,
appending their new working memories, sliding full windows -- and evaluates exactly those slots in a
single forward pass. There is no per-slot Python anywhere on this path: the trainer's rollouts and the
service's batched step both run it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from trmrl.memory import append_to_windows, begin_step
from trmrl.model import ModelConfig, PolicyOutput, TrMRL


class PoolStep(NamedTuple):
    """Result of one :meth:`SlotPool.step`."""

    output: PolicyOutput
    """Policy distribution and value for the stepped slots, in the order given."""
    windows: Tensor
    """``[B, N, token_dim]`` the updated windows the forward pass read (what PPO stores)."""
    newest: Tensor
    """``[B]`` position of the newest working memory in each window."""
    state: Tensor | None = None
    """``[B, rnn_hidden]`` a recurrent policy's hidden state before the step (``None`` for TrMRL)."""


class SlotMemory(NamedTuple):
    """The complete memory of some slots: what session snapshots and moves carry."""

    windows: Tensor
    """``[B, N, token_dim]``."""
    lengths: Tensor
    """``[B]`` memories held in each window (0..N)."""
    prev_action: Tensor
    """``[B, act_dim]``."""


class SlotStore:
    """What every memory pool holds per slot, and the verbs on it: ``[capacity, rows, width]`` memory
    rows (a TrMRL window of ``N`` working memories; an RL² hidden state as one row), a fill count
    (``0..rows``) and the last action executed. Nothing outside a pool touches these tensors: batched
    :meth:`read` and :meth:`write` by slot are the way in and out."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: ModelConfig,
        capacity: int,
        rows: int,
        width: int,
        device: torch.device | str | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (got {capacity})")
        self.config = config
        self.capacity = capacity
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.windows = torch.zeros(capacity, rows, width, device=self.device)
        self.lengths = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.prev_action = torch.zeros(capacity, config.act_dim, device=self.device)

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
        """Advance ``slots`` by one step and evaluate them in one forward pass.

        Args:
            slots: ``[B]`` distinct slot indices.
            obs: ``[B, obs_dim]`` the new observations.
            reward: ``[B]`` reward received for the slot's previous action (ignored at an episode start).
            episode_start: ``[B]`` bool, ``obs`` is the first observation of an episode.
            applied_action: ``[B, act_dim]`` what was really executed for the previous step, where it
                differs from the recorded action (e.g. a robot's own clipping).
            applied_mask: ``[B]`` bool, rows of ``applied_action`` to use (all rows if omitted).
            clear: ``[B]`` bool, rows to read as empty slots (as after :meth:`clear`). A mask rather than
                a prior :meth:`clear` keeps every shape fixed and the host out of the step: what a
                captured CUDA graph needs.

        The pool is written only after the forward pass succeeds, so a failure leaves it unchanged.
        """
        cfg = self.config
        memory, lengths, prev_action, tokens = begin_step(
            self._recent(slots),
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
        result = self._take_in(slots, memory, lengths, tokens)
        self.prev_action[slots] = prev_action
        return result

    def _recent(self, slots: Tensor) -> Tensor:
        """The memory rows a step reads and rolls forward (``[B, rows, width]``: the whole window)."""
        return self.windows[slots]

    def _take_in(self, slots: Tensor, memory: Tensor, lengths: Tensor, tokens: Tensor) -> PoolStep:
        """Evaluate the step and write the slots' new memory rows and fill counts (``lengths``: what
        each context holds before the new working memory, 0 where the step restarts it)."""
        result, memory, lengths = self._advance(memory, lengths, tokens)
        self.windows[slots] = memory
        self.lengths[slots] = lengths
        return result

    def _advance(self, memory: Tensor, lengths: Tensor, tokens: Tensor) -> tuple[PoolStep, Tensor, Tensor]:
        """Take in one working memory per row and evaluate: the step's result and the new memory rows
        and fill counts (written to the pool by :meth:`step`)."""
        raise NotImplementedError

    @property
    def memory_shape(self) -> tuple[int, int]:
        """``(rows, width)`` of one slot's memory: ``(N, token_dim)`` for a window, ``(1, H)`` for a
        hidden state."""
        return int(self.windows.shape[1]), int(self.windows.shape[2])

    @property
    def bytes_per_slot(self) -> int:
        """Device memory one slot occupies."""
        tensors = (self.windows, self.lengths, self.prev_action)
        return sum(t[0].numel() * t.element_size() for t in tensors)

    def clear(self, slots: Tensor) -> None:
        """Forget everything the given slots hold (a new trial, a freed session)."""
        self.windows[slots] = 0.0
        self.lengths[slots] = 0
        self.prev_action[slots] = 0.0

    def record_actions(self, slots: Tensor, actions: Tensor) -> None:
        """Remember the actions returned for ``slots``: they enter the next working memories."""
        self.prev_action[slots] = actions.to(self.prev_action.dtype)

    def read(self, slots: Tensor) -> SlotMemory:
        """Copies of the given slots' memories, on the pool's device."""
        return SlotMemory(self.windows[slots], self.lengths[slots], self.prev_action[slots])

    def write(self, slots: Tensor, memory: SlotMemory) -> None:
        """Load the given slots' memories (shapes and lengths are checked first: a refused write
        changes nothing)."""
        self.check_memory(slots, memory)
        self.windows[slots] = memory.windows.to(self.device, self.windows.dtype)
        self.lengths[slots] = memory.lengths.to(self.device, self.lengths.dtype)
        self.prev_action[slots] = memory.prev_action.to(self.device, self.prev_action.dtype)

    def check_memory(self, slots: Tensor, memory: SlotMemory) -> None:
        """Raise ``ValueError`` unless ``memory`` fits ``slots`` (shapes, and lengths in ``0..rows``)."""
        count = len(slots)
        rows, width = self.memory_shape
        expected = (count, rows, width)
        if tuple(memory.windows.shape) != expected:
            raise ValueError(f"windows shape {tuple(memory.windows.shape)} != {expected}")
        act_dim = self.prev_action.shape[1]
        if tuple(memory.prev_action.shape) != (count, act_dim):
            raise ValueError(f"prev_action shape {tuple(memory.prev_action.shape)} != {(count, act_dim)}")
        if tuple(memory.lengths.shape) != (count,) or ((memory.lengths < 0) | (memory.lengths > rows)).any():
            raise ValueError(f"lengths must be {count} values in [0, {rows}]")

    def addresses(self) -> tuple[int, ...]:
        """Where the pool's tensors live on the device (a captured CUDA graph holds these)."""
        return tuple(t.data_ptr() for t in (self.windows, self.lengths, self.prev_action))


class SlotPool(SlotStore):
    """Preallocated ``[capacity, N, token_dim]`` windows plus per-slot counters on one device.

    Example:
        >>> from trmrl.model import ModelConfig, TrMRL
        >>> net = TrMRL(ModelConfig.from_preset("small", obs_dim=2, act_dim=2))
        >>> pool = SlotPool(net, capacity=8)
        >>> slots = torch.tensor([0, 5])
        >>> step = pool.step(slots, torch.zeros(2, 2), torch.zeros(2), torch.ones(2, dtype=torch.bool))
        >>> pool.record_actions(slots, step.output.mean)
        >>> pool.lengths[slots].tolist()
        [1, 1]
    """

    def __init__(self, model: TrMRL, capacity: int, device: torch.device | str | None = None) -> None:
        cfg = model.config
        super().__init__(model, cfg, capacity, cfg.window, cfg.token_dim, device)
        self.model = model

    def _advance(self, memory: Tensor, lengths: Tensor, tokens: Tensor) -> tuple[PoolStep, Tensor, Tensor]:
        windows, lengths, newest = append_to_windows(memory, lengths, tokens)
        output = self.model(windows, newest)
        return PoolStep(output, windows, newest), windows, lengths
