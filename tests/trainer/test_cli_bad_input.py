"""The trainer's and the evaluator's command lines refuse bad input with one line, before any work.

Each case runs ``trmrl-train`` / ``trmrl-eval`` (their main functions, or a fresh interpreter where the
family registry must start empty) and checks the exit status and the one line on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trmrl.tasks.base as tasks_base
from trainer.cli import eval_main, train_main
from trainer.config import PRESETS, preset_config
from trmrl.checkpoint import checkpoint_family, load_checkpoint, save_checkpoint
from trmrl.tasks import TaskFamilyError

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ROOT / "checkpoints"

# A user's own family: point-nav under another name, in a module that is not installed.
OWN_FAMILY = """
import dataclasses

from trmrl.tasks import get_family

FAMILY = dataclasses.replace(get_family("point-nav"), name="{name}")
"""

# A gymnasium environment as a family whose draw() returns what the test puts in RETURN.
GYM_FAMILY = """
import numpy as np

from trmrl.tasks.gym_family import gym_task_family


def draw(rng, split, n):
    return {returned}


FAMILY = gym_task_family("{name}", "Pendulum-v1", draw, lambda env, params: None, task_param_dim=1)
"""


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on ``sys.path`` for family modules; the family registry is restored afterwards."""
    where = tmp_path / "modules"
    where.mkdir()
    monkeypatch.syspath_prepend(str(where))
    monkeypatch.setattr(tasks_base, "_REGISTRY", dict(tasks_base._REGISTRY))
    return where


def _module(where: Path, source: str) -> str:
    """Write ``source`` as a module of a name unique to this test and return that name."""
    name = f"fam_{where.parent.name.replace('-', '_')}_{len(list(where.iterdir()))}"
    (where / f"{name}.py").write_text(source)
    sys.modules.pop(name, None)
    return name


