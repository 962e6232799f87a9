"""A pool for ``context="trial"`` policies: each slot's keys and values in paged blocks, so a step costs
one new token and memory grows with the trial.

A trial-context TrMRL attends over every working memory since its memory was last cleared (the trial's
start, or the episode's with ``memory_scope="episode"``). Re-encoding that whole context at every step
would cost a forward over up to ``max_context`` tokens; :class:`TrialPool` instead keeps every encoder
layer's keys and values and a step computes the new working memory's query, key and value at each layer
and attends over the slot's cached ones -- the arithmetic of a full causal forward at the newest position.

**Paged.** Keys and values live in fixed-size blocks of ``block_size`` positions (16 by default), taken
from one block store per layer as a slot's context grows, as vLLM's paged cache does for text: a slot
holds ``ceil(t / block_size)`` blocks at trial length ``t``, listed in its row of a block table. A
block is taken when a step writes the first position of a new block; a slot's blocks go back to the
free list on :meth:`TrialPool.clear` and when a step restarts its context (a new trial, or a new episode
with ``memory_scope="episode"``: the slot keeps its first block), and freed blocks are handed out again
before the store grows. The store grows on demand (by at least a sixteenth; a growth copies the blocks
into a larger store) unless ``blocks`` fixes it: then a step, write or rebuild that needs a block when
none is free raises :class:`CacheExhausted` and changes nothing. A block is zeroed when it is handed
out, so nothing of an earlier session reaches a later one. Block 0 is never handed out: it stands for
"no block" in the table and holds zeros.

**The attention reads the blocks where they are.** Per layer the keys are stored ``[blocks, heads,
head_dim, block_size]`` and the values ``[blocks, heads, block_size, head_dim]``, and a step's attention
is two ``embedding_bag`` sums through the block table -- the scores as weighted sums of key rows (the
query's components the weights), the output as the softmax-weighted sum of value rows -- one fused
gather-and-reduce each, no copy of the cache, over all stepped slots at once. The index rows are built
once per step and serve every layer.

What a slot's memory *is* stays the working memories: :class:`TrialPool` keeps them in the same blocks
(``memories``, ``[blocks, block_size, token_dim]`` in float32, beside the block's keys and values), so
all a slot holds beyond its blocks is its counters and table row, and :meth:`TrialPool.read` and
:meth:`TrialPool.write` carry them as ``[max_context, token_dim]`` rows, as for every other pool (the
fixed layout, :class:`TrialStore`'s, keeps them in ``windows``). The cache is derived state:
:meth:`TrialPool.write` rebuilds it by re-encoding the written memories under the pool's weights, so a
snapshot, an export/import or a migration to new weights (``new_pool.write(slots, old_pool.read(...))``)
gives exactly the cache a step-by-step run under those weights would have built. Snapshots carry
``max_context x token_dim`` floats per session, not the cache.

Past ``max_context`` nothing slides: a step that would add a working memory to a full context raises
:class:`ContextFull` naming the slots, and the pool is unchanged (a new trial -- ``clear`` -- starts the
context again). A step takes the blocks it needs before its forward pass and writes each new key and
value in place during it, at the position past everything the slot's context keeps (at 0 for a context
the step restarts); the working memories and counters are written, and a restarted context's other
blocks released, only after the pass succeeds. A failed pass thus leaves every slot's working memories
and length unchanged (a block it took stays with its slot, to be used by the next step; a restarted slot
may have lost its first cached key: :meth:`TrialPool.rebuild` restores it from the working memories).

Memory: :attr:`TrialPool.bytes_per_slot` is what one slot occupies at most (a full context: what
sizing a device for the worst case needs); :meth:`TrialPool.bytes_held` what given slots hold now,
:meth:`TrialPool.bytes_at_length` what a slot holds at a trial length and :attr:`TrialPool.device_bytes`
everything the pool has allocated, free blocks included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trmrl.model import PolicyOutput, TrMRL
from trmrl.slot_pool import PoolStep, SlotMemory, SlotStore

BLOCK_SIZE = 16
"""Positions per cache block. 10,000 sessions spread evenly over a 400-step trial hold 0.56 of a fixed
allocation at the maximum with 16 in float32 and 0.60 in bfloat16 (32: 0.58 and 0.62; 64: 0.62). Speed
at t = 400, batch 1,024 (``bench/trial_context.py``): 8 is slower (about 1.3x); 32 was 5-8% faster
than 16 in three focused comparisons, within noise in a fourth; 16 keeps both precisions within 0.6."""


class ContextFull(ValueError):
    """A step would add a working memory to a context that already holds ``max_context``."""

    def __init__(self, slots: list[int], max_context: int) -> None:
        self.slots = slots
        self.max_context = max_context
        super().__init__(
            f"slots {slots} hold max_context={max_context} working memories: a trial-context policy "
            "does not slide; start a new trial"
        )


class CacheExhausted(RuntimeError):
    """A pool built with a fixed block budget has too few free blocks for what was asked."""

    def __init__(self, needed: int, free: int, blocks: int) -> None:
        self.needed, self.free, self.blocks = needed, free, blocks
        super().__init__(
            f"the key/value cache needs {needed} more block(s) and {free} of its {blocks} are free: "
            "clear finished sessions or build the pool with a larger block budget (blocks=None grows it)"
        )


def _ceil_div(a: Tensor, b: int) -> Tensor:
    return torch.div(a + (b - 1), b, rounding_mode="floor")


class _Pages:
    """The paged cache of some slots, seen by one encoder during one step
    (:class:`~trmrl.model.KeyValueCache`).

    The new memory's key and value go to position ``lengths`` of each slot's context (block
    ``lengths // block_size`` of its table row); attention then runs over positions ``0..lengths`` as
    two ``embedding_bag`` sums whose index rows (built once per step by :meth:`TrialPool._pages`) name
    the key and value rows of each slot's blocks.
    """

    def __init__(
        self,
        keys: list[Tensor],
        values: list[Tensor],
        block: Tensor,
        offset: Tensor,
        key_rows: Tensor,
        value_rows: Tensor,
        bias: Tensor,
    ) -> None:
        self.keys, self.values = keys, values
        self.block, self.offset = block, offset
        self.key_rows, self.value_rows = key_rows, value_rows
        """``[B * H * nb, dh]`` and ``[B * H, nb * block_size]`` rows of the flattened stores."""
        self.bias = bias
        """``[B, 1, nb * block_size]`` in the cache's dtype: 0 on positions ``0..lengths``, ``-inf`` after."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys, values = self.keys[layer], self.values[layer]
        _, heads, dh, size = keys.shape
        count, blocks = q.shape[0], self.bias.shape[-1] // size
        keys[self.block, :, :, self.offset] = k.to(keys.dtype)
        values[self.block, :, self.offset] = v.to(values.dtype)
        # Scores: each block's key rows (one per head and component) summed with the query's components.
        weights = (q * dh**-0.5).to(keys.dtype).unsqueeze(2).expand(count, heads, blocks, dh)
        scores = F.embedding_bag(
            self.key_rows, keys.view(-1, size), mode="sum", per_sample_weights=weights.reshape(-1, dh)
        )
        # In the cache's dtype: softmax accumulates in float32 and its output weights the value rows.
        probs = torch.softmax(scores.view(count, heads, blocks * size).add_(self.bias), dim=-1)
        out = F.embedding_bag(
            self.value_rows,
            values.view(-1, dh),
            mode="sum",
            per_sample_weights=probs.view(count * heads, blocks * size),
        )
        return out.view(count, heads, dh).to(q.dtype)


class TrialStore(SlotStore):
    """What every trial-context pool shares: a slot's context is its working memories since the trial
    began (``[max_context, token_dim]`` rows), a step appends one and never slides, and the cache of
    keys and values (the subclass's) is derived from them."""

    pages_memories = False
    """The working memories live in the subclass's blocks, not in ``windows`` (which then has no rows)."""

    def __init__(
        self,
        model: TrMRL,
        capacity: int,
        device: torch.device | str | None = None,
        cache_dtype: torch.dtype = torch.float32,
    ) -> None:
        cfg = model.config
        if cfg.context != "trial":
            raise ValueError(
                f"{type(self).__name__} serves context=trial policies (got context={cfg.context!r})"
            )
        rows = 0 if self.pages_memories else cfg.max_context
        super().__init__(model, cfg, capacity, rows, cfg.token_dim, device)
        self.model = model
        self.cache_dtype = cache_dtype
        self.heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.layers = (2 if model.value_encoder is not None else 1) * cfg.n_layers
        """Encoder layers with a cache: the policy encoder's, then the value encoder's."""
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self._allocate()

    def _allocate(self) -> None:
        """Allocate the cache (``keys`` and ``values``, a tensor per layer)."""

    def _recent(self, slots: Tensor) -> Tensor:
        return self.windows.new_zeros(len(slots), 0)  # nothing rolls forward: the cache holds the context

    @property
    def memory_shape(self) -> tuple[int, int]:
        """``(max_context, token_dim)``: a slot's working memories, as :meth:`read` gives them."""
        return self.config.max_context, self.config.token_dim

    def _context(self, slots: Tensor, span: int) -> Tensor:
        """``[B, span, token_dim]``: the slots' first ``span`` working memories."""
        return self.windows[slots, :span]

    def _keep(self, slots: Tensor, lengths: Tensor, tokens: Tensor) -> None:
        """Store each slot's new working memory at position ``lengths`` of its context."""
        self.windows[slots, lengths] = tokens

    def _check_room(self, slots: Tensor, lengths: Tensor) -> None:
        """Raise :class:`ContextFull` for the slots whose contexts (``lengths`` before the new memory)
        cannot take another working memory."""
        limit = self.config.max_context
        full = lengths >= limit
        if bool(full.any()):
            raise ContextFull(slots[full].tolist(), limit)

    def write(self, slots: Tensor, memory: SlotMemory) -> None:
        """Load the given slots' working memories and rebuild their keys and values by re-encoding them
        under the pool's weights. Checked first (shapes; a block budget): a refused write changes
        nothing."""
        self.check_memory(slots, memory)
        self._make_room(slots, memory.lengths)
        super().write(slots, memory)
        self.rebuild(slots)

    @torch.no_grad()
    def rebuild(self, slots: Tensor) -> None:
        """Recompute the given slots' keys and values from their working memories (one causal forward):
        after a :meth:`write`, or when the pool's model has new weights (a migration)."""
        lengths = self.lengths[slots]
        span = int(lengths.max()) if len(slots) else 0
        if span:
            self._store(slots, lengths, span, self.model.context_keys_values(self._context(slots, span)))

    def _make_room(self, slots: Tensor, lengths: Tensor) -> None:
        """Whatever a write of contexts of ``lengths`` needs first (raising leaves the pool unchanged)."""

    def _store(self, slots: Tensor, lengths: Tensor, span: int, kv: list[tuple[Tensor, Tensor]]) -> None:
        """Keep the keys and values ``kv`` (per layer ``[B, H, span, dh]``) of contexts of ``lengths``."""
        raise NotImplementedError

    def _append(self, slots: Tensor, lengths: Tensor, tokens: Tensor, output: PolicyOutput) -> PoolStep:
        """Keep each slot's new working memory at position ``lengths`` of its context (once the step's
        forward pass has succeeded); the step's result, whose ``windows`` are the new working memories
        (``[B, 1, token_dim]``: what PPO stores; its update re-reads whole trials,
        :meth:`~trmrl.model.TrMRL.forward_sequence`)."""
        self._keep(slots, lengths, tokens)
        self.lengths[slots] = lengths + 1
        newest = torch.zeros(len(slots), dtype=torch.long, device=tokens.device)
        return PoolStep(output, tokens.unsqueeze(1), newest)


class TrialPool(TrialStore):
    """Each slot's trial context as working memories plus the keys and values of every encoder layer,
    in blocks taken as the context grows.

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
        block_size: positions per block.
        blocks: a fixed block budget (the store never grows; :class:`CacheExhausted` when it is spent),
            or ``None``: the store starts with a block per slot and grows on demand.

    Example:
        >>> from trmrl.model import ModelConfig, TrMRL
        >>> cfg = ModelConfig.from_preset("small", obs_dim=2, act_dim=2, context="trial", window=1)
        >>> pool = TrialPool(TrMRL(cfg), capacity=4, block_size=2)
        >>> slots = torch.tensor([0, 3])
        >>> for t in range(3):
        ...     _ = pool.step(slots, torch.zeros(2, 2), torch.zeros(2), torch.full((2,), t == 0))
        >>> pool.lengths.tolist(), pool.held.tolist()
        ([3, 0, 0, 3], [2, 0, 0, 2])
    """

    pages_memories = True

    def __init__(
        self,
        model: TrMRL,
        capacity: int,
        device: torch.device | str | None = None,
        cache_dtype: torch.dtype = torch.float32,
        block_size: int = BLOCK_SIZE,
        blocks: int | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {block_size})")
        if blocks is not None and blocks < 1:
            raise ValueError(f"blocks must be >= 1 or None (got {blocks})")
        super().__init__(model, capacity, device, cache_dtype)
        cfg = self.config
        self.block_size = block_size
        self.budget = blocks
        per_slot = -(-cfg.max_context // block_size)
        self.table = torch.zeros(capacity, per_slot, dtype=torch.long, device=self.device)
        """``[capacity, ceil(max_context / block_size)]``: each slot's blocks in order (0: none)."""
        self.held = torch.zeros(capacity, dtype=torch.long, device=self.device)
        """``[capacity]``: blocks each slot holds (its first ``held`` table entries)."""
        # Per layer, the keys [blocks, H, dh, block_size] and the values [blocks, H, block_size, dh].
        self.memories = torch.zeros(0, block_size, cfg.token_dim, device=self.device)
        """``[blocks, block_size, token_dim]``: the working memories, in the same blocks (float32)."""
        self._free = torch.zeros(0, dtype=torch.long, device=self.device)
        self._free_count = 0
        self._resize(1 + (blocks if blocks is not None else capacity))
        self._offsets: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
        positions = torch.arange(per_slot * block_size, device=self.device)
        hidden = positions > torch.arange(cfg.max_context, device=self.device).unsqueeze(1)
        self._hidden = torch.zeros(hidden.shape, dtype=cache_dtype, device=self.device)
        self._hidden.masked_fill_(hidden, -torch.inf)
        """Row ``p``: the attention bias of a step writing position ``p`` (``-inf`` past it)."""

    # -- blocks ----------------------------------------------------------------------------------------
    @staticmethod
    def block_bytes_of(
        model: TrMRL, cache_dtype: torch.dtype = torch.float32, block_size: int = BLOCK_SIZE
    ) -> int:
        """Bytes of one block of ``model``'s cache (its keys and values at every layer, and its working
        memories), before any pool is built: what sizing a budget (``blocks``) from a byte count needs."""
        cfg = model.config
        layers = (2 if model.value_encoder is not None else 1) * cfg.n_layers
        itemsize = torch.empty(0, dtype=cache_dtype).element_size()
        return (2 * layers * cfg.d_model * itemsize + cfg.token_dim * 4) * block_size

    @property
    def blocks(self) -> int:
        """Blocks in the store, the null block 0 included."""
        return int(self.keys[0].shape[0])

    @property
    def free_blocks(self) -> int:
        """Blocks no slot holds (the null block not counted)."""
        return self._free_count

    def _resize(self, total: int) -> None:
        """Grow the store to ``total`` blocks (the existing ones copied; the new ones free)."""
        old = self.blocks if self.keys else 0
        kshape = (total, self.heads, self.head_dim, self.block_size)
        vshape = (total, self.heads, self.block_size, self.head_dim)
        memories = torch.zeros(total, *self.memories.shape[1:], device=self.device)
        if old:
            memories[:old] = self.memories
        self.memories = memories
        new_keys, new_values = [], []
        for i in range(self.layers):
            k = torch.zeros(kshape, dtype=self.cache_dtype, device=self.device)
            v = torch.zeros(vshape, dtype=self.cache_dtype, device=self.device)
            if old:
                k[:old] = self.keys[i]
                v[:old] = self.values[i]
            new_keys.append(k)
            new_values.append(v)
        self.keys, self.values = new_keys, new_values
        # The free list is a stack popped from its end: new blocks go below the free ones, lowest on top.
        added = torch.arange(total - 1, max(old, 1) - 1, -1, device=self.device)
        free = torch.cat([added, self._free[: self._free_count]])
        self._free = torch.cat([free, torch.zeros(total - len(free), dtype=torch.long, device=self.device)])
        self._free_count = len(free)

    def _reserve(self, needed: int, freed: int = 0) -> None:
        """Make ``needed`` free blocks available (``freed`` more are about to be returned): grow the
        store, or raise :class:`CacheExhausted` under a fixed budget. Changes nothing but the store's
        size."""
        short = needed - self._free_count - freed
        if short <= 0:
            return
        if self.budget is not None:
            raise CacheExhausted(needed, self._free_count + freed, self.budget)
        self._resize(self.blocks + max(short, self.blocks // 16))

    def _take(self, count: int) -> Tensor:
        """``count`` free blocks, zeroed (:meth:`_reserve` first)."""
        self._free_count -= count
        ids = self._free[self._free_count : self._free_count + count].clone()
        for store in (*self.keys, *self.values, self.memories):
            store.index_fill_(0, ids, 0)
        return ids

    def _release(self, ids: Tensor) -> None:
        count = len(ids)
        self._free[self._free_count : self._free_count + count] = ids
        self._free_count += count

    def _fit(self, slots: Tensor, wanted: Tensor) -> None:
        """Give each slot exactly ``wanted`` blocks: release those past it, take the missing ones.
        Raises :class:`CacheExhausted` (nothing changed) when a budget cannot give them."""
        held = self.held[slots]
        index = torch.arange(self.table.shape[1], device=self.device)
        extra = (index >= wanted.unsqueeze(1)) & (index < held.unsqueeze(1))
        missing = (index < wanted.unsqueeze(1)) & (index >= held.unsqueeze(1))
        count = int(missing.sum())
        self._reserve(count, freed=int(extra.sum()))
        rows = self.table[slots]
        self._release(rows[extra])
        rows[extra] = 0
        rows[missing] = self._take(count)
        self.table[slots] = rows
        self.held[slots] = wanted

    def starved(self, slots: Tensor, episode_start: Tensor, clear: Tensor | None = None) -> Tensor:
        """``[B]`` bool: the rows of a :meth:`step` (same arguments) that a fixed block budget cannot
        serve now -- each needs a new block and the free ones go to the earlier rows first. All
        ``False`` without a budget (the store grows). Stepping the other rows alone then succeeds."""
        lengths = self.lengths[slots]
        if clear is not None:
            lengths = torch.where(clear.to(torch.bool), torch.zeros_like(lengths), lengths)
        if self.config.memory_scope == "episode":
            lengths = torch.where(episode_start.to(torch.bool), torch.zeros_like(lengths), lengths)
        grow = torch.div(lengths, self.block_size, rounding_mode="floor") >= self.held[slots]
        if self.budget is None:
            return torch.zeros_like(grow)
        return grow & (grow.cumsum(0) > self._free_count)

    # -- the step --------------------------------------------------------------------------------------
    def _take_in(self, slots: Tensor, _memory: Tensor, lengths: Tensor, tokens: Tensor) -> PoolStep:
        """Raises :class:`ContextFull` for a slot whose context already holds ``max_context`` working
        memories, and :class:`CacheExhausted` when a fixed block budget has no block for a context that
        needs one (both before any change)."""
        self._check_room(slots, lengths)
        count = len(slots)
        column = torch.div(lengths, self.block_size, rounding_mode="floor")
        held = self.held[slots]
        grow = column >= held  # the new memory opens a block (at most one per slot and step)
        restart = (lengths == 0) & (held > 1)  # a new context keeps its first block only
        growing, restarting, last = (  # one read of the device for all three
            torch.stack([grow.sum(), restart.sum(), lengths.max()]).tolist() if count else (0, 0, 0)
        )
        if growing:
            self._reserve(growing)
            grown = slots[grow]
            self.table[grown, held[grow]] = self._take(growing)
            self.held[grown] = held[grow] + 1
        output = self.model.forward_step(tokens, lengths, *self._pages(slots, lengths, column, last + 1))
        if restarting:
            self._fit(slots[restart], torch.ones_like(lengths[restart]))
        return self._append(slots, lengths, tokens, output)

    def _row_offsets(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Per head the offsets of a block's key rows (``[H, dh]``) and value rows (``[H, block_size]``)."""
        if dtype not in self._offsets:
            heads = torch.arange(self.heads, device=self.device, dtype=dtype).unsqueeze(1)
            dims = torch.arange(self.head_dim, device=self.device, dtype=dtype)
            positions = torch.arange(self.block_size, device=self.device, dtype=dtype)
            self._offsets[dtype] = (heads * self.head_dim + dims, heads * self.block_size + positions)
        return self._offsets[dtype]

    def _pages(
        self, slots: Tensor, lengths: Tensor, column: Tensor, span: int
    ) -> tuple[_Pages, _Pages | None]:
        """The step's view of the cache: where each new key and value goes (block ``column`` of the
        slot's row, at ``lengths % block_size``) and the rows of positions ``0..span-1``."""
        count, size = len(slots), self.block_size
        blocks = -(-span // size)
        rows = self.table[slots, :blocks]
        block = rows.gather(1, column.unsqueeze(1)).squeeze(1)
        offset = lengths - column * size
        # int32 rows where they fit: half the index bytes the two gathers read.
        per_block = self.heads * max(self.head_dim, size)
        dtype = torch.int32 if self.blocks * per_block < 2**31 else torch.long
        key_offsets, value_offsets = self._row_offsets(dtype)
        base = rows.to(dtype).view(count, 1, blocks, 1)
        key_rows = (base * (self.heads * self.head_dim) + key_offsets.unsqueeze(1)).view(-1, self.head_dim)
        value_rows = (base * (self.heads * size) + value_offsets.unsqueeze(1)).view(
            count * self.heads, blocks * size
        )
        bias = self._hidden[:, : blocks * size].index_select(0, lengths).unsqueeze(1)
        n = self.config.n_layers
        policy = _Pages(self.keys[:n], self.values[:n], block, offset, key_rows, value_rows, bias)
        value = None
        if self.layers > n:
            value = _Pages(self.keys[n:], self.values[n:], block, offset, key_rows, value_rows, bias)
        return policy, value

    # -- memory ----------------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        """Bytes of one block: its keys and values at every layer and its working memories."""
        return sum(t[0].numel() * t.element_size() for t in (*self.keys, *self.values, self.memories))

    @property
    def _slot_bytes(self) -> int:
        """What every slot holds whatever its length: counters, previous action, its table row."""
        return super().bytes_per_slot + self.table[0].numel() * self.table.element_size() + 8

    @property
    def bytes_per_slot(self) -> int:
        """Device memory one slot occupies at most: its working memories, counters and table row and the
        blocks of a full context (what a device sized for the worst case must hold per slot)."""
        return self.bytes_at_length(self.config.max_context)

    def bytes_at_length(self, length: int) -> int:
        """Device memory a slot holds at a trial length of ``length`` working memories."""
        return self._slot_bytes + -(-length // self.block_size) * self.block_bytes

    def bytes_held(self, slots: Tensor) -> Tensor:
        """``[B]`` device memory the given slots hold now (their blocks and fixed rows)."""
        return self._slot_bytes + self.held[slots] * self.block_bytes

    @property
    def device_bytes(self) -> int:
        """Everything the pool has allocated: every slot's fixed rows and the whole block store (free
        blocks and the null block included) and its free list."""
        store = self.blocks * self.block_bytes + self._free.numel() * self._free.element_size()
        return self.capacity * self._slot_bytes + store

    def cache_bytes_per_memory(self) -> int:
        """Bytes of keys and values one working memory adds to a context (blocks aside)."""
        return sum(t[0].numel() * t.element_size() for t in (*self.keys, *self.values)) // self.block_size

    # -- the working memories, in the blocks --------------------------------------------------------------
    def _context(self, slots: Tensor, span: int) -> Tensor:
        blocks = -(-span // self.block_size)
        rows = self.memories[self.table[slots, :blocks]]  # [B, blocks, block_size, token_dim]
        return rows.flatten(1, 2)[:, :span]

    def read(self, slots: Tensor) -> SlotMemory:
        """Copies of the given slots' working memories (``[B, max_context, token_dim]``, zeros past each
        slot's length), lengths and previous actions."""
        windows = self._context(slots, self.config.max_context)
        lengths = self.lengths[slots]
        past = torch.arange(windows.shape[1], device=self.device) >= lengths.unsqueeze(1)
        return SlotMemory(windows.masked_fill(past.unsqueeze(-1), 0.0), lengths, self.prev_action[slots])

    def write(self, slots: Tensor, memory: SlotMemory) -> None:
        """Load the given slots' working memories into their blocks and rebuild their keys and values
        under the pool's weights. Checked first (shapes; the block budget): a refused write changes
        nothing."""
        self.check_memory(slots, memory)
        lengths = memory.lengths.to(self.device, torch.long)
        self._make_room(slots, lengths)
        span = int(lengths.max()) if len(slots) else 0
        if span:
            size = self.block_size
            blocks = -(-span // size)
            mine = torch.arange(blocks, device=self.device) < _ceil_div(lengths, size).unsqueeze(1)
            windows = memory.windows[:, :span].to(self.device, torch.float32)
            windows = F.pad(windows, (0, 0, 0, blocks * size - span)).view(len(slots), blocks, size, -1)
            self.memories[self.table[slots, :blocks][mine]] = windows[mine]
        self.lengths[slots] = lengths
        self.prev_action[slots] = memory.prev_action.to(self.device, self.prev_action.dtype)
        self.rebuild(slots)

    def _keep(self, slots: Tensor, lengths: Tensor, tokens: Tensor) -> None:
        column = torch.div(lengths, self.block_size, rounding_mode="floor")
        block = self.table[slots].gather(1, column.unsqueeze(1)).squeeze(1)
        self.memories[block, lengths - column * self.block_size] = tokens

    def clear(self, slots: Tensor) -> None:
        """Forget everything the given slots hold and return their blocks."""
        super().clear(slots)
        self._fit(slots, torch.zeros_like(self.held[slots]))

    def _make_room(self, slots: Tensor, lengths: Tensor) -> None:
        """Blocks for contexts of ``lengths`` (a refused write -- :class:`CacheExhausted` -- changes
        nothing)."""
        self._fit(slots, _ceil_div(lengths.to(self.device, torch.long), self.block_size))

    def _store(self, slots: Tensor, lengths: Tensor, span: int, kv: list[tuple[Tensor, Tensor]]) -> None:
        size = self.block_size
        wanted = _ceil_div(lengths, size)
        self._fit(slots, torch.maximum(wanted, self.held[slots]))
        blocks = -(-span // size)
        rows = self.table[slots, :blocks]
        mine = torch.arange(blocks, device=self.device) < wanted.unsqueeze(1)  # [B, blocks]
        targets = rows[mine]
        pad = blocks * size - span
        count = len(slots)
        for (k, v), keys, values in zip(kv, self.keys, self.values, strict=True):
            k = F.pad(k, (0, 0, 0, pad)).view(count, self.heads, blocks, size, self.head_dim)
            v = F.pad(v, (0, 0, 0, pad)).view(count, self.heads, blocks, size, self.head_dim)
            keys[targets] = k.permute(0, 2, 1, 4, 3)[mine].to(keys.dtype)
            values[targets] = v.permute(0, 2, 1, 3, 4)[mine].to(values.dtype)

    def addresses(self) -> tuple[int, ...]:
        tensors = (self.table, self.held, self.memories, *self.keys, *self.values)
        return super().addresses() + tuple(t.data_ptr() for t in tensors)
