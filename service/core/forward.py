"""The forward pass of one model over a batch of steps: eager, or at fixed shapes through bucketed
CUDA graphs.

On a GPU (or in reduced precision) the step runs at fixed shapes through
:class:`~trmrl.graphed.BucketedStep`, whose padded rows need a slot of their own: one past the
sessions'. The CPU float32 path is the trainer's own :func:`trmrl.policy.act`, bit for bit, and
needs none. An RL² policy (a GRU whose memory is its hidden state) and a trial-context TrMRL (its
memory is a key/value cache per slot, :class:`~trmrl.trial_pool.TrialPool`) run the eager path on
every device, in float32.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from service.core.batch import Batch
from service.core.records import EngineLimits
from trmrl.checkpoint import Checkpoint, CheckpointError
from trmrl.graphed import BucketedStep
from trmrl.model import TrMRL
from trmrl.networks import make_pool
from trmrl.policy import act, counter_normal
from trmrl.slot_pool import SlotPool
from trmrl.trial_pool import BLOCK_SIZE, TrialPool

log = logging.getLogger("trmrl.service")


def cache_budget(checkpoint: Checkpoint, cache_mib: float) -> int | None:
    """The blocks ``cache_mib`` MiB of a trial-context model's key/value cache hold (``None`` for 0: the
    cache grows on demand). Refused when they hold less than one full context."""
    if not cache_mib:
        return None
    model = checkpoint.model
    assert isinstance(model, TrMRL)
    per_block = TrialPool.block_bytes_of(model)
    blocks = int(cache_mib * 2**20) // per_block
    full = -(-model.config.max_context // BLOCK_SIZE)
    if blocks < full:
        raise CheckpointError(
            f"{checkpoint.path}: TRMRL_CACHE_MIB={cache_mib:g} holds {blocks} key/value cache blocks of "
            f"{per_block} bytes, fewer than one full trial context needs ({full} blocks for "
            f"max_context={model.config.max_context}); give it at least {full * per_block / 2**20:.3g} MiB"
        )
    return blocks


def _picked(column: np.ndarray, n: int, rows: np.ndarray | None) -> np.ndarray:
    """A batch column's first ``n`` rows, or ``rows`` of them."""
    return column[:n] if rows is None else column[:n][rows]


def _spread(actions: np.ndarray, n: int, rows: np.ndarray | None) -> np.ndarray:
    """The computed ``rows``' actions in an ``n``-row array, NaN in the others (``None``: all rows)."""
    if rows is None:
        return actions
    out = np.full((n, actions.shape[1]), np.nan, np.float32)
    out[rows] = actions
    return out


