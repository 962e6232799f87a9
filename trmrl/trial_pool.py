"""A pool for ``context="trial"`` policies: each slot's keys and values, so a step costs one new token.

A trial-context TrMRL attends over every working memory since its memory was last cleared (the trial's
start, or the episode's with ``memory_scope="episode"``). Re-encoding that whole context at every step
would cost a forward over up to ``max_context`` tokens; :class:`TrialPool` instead keeps, per encoder
layer, one device tensor of keys and one of values (``[capacity, heads, max_context, head_dim]``, a row
per slot) and a step computes the new working memory's query, key and value at each layer and attends
over the slot's cached ones -- the arithmetic of a full causal forward at the newest position.

What a slot's memory *is* stays the working memories: the pool also keeps each slot's context as
``[max_context, token_dim]`` rows (the store's ``windows``), and :meth:`TrialPool.read` and
:meth:`TrialPool.write` carry those, as for every other pool. The cache is derived state:
:meth:`TrialPool.write` rebuilds it by re-encoding the written memories under the pool's weights, so a
snapshot, an export/import or a migration to new weights (``new_pool.write(slots, old_pool.read(...))``)
gives exactly the cache a step-by-step run under those weights would have built. Snapshots carry
``max_context x token_dim`` floats per session, not the cache (``2 x layers x max_context x d_model``).

Past ``max_context`` nothing slides: a step that would add a working memory to a full context raises
:class:`ContextFull` naming the slots, and the pool is unchanged (a new trial -- ``clear`` -- starts the
context again). A step writes each new key and value in place during its forward pass, at the
position past everything the slot's context keeps (at 0 for a context the step restarts); the working
memories and counters are written only after the pass succeeds, as in every pool. A failed step thus
leaves every slot's working memories and length unchanged (a restarted slot may have lost its first
cached key: :meth:`TrialPool.rebuild` restores it from the working memories).

The allocation is fixed: every slot owns ``max_context`` positions whatever its trial's length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trmrl.memory import begin_step
from trmrl.model import TrMRL
from trmrl.slot_pool import PoolStep, SlotMemory, SlotStore


class ContextFull(ValueError):
    """A step would add a working memory to a context that already holds ``max_context``."""

    def __init__(self, slots: list[int], max_context: int) -> None:
        self.slots = slots
        self.max_context = max_context
        super().__init__(
            f"slots {slots} hold max_context={max_context} working memories: a trial-context policy "
            "does not slide; start a new trial"
        )


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


class TrialPool(SlotStore):
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

    Example:
        >>> from trmrl.model import ModelConfig, TrMRL
        >>> cfg = ModelConfig.from_preset("small", obs_dim=2, act_dim=2, context="trial", window=1)
        >>> pool = TrialPool(TrMRL(cfg), capacity=4)
        >>> slots = torch.tensor([0, 3])
        >>> for t in range(3):
        ...     _ = pool.step(slots, torch.zeros(2, 2), torch.zeros(2), torch.full((2,), t == 0))
        >>> pool.lengths.tolist()
        [3, 0, 0, 3]
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
