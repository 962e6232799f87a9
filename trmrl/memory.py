"""Working memories and the sliding window that holds them.

A TrMRL policy sees the N most recent *working memories*: at step t the token is
``[obs_t, a_{t-1}, r_{t-1}, done_{t-1}]``. Every path that feeds the network -- the trainer's rollouts,
its evaluation and the service -- builds tokens and slides windows with the functions in this module
and nowhere else.

Windows are left-aligned: a window holding ``c < N`` memories has them at positions ``0..c-1`` and
zeros after; the newest memory sits at ``c-1``. Because the encoder is causal, the zero padding after
the newest memory never influences its output. Once full, the window slides: the oldest memory is
dropped and the newest lands at ``N-1``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_dim(obs_dim: int, act_dim: int) -> int:
    """Width of one working memory: observation, previous action, previous reward, done flag."""
    return obs_dim + act_dim + 2


def working_memory(
    obs: Tensor,
    prev_action: Tensor,
    prev_reward: Tensor,
    prev_done: Tensor,
    *,
    include_previous: bool = True,
) -> Tensor:
    """Build working memories ``[obs, a_{t-1}, r_{t-1}, done_{t-1}]`` for a batch.

    Args:
        obs: ``[B, obs_dim]`` observations.
        prev_action: ``[B, act_dim]`` action executed before ``obs`` (zeros at an episode start).
        prev_reward: ``[B]`` reward received for that action (zero at an episode start).
        prev_done: ``[B]`` 1 where the previous transition ended an episode of the same trial.
        include_previous: ``False`` for a memoryless policy: the action, reward and flag are zeroed so
            the token carries the observation alone while keeping the same width.

    Returns:
        ``[B, obs_dim + act_dim + 2]`` float tensor.
    """
    dtype = obs.dtype
    previous = torch.cat(
        [prev_action.to(dtype), prev_reward.to(dtype).unsqueeze(-1), prev_done.to(dtype).unsqueeze(-1)], -1
    )
    if not include_previous:
        previous = torch.zeros_like(previous)
    return torch.cat([obs, previous], -1)


def append_to_windows(windows: Tensor, lengths: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Append one working memory to each window, sliding the windows that are full.

    Args:
        windows: ``[B, N, D]`` left-aligned windows (not modified).
        lengths: ``[B]`` number of memories held (0..N).
        tokens: ``[B, D]`` the new working memories.

    Returns:
        ``(new_windows, new_lengths, newest)`` where ``newest[b]`` is the position of the new memory.
    """
    n = windows.shape[1]
    full = (lengths >= n).view(-1, 1, 1)
    slid = torch.cat([windows[:, 1:], torch.zeros_like(windows[:, :1])], 1)
    out = torch.where(full, slid, windows)
    newest = lengths.clamp(max=n - 1)
    out[torch.arange(out.shape[0], device=out.device), newest] = tokens
    return out, (newest + 1), newest


def begin_step(
    memory: Tensor,
    lengths: Tensor,
    prev_action: Tensor,
    obs: Tensor,
    reward: Tensor,
    episode_start: Tensor,
    applied_action: Tensor | None,
    applied_mask: Tensor | None,
    clear: Tensor | None,
    *,
    episode_scope: bool,
    include_previous: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The step rules every memory pool shares, on copies of a batch of slots' state.

    ``memory`` is ``[B, ...]``: a window per slot (TrMRL) or a hidden state (RL²). Rows in ``clear``
    read as empty slots; ``applied_action`` replaces the remembered previous action where
    ``applied_mask`` says so (all rows without a mask); with ``episode_scope`` a slot starting an
    episode forgets its memory. Returns ``(memory, lengths, prev_action, tokens)``: the state to
    advance and the new working memories, flagged as done where a later episode of the same trial
    starts.
    """
    start = episode_start.to(torch.bool)

    def rows(mask: Tensor, like: Tensor) -> Tensor:
        return mask.view(-1, *([1] * (like.dim() - 1)))

    if clear is not None:
        empty = clear.to(torch.bool)
        memory = torch.where(rows(empty, memory), torch.zeros_like(memory), memory)
        lengths = torch.where(empty, torch.zeros_like(lengths), lengths)
        prev_action = torch.where(empty.unsqueeze(-1), torch.zeros_like(prev_action), prev_action)
    if applied_action is not None:
        use = torch.ones_like(start) if applied_mask is None else applied_mask.to(torch.bool)
        prev_action = torch.where(use.unsqueeze(-1), applied_action.to(prev_action.dtype), prev_action)
    if episode_scope:
        memory = torch.where(rows(start, memory), torch.zeros_like(memory), memory)
        lengths = torch.where(start, torch.zeros_like(lengths), lengths)
    # Within a trial, the first memory of a later episode is flagged: the previous transition ended one.
    prev_done = start & (lengths > 0)
    zero = torch.zeros((), dtype=obs.dtype, device=obs.device)
    tokens = working_memory(
        obs,
        torch.where(start.unsqueeze(-1), zero, prev_action),
        torch.where(start, zero, reward.to(obs.dtype)),
        prev_done,
        include_previous=include_previous,
    )
    return memory, lengths, prev_action, tokens


def fit_windows(windows: Tensor, lengths: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Left-aligned windows refitted to ``size`` memories: a shorter window keeps the newest ones.

    Args:
        windows: ``[B, N, D]`` left-aligned windows (not modified).
        lengths: ``[B]`` number of memories held (0..N).
        size: the new window length.

    Returns:
        ``(windows, lengths)`` as ``[B, size, D]`` and ``[B]``.

    Example:
        >>> w = torch.arange(3.0).view(1, 3, 1)
        >>> fitted, n = fit_windows(w, torch.tensor([3]), 2)
        >>> fitted.flatten().tolist(), n.tolist()
        ([1.0, 2.0], [2])
    """
    n = windows.shape[1]
    if n > size:
        # The newest ``size`` memories start at ``length - size``.
        first = (lengths - size).clamp(min=0)
        rows = first.unsqueeze(1) + torch.arange(size, device=windows.device)
        windows = windows.gather(1, rows.unsqueeze(-1).expand(-1, -1, windows.shape[2]))
        lengths = lengths.clamp(max=size)
    elif n < size:
        windows = torch.cat([windows, windows.new_zeros(windows.shape[0], size - n, windows.shape[2])], 1)
    return windows, lengths
