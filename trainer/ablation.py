"""The learner ablation: which settings, at a screening budget, chosen on the validation split only.

Every arm is a preset plus ``--set`` overrides, trained with ``--no-held-out`` (a probe: test and ood are
never evaluated), so the table below reads validation figures alone. TrMRL and RL² get the same value
options. Each learner also gets the same number of arms on its own memory: TrMRL's block, window, memory
scope and trial-long context, RL²'s GRU width, backpropagation length and memory scope.

``python -m trainer.ablation commands [--family F]`` prints the training command of every arm;
``python -m trainer.ablation run --jobs 2 [--family F]`` trains the arms not finished yet, a few at a time,
each on one thread (every run resumes from its last checkpoint, so an interrupted ablation goes on);
``python -m trainer.ablation table RUNS_DIR --json FILE`` reads each run's ``metrics.jsonl`` and prints
the table (validation return at the end of the budget, gap closed, env steps to 0.85 of the gap, wall
time), taking the memoryless and oracle figures from ``docs/results/<family>-validation.json``.
``python -m trainer.ablation final experiments/ablation [--also context-trial]`` takes, for each family
and learner whose arms have all finished, the arm with the best validation return and trains it at
three new seeds with the same budget, each run evaluating test and ood once at its end;
``python -m trainer.ablation report experiments/final --json FILE --plot PNG`` gives their table (mean and
spread over seeds, the gap closed by the mean and by the worst seed) and sample-efficiency curves.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCREEN_STEPS = 3_000_000
"""The screening budget: where both learners' validation curves have flattened on halfcheetah-vel."""
LAST_EVALS = 3
"""The end-of-budget figure is the mean of this many last validation evaluations (the curves are noisy)."""
GAP_TARGET = 0.85

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Arm:
    family: str
    learner: str
    """``trmrl`` or ``rl2``."""
    option: str
    """Short name of what differs from the preset (``base``: nothing)."""
    sets: tuple[tuple[str, str], ...] = ()
    seed: int | None = None
    """``None``: the screen's run (the preset's seed, 0, validation only); a seed: a final run, whose
    held-out splits (test, ood) are evaluated once at its end."""

    @property
    def name(self) -> str:
        return f"{self.family}-{self.learner}-{self.option}" + ("" if self.seed is None else f"-s{self.seed}")

    @property
    def preset(self) -> str:
        return f"small-{self.family}" + ("-rl2" if self.learner == "rl2" else "")

    def command(self, runs: Path, steps: int = SCREEN_STEPS) -> str:
        sets = " ".join(f"--set {k}={v}" for k, v in self.sets)
        which = "--no-held-out" if self.seed is None else f"--seed {self.seed}"
        return (
            f".venv/bin/trmrl-train --preset {self.preset} --out {shlex.quote(str(runs / self.name))} "
            f"--total-steps {steps} {which} --no-progress {sets}"
        ).strip()


_BASE_VALUE_INPUT = {"halfcheetah-vel": "observation", "ant-dir": "memory"}
"""What the value reads in each family's preset (as the authors' runs do)."""
_VALUE_OPTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "value-observation": (("value_input", "observation"),),
    "value-memory": (("value_input", "memory"),),
    "value-memory-popart": (("value_input", "memory"), ("value_norm", "popart")),
    "value-detached": (("value_input", "memory_detached"),),
    "value-encoder": (("value_input", "encoder"),),
}
_MEMORY_OPTIONS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "trmrl": {
        "prenorm": (("block", "prenorm"),),
        "window25": (("window", "25"),),
        "window25-trial": (("window", "25"), ("memory_scope", "trial")),
        "context-trial": (("context", "trial"), ("memory_scope", "trial")),
    },
    "rl2": {
        "rnn256": (("rnn_hidden", "256"),),
        "bptt200": (("bptt", "200"),),
        "episode-scope": (("memory_scope", "episode"),),
        "bptt400": (("bptt", "400"),),
    },
}
"""Each learner's own memory options, as many for one as for the other. The first of each list is its
architecture option; the last reads the whole trial at once (TrMRL's trial-long context, RL²'s
backpropagation through all 400 steps). ant-dir screens these two of each learner's."""


