"""Bring your own task family: a package outside this repository offers one through the entry-point
group; it is trained with the trainer's CLI and its checkpoint is served."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from trmrl.checkpoint import load_checkpoint
from trmrl.tasks import TaskFamilyError, get_family
from trmrl.tasks.gym_family import gym_task_family

ROOT = Path(__file__).resolve().parents[2]

PACKAGE = '''
"""A pendulum whose gravity is the task."""

import numpy as np

from trmrl.tasks.gym_family import gym_task_family


def draw(rng, split, n):
    low, high = (12.0, 14.0) if split == "ood" else (8.0, 12.0)
    return rng.uniform(low, high, size=(n, 1))


def apply(env, params):
    env.unwrapped.g = params[0]


FAMILY = gym_task_family(
    "pendulum-gravity",
    "Pendulum-v1",
    draw,
    apply,
    task_param_dim=1,
    episode_length=50,
    splits=("train", "validation", "test", "ood"),
)
'''


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory holding an installed distribution: the package and its entry-point metadata."""
    root = tmp_path / "site"
    (root / "pendulum_tasks").mkdir(parents=True)
    (root / "pendulum_tasks" / "__init__.py").write_text(PACKAGE)
    info = root / "pendulum_tasks-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pendulum-tasks\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[trmrl.task_families]\npendulum-gravity = pendulum_tasks:FAMILY\n"
    )
    return root


@pytest.mark.slow
def test_an_installed_family_trains_and_its_checkpoint_is_served(site: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {
        **os.environ,
        "MUJOCO_GL": "disable",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
    }
    settings = ["tasks_per_update=4", "eval_tasks=2", "eval_every=1", "minibatch_size=128", "epochs=2"]
    cmd = [sys.executable, "-m", "trainer.cli", "--preset", "small-point-nav", "--family", "pendulum-gravity"]
    cmd += ["--out", str(out), "--total-steps", "1200", "--no-progress"]
    cmd += [arg for s in settings for arg in ("--set", s)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ood/return" in done.stdout  # the family's own ood split, evaluated at the end

    ckpt = load_checkpoint(out / "final")
    assert ckpt.info.task_family == "pendulum-gravity"
    assert (ckpt.config.obs_dim, ckpt.config.act_dim) == (3, 1)
    assert ckpt.info.action_low == (-2.0,) and ckpt.info.step == 1200

    app = create_app(Settings(models=[out / "final"]))  # type: ignore[call-arg]
    with TestClient(app) as client:
        reply = client.post("/v1/act", json={"observation": [1.0, 0.0, 0.0], "episode_start": True})
        assert reply.status_code == 200, reply.text
        action = reply.json()["action"]
        assert len(action) == 1 and -2.0 <= action[0] <= 2.0
        wrong = client.post("/v1/act", json={"observation": [1.0, 0.0], "episode_start": True})
        assert wrong.status_code == 422 or wrong.status_code == 400


def test_a_family_by_module_and_attribute(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(site))
    family = get_family("pendulum_tasks:FAMILY")
    assert family.name == "pendulum-gravity"
    assert get_family("pendulum-gravity") is family  # a checkpoint naming it finds it again
    tasks = family.sample_tasks("ood", 3, seed=0)
    assert all(12.0 <= t.params[0] <= 14.0 for t in tasks)
    env = family.make_env(tasks[0])
    try:
        env.reset(seed=0)
        assert env.unwrapped.g == tasks[0].params[0]  # type: ignore[attr-defined]
        for _ in range(family.episode_length):
            obs, _, terminated, truncated, _ = env.step(np.zeros(1, np.float32))
        assert obs.dtype == np.float32 and truncated and not terminated
    finally:
        env.close()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no-such-family", "unknown task family 'no-such-family'"),
        ("trmrl.tasks:nothing_here", "cannot load task family 'trmrl.tasks:nothing_here'"),
        ("trmrl.tasks:Task", "cannot build task family from .trmrl.tasks:Task."),
        ("trmrl.tasks.base:SPLITS", "is a tuple, not a TaskFamily"),
    ],
)
def test_unknown_or_wrong_families_are_refused(name: str, message: str) -> None:
    with pytest.raises(TaskFamilyError, match=message):
        get_family(name)


def test_the_adapter_refuses_what_it_cannot_train() -> None:
    with pytest.raises(ValueError, match="actions must be a flat Box"):
        gym_task_family(
            "cartpole", "CartPole-v1", lambda r, s, n: np.zeros((n, 1)), lambda e, p: None, task_param_dim=1
        )
    wrong = gym_task_family(
        "pendulum-wrong", "Pendulum-v1", lambda r, s, n: np.zeros((n, 2)), lambda e, p: None, task_param_dim=1
    )
    shapes = r"shape \(n, task_param_dim\) = \(2, 1\); it returned a numpy array of shape \(2, 2\)"
    with pytest.raises(TaskFamilyError, match=shapes):
        wrong.sample_tasks("train", 2, seed=0)
