"""Command lines: ``trmrl-train`` and ``trmrl-eval``."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from trainer.config import PRESETS, TrainConfig, preset_config

if TYPE_CHECKING:
    from trmrl.tasks import TaskFamily


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def train_main(argv: list[str] | None = None) -> int:
    """Meta-train a TrMRL policy (or an oracle / memoryless reference, or the RL² baseline) from a preset."""
    parser = argparse.ArgumentParser(
        prog="trmrl-train",
        description="Meta-train TrMRL with PPO. Runs resume automatically from OUT/latest.",
    )
    parser.add_argument("--preset", help="named settings; see --list-presets")
    parser.add_argument("--out", type=Path, help="run directory (created; resumed if it holds this run)")
    parser.add_argument("--total-steps", type=int, help="environment steps to train for")
    parser.add_argument("--seed", type=int, help="seed of tasks, envs, initialisation, exploration")
    parser.add_argument(
        "--family",
        help="task family instead of the preset's: a name (built in or installed under the "
        "trmrl.task_families entry-point group) or module:attribute",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--list-presets", action="store_true", help="print the presets as a table and exit")
    parser.add_argument(
        "--show-preset",
        metavar="NAME",
        help="print every setting of preset NAME (with --set, --family, ... applied) and exit",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-held-out",
        action="store_true",
        help="skip the end-of-run evaluation of the held-out splits (test, ood): for a probe whose "
        "figures may only be read on validation; trmrl-eval --split test evaluates them later",
    )
    args = parser.parse_args(argv)
    prog = parser.prog

    if args.list_presets:
        return _printed(_list_presets)
    name = args.show_preset or args.preset
    if name is None or (args.show_preset is None and args.out is None):
        parser.error("--preset and --out are required (or --list-presets, --show-preset NAME)")
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        _fail(prog, f"unknown preset {name!r}; {hint}trmrl-train --list-presets shows the known ones")
    try:
        overrides = _parse_sets(args.set)
        if args.total_steps is not None:
            overrides["total_steps"] = str(args.total_steps)
        if args.seed is not None:
            overrides["seed"] = str(args.seed)
        if args.family is not None:
            overrides["family"] = args.family
        cfg = preset_config(name, overrides)
    except ValueError as exc:
        _fail(prog, str(exc))
    if args.show_preset is not None:
        return _printed(lambda: _show_preset(name, cfg, overrides))
    _check_before_work(prog, cfg)

    from trainer.run import Trainer, init_distributed

    init_distributed()
    try:
        trainer = Trainer(cfg, args.out, progress=not args.no_progress, held_out=not args.no_held_out)
    except ValueError as exc:  # RunDirectoryError included: a config or directory refused before any work
        _fail(prog, str(exc))
    try:
        result = trainer.train()
    finally:
        trainer.close()
    if trainer.is_main:
        rate = result.steps / max(result.seconds, 1e-9)
        print(f"trained {result.steps} steps in {result.seconds:.0f} s ({rate:.0f} steps/s) into {args.out}")
        for key, value in sorted(result.last_eval.items()):
            print(f"  {key:28s} {value:10.2f}")
    return 0


def _fail(prog: str, message: str) -> NoReturn:
    """Refuse with one line on stderr, ``PROG: error: MESSAGE``, and exit status 2 (as argparse does)."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def _check_before_work(prog: str, cfg: TrainConfig) -> None:
    """Refuse, with one line, what would otherwise fail once the run has started: a family that cannot be
    loaded or whose sampler does not return tasks, and a device this machine lacks."""
    from trmrl.device import resolve_device
    from trmrl.tasks import TaskFamilyError, get_family, locomotion, metaworld_tasks, point_nav

    built_in = (*point_nav.FAMILIES, *locomotion.FAMILIES, *metaworld_tasks.FAMILIES)
    try:
        family = get_family(cfg.family)
        if not any(family is known for known in built_in):
            # A user's own sampler: every split the run may draw from fails here, not in the run.
            for split in family.splits:
                family.sample_tasks(split, 2, seed=cfg.seed)
    except TaskFamilyError as exc:
        _fail(prog, str(exc))
    try:
        resolve_device(cfg.device)
    except RuntimeError as exc:
        _fail(prog, f"--set device={cfg.device}: {str(exc).splitlines()[0]}; use device=auto or device=cpu")


