"""Figures for reports: training curves of runs, adaptation curves of an evaluation.

``python -m trainer.plots curves RUN [RUN ...] --out FILE.png`` plots held-out return against env steps
from each run's ``metrics.jsonl``; ``python -m trainer.plots adaptation EVAL.json --out FILE.png`` plots
the mean reward by step index from a ``trmrl-eval --json`` file, one line per checkpoint;
``python -m trainer.plots trajectories CKPT [CKPT ...] --info x_velocity --target-param 0 --out FILE.png``
runs each checkpoint on a few held-out tasks (lowest, middle and highest first task parameter) and plots a
quantity the environment reports, against its target, and the reward by step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from trmrl.checkpoint import Checkpoint, load_checkpoint
from trmrl.networks import make_pool
from trmrl.policy import act
from trmrl.tasks import Task, TaskFamily, get_family
from trmrl.tasks.trials import EARLY_STEPS, trial_flow


def _save(fig: Figure, out: Path) -> None:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_curves(runs: list[Path], out: Path, metric: str = "test/return") -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        points = [(r["steps"], r[metric]) for r in rows if metric in r]
        if not points:
            raise SystemExit(f"{run}: no '{metric}' in metrics.jsonl")
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, label=run.name)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"{metric} (per episode, deterministic)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out)


def plot_adaptation(evaluation: Path, out: Path, episode: int = 0) -> None:
    data = json.loads(evaluation.read_text())
    fig, ax = plt.subplots(figsize=(7, 4))
    for result in data["results"]:
        curve = [x for x in result["curve"][episode] if x is not None]
        ax.plot(range(len(curve)), curve, label=f"{result['kind']} ({Path(result['checkpoint']).name})")
    ax.axvline(EARLY_STEPS, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"step within episode {episode + 1}")
    ax.set_ylabel("mean reward over held-out tasks")
    ax.set_title(f"{data['family']} {data['split']}: adaptation within an episode")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out)


def spread_tasks(family: TaskFamily, split: str, count: int, seed: int, pool: int = 30) -> list[Task]:
    """``count`` tasks of a ``pool``-task held-out set, spread over the range of their first parameter."""
    tasks = sorted(family.sample_tasks(split, pool, seed=seed), key=lambda t: t.params[0])
    picks = np.linspace(0, len(tasks) - 1, count).round().astype(int)
    return [tasks[i] for i in picks]


@torch.no_grad()
def run_episode(
    ckpt: Checkpoint, family: TaskFamily, task: Task, info_key: str
) -> tuple[list[float], list[float]]:
    """One deterministic first episode of ``task``: ``info[info_key]`` and the reward at each step."""
    model = ckpt.model.eval()
    pool = make_pool(model, 1)
    low, high = torch.tensor(family.action_low), torch.tensor(family.action_high)
    values: list[float] = []
    rewards: list[float] = []

    def record(env: int, episode: int, reward: float, info: dict[str, Any]) -> None:
        if info_key not in info:
            known = ", ".join(sorted(info))
            raise SystemExit(f"{family.name}: the environment reports no '{info_key}' (has: {known})")
        values.append(float(info[info_key]))
        rewards.append(reward)

    env = family.make_env(task)
    try:
        trial = trial_flow(
            family, [env], [task], 1, oracle=ckpt.info.task_params_in_obs, seed=0, on_step=record
        )
        tick = next(trial)
        while True:
            result = act(
                pool,
                torch.as_tensor(tick.rows),
                torch.as_tensor(tick.observations, dtype=torch.float32),
                torch.as_tensor(tick.rewards, dtype=torch.float32),
                torch.as_tensor(tick.episode_starts),
                low=low,
                high=high,
                deterministic=True,
                noise=None,
            )
            tick = trial.send(result.actions.numpy())
    except StopIteration:
        return values, rewards
    finally:
        env.close()


def plot_trajectories(
    checkpoints: list[Path],
    out: Path,
    info_key: str,
    *,
    split: str = "test",
    count: int = 3,
    seed: int = 1000,
    target_param: int | None = None,
) -> None:
    loaded = [load_checkpoint(path) for path in checkpoints]
    families = {c.info.task_family for c in loaded}
    if len(families) != 1:
        raise SystemExit(f"checkpoints are of different task families: {', '.join(sorted(families))}")
    family = get_family(families.pop())
    tasks = spread_tasks(family, split, count, seed)
    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6), sharex=True, squeeze=False)
    for t, task in enumerate(tasks):
        top, bottom = axes[0, t], axes[1, t]
        if target_param is not None:
            target = task.params[target_param]
            top.axhline(target, color="black", linewidth=0.8, linestyle="--", label="target")
        for path, ckpt in zip(checkpoints, loaded, strict=True):
            values, rewards = run_episode(ckpt, family, task, info_key)
            kind = str(ckpt.info.training.get("reference", "trmrl"))
            top.plot(values, linewidth=1.1, label=f"{kind} ({path.name})")
            bottom.plot(rewards, linewidth=1.1)
        top.set_title(f"{task.label}", fontsize=10)
        bottom.set_xlabel("step within the episode")
        for ax in (top, bottom):
            ax.axvline(EARLY_STEPS, color="grey", linestyle=":", linewidth=1)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(info_key)
    axes[1, 0].set_ylabel("reward")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{family.name} {split}: first episode of a trial, deterministic")
    _save(fig, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.plots", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    curves = sub.add_parser("curves", help="held-out return against env steps")
    curves.add_argument("runs", nargs="+", type=Path)
    curves.add_argument("--metric", default="test/return")
    curves.add_argument("--out", type=Path, required=True)
    adaptation = sub.add_parser("adaptation", help="reward by step index from a trmrl-eval --json file")
    adaptation.add_argument("evaluation", type=Path)
    adaptation.add_argument("--episode", type=int, default=0)
    adaptation.add_argument("--out", type=Path, required=True)
    trajectories = sub.add_parser("trajectories", help="an env-reported quantity and reward by step")
    trajectories.add_argument("checkpoints", nargs="+", type=Path)
    trajectories.add_argument("--info", default="x_velocity", help="info key to plot (default x_velocity)")
    trajectories.add_argument("--split", choices=["validation", "test", "ood"], default="test")
    trajectories.add_argument("--count", type=int, default=3, help="tasks to show (default 3)")
    trajectories.add_argument("--seed", type=int, default=1000, help="task-set seed (default 1000)")
    trajectories.add_argument("--target-param", type=int, help="draw this task parameter as the target")
    trajectories.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "curves":
        plot_curves(args.runs, args.out, args.metric)
    elif args.command == "trajectories":
        plot_trajectories(
            args.checkpoints,
            args.out,
            args.info,
            split=args.split,
            count=args.count,
            seed=args.seed,
            target_param=args.target_param,
        )
    else:
        plot_adaptation(args.evaluation, args.out, args.episode)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