def _refused(main: object, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``main(argv)`` refuses with (exit status 2, nothing else on stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)  # type: ignore[operator]
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _train_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--preset", "small-point-nav", "--out", str(tmp_path / "run"), "--no-progress", *extra]


# -- 1. trmrl-eval on a checkpoint of a family trained as module:attribute -----------------------------


def _own_family_checkpoint(where: Path, out: Path) -> tuple[str, str]:
    """The bundled point-nav policy saved as if trained with ``--family MODULE:FAMILY`` on a family of
    another name, as ``trmrl-train`` records it; returns (module, family name)."""
    family = f"own-nav-{out.name}"
    module = _module(where, OWN_FAMILY.format(name=family))
    ckpt = load_checkpoint(CHECKPOINTS / "point-nav")
    training = {**ckpt.info.training, "family": f"{module}:FAMILY"}
    info = dataclasses.replace(ckpt.info, task_family=family, training=training, created_at="")
    save_checkpoint(out, ckpt.model, info)
    return module, family


def _fresh(args: list[str], modules: Path, main: str) -> subprocess.CompletedProcess[str]:
    """``main(args)`` of ``trainer.cli`` in a fresh interpreter (no family registered but the built-in
    ones), ``modules`` on its path as a user's PYTHONPATH."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(modules), str(ROOT)])}
    cmd = [sys.executable, "-c", f"import sys; from trainer.cli import {main}; sys.exit({main}())", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_eval_loads_a_family_recorded_as_module_and_attribute(modules: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    _, family = _own_family_checkpoint(modules, out)
    # A fresh interpreter: nothing has registered the family's name, as for a user running trmrl-eval.
    argv = [str(out), "--tasks", "2", "--episodes", "1", "--json", str(tmp_path / "eval.json")]
    done = _fresh(argv, modules, "eval_main")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{family} test: 2 tasks, seed 1000" in done.stdout
    assert json.loads((tmp_path / "eval.json").read_text())["family"] == family


@pytest.mark.slow
def test_a_run_trained_with_module_and_attribute_is_evaluated(modules: Path, tmp_path: Path) -> None:
    family = "own-nav-trained"
    module = _module(modules, OWN_FAMILY.format(name=family))
    settings = ["tasks_per_update=4", "eval_tasks=2", "eval_every=1", "minibatch_size=128", "epochs=1"]
    argv = ["--preset", "small-point-nav", "--family", f"{module}:FAMILY", "--out", str(tmp_path / "run")]
    argv += ["--total-steps", "800", "--no-progress", *(a for s in settings for a in ("--set", s))]
    trained = _fresh(argv, modules, "train_main")
    assert trained.returncode == 0, trained.stderr[-3000:]
    info = load_checkpoint(tmp_path / "run" / "final").info
    assert (info.task_family, info.family_source) == (family, f"{module}:FAMILY")
    evaluated = _fresh(
        [str(tmp_path / "run" / "final"), "--tasks", "2", "--episodes", "1"], modules, "eval_main"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"{family} test: 2 tasks, seed 1000" in evaluated.stdout


def test_the_shared_helper_finds_the_recorded_module(modules: Path, tmp_path: Path) -> None:
    _, family = _own_family_checkpoint(modules, tmp_path / "ckpt")
    assert family not in tasks_base._REGISTRY
    found = checkpoint_family(load_checkpoint(tmp_path / "ckpt").info)
    assert found.name == family and found.obs_dim == 2


def test_the_service_serves_it_without_the_family_module(modules: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    module, family = _own_family_checkpoint(modules, tmp_path / "ckpt")
    (modules / f"{module}.py").unlink()  # the service reads no task family: the checkpoint is enough
    sys.modules.pop(module, None)
    with TestClient(create_app(Settings(models=[tmp_path / "ckpt"]))) as client:  # type: ignore[call-arg]
        assert client.get("/v1/models").json()["models"][0]["task_family"] == family
        reply = client.post("/v1/act", json={"observation": [0.1, 0.2], "episode_start": True})
        assert reply.status_code == 200, reply.text


def test_a_recorded_module_that_now_gives_another_family_is_refused(modules: Path, tmp_path: Path) -> None:
    module, family = _own_family_checkpoint(modules, tmp_path / "ckpt")
    (modules / f"{module}.py").write_text(OWN_FAMILY.format(name="renamed-nav"))
    sys.modules.pop(module, None)
    with pytest.raises(
        TaskFamilyError, match=f"gives a family named 'renamed-nav', the checkpoint's is '{family}'"
    ):
        checkpoint_family(load_checkpoint(tmp_path / "ckpt").info)


def test_eval_says_where_a_recorded_family_module_is_missing(
    modules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module, family = _own_family_checkpoint(modules, tmp_path / "ckpt")
    (modules / f"{module}.py").unlink()
    sys.modules.pop(module, None)
    line = _refused(eval_main, [str(tmp_path / "ckpt"), "--tasks", "2"], capsys)
    assert f"task family {family!r} was trained from '{module}:FAMILY', which does not load here" in line
    assert f"No module named '{module}'" in line and "PYTHONPATH" in line


def test_eval_family_argument_may_name_the_module_itself(
    modules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The module moved: --family names it where it is now, and the checkpoint's family is found by name.
    module, family = _own_family_checkpoint(modules, tmp_path / "ckpt")
    moved = _module(modules, (modules / f"{module}.py").read_text())
    (modules / f"{module}.py").unlink()
    sys.modules.pop(module, None)
    argv = [str(tmp_path / "ckpt"), "--family", f"{moved}:FAMILY", "--tasks", "2", "--episodes", "1"]
    assert eval_main(argv) == 0
    assert f"{family} test: 2 tasks" in capsys.readouterr().out


# -- 2. a family module whose import raises something other than ImportError ---------------------------


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("raise RuntimeError('no licence server\\nsecond line')", "RuntimeError: no licence server"),
        ("def broken(:\n    pass\n", "SyntaxError: "),
        ("import numpy\nnumpy.zeros(2)[5]\n", "IndexError: index 5 is out of bounds"),
    ],
)
def test_a_family_module_that_fails_to_import_is_named_with_its_error(
    source: str, error: str, modules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _module(modules, source)
    line = _refused(train_main, _train_argv(tmp_path, "--family", f"{module}:FAMILY"), capsys)
    assert f"cannot load task family '{module}:FAMILY': importing {module} raised {error}" in line
    assert not (tmp_path / "run").exists()  # refused before the run directory was made

    line = _refused(eval_main, [str(CHECKPOINTS / "point-nav"), "--family", f"{module}:FAMILY"], capsys)
    assert f"importing {module} raised {error}" in line


# -- 3 and 5. a sampler returning the wrong thing ------------------------------------------------------


@pytest.mark.parametrize(
    ("returned", "got"),
    [
        ("[{'g': 9.0 + i} for i in range(n)]", "it returned a list of dict"),
        ("rng.uniform(8, 12, size=(2 * n, 1))", "it returned a numpy array of shape (4, 1)"),
        ("rng.uniform(8, 12, size=(n, 2))", "it returned a numpy array of shape (2, 2)"),
        ("None", "it returned a NoneType"),
    ],
)
def test_a_sampler_returning_the_wrong_thing_is_told_what_it_must_return(
    returned: str, got: str, modules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"pendulum-{tmp_path.name}"
    module = _module(modules, GYM_FAMILY.format(name=name, returned=returned))
    line = _refused(train_main, _train_argv(tmp_path, "--family", f"{module}:FAMILY"), capsys)
    must = "draw(rng, split, n) must return an array of numbers of shape (n, task_param_dim) = (2, 1)"
    assert f"{name}: {must}; {got}" in line
    assert "parameters per task" not in line
    assert not (tmp_path / "run").exists()


def test_a_one_column_sampler_may_return_a_flat_array(modules: Path) -> None:
    module = _module(modules, GYM_FAMILY.format(name="pendulum-flat", returned="rng.uniform(8, 12, n)"))
    family = tasks_base.get_family(f"{module}:FAMILY")
    assert [len(t.params) for t in family.sample_tasks("train", 3, seed=0)] == [1, 1, 1]


def test_a_subclass_sampler_returning_dicts_is_refused(
    modules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = OWN_FAMILY.format(name="dict-nav") + (
        "\nclass Dicts(type(FAMILY)):\n"
        "    def _sample_tasks(self, split, n, rng):\n"
        "        return [{'goal': (0.0, 0.0)} for _ in range(n)]\n"
        "\nFAMILY = Dicts(**{f.name: getattr(FAMILY, f.name) for f in dataclasses.fields(FAMILY)})\n"
    )
    module = _module(modules, source)
    line = _refused(train_main, _train_argv(tmp_path, "--family", f"{module}:FAMILY"), capsys)
    assert "dict-nav: _sample_tasks('train', 2) must return a list of 2 Task objects" in line
    assert "it returned a list of 2 dict" in line


# -- 4. a device this machine lacks --------------------------------------------------------------------


def test_cuda_asked_for_without_cuda_is_refused_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _refused(train_main, _train_argv(tmp_path, "--set", "device=cuda"), capsys)
    assert "--set device=cuda: device 'cuda' asked for, but no CUDA device is available" in line
    assert "use device=auto or device=cpu" in line
    assert not (tmp_path / "run").exists()


def test_a_device_torch_does_not_know_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _refused(train_main, _train_argv(tmp_path, "--set", "device=gpu"), capsys)
    assert line.startswith("trmrl-train: error: --set device=gpu: ")


# -- 6. the presets: a table, one preset's settings, an unknown name -----------------------------------


def test_list_presets_is_a_table_with_headers(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "preset",
        "family",
        "policy",
        "reference",
        "architecture",
        "optimization",
        "total",
        "steps",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1 : len(PRESETS) + 1]}
    assert set(rows) == set(PRESETS)
    assert rows["paper-ant-dir-oracle"][1:] == [
        "ant-dir",
        "trmrl",
        "oracle",
        "mujoco",
        "separate",
        "40,000,000",
    ]
    assert rows["small-point-nav-rl2"][2:4] == ["rl2", "trmrl"]
    assert "--show-preset NAME" in lines[-1]


def test_show_preset_prints_every_setting_and_where_it_comes_from(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--show-preset", "paper-halfcheetah-vel", "--set", "seed=3", "--total-steps", "1000"]
    assert train_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "preset paper-halfcheetah-vel"
    assert lines[1].split() == ["setting", "value", "from"]
    settings = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(settings) == set(preset_config("paper-halfcheetah-vel").to_dict())
    assert settings["family"] == ["halfcheetah-vel-20d", "preset"]
    assert settings["optimization"] == ["separate", "preset"]
    assert settings["seed"] == ["3", "command", "line"] and settings["total_steps"] == [
        "1000",
        "command",
        "line",
    ]
    assert settings["window"] == ["5", "default"]
    assert settings["normalize_obs"] == ["false", "preset"]


@pytest.mark.parametrize("flag", ["--show-preset", "--preset"])
def test_an_unknown_preset_says_how_to_see_the_known_ones(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _refused(train_main, [flag, "small-pointnav", "--out", str(tmp_path / "run")], capsys)
    assert line.startswith(
        "trmrl-train: error: unknown preset 'small-pointnav'; did you mean small-point-nav"
    )
    assert line.endswith("trmrl-train --list-presets shows the known ones")


# -- 7. vf_coef means nothing to separate optimisation -------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "settings"),
    [
        ("paper-ant-dir", ["vf_coef=0.5"]),
        ("small-point-nav", ["optimization=separate", "vf_coef=1.0"]),
    ],
)
def test_vf_coef_with_separate_optimisation_is_refused(
    preset: str, settings: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--preset", preset, "--out", str(tmp_path / "run"), *(a for s in settings for a in ("--set", s))]
    line = _refused(train_main, argv, capsys)
    assert "vf_coef=" in line and "optimization=separate" in line and "drop vf_coef" in line
    assert not (tmp_path / "run").exists()


def test_every_preset_and_separate_without_vf_coef_still_validate() -> None:
    for name in PRESETS:
        preset_config(name)
    assert preset_config("small-point-nav", {"optimization": "separate"}).optimization == "separate"
    assert preset_config("paper-ant-dir", {"optimization": "joint", "vf_coef": "0.25"}).vf_coef == 0.25
