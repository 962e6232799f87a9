"""The batched step at fixed shapes, for a GPU: bucketed batch sizes, CUDA graphs, reduced precision.

:class:`BucketedStep` runs the same :func:`trmrl.policy.act` as the trainer and the service, but in a
form a CUDA graph can hold:

* every input lives in a preallocated device buffer, staged from pinned host memory with
  non-blocking copies (three copies a step: one int64 column, one float32 block, one bool block);
* a batch of ``n`` rows is padded to its bucket (the smallest power of two ``>= n``, capped at
  ``max_batch``), so a handful of shapes covers every batch size. Padded rows point at a scratch slot
  that no session owns, are marked deterministic and cleared: they read and write only that slot;
* session resets are a mask inside the step (``clear``) rather than a separate, data-dependent write
  before it, so the step never has to ask the host anything;
* on CUDA, each bucket is captured once as a :class:`torch.cuda.CUDAGraph` and replayed: one launch
  instead of a few hundred small kernels. The graphs share one memory pool (they never run at once)
  and write their actions into one static output buffer;
* optionally the forward runs under autocast in bf16 or fp16: the windows, counters and actions stay
  float32, only the matrix products and attention run in reduced precision.

On the CPU the same code runs eagerly (no graphs), which is how the tests check padding, the scratch
slot and the precision bounds without a GPU. The CUDA-only lines are the ones under ``self.cuda``.

The slot pool's tensors must be updated in place only (as :class:`SlotPool` does): a graph holds
their addresses. If they are replaced, the graphs are captured again on the next step.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from trmrl.policy import act
from trmrl.slot_pool import SlotPool

Precision = Literal["fp32", "bf16", "fp16"]

#: Autocast dtype of each precision (``None``: plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes: powers of two below ``max_batch``, then ``max_batch`` itself.

    Example:
        >>> buckets_for(12)
        (1, 2, 4, 8, 12)
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def bucket_of(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``n`` rows.

    Example:
        >>> bucket_of(5, (1, 2, 4, 8))
        8
    """
    at = bisect.bisect_left(buckets, n)
    if n < 1 or at == len(buckets):
        raise ValueError(f"{n} rows do not fit the buckets {buckets}")
    return buckets[at]


