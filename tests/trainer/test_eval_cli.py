"""trmrl-eval on the bundled checkpoints; Meta-World success is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.cli import eval_main
from trainer.rollout import TrialSampler
from trmrl.model import ModelConfig, TrMRL
from trmrl.tasks import get_family

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


def test_eval_prints_one_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["point-nav-memoryless", "point-nav", "point-nav-oracle"]
    out = tmp_path / "eval.json"
    argv = [str(CHECKPOINTS / n) for n in names] + ["--split", "test", "--tasks", "4", "--seed", "3"]
    assert eval_main([*argv, "--episodes", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "point-nav test: 4 tasks, seed 3" in printed
    assert "gap closed" in printed
    data = json.loads(out.read_text())
    assert [r["kind"] for r in data["results"]] == ["memoryless", "trmrl", "oracle"]
    returns = {r["kind"]: r["summary"]["return"] for r in data["results"]}
    assert returns["memoryless"] < returns["trmrl"] <= returns["oracle"] + 1.0
    assert len(data["results"][1]["curve"][0]) == 100


def test_eval_takes_the_validation_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    argv = [str(CHECKPOINTS / "point-nav"), "--split", "validation", "--tasks", "3", "--json", str(out)]
    assert eval_main(argv) == 0
    assert "point-nav validation: 3 tasks, seed 1000" in capsys.readouterr().out
    data = json.loads(out.read_text())
    tasks = get_family("point-nav").sample_tasks("validation", 3, seed=1000)
    assert data["split"] == "validation" and data["results"][0]["labels"] == [t.label for t in tasks]


def test_eval_samples_actions_when_asked_reproducibly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [str(CHECKPOINTS / "point-nav"), "--split", "test", "--tasks", "3", "--episodes", "1"]

    def run(*extra: str) -> dict:
        out = tmp_path / f"eval{len(list(tmp_path.iterdir()))}.json"
        assert eval_main([*base, *extra, "--json", str(out)]) == 0
        return json.loads(out.read_text())

    mean = run()
    sampled, again = run("--sample"), run("--sample")
    other_seed = run("--sample", "--seed", "1001")
    printed = capsys.readouterr().out
    assert "3 tasks, seed 1000, deterministic" in printed and "3 tasks, seed 1000, sampled actions" in printed
    assert (mean["actions"], sampled["actions"]) == ("deterministic", "sampled")
    assert sampled["results"][0]["returns"] == again["results"][0]["returns"]  # the noise is seeded
    assert sampled["results"][0]["returns"] != mean["results"][0]["returns"]
    assert other_seed["results"][0]["labels"] != sampled["results"][0]["labels"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nowhere"], "not a checkpoint directory"),
        ([str(CHECKPOINTS / "point-nav"), "--split", "dev"], "invalid choice: 'dev'"),
        ([str(CHECKPOINTS / "point-nav"), "--tasks", "0"], "--tasks must be >= 1"),
        (
            [str(CHECKPOINTS / "point-nav"), "--family", "halfcheetah-vel"],
            "--family halfcheetah-vel: its obs_dim, act_dim, task_param_dim, action_low, action_high differ",
        ),
        ([str(CHECKPOINTS / "point-nav"), "--family", "no-such-family"], "no-such-family"),
    ],
)
def test_eval_refuses_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        eval_main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_runs_a_policy_on_another_family_with_the_same_spaces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    argv = [str(CHECKPOINTS / "halfcheetah-vel"), "--family", "halfcheetah-dir", "--tasks", "2"]
    assert eval_main([*argv, "--episodes", "1", "--json", str(out)]) == 0
    assert "halfcheetah-dir test: 2 tasks, seed 1000" in capsys.readouterr().out
    data = json.loads(out.read_text())
    tasks = get_family("halfcheetah-dir").sample_tasks("test", 2, seed=1000)
    assert data["family"] == "halfcheetah-dir"
    assert data["results"][0]["labels"] == [t.label for t in tasks]


@pytest.mark.slow
@pytest.mark.metaworld
def test_meta_world_trials_record_success() -> None:
    family = get_family("ml1-reach")
    net = TrMRL(ModelConfig.from_preset("metaworld", obs_dim=family.obs_dim, act_dim=family.act_dim)).eval()
    sampler = TrialSampler(family, net, 2, 1)
    try:
        rollout = sampler.run(family.sample_tasks("test", 2, seed=0), seed=0, generator=torch.Generator())
    finally:
        sampler.close()
    assert rollout.lengths.tolist() == [500, 500]
    assert rollout.success.shape == (2, 1)
    assert set(rollout.success.flatten().tolist()) <= {0.0, 1.0}


def test_eval_summarises_several_checkpoints_of_one_kind_as_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["point-nav-memoryless", "point-nav", "point-nav", "point-nav-oracle"]
    out = tmp_path / "eval.json"
    argv = [str(CHECKPOINTS / n) for n in names] + ["--tasks", "2", "--episodes", "1", "--json", str(out)]
    assert eval_main(argv) == 0
    printed = capsys.readouterr().out
    assert "gap closed (worst)" in printed
    groups = json.loads(out.read_text())["groups"]
    assert groups["trmrl"]["n"] == 2 and groups["trmrl"]["std"] == 0.0  # deterministic: the same twice
    lo, hi = groups["memoryless"]["mean"], groups["oracle"]["mean"]
    expected = (groups["trmrl"]["worst"] - lo) / (hi - lo)
    assert groups["trmrl"]["gap_worst"] == pytest.approx(expected)
    assert lo < groups["trmrl"]["mean"] <= hi + 1.0
