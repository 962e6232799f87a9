"""The trial pool's fixed layout as it was before paging, kept to measure the paged one against.

Per encoder layer one keys and one values tensor ``[capacity, heads, max_context, head_dim]`` (every
slot owns ``max_context`` positions whatever its trial's length) and one fused attention kernel
(``scaled_dot_product_attention`` with a bias mask) over a slot's rows. Same step, read/write and
rebuild semantics as :class:`trmrl.trial_pool.TrialPool`; ``bench/trial_context.py`` runs both side by
side. Not used by the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trmrl.slot_pool import PoolStep
from trmrl.trial_pool import TrialStore


class _Rows:
    """The cache of some slots, seen by one encoder during one step (:class:`~trmrl.model.KeyValueCache`).

    The new memory's key and value go to position ``lengths`` of each slot's rows -- past everything
    the context keeps, or at 0 for a context this step restarts -- and attention runs over positions
    ``0..lengths`` in one fused kernel (``scaled_dot_product_attention``): one read of the cached keys
    and values, no copy of them when the slots are consecutive.
    """

    def __init__(
        self,
        keys: list[Tensor],
        values: list[Tensor],
        slots: Tensor,
        start: int | None,
        lengths: Tensor,
        span: int,
        bias: Tensor,
    ) -> None:
        self.keys, self.values = keys, values
        self.slots, self.start, self.lengths = slots, start, lengths
        self.span = span
        self.bias = bias
        """``[B, 1, 1, span]``: 0 on positions ``0..lengths``, ``-inf`` after (one per step, all layers)."""

    def _cached(self, tensor: Tensor) -> Tensor:
        if self.start is not None:  # consecutive slots: a view, no copy
            return tensor[self.start : self.start + len(self.slots), :, : self.span]
        return tensor[self.slots, :, : self.span]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys, values = self.keys[layer], self.values[layer]
        keys[self.slots, :, self.lengths] = k.to(keys.dtype)
        values[self.slots, :, self.lengths] = v.to(values.dtype)
        query = q.unsqueeze(2).to(keys.dtype)  # [B, H, 1, dh]
        bias = self.bias if self.bias.dtype == keys.dtype else self.bias.to(keys.dtype)
        y = F.scaled_dot_product_attention(query, self._cached(keys), self._cached(values), attn_mask=bias)
        return y.squeeze(2).to(q.dtype)


class FixedTrialPool(TrialStore):
    """Each slot's trial context as working memories plus the keys and values of every encoder layer at
    ``max_context`` positions, allocated once: the step of :class:`~trmrl.trial_pool.TrialPool` without
    its blocks. Its arguments are :class:`~trmrl.trial_pool.TrialPool`'s but ``block_size`` and
    ``blocks``.
    """

    def _allocate(self) -> None:
        cfg = self.config
        shape = (self.capacity, self.heads, cfg.max_context, self.head_dim)
        dtype, device = self.cache_dtype, self.device
        # Per layer (the policy encoder's, then the value encoder's): [capacity, H, max_context, dh].
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.layers)]

    def _take_in(self, slots: Tensor, _memory: Tensor, lengths: Tensor, tokens: Tensor) -> PoolStep:
        """Raises :class:`~trmrl.trial_pool.ContextFull` (pool unchanged) for a slot whose context
        already holds ``max_context`` working memories."""
        self._check_room(slots, lengths)
        output = self.model.forward_step(tokens, lengths, *self._rows(slots, lengths))
        return self._append(slots, lengths, tokens, output)

    def _rows(self, slots: Tensor, lengths: Tensor) -> tuple[_Rows, _Rows | None]:
        count = len(slots)
        start = int(slots[0]) if count else 0
        consecutive = bool(count) and torch.equal(
            slots.cpu(), torch.arange(start, start + count, dtype=slots.dtype)
        )
        n = self.config.n_layers
        first = None if not consecutive else start
        span = int(lengths.max()) + 1 if count else 0
        hidden = torch.arange(span, device=lengths.device) > lengths.unsqueeze(1)
        bias = torch.zeros(count, 1, 1, span, device=lengths.device).masked_fill_(
            hidden.view(count, 1, 1, span), -torch.inf
        )
        policy = _Rows(self.keys[:n], self.values[:n], slots, first, lengths, span, bias)
        value = None
        if len(self.keys) > n:
            value = _Rows(self.keys[n:], self.values[n:], slots, first, lengths, span, bias)
        return policy, value

    @property
    def bytes_per_slot(self) -> int:
        """Device memory one slot occupies: its working memories, counters and keys and values."""
        cache = sum(t[0].numel() * t.element_size() for t in (*self.keys, *self.values))
        return super().bytes_per_slot + cache

    def cache_bytes_per_memory(self) -> int:
        """Bytes of keys and values one working memory adds to a context."""
        return sum(t[0, :, 0].numel() * t.element_size() for t in (*self.keys, *self.values))

    def _store(self, slots: Tensor, lengths: Tensor, span: int, kv: list[tuple[Tensor, Tensor]]) -> None:
        for (k, v), keys, values in zip(kv, self.keys, self.values, strict=True):
            keys[slots, :, :span] = k.to(keys.dtype)
            values[slots, :, :span] = v.to(values.dtype)

    def addresses(self) -> tuple[int, ...]:
        return super().addresses() + tuple(t.data_ptr() for t in (*self.keys, *self.values))