class BucketedStep:
    """:func:`trmrl.policy.act` for up to ``max_batch`` slots of ``pool`` at fixed shapes.

    Args:
        pool: the slot pool; ``scratch_slot`` must be one of its slots that nothing else uses.
        low, high: ``[act_dim]`` action bounds on the pool's device.
        max_batch: most rows one call takes.
        scratch_slot: where padded rows read and write.
        graphs: capture each bucket as a CUDA graph (CUDA only).
        pad: pad to buckets (default: when ``graphs``; graphs need it, eager code does not).
        precision: ``fp32``, ``bf16`` or ``fp16`` for the forward pass.

    Example:
        >>> from trmrl.model import ModelConfig, TrMRL
        >>> pool = SlotPool(TrMRL(ModelConfig.from_preset("small", obs_dim=2, act_dim=2)), capacity=9)
        >>> step = BucketedStep(pool, -torch.ones(2), torch.ones(2), 8, scratch_slot=8, pad=True)
        >>> n = 3
        >>> actions = step.run(np.arange(n), np.zeros((n, 2), np.float32), np.zeros(n, np.float32),
        ...                    np.ones(n, bool), np.ones(n, bool), np.ones(n, bool))
        >>> actions.shape, pool.read(torch.arange(n)).lengths.tolist()
        ((3, 2), [1, 1, 1])
    """

    def __init__(
        self,
        pool: SlotPool,
        low: Tensor,
        high: Tensor,
        max_batch: int,
        *,
        scratch_slot: int,
        graphs: bool = False,
        pad: bool | None = None,
        precision: Precision = "fp32",
    ) -> None:
        if not 0 <= scratch_slot < pool.capacity:
            raise ValueError(f"scratch slot {scratch_slot} is outside the pool of {pool.capacity}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
        self.pool = pool
        self.device = pool.device
        self.cuda = self.device.type == "cuda"
        if graphs and not self.cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.graphs = graphs
        self.pad = graphs if pad is None else pad
        if graphs and not self.pad:
            raise ValueError("CUDA graphs need padded batches")
        self.precision = precision
        self.low, self.high = low, high
        self.scratch_slot = scratch_slot
        self.max_batch = max_batch
        self.buckets = buckets_for(max_batch)
        cfg = pool.model.config
        self.obs_dim, self.act_dim = cfg.obs_dim, cfg.act_dim
        rows = max_batch
        # Float columns: observation | reward | applied action | noise. Bool columns: episode start |
        # clear | applied mask | deterministic. Row-major, so the first ``size`` rows of every column
        # are one contiguous block: one copy each way per step.
        width = self.obs_dim + 1 + 2 * self.act_dim
        self._dev_slots = torch.full((rows,), scratch_slot, dtype=torch.long, device=self.device)
        self._dev_floats = torch.zeros(rows, width, device=self.device)
        self._dev_flags = torch.zeros(rows, 4, dtype=torch.bool, device=self.device)
        self._dev_out = torch.zeros(rows, self.act_dim, device=self.device)
        if self.cuda:  # CUDA only: page-locked host staging, so the copies can run asynchronously.
            self._host_slots = torch.empty(rows, dtype=torch.long, pin_memory=True)
            self._host_floats = torch.zeros(rows, width, pin_memory=True)
            self._host_flags = torch.zeros(rows, 4, dtype=torch.bool, pin_memory=True)
            self._host_out = torch.zeros(rows, self.act_dim, pin_memory=True)
        else:  # on the CPU the device buffers are the staging buffers
            self._host_slots, self._host_floats = self._dev_slots, self._dev_floats
            self._host_flags, self._host_out = self._dev_flags, self._dev_out
        self._slots_np = self._host_slots.numpy()
        self._floats_np = self._host_floats.numpy()
        self._flags_np = self._host_flags.numpy()
        self._out_np = self._host_out.numpy()
        self._cuda_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_pool: tuple[int, int] | None = None
        self._captured_for: tuple[int, ...] = ()

    # -- the step ------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache: under a graph the casts are captured and replayed anyway, and a cache
        # entry freed after capture would leave the graph reading released memory.
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=False)

    def _forward(self, size: int) -> None:
        """The step on the first ``size`` rows of the device buffers; actions into the output buffer."""
        d, a = self.obs_dim, self.act_dim
        floats, flags = self._dev_floats[:size], self._dev_flags[:size]
        with torch.inference_mode(), self._autocast():
            result = act(
                self.pool,
                self._dev_slots[:size],
                floats[:, :d],
                floats[:, d],
                flags[:, 0],
                low=self.low,
                high=self.high,
                deterministic=flags[:, 3],
                noise=floats[:, d + 1 + a :],
                applied_action=floats[:, d + 1 : d + 1 + a],
                applied_mask=flags[:, 2],
                clear=flags[:, 1],
            )
            self._dev_out[:size].copy_(result.actions)

    def run(
        self,
        slots: np.ndarray,
        obs: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        clear: np.ndarray,
        deterministic: np.ndarray,
        noise: np.ndarray | None = None,
        applied: np.ndarray | None = None,
        applied_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Step ``n`` distinct slots (numpy columns, ``n <= max_batch``); returns ``[n, act_dim]`` actions.

        ``noise`` may be omitted only where every row is deterministic; ``applied`` rows are used where
        ``applied_mask`` is set (every row if it is omitted).
        """
        n = len(slots)
        size = bucket_of(n, self.buckets) if self.pad else n
        if size > self.max_batch or n < 1:
            raise ValueError(f"{n} rows: a step takes 1 to {self.max_batch}")
        d, a = self.obs_dim, self.act_dim
        self._slots_np[:n] = slots
        floats, flags = self._floats_np, self._flags_np
        floats[:n, :d] = obs
        floats[:n, d] = reward
        flags[:n, 0] = episode_start
        flags[:n, 1] = clear
        flags[:n, 3] = deterministic
        if applied is None:
            flags[:n, 2] = False
        else:
            floats[:n, d + 1 : d + 1 + a] = applied
            flags[:n, 2] = True if applied_mask is None else applied_mask
        if noise is None:
            if not np.all(deterministic):
                raise ValueError("sampled rows need noise")
            floats[:n, d + 1 + a :] = 0.0
        else:
            floats[:n, d + 1 + a :] = noise
        if size > n:
            # Padding: the scratch slot, zeros, an episode start on a cleared, deterministic row.
            self._slots_np[n:size] = self.scratch_slot
            floats[n:size] = 0.0
            flags[n:size] = (True, True, False, True)
        if self.cuda:  # CUDA only: three host-to-device copies that do not block the host.
            self._dev_slots[:size].copy_(self._host_slots[:size], non_blocking=True)
            self._dev_floats[:size].copy_(self._host_floats[:size], non_blocking=True)
            self._dev_flags[:size].copy_(self._host_flags[:size], non_blocking=True)
        if self.graphs:
            self._graph(size).replay()
        else:
            self._forward(size)
        if self.cuda:  # CUDA only: one copy back, then wait for it (the only synchronisation).
            self._host_out[:size].copy_(self._dev_out[:size], non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return self._out_np[:n].copy()

    # -- CUDA graphs (CUDA only) ----------------------------------------------------------------------
    def _graph(self, size: int) -> torch.cuda.CUDAGraph:
        if self._captured_for != self.pool.addresses():
            self.capture()
        return self._cuda_graphs[size]

    @contextlib.contextmanager
    def _scratch_rows(self) -> Iterator[None]:
        """Point every device row at the scratch slot while warming up, so no session is touched."""
        self._dev_slots.fill_(self.scratch_slot)
        self._dev_floats.zero_()
        self._dev_flags.copy_(torch.tensor([True, True, False, True], device=self.device))
        yield

    def capture(self) -> None:
        """Capture one graph per bucket (largest first, sharing one memory pool); CUDA only.

        Each bucket first runs eagerly on a side stream (library handles and kernel choices are made
        outside the capture), on scratch rows only. Capture itself runs nothing. Other threads may go on
        using the device meanwhile (other models serving).
        """
        if not self.graphs:
            raise RuntimeError("this step was built without CUDA graphs")
        self._cuda_graphs.clear()
        self._graph_pool = None
        order = sorted(self.buckets, reverse=True)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), self._scratch_rows():
            for size in order:
                for _ in range(2):
                    self._forward(size)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        for size in order:
            graph = torch.cuda.CUDAGraph()
            # thread_local: a model version loaded while others serve captures on its own thread; the
            # default ("global") would make the serving threads' CUDA calls fail during the capture.
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                self._forward(size)
            if self._graph_pool is None:
                self._graph_pool = graph.pool()
            self._cuda_graphs[size] = graph
        torch.cuda.synchronize(self.device)
        self._captured_for = self.pool.addresses()

    @property
    def captured(self) -> tuple[int, ...]:
        """The buckets that have a captured graph."""
        return tuple(sorted(self._cuda_graphs))
