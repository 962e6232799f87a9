"""Rendered clips of the bundled checkpoints side by side on one held-out task (the clips in the docs).

From a checkout of the repository, like ``make demo``: serve the family's bundled TrMRL checkpoint and its
memoryless reference (:func:`trmrl_sim.demo.find_models`), run the same held-out task through the service
with each, render it offscreen (:mod:`trmrl_sim.render`) and write the panels side by side, one GIF or MP4.

Example:
    MUJOCO_GL=osmesa python -m trmrl_sim.clips --family halfcheetah-vel --task 2 \\
        --out docs/img/halfcheetah-vel-rollout.gif
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trmrl_sim.demo import DemoError, find_models, running_service
from trmrl_sim.render import (
    EpisodeRecorder,
    RenderError,
    check_can_render,
    choose_gl_backend,
    parse_size,
    side_by_side,
    write_clip,
)
from trmrl_sim.sim import SimError, exit_status, load_tasks_module, run_sim

KIND_TITLES = {"trmrl": "TrMRL", "memoryless": "memoryless reference", "oracle": "oracle (told the task)"}


def render_clip(args: argparse.Namespace) -> int:
    """Serve the checkpoints, render the task with each, write the panels side by side to ``args.out``.

    Example:
        >>> render_clip(parse_args(["--family", "ant-dir", "--out", "ant.gif"]))  # doctest: +SKIP
        0
    """
    family, models = find_models(args.checkpoints, args.family)
    models = [m for m in models if m.kind in args.kinds]
    if not models:
        raise DemoError(
            f"no checkpoint of kind {', '.join(args.kinds)} for {family} under {args.checkpoints}"
        )
    tasks_module = load_tasks_module()
    try:
        family_def = tasks_module.get_family(family)
        task = family_def.sample_tasks(args.split, args.task + 1, args.seed)[args.task]
    except tasks_module.TaskFamilyError as exc:
        raise SimError(str(exc)) from exc
    check_can_render(family_def, args.out, args.size)
    names = ", ".join(m.name for m in models)
    print(f"clips: {family} {args.split} task {args.task} ({task.label}); models {names}")
    panels: list[list[np.ndarray]] = []
    fps = 10.0
    with running_service([m.path for m in models], ready_timeout_s=args.ready_timeout) as url:
        for model in models:
            recorder = EpisodeRecorder(
                args.task,
                size=args.size,
                every=args.every,
                title=KIND_TITLES.get(model.kind, model.kind),
            )
            result = asyncio.run(
                run_sim(
                    url,
                    family,
                    split=args.split,
                    envs=args.task + 1,
                    episodes=args.episodes,
                    model=model.name,
                    seed=args.seed,
                    progress=False,
                    recorder=recorder,
                )
            )
            returns = ", ".join(f"{r:.1f}" for r in result.returns[args.task])
            success = "" if result.success is None else f", success {result.success[args.task].tolist()}"
            n_frames = len(recorder.frames)
            print(f"clips: {model.name}: return of each episode {returns}{success}, {n_frames} frames")
            panels.append(recorder.frames)
            fps = recorder.fps
    frames = side_by_side(panels)
    write_clip(args.out, frames, fps)
    size = args.out.stat().st_size
    print(
        f"clips: wrote {args.out}: {len(frames)} frames of {frames[0].shape[1]}x{frames[0].shape[0]}, "
        f"{len(frames) / fps:.1f} s, {size / 1e6:.2f} MB"
    )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trmrl_sim.clips",
        description="Serve a family's bundled TrMRL checkpoint and its memoryless reference, run one "
        "held-out task through the service with each and render the episodes side by side to a GIF or MP4.",
    )
    parser.add_argument("--family", required=True, help="task family with bundled checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="the clip: a .gif or an .mp4")
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="bundled checkpoints")
    parser.add_argument(
        "--split", choices=["test", "ood"], default="test", help="held-out split (default test)"
    )
    parser.add_argument("--task", type=int, default=0, help="which task of the split (default 0)")
    parser.add_argument("--episodes", type=int, default=1, help="episodes rendered (default 1)")
    parser.add_argument(
        "--kinds",
        default="trmrl,memoryless",
        help="checkpoint kinds, left to right (default trmrl,memoryless)",
    )
    parser.add_argument("--size", default="240x180", help="panel size in pixels (default 240x180)")
    parser.add_argument("--every", type=int, default=2, help="keep every N-th step's frame (default 2)")
    parser.add_argument("--seed", type=int, default=1000, help="task-set seed (default 1000, as training)")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for /readyz")
    args = parser.parse_args(argv)
    if args.task < 0 or args.episodes < 1 or args.every < 1:
        parser.error("--task must be >= 0, --episodes and --every >= 1")
    try:
        args.size = parse_size(args.size)
    except ValueError as exc:
        parser.error(f"--size: {exc}")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trmrl_sim.clips``; returns the exit status (2: bad invocation).

    Example:
        >>> main(["--family", "halfcheetah-vel", "--task", "2", "--out", "cheetah.gif"])  # doctest: +SKIP
        0
    """
    args = parse_args(argv)
    choose_gl_backend()  # before anything imports mujoco
    return exit_status("clips", lambda: render_clip(args), (DemoError, SimError, RenderError))


if __name__ == "__main__":
    sys.exit(main())
