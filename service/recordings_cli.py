"""``trmrl-recordings``: what recorded sessions did, from the Parquet files the service wrote.

``trmrl-recordings summarize DIR`` prints, per model version, the episodes recorded and their mean
return, then the adaptation curve: the mean reward by step in episode (the reward for the action
taken at the step before), over the first steps and after them. A robot that adapts shows rewards
that improve over an episode's first steps.

The reward of an episode's last action arrives with the next episode's first observation, which the
service ignores (it starts the episode): a recorded return lacks that one reward.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.core.engine import ADAPTATION_STEPS


def load(directory: Path) -> dict[str, np.ndarray]:
    """The columns the summary needs, from every complete recording file under ``directory``."""
    import pyarrow.parquet as pq

    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no recording files (*.parquet) in {directory}")
    table = pq.read_table(
        files, columns=["session_id", "model", "version", "episode", "step_in_episode", "reward"]
    )
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def summarize(columns: dict[str, np.ndarray], curve_steps: int = 40) -> str:
    lines = []
    models = np.char.add(np.char.add(columns["model"].astype(str), " "), columns["version"].astype(str))
    for label in sorted(set(models.tolist())):
        mine = models == label
        sessions = columns["session_id"][mine].astype(str)
        episode = columns["episode"][mine]
        step = columns["step_in_episode"][mine]
        reward = columns["reward"][mine].astype(np.float64)
        keys = np.char.add(np.char.add(sessions, "/"), episode.astype(str))
        _, which = np.unique(keys, return_inverse=True)
        returns = np.bincount(which, weights=np.where(step >= 1, reward, 0.0))
        lengths = np.bincount(which)
        lines.append(
            f"{label}: {len(set(sessions.tolist()))} sessions, {len(returns)} episodes, "
            f"{int(mine.sum())} steps; return per episode mean {returns.mean():.2f} "
            f"(min {returns.min():.2f}, max {returns.max():.2f}), mean length {lengths.mean():.1f}"
        )
        rewarded = step >= 1
        early = rewarded & (step <= ADAPTATION_STEPS)
        late = rewarded & (step > ADAPTATION_STEPS)
        if early.any():
            after = f"{reward[late].mean():.3f}" if late.any() else "-"
            first = reward[early].mean()
            lines.append(f"  mean reward, first {ADAPTATION_STEPS} steps {first:.3f}, after them {after}")
        top = min(curve_steps, int(step.max()) if len(step) else 0)
        if top >= 1:
            sums = np.bincount(step[rewarded], weights=reward[rewarded], minlength=top + 1)[1 : top + 1]
            counts = np.bincount(step[rewarded], minlength=top + 1)[1 : top + 1]
            curve = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
            lines.append("  adaptation curve (mean reward by step in episode):")
            for start in range(0, top, 10):
                cells = " ".join(f"{v:7.3f}" for v in curve[start : start + 10])
                lines.append(f"    steps {start + 1:3d}-{min(start + 10, top):3d}: {cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trmrl-recordings", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summarize", help="returns per episode and the adaptation curve")
    summary.add_argument("directory", type=Path, help="the service's TRMRL_RECORD_DIR")
    summary.add_argument("--steps", type=int, default=40, help="steps of the adaptation curve (default 40)")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"trmrl-recordings: {args.directory} is not a directory", file=sys.stderr)
        return 2
    try:
        columns = load(args.directory)
    except FileNotFoundError as exc:
        print(f"trmrl-recordings: {exc}", file=sys.stderr)
        return 2
    print(summarize(columns, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
