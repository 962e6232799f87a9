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

log = logging.getLogger("trmrl.service")


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
        self.pool = make_pool(self.model, max_sessions + (1 if fixed_shapes else 0), device)
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
        """One forward pass for the batch's ``n`` steps (worker thread); returns clipped actions."""
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
            applied: torch.Tensor | None = None
            applied_mask: torch.Tensor | None = None
            if batch.applied_mask[:n].any():
                applied = torch.from_numpy(batch.applied[:n]).to(device)
                applied_mask = torch.from_numpy(batch.applied_mask[:n]).to(device)
            noise: torch.Tensor | None = None
            sample: torch.Tensor | bool = True
            if not deterministic.all():
                steps = torch.from_numpy(batch.steps[:n])
                noise = counter_normal(torch.from_numpy(seeds), steps, self.act_dim).to(device)
                sample = torch.from_numpy(deterministic).to(device)
            result = act(
                self.pool,
                slots,
                torch.from_numpy(batch.obs[:n]).to(device),
                torch.from_numpy(batch.reward[:n]).to(device),
                torch.from_numpy(batch.start[:n]).to(device),
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
        noise = None
        if not deterministic.all():
            steps = torch.from_numpy(batch.steps[:n])
            noise = counter_normal(torch.from_numpy(seeds), steps, self.act_dim).numpy()
        applied_mask = batch.applied_mask[:n]
        return self.fixed.run(
            batch.slots[:n],
            batch.obs[:n],
            batch.reward[:n],
            batch.start[:n],
            batch.clear[:n],
            deterministic,
            noise,
            batch.applied[:n] if applied_mask.any() else None,
            applied_mask,
        )
