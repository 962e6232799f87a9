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

from trmrl.memory import begin_step
from trmrl.model import TrMRL
from trmrl.slot_pool import PoolStep, SlotMemory, SlotStore
from trmrl.trial_pool import ContextFull


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


class FixedTrialPool(SlotStore):
    """Each slot's trial context as working memories plus the keys and values of every encoder layer.

    The same interface as :class:`~trmrl.slot_pool.SlotPool`: :meth:`step` clears the contexts of the
    slots that start a trial (or an episode, with ``memory_scope="episode"``), builds their working
    memories and evaluates them in one forward pass over the cached keys and values. The step's
    ``windows`` are the new working memories (``[B, 1, token_dim]``: what PPO stores; its update
    re-reads whole trials, :meth:`~trmrl.model.TrMRL.forward_sequence`).

    Args:
        model: a ``context="trial"`` TrMRL.
        capacity: slots.
        device: where the tensors live (the model's device by default).
        cache_dtype: keys and values in ``float32`` or a reduced precision (``bfloat16`` halves the
            memory and the bytes a step reads; the working memories stay ``float32``).
    """

    def __init__(
        self,
        model: TrMRL,
        capacity: int,
        device: torch.device | str | None = None,
        cache_dtype: torch.dtype = torch.float32,
    ) -> None:
        cfg = model.config
        if cfg.context != "trial":
            raise ValueError(f"TrialPool serves context=trial policies (got context={cfg.context!r})")
        super().__init__(model, cfg, capacity, cfg.max_context, cfg.token_dim, device)
        self.model = model
        self.cache_dtype = cache_dtype
        encoders = 2 if model.value_encoder is not None else 1
        shape = (capacity, cfg.n_heads, cfg.max_context, cfg.d_model // cfg.n_heads)
        layers = encoders * cfg.n_layers
        self.keys = [torch.zeros(shape, dtype=cache_dtype, device=self.device) for _ in range(layers)]
        """Per layer (the policy encoder's, then the value encoder's): ``[capacity, H, max_context, dh]``."""
        self.values = [torch.zeros(shape, dtype=cache_dtype, device=self.device) for _ in range(layers)]

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
        """As :meth:`SlotStore.step`; raises :class:`ContextFull` (pool unchanged) for a slot whose
        context already holds ``max_context`` working memories."""
        cfg = self.config
        count = len(slots)
        _, lengths, prev_action, tokens = begin_step(
            self.windows.new_zeros(count, 0),
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
        full = lengths >= cfg.max_context
        if bool(full.any()):
            raise ContextFull(slots[full].tolist(), cfg.max_context)
        output = self.model.forward_step(tokens, lengths, *self._rows(slots, lengths))
        self.windows[slots, lengths] = tokens
        self.lengths[slots] = lengths + 1
        self.prev_action[slots] = prev_action
        newest = torch.zeros(count, dtype=torch.long, device=tokens.device)
        return PoolStep(output, tokens.unsqueeze(1), newest)

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

    def write(self, slots: Tensor, memory: SlotMemory) -> None:
        """Load the given slots' working memories (checked first: a refused write changes nothing) and
        rebuild their keys and values by re-encoding them under the pool's weights."""
        super().write(slots, memory)
        self.rebuild(slots)

    @torch.no_grad()
    def rebuild(self, slots: Tensor) -> None:
        """Recompute the given slots' keys and values from their working memories (one causal forward):
        after a :meth:`write`, or when the pool's model has new weights (a migration)."""
        lengths = self.lengths[slots]
        span = int(lengths.max()) if len(slots) else 0
        if span == 0:
            return
        model = self.model
        x = model.normalize(self.windows[slots, :span])
        embeddings = model.positions[:span]
        encoders = [model] if model.value_encoder is None else [model, model.value_encoder]
        kv = [pair for encoder in encoders for pair in encoder.encode_sequence(x, embeddings, None)[1]]
        for (k, v), keys, values in zip(kv, self.keys, self.values, strict=True):
            keys[slots, :, :span] = k.to(keys.dtype)
            values[slots, :, :span] = v.to(values.dtype)

    def addresses(self) -> tuple[int, ...]:
        return super().addresses() + tuple(t.data_ptr() for t in (*self.keys, *self.values))