class Forward:
    """A model on its device with its slot pool; :meth:`run` is one forward pass for a batch."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, limits: EngineLimits) -> None:
        precision, max_sessions = limits.precision, limits.max_sessions
        model = checkpoint.model
        recurrent = not isinstance(model, TrMRL)
        trial = isinstance(model, TrMRL) and model.config.context == "trial"
        if (recurrent or trial) and precision != "fp32":
            kind = "an rl2 policy" if recurrent else "a context=trial policy"
            raise CheckpointError(
                f"{checkpoint.path}: {kind} is served in fp32 only (TRMRL_DTYPE={precision})"
            )
        self.device = device
        self.act_dim = checkpoint.model.config.act_dim
        self.model = checkpoint.model.to(device).eval()
        self.low = torch.tensor(checkpoint.info.action_low, dtype=torch.float32, device=device)
        self.high = torch.tensor(checkpoint.info.action_high, dtype=torch.float32, device=device)
        fixed_shapes = not (recurrent or trial) and (device.type == "cuda" or precision != "fp32")
        self.cache_blocks = cache_budget(checkpoint, limits.cache_mib) if trial else None
        """A trial-context model's fixed key/value cache budget in blocks (``TRMRL_CACHE_MIB``); ``None``:
        the cache grows on demand."""
        self.pool = make_pool(
            self.model, max_sessions + (1 if fixed_shapes else 0), device, cache_blocks=self.cache_blocks
        )
        self.fixed: BucketedStep | None = None
        """The fixed-shape step (GPU, reduced precision); ``None``: the eager step."""
        if fixed_shapes:
            assert isinstance(self.pool, SlotPool)
            self.fixed = BucketedStep(
                self.pool,
                self.low,
                self.high,
                limits.max_batch,
                scratch_slot=max_sessions,
                graphs=device.type == "cuda" and limits.cuda_graphs,
                precision=precision,
            )

    def capture(self, name: str) -> None:
        """Capture the CUDA graphs, if any (blocking); a failed capture leaves the eager replay on."""
        if self.fixed is None or not self.fixed.graphs:
            return
        began = time.perf_counter()
        try:
            self.fixed.capture()
        except Exception:
            # A driver or library that cannot capture must not keep the model from serving.
            log.exception("model %s: CUDA graph capture failed; serving without graphs", name)
            self.fixed.graphs = False
        else:
            log.info(
                "model %s: captured CUDA graphs for batch sizes %s in %.1f s",
                name,
                ",".join(map(str, self.fixed.captured)),
                time.perf_counter() - began,
            )

    def clear(self, count: int) -> None:
        """Empty the first ``count`` slots (after a warm-up)."""
        with torch.inference_mode():
            self.pool.clear(torch.arange(count, device=self.device))

    def run(self, batch: Batch, n: int, deterministic: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """One forward pass for the batch's ``n`` steps (worker thread); returns clipped actions. Rows
        already marked in ``batch.refused`` (they follow a step of their session that was not taken)
        and, under a fixed cache budget, rows that need a block when none is free (the free ones go to
        the earlier rows) are left out of the pass: marked in ``batch.refused``, their actions NaN."""
        if self.fixed is not None:
            return self._run_fixed(batch, n, deterministic, seeds)
        device = self.device
        with torch.inference_mode():
            if len(batch.released):
                # Ended sessions' cache blocks go back before this pass takes any.
                self.pool.clear(torch.from_numpy(batch.released).to(device))
            slots = torch.from_numpy(batch.slots[:n]).to(device)
            clear = batch.clear[:n]
            if clear.any():
                # New sessions and trial resets start from an empty window. This is the one write
                # before the forward pass; if the pass then fails, the session has lost only what
                # its reset asked to forget, and the rollback re-arms the clear for the retry.
                self.pool.clear(slots[torch.from_numpy(clear).to(device)])
            start = torch.from_numpy(batch.start[:n]).to(device)
            # Rows already refused (they follow a step of their session that was not taken) are left
            # out, and take no cache block.
            refused = batch.refused[:n]
            if self.cache_blocks is not None:
                assert isinstance(self.pool, TrialPool)
                open_rows = np.flatnonzero(~refused)
                if len(open_rows):
                    index = torch.from_numpy(open_rows).to(device)
                    refused[open_rows] = self.pool.starved(slots[index], start[index]).cpu().numpy()
            rows = self._computed_rows(refused)
            if rows is not None and not len(rows):
                return np.full((n, self.act_dim), np.nan, np.float32)
            return _spread(self._act(batch, n, rows, slots, start, deterministic, seeds), n, rows)

    @staticmethod
    def _computed_rows(refused: np.ndarray) -> np.ndarray | None:
        """The rows a pass computes: ``None`` for all, else the ones not refused."""
        return np.flatnonzero(~refused) if refused.any() else None

    def _act(
        self,
        batch: Batch,
        n: int,
        rows: np.ndarray | None,
        slots: torch.Tensor,
        start: torch.Tensor,
        deterministic: np.ndarray,
        seeds: np.ndarray,
    ) -> np.ndarray:
        """The eager step of the batch's first ``n`` rows, or of ``rows`` of them."""
        device = self.device

        def pick(column: np.ndarray) -> np.ndarray:
            return _picked(column, n, rows)

        if rows is not None:
            index = torch.from_numpy(rows).to(device)
            slots, start = slots[index], start[index]
            deterministic, seeds = deterministic[rows], seeds[rows]
        applied: torch.Tensor | None = None
        applied_mask: torch.Tensor | None = None
        if pick(batch.applied_mask).any():
            applied = torch.from_numpy(pick(batch.applied)).to(device)
            applied_mask = torch.from_numpy(pick(batch.applied_mask)).to(device)
        noise: torch.Tensor | None = None
        sample: torch.Tensor | bool = True
        if not deterministic.all():
            steps = torch.from_numpy(pick(batch.steps))
            noise = counter_normal(torch.from_numpy(seeds), steps, self.act_dim).to(device)
            sample = torch.from_numpy(deterministic).to(device)
        result = act(
            self.pool,
            slots,
            torch.from_numpy(pick(batch.obs)).to(device),
            torch.from_numpy(pick(batch.reward)).to(device),
            start,
            low=self.low,
            high=self.high,
            deterministic=sample,
            noise=noise,
            applied_action=applied,
            applied_mask=applied_mask,
        )
        return result.actions.cpu().numpy()

    def _run_fixed(self, batch: Batch, n: int, deterministic: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """:meth:`run` at fixed shapes (GPU, reduced precision): the same step, with resets as a mask
        and the noise drawn on the host exactly as there."""
        assert self.fixed is not None
        rows = self._computed_rows(batch.refused[:n])  # rows queued behind a step not taken: left out

        def pick(column: np.ndarray) -> np.ndarray:
            return _picked(column, n, rows)

        if rows is not None:
            if not len(rows):
                return np.full((n, self.act_dim), np.nan, np.float32)
            deterministic, seeds = deterministic[rows], seeds[rows]
        noise = None
        if not deterministic.all():
            steps = torch.from_numpy(pick(batch.steps))
            noise = counter_normal(torch.from_numpy(seeds), steps, self.act_dim).numpy()
        applied_mask = pick(batch.applied_mask)
        actions = self.fixed.run(
            pick(batch.slots),
            pick(batch.obs),
            pick(batch.reward),
            pick(batch.start),
            pick(batch.clear),
            deterministic,
            noise,
            pick(batch.applied) if applied_mask.any() else None,
            applied_mask,
        )
        return _spread(actions, n, rows)
