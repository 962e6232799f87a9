"""Figures for reports: training curves of runs, adaptation curves of an evaluation.

``python -m trainer.plots curves RUN [RUN ...] --out FILE.png`` plots held-out return against env steps
from each run's ``metrics.jsonl``; ``python -m trainer.plots adaptation EVAL.json --out FILE.png`` plots
the mean reward by step index from a ``trmrl-eval --json`` file, one line per checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


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
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def plot_adaptation(evaluation: Path, out: Path, episode: int = 0) -> None:
    data = json.loads(evaluation.read_text())
    fig, ax = plt.subplots(figsize=(7, 4))
    for result in data["results"]:
        curve = [x for x in result["curve"][episode] if x is not None]
        ax.plot(range(len(curve)), curve, label=f"{result['kind']} ({Path(result['checkpoint']).name})")
    ax.axvline(20, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"step within episode {episode + 1}")
    ax.set_ylabel("mean reward over held-out tasks")
    ax.set_title(f"{data['family']} {data['split']}: adaptation within an episode")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


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
    args = parser.parse_args(argv)
    if args.command == "curves":
        plot_curves(args.runs, args.out, args.metric)
    else:
        plot_adaptation(args.evaluation, args.out, args.episode)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