def arms() -> list[Arm]:
    """halfcheetah-vel: every option; ant-dir: the value options and each learner's architecture and
    whole-trial options. The value input a family's preset already uses is its ``base`` arm."""
    out: list[Arm] = []
    for family in ("halfcheetah-vel", "ant-dir"):
        for learner in ("trmrl", "rl2"):
            out.append(Arm(family, learner, "base"))
            for option, sets in _VALUE_OPTIONS.items():
                if option == f"value-{_BASE_VALUE_INPUT[family]}":
                    continue
                out.append(Arm(family, learner, option, sets))
            memory = list(_MEMORY_OPTIONS[learner].items())
            for option, sets in memory if family == "halfcheetah-vel" else [memory[0], memory[-1]]:
                out.append(Arm(family, learner, option, sets))
    return out


FINAL_SEEDS = (1, 2, 3)
"""The final runs' seeds: none of them is the screen's seed 0, whose validation curve chose the arm."""


def choose(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Each (family, learner)'s arm with the best validation return at the end of the budget, once every
    arm of that family and learner has finished its budget; the others are left out."""
    planned: dict[tuple[str, str], int] = {}
    for arm in arms():
        planned[arm.family, arm.learner] = planned.get((arm.family, arm.learner), 0) + 1
    finished: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["steps"] >= SCREEN_STEPS:
            finished.setdefault((row["family"], row["learner"]), []).append(row)
    return {
        key: max(done, key=lambda r: r["validation_return"])
        for key, done in finished.items()
        if len(done) == planned[key]
    }


def finals(chosen: dict[tuple[str, str], dict[str, Any]], also: list[str]) -> list[Arm]:
    """The final runs: every chosen arm, and TrMRL's ``also`` options beside them, at each final seed."""
    by_name = {a.name: a for a in arms()}
    picked: list[Arm] = []
    for (family, learner), row in sorted(chosen.items()):
        names = [row["arm"]] + [f"{family}-trmrl-{o}" for o in also if learner == "trmrl"]
        picked += [by_name[n] for n in dict.fromkeys(names) if n in by_name]
    return [Arm(a.family, a.learner, a.option, a.sets, seed) for a in picked for seed in FINAL_SEEDS]


def run(chosen: list[Arm], runs: Path, jobs: int) -> int:
    """Train every arm without a ``final/`` checkpoint, ``jobs`` at a time, in the order given."""
    pending = [a for a in chosen if not (runs / a.name / "final").exists()]
    runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    active: list[tuple[Arm, subprocess.Popen[bytes]]] = []
    failed = 0
    while pending or active:
        while pending and len(active) < jobs:
            arm = pending.pop(0)
            log = (runs / f"{arm.name}.log").open("ab")
            cmd = shlex.split(arm.command(runs))
            cmd[0] = str(Path(sys.executable).with_name("trmrl-train"))
            print(f"start {arm.name}", flush=True)
            active.append((arm, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(5)
        for arm, proc in list(active):
            if proc.poll() is not None:
                active.remove((arm, proc))
                failed += proc.returncode != 0
                print(f"done {arm.name}: exit {proc.returncode}", flush=True)
    return 1 if failed else 0


def references(family: str, split: str = "validation") -> tuple[float, float]:
    """The shipped memoryless and oracle policies' returns on a split."""
    data = json.loads((ROOT / "docs" / "results" / f"{family}-{split}.json").read_text())
    return float(data["groups"]["memoryless"]["mean"]), float(data["groups"]["oracle"]["mean"])


def gap_closed(family: str, split: str, value: float) -> float | None:
    """``value``'s share of the memoryless-to-oracle gap on a split; ``None`` where the two references are
    too close (within 5 %) for a share to mean anything (ant-dir's sideways ood tasks)."""
    memoryless, oracle = references(family, split)
    if abs(oracle - memoryless) < 0.05 * max(abs(oracle), abs(memoryless)):
        return None
    return _share(value, memoryless, oracle)


def _share(value: float, memoryless: float, oracle: float) -> float:
    return (value - memoryless) / (oracle - memoryless)


def final_report(runs: Path) -> list[dict[str, Any]]:
    """One row per final arm with a finished run: every seed's validation, test and ood figures (the
    held-out ones from the run's last record), their means and spreads, and the seeds' curves."""
    out: list[dict[str, Any]] = []
    for arm in arms():
        seeds = [Arm(arm.family, arm.learner, arm.option, arm.sets, seed) for seed in FINAL_SEEDS]
        rows = [(a.seed, row) for a in seeds if (row := summarize(a, runs / a.name)) is not None]
        rows = [(seed, row) for seed, row in rows if row["steps"] >= SCREEN_STEPS]
        if not rows:
            continue
        last = {seed: _last_record(runs / f"{arm.name}-s{seed}") for seed, _ in rows}
        figures: dict[str, Any] = {"validation": [row["validation_return"] for _, row in rows]}
        for split in ("test", "ood"):
            values = [last[seed].get(f"{split}/return") for seed, _ in rows]
            if all(v is not None for v in values):
                figures[split] = values
        summary = {
            split: {
                "per_seed": values,
                "mean": float(np.mean(values)),
                "std": float(np.std(values)),
                "gap_closed": gap_closed(arm.family, split, float(np.mean(values))),
                "worst_gap_closed": gap_closed(arm.family, split, float(min(values))),
            }
            for split, values in figures.items()
        }
        out.append(
            {
                "arm": arm.name,
                "family": arm.family,
                "learner": arm.learner,
                "option": arm.option,
                "sets": dict(arm.sets),
                "seeds": [seed for seed, _ in rows],
                "splits": summary,
                "steps_to_gap_085": [row["steps_to_gap_085"] for _, row in rows],
                "curves": {str(seed): row["curve"] for seed, row in rows},
            }
        )
    return out


def _last_record(run: Path) -> dict[str, Any]:
    lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return dict(json.loads(lines[-1])) if lines else {}


def final_table(rows: list[dict[str, Any]]) -> str:
    """Mean ± spread over seeds, the gap closed by the mean (and by the worst seed on test)."""

    def cell(row: dict[str, Any], split: str) -> str:
        figure = row["splits"].get(split)
        if figure is None:
            return "—"
        gap = "" if figure["gap_closed"] is None else f" ({figure['gap_closed']:.2f})"
        return f"{figure['mean']:.1f} ± {figure['std']:.1f}{gap}"

    lines = [
        "| family | learner | option | seeds | validation (gap) | test (gap) | worst test seed's gap | "
        "ood (gap) | steps to 0.85 (validation) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        test = r["splits"].get("test")
        worst = "—" if test is None or test["worst_gap_closed"] is None else f"{test['worst_gap_closed']:.2f}"
        reached = " / ".join("—" if s is None else f"{s / 1e6:.2f} M" for s in r["steps_to_gap_085"])
        lines.append(
            f"| {r['family']} | {r['learner']} | {r['option']} | {','.join(map(str, r['seeds']))} | "
            f"{cell(r, 'validation')} | {cell(r, 'test')} | {worst} | {cell(r, 'ood')} | {reached} |"
        )
    return "\n".join(lines)


def summarize(arm: Arm, run: Path) -> dict[str, Any] | None:
    """One row of the table, or ``None`` while the run has no validation evaluation yet."""
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [(r["steps"], r["validation/return"]) for r in rows if "validation/return" in r]
    if not evals:
        return None
    memoryless, oracle = references(arm.family)

    def gap(value: float) -> float:
        return _share(value, memoryless, oracle)

    last = [v for _, v in evals[-LAST_EVALS:]]
    end = sum(last) / len(last)
    reached = next((s for s, v in evals if gap(v) >= GAP_TARGET), None)
    seconds = sum(r.get("time/sample_s", 0.0) + r.get("time/update_s", 0.0) for r in rows)
    steps = max(r["steps"] for r in rows)
    return {
        "arm": arm.name,
        "family": arm.family,
        "learner": arm.learner,
        "option": arm.option,
        "sets": dict(arm.sets),
        "steps": steps,
        "validation_return": end,
        "best_validation_return": max(v for _, v in evals),
        "gap_closed": gap(end),
        "steps_to_gap_085": reached,
        "train_seconds": seconds,
        "curve": evals,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| family | learner | option | env steps | validation return (last 3) | gap closed | "
        "steps to 0.85 | train time |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        reached = f"{r['steps_to_gap_085'] / 1e6:.2f} M" if r["steps_to_gap_085"] is not None else "—"
        lines.append(
            f"| {r['family']} | {r['learner']} | {r['option']} | {r['steps'] / 1e6:.2f} M | "
            f"{r['validation_return']:.1f} | {r['gap_closed']:.2f} | {reached} | "
            f"{r['train_seconds'] / 60:.0f} min |"
        )
    return "\n".join(lines)


def _label(row: dict[str, Any]) -> tuple[str, str]:
    """A row's legend entry and line style: TrMRL solid, RL² dashed."""
    trmrl = row["learner"] == "trmrl"
    return f"{'TrMRL' if trmrl else 'RL²'} {row['option']}", "-" if trmrl else "--"


def plot(rows: list[dict[str, Any]], out: Path) -> int:
    """The screen's curves: each arm's validation return against env steps (seed 0)."""

    def draw(ax: Any, row: dict[str, Any]) -> None:
        steps, values = zip(*row["curve"], strict=True)
        label, style = _label(row)
        ax.plot(np.asarray(steps) / 1e6, values, style, label=label, linewidth=1.2)

    return _panels(rows, out, draw, "validation return, seed 0 (screen)", gap_line=False)


def plot_finals(rows: list[dict[str, Any]], out: Path) -> int:
    """Sample efficiency: each final arm's validation return against env steps, the mean over its seeds
    as a line and their range as a band."""

    def draw(ax: Any, row: dict[str, Any]) -> None:
        curves = [dict(c) for c in row["curves"].values()]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.asarray([[c[s] for s in steps] for c in curves])
        label, style = _label(row)
        x = np.asarray(steps) / 1e6
        (line,) = ax.plot(x, values.mean(0), style, label=f"{label} ({len(curves)} seeds)")
        ax.fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)

    return _panels(rows, out, draw, "validation return (mean of seeds, band: their range)", gap_line=True)


def _panels(rows: list[dict[str, Any]], out: Path, draw: Any, title: str, *, gap_line: bool) -> int:
    """One panel per family: ``draw(ax, row)`` for each of its rows, then the memoryless and oracle
    references (and 0.85 of the gap between them) as dotted lines. Returns the number of rows drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r["family"] for r in rows})
    fig, axes = plt.subplots(1, len(families), figsize=(8 * len(families), 5), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        memoryless, oracle = references(family)
        for row in rows:
            if row["family"] == family:
                draw(ax, row)
        ax.axhline(memoryless, color="grey", linestyle=":", linewidth=1, label="memoryless")
        ax.axhline(oracle, color="black", linestyle=":", linewidth=1, label="oracle")
        if gap_line:
            level = memoryless + GAP_TARGET * (oracle - memoryless)
            ax.axhline(level, color="green", linestyle=":", linewidth=1, label=f"{GAP_TARGET} of the gap")
        ax.set_ylim(bottom=memoryless - 0.5 * (oracle - memoryless))
        ax.set_title(f"{family}: {title}")
        ax.set_xlabel("env steps (M)")
        ax.set_ylabel("return per episode (deterministic, validation tasks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.ablation", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = sub.add_parser("commands", help="the training command of every arm")
    commands.add_argument("--runs", type=Path, default=Path("experiments/ablation"))
    commands.add_argument("--family", choices=["halfcheetah-vel", "ant-dir"])
    launch = sub.add_parser("run", help="train the arms not finished yet")
    launch.add_argument("--runs", type=Path, default=Path("experiments/ablation"))
    launch.add_argument("--family", choices=["halfcheetah-vel", "ant-dir"])
    launch.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    launch.add_argument("--only", nargs="+", metavar="ARM", help="these arms, in this order")
    final = sub.add_parser(
        "final",
        help="each learner's arm chosen on the screen's validation, trained at seeds "
        f"{', '.join(map(str, FINAL_SEEDS))} (test and ood evaluated once at the end)",
    )
    final.add_argument("screen", type=Path, help="the screen's runs (experiments/ablation)")
    final.add_argument("--runs", type=Path, default=Path("experiments/final"))
    final.add_argument("--family", choices=["halfcheetah-vel", "ant-dir"])
    final.add_argument(
        "--also", nargs="+", default=[], metavar="OPTION", help="TrMRL options trained beside its choice"
    )
    final.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    final.add_argument("--dry-run", action="store_true", help="print the choices and commands only")
    outcome = sub.add_parser("report", help="the final runs' table (validation, test, ood) and curves")
    outcome.add_argument("runs", type=Path, help="the final runs (experiments/final)")
    outcome.add_argument("--json", type=Path, help="write the rows (per seed, curves included) here")
    outcome.add_argument("--plot", type=Path, help="draw the sample-efficiency curves here (PNG)")
    report = sub.add_parser("table", help="the table of the runs so far")
    report.add_argument("runs", type=Path)
    report.add_argument("--json", type=Path, help="write the rows (curves included) here")
    report.add_argument("--plot", type=Path, help="draw every arm's validation curve here (PNG)")
    args = parser.parse_args(argv)
    chosen = [a for a in arms() if getattr(args, "family", None) in (None, a.family)]
    if args.command == "commands":
        for arm in chosen:
            print(arm.command(args.runs))
        return 0
    if args.command == "run":
        if args.jobs < 1:
            parser.error("--jobs must be >= 1")
        if args.only:
            known = {a.name: a for a in chosen}
            unknown = [n for n in args.only if n not in known]
            if unknown:
                parser.error(f"unknown arm {unknown[0]!r}; 'commands' lists them")
            chosen = [known[n] for n in args.only]
        return run(chosen, args.runs, args.jobs)
    if args.command == "final":
        if args.jobs < 1:
            parser.error("--jobs must be >= 1")
        options = {a.option for a in arms() if a.learner == "trmrl"}
        unknown = [o for o in args.also if o not in options]
        if unknown:
            parser.error(f"unknown TrMRL option {unknown[0]!r}; 'commands' lists the arms")
        if not args.screen.is_dir():
            parser.error(f"{args.screen} is not a directory of runs")
        rows = [row for arm in chosen if (row := summarize(arm, args.screen / arm.name)) is not None]
        picks = choose(rows)
        if not picks:
            parser.error("no learner has finished every arm of its screen yet")
        for (family, learner), row in sorted(picks.items()):
            print(f"{family} {learner}: {row['option']} (validation {row['validation_return']:.1f})")
        todo = finals(picks, args.also)
        if args.dry_run:
            for arm in todo:
                print(arm.command(args.runs))
            return 0
        return run(todo, args.runs, args.jobs)
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a directory of runs")
    if args.command == "report":
        facts: dict[str, Any] = {"seeds": FINAL_SEEDS}
        rows = final_report(args.runs)
        printed, draw, missing = final_table, plot_finals, "has finished its budget"
    else:
        rows = [row for arm in chosen if (row := summarize(arm, args.runs / arm.name)) is not None]
        facts = {"screen_steps": SCREEN_STEPS}
        printed, draw, missing = table, plot, "has a validation evaluation yet"
    if not rows:
        parser.error(f"no run under {args.runs} {missing}")
    print(printed(rows))
    if args.json:
        args.json.write_text(json.dumps({**facts, "rows": rows}, indent=1) + "\n")
    if args.plot:
        draw(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
