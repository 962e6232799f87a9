"""The sampler's env stages: simulators in worker processes give the trials in-process envs give, a
worker's failure is raised in the sampler as it was raised there, and the trainer trains with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import preset_config
from trainer.envs import WorkerStage, make_stages
from trainer.rollout import Rollout, TrialSampler
from trainer.run import model_config_for, train
from trmrl.networks import build_model
from trmrl.tasks import TaskFamilyError, get_family


def _rollouts(preset: str, n: int, deterministic: bool, **kw: object) -> dict[str, Rollout]:
    cfg = preset_config(preset)
    family = get_family(cfg.family)
    torch.manual_seed(0)
    net = build_model(model_config_for(cfg, family)).eval()
    tasks = family.sample_tasks("train", n, seed=3)
    out = {}
    for mode in ("sync", "async"):
        sampler = TrialSampler(family, net, n, 2, vector=mode, **kw)  # type: ignore[arg-type]
        try:
            out[mode] = sampler.run(
                tasks, seed=5, deterministic=deterministic, generator=torch.Generator().manual_seed(9)
            )
        finally:
            sampler.close()
    return out


@pytest.mark.parametrize(("preset", "n"), [("small-point-nav", 5), ("small-halfcheetah-vel-rl2", 3)])
def test_workers_give_the_trials_of_in_process_envs(preset: str, n: int) -> None:
    r = _rollouts(preset, n, deterministic=True)
    sync, workers = r["sync"], r["async"]
    assert torch.equal(sync.valid, workers.valid) and torch.equal(sync.lengths, workers.lengths)
    assert torch.equal(sync.episode, workers.episode) and torch.equal(sync.newest, workers.newest)
    # The halves run the network on half batches: the same sums in another order, so equal to rounding.
    for name in ("windows", "actions", "rewards", "values", "log_probs", "last_values"):
        torch.testing.assert_close(getattr(workers, name), getattr(sync, name), rtol=0, atol=1e-4)
    if sync.states is not None:
        assert workers.states is not None
        torch.testing.assert_close(workers.states, sync.states, rtol=0, atol=1e-4)


def test_early_ends_are_booked_per_env_with_workers() -> None:
    rollout = _rollouts("small-ant-dir", 4, deterministic=False)["async"]
    lengths = rollout.lengths.tolist()
    for e, length in enumerate(lengths):
        assert rollout.valid[:length, e].all() and not rollout.valid[length:, e].any()
        episodes = rollout.episode[:length, e]
        assert episodes[0] == 0 and int(episodes[-1]) <= 1 and (episodes.diff() >= 0).all()
        steps = rollout.episode_step[:length, e]
        # within an episode the step counter climbs by one; it restarts at 0 exactly when the episode does
        restarts = torch.nonzero(episodes.diff()).flatten() + 1
        assert steps[restarts].eq(0).all() and steps[0] == 0
    assert min(lengths) < 400  # an ant that fell ended its episode early, and the trial went on
    assert rollout.actions[~rollout.valid].eq(0).all()


def test_a_workers_failure_names_its_cause_and_the_stage_closes() -> None:
    family = get_family("point-nav")
    stage = WorkerStage(family, np.arange(3), workers=1)
    try:
        foreign = get_family("halfcheetah-vel").sample_tasks("train", 3, seed=0)
        with pytest.raises(TaskFamilyError, match="belongs to family 'halfcheetah-vel', not to 'point-nav'"):
            stage.set_tasks(foreign)
        stage.set_tasks(family.sample_tasks("train", 3, seed=0))
        stage.reset([0, 1, 2])
        with pytest.raises(ValueError, match="not envs of this stage"):
            stage.send(np.array([7]), np.zeros((1, 2), np.float32))
        # the worker is still serving after a failed request
        stage.send(np.array([0, 2]), np.zeros((2, 2), np.float32))
        assert stage.recv().obs.shape == (2, 2)
        stage._procs[0].kill()
        stage._procs[0].join(timeout=10)

        def step_once() -> None:  # the send or the reply finds the worker gone
            stage.send(np.array([0]), np.zeros((1, 2), np.float32))
            stage.recv()

        with pytest.raises(RuntimeError, match="an env worker died"):
            step_once()
    finally:
        procs = list(stage._procs)
        stage.close()
    assert procs and all(not p.is_alive() for p in procs)


def test_stage_layouts_and_refusals() -> None:
    family = get_family("point-nav")
    stages = make_stages(family, 5, "async", workers=3)
    try:
        assert [s.members.tolist() for s in stages] == [[0, 1, 2], [3, 4]]
        assert [len(s._parts) for s in stages] == [2, 1]  # type: ignore[attr-defined]
    finally:
        for s in stages:
            s.close()
    with pytest.raises(ValueError, match="vector mode must be 'sync' or 'async'"):
        make_stages(family, 2, "turbo")
    with pytest.raises(ValueError, match="env_workers must be >= 0"):
        preset_config("small-point-nav", {"env_workers": "-1"})


def test_the_trainer_trains_with_env_workers(tmp_path: Path) -> None:
    cfg = preset_config(
        "small-point-nav",
        {"total_steps": "12800", "eval_every": "1", "eval_tasks": "2", "vector": "async", "env_workers": "2"},
    )
    train(cfg, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in records] == [6400, 12800]
    assert all(np.isfinite(r["train/return"]) and np.isfinite(r["validation/return"]) for r in records)
    assert (tmp_path / "run" / "final").is_dir()
