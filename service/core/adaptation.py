"""Each engine's adaptation signal in full, for the fleet page (:mod:`service.fleet`).

:class:`AdaptationCurves`: the reward received for the action at each step of an episode, summed and
counted separately for a session's first episode and its later ones (the engine's ``reward_sums`` are
the same rewards in two bins, steps 1-20 and after), plus each session's running and last episode
return (columns of the session table). It is counted once per forward pass, with the batch's rewards,
beside ``reward_sums``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service.core.session_table import SessionTable

#: Steps of an episode the adaptation curves cover (rewards of later steps are left out of them).
CURVE_STEPS = 200


class AdaptationCurves:
    """Rewards by step in episode (1..``steps``), a session's first episode apart from its later ones.

    Sums and counts are flat, ``width = steps + 2`` bins per half: index ``step`` for the first
    episode, ``width + step`` for later ones; bin 0 stays empty (an episode's first row carries no
    reward) and bin ``steps + 1`` takes the steps beyond the curve, left out of it. Large batches are
    counted into numpy arrays (:attr:`sums`, :attr:`counts`), a few rows into Python lists (cheaper
    per row); :meth:`curves` adds them.
    """

    __slots__ = ("_few_counts", "_few_sums", "counts", "steps", "sums", "width")

    def __init__(self, steps: int = CURVE_STEPS) -> None:
        self.steps = steps
        self.width = steps + 2
        self.sums = np.zeros(2 * self.width)
        self.counts = np.zeros(2 * self.width, np.int64)
        self._few_sums = [0.0] * (2 * self.width)
        self._few_counts = [0] * (2 * self.width)

    def count(
        self, table: SessionTable, slots: np.ndarray, start: np.ndarray, live: np.ndarray, rewards: np.ndarray
    ) -> None:
        """Count a computed batch, before the table commits it (its episode counters are the ones the
        rows' rewards belong to). The slots of a batch are distinct.

        A row's reward is for the session's previous action; an episode's first row has none, and it
        closes the previous episode: its return becomes the session's last return.
        """
        width, beyond = self.width, self.steps + 1
        episode_step, episodes = table.episode_step, table.episodes
        running, last = table.episode_return, table.last_return
        if len(slots) < 32:
            # A few rows (one robot's step): plain Python costs a fraction of the array operations.
            sums, counts = self._few_sums, self._few_counts
            rows = zip(start.tolist(), live.tolist(), slots.tolist(), rewards.tolist(), strict=True)
            for first, alive, slot, reward in rows:
                if not alive:
                    continue
                if first:
                    if episodes[slot]:
                        last[slot] = running[slot]
                    running[slot] = 0.0
                    continue
                running[slot] += reward
                step = int(episode_step[slot])
                at = (step if step < beyond else beyond) + (width if episodes[slot] > 1 else 0)
                sums[at] += reward
                counts[at] += 1
            return
        if live.all() and not start.any():  # the steady state: every row rewarded
            at_slots, values = slots, rewards
        else:
            began = slots[start & live]
            if len(began):
                ended = began[episodes[began] > 0]
                last[ended] = running[ended]
                running[began] = 0.0
            rewarded = live & ~start
            at_slots, values = slots[rewarded], rewards[rewarded]
        running[at_slots] += values
        index = np.minimum(episode_step[at_slots], beyond)
        index += (episodes[at_slots] > 1) * width
        self.sums += np.bincount(index, weights=values, minlength=2 * width)
        self.counts += np.bincount(index, minlength=2 * width)

    def curves(self) -> tuple[list[float | None], list[float | None], int, int]:
        """Mean reward at steps 1.. for the first episode and the later ones (``None``: no reward
        counted at that step), up to the last step with any; and the rewards counted in each."""
        width = self.width
        both = (self.counts + np.asarray(self._few_counts)).reshape(2, width)
        counts = both[:, 1 : self.steps + 1]
        sums = (self.sums + np.asarray(self._few_sums)).reshape(2, width)[:, 1 : self.steps + 1]
        seen = np.flatnonzero(counts.sum(0))
        top = int(seen[-1]) + 1 if len(seen) else 0
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.round(sums[:, :top] / counts[:, :top], 5)
        first, later = (
            [
                None if n == 0 else float(v)
                for v, n in zip(means[k].tolist(), counts[k, :top].tolist(), strict=True)
            ]
            for k in (0, 1)
        )
        return first, later, int(counts[0].sum()), int(counts[1].sum())