def _printed(show: Callable[[], None]) -> int:
    """Run ``show``; a reader that stops early (``| head``) ends it quietly."""
    try:
        show()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def _list_presets() -> None:
    """The presets as a table: what each trains, on what, for how long."""
    columns = ["preset", "family", "policy", "reference", "architecture", "optimization", "total steps"]
    rows = []
    for name in sorted(PRESETS):
        cfg = preset_config(name)
        rows.append(
            [
                name,
                cfg.family,
                cfg.policy,
                cfg.reference,
                cfg.architecture,
                cfg.optimization,
                f"{cfg.total_steps:,}",
            ]
        )
    _print_table(columns, rows)
    print("\ntrmrl-train --show-preset NAME prints every setting of one preset.")


def _show_preset(name: str, cfg: TrainConfig, overrides: dict[str, str]) -> None:
    """Every setting of ``cfg`` and where its value comes from: the preset, the command line or the
    default."""
    print(f"preset {name}")
    rows = []
    for key, value in cfg.to_dict().items():
        source = "command line" if key in overrides else "preset" if key in PRESETS[name] else "default"
        rows.append([key, json.dumps(value) if isinstance(value, bool) else str(value), source])
    _print_table(["setting", "value", "from"], rows)


def _print_table(columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(columns[i]), *(len(row[i]) for row in rows)) for i in range(len(columns))]
    for row in [columns, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _group_summary(values: list[float], gap_closed: Callable[[float], float | None]) -> dict[str, float]:
    """Mean, sample standard deviation, worst and best return of one kind's checkpoints (seeds), and the
    gap closed by their mean and by the worst of them."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    out = {"n": n, "mean": mean, "std": std, "worst": min(values), "best": max(values)}
    closed_mean, closed_worst = gap_closed(mean), gap_closed(min(values))
    if closed_mean is not None and closed_worst is not None:
        out |= {"gap_mean": closed_mean, "gap_worst": closed_worst}
    return out


def policy_kind(training: dict[str, Any]) -> str:
    """What a checkpoint is, from its training settings: ``trmrl``, ``rl2``, ``oracle`` or ``memoryless``."""
    if training.get("policy") == "rl2":
        return "rl2"
    return str(training.get("reference", "trmrl"))


def _compatible_family(trained: TaskFamily, other: TaskFamily) -> TaskFamily:
    """``other``, if a policy trained on ``trained`` can act in it (same spaces); else raise."""
    from trmrl.tasks import TaskFamilyError

    fields = ("obs_dim", "act_dim", "task_param_dim", "action_low", "action_high")
    differ = [f for f in fields if getattr(trained, f) != getattr(other, f)]
    if differ:
        raise TaskFamilyError(
            f"--family {other.name}: its {', '.join(differ)} differ from {trained.name}'s, "
            "which the checkpoints were trained on"
        )
    return other


def eval_main(argv: list[str] | None = None) -> int:
    """Evaluate checkpoints on one held-out task set and print a comparison table."""
    parser = argparse.ArgumentParser(
        prog="trmrl-eval",
        description="Meta-test checkpoints on the same task set (mean actions unless --sample).",
    )
    parser.add_argument("checkpoints", nargs="+", type=Path, metavar="CKPT")
    parser.add_argument("--split", choices=["validation", "test", "ood"], default="test")
    parser.add_argument("--tasks", type=int, default=30, help="number of tasks (default 30)")
    parser.add_argument("--seed", type=int, default=1000, help="task-set seed (default 1000, as training)")
    parser.add_argument("--episodes", type=int, help="episodes per trial (default: as trained)")
    parser.add_argument(
        "--sample",
        action="store_true",
        help="draw actions from the policy (noise seeded by --seed) instead of taking its mean",
    )
    parser.add_argument(
        "--family",
        help="evaluate on this task family instead of the checkpoints' own (its observations, actions and "
        "task parameters must have the same shapes and bounds), e.g. an ml1-reach policy on "
        "ml1-reach-decoupled",
    )
    parser.add_argument("--json", type=Path, help="write the full results here")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be >= 1")
    if args.episodes is not None and args.episodes < 1:
        parser.error("--episodes must be >= 1")

    from trainer.evaluate import evaluate
    from trmrl.checkpoint import CheckpointError, checkpoint_family, load_checkpoint
    from trmrl.tasks import TaskFamilyError, get_family
    from trmrl.tasks.trials import EARLY_STEPS

    try:
        loaded = [load_checkpoint(path) for path in args.checkpoints]
    except CheckpointError as exc:
        _fail(parser.prog, str(exc))
    families = {c.info.task_family for c in loaded}
    if len(families) != 1:
        _fail(parser.prog, f"checkpoints are of different task families: {', '.join(sorted(families))}")
    try:
        # --family first: a module:attribute it names registers its family, which the checkpoints may name.
        other = get_family(args.family) if args.family is not None else None
        family = checkpoint_family(loaded[0].info)
        if other is not None:
            family = _compatible_family(family, other)
        tasks = family.sample_tasks(args.split, args.tasks, seed=args.seed)
    except TaskFamilyError as exc:
        _fail(parser.prog, str(exc))

    for path, ckpt in zip(args.checkpoints, loaded, strict=True):
        episodes = args.episodes or int(ckpt.info.training.get("episodes_per_trial", 2))
        cfg = ckpt.config
        held = (episodes if cfg.memory_scope == "trial" else 1) * family.episode_length + 1
        if cfg.context == "trial" and held > cfg.max_context:
            parser.error(
                f"{path}: a context=trial policy with max_context={cfg.max_context} cannot hold "
                f"{episodes} episode(s) of {family.episode_length} steps (memory_scope={cfg.memory_scope})"
            )

    rows = []
    for path, ckpt in zip(args.checkpoints, loaded, strict=True):
        episodes = args.episodes or int(ckpt.info.training.get("episodes_per_trial", 2))
        result = evaluate(
            ckpt.model,
            family,
            tasks,
            episodes,
            oracle=ckpt.info.task_params_in_obs,
            seed=args.seed,
            deterministic=not args.sample,
        )
        rows.append((path, ckpt, result))

    # Several checkpoints of one kind (seeds) are a group: the references are each group's mean.
    groups: dict[str, list[float]] = {}
    for _, ckpt, r in rows:
        groups.setdefault(policy_kind(ckpt.info.training), []).append(float(r.returns.mean()))
    means = {kind: sum(values) / len(values) for kind, values in groups.items()}
    actions = "sampled actions" if args.sample else "deterministic"
    header = f"{family.name} {args.split}: {len(tasks)} tasks, seed {args.seed}, {actions}"
    print(header)
    columns = ["checkpoint", "kind", "version", "return"]
    max_eps = max(r.returns.shape[1] for _, _, r in rows)
    columns += [f"ep{e + 1}" for e in range(max_eps)]
    columns += [f"first{EARLY_STEPS}", f"after{EARLY_STEPS}"]
    has_success = family.has_success
    if has_success:
        columns.append("success")
    gap = "oracle" in groups and "memoryless" in groups

    def gap_closed(value: float) -> float | None:
        if not gap or means["oracle"] == means["memoryless"]:
            return None
        return (value - means["memoryless"]) / (means["oracle"] - means["memoryless"])

    if gap:
        columns.append("gap closed")
    table = []
    for path, ckpt, r in rows:
        kind = policy_kind(ckpt.info.training)
        line = [str(path), kind, ckpt.info.version, f"{r.returns.mean():.1f}"]
        line += [f"{r.returns[:, e].mean():.1f}" if e < r.returns.shape[1] else "" for e in range(max_eps)]
        line += [f"{r.early_returns.mean():.1f}", f"{(r.returns - r.early_returns).mean():.1f}"]
        if has_success:
            line.append(f"{100 * r.success.mean():.0f}%" if r.success is not None else "")
        if gap:
            closed = gap_closed(float(r.returns.mean()))
            line.append("n/a" if closed is None else f"{closed:.2f}")
        table.append(line)
    _print_table(columns, table)

    summary = {kind: _group_summary(values, gap_closed) for kind, values in groups.items()}
    if any(len(values) > 1 for values in groups.values()):
        print()
        group_columns = ["kind", "checkpoints", "mean return", "std", "worst", "best"]
        if gap:
            group_columns += ["gap closed (mean)", "gap closed (worst)"]
        group_rows = []
        for kind, s in summary.items():
            line = [
                kind,
                str(s["n"]),
                f"{s['mean']:.1f}",
                f"{s['std']:.1f}",
                f"{s['worst']:.1f}",
                f"{s['best']:.1f}",
            ]
            if gap:
                line += (
                    [f"{s['gap_mean']:.2f}", f"{s['gap_worst']:.2f}"] if "gap_mean" in s else ["n/a", "n/a"]
                )
            group_rows.append(line)
        _print_table(group_columns, group_rows)

    if args.json:
        payload = {
            "family": family.name,
            "split": args.split,
            "tasks": args.tasks,
            "seed": args.seed,
            "actions": "sampled" if args.sample else "deterministic",
            "groups": summary,
            "results": [
                {
                    "checkpoint": str(path),
                    "kind": policy_kind(ckpt.info.training),
                    "version": ckpt.info.version,
                    "summary": r.summary(""),
                    **r.to_json(),
                }
                for path, ckpt, r in rows
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
