"""Every checkpoint shipped under checkpoints/ loads, matches its hash and config, and acts sensibly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.evaluate import evaluate
from trmrl.checkpoint import CONFIG_FILE, load_checkpoint
from trmrl.recurrent import RL2
from trmrl.tasks import get_family

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
BUNDLED = (
    sorted(p for p in CHECKPOINTS.iterdir() if (p / CONFIG_FILE).is_file()) if CHECKPOINTS.is_dir() else []
)


NAMES = {p.name for p in BUNDLED}
TRIOS = sorted(f for f in NAMES if {f"{f}-oracle", f"{f}-memoryless"} <= NAMES)
"""Families shipped with both references beside the TrMRL policy."""


def test_point_nav_and_halfcheetah_vel_are_shipped_with_both_references() -> None:
    assert {"point-nav", "halfcheetah-vel"} <= set(TRIOS)


@pytest.mark.parametrize("path", BUNDLED, ids=[p.name for p in BUNDLED])
def test_bundled_checkpoint_loads_and_evaluates(path: Path) -> None:
    ckpt = load_checkpoint(path)  # validates schema, hash and shapes
    config = json.loads((path / CONFIG_FILE).read_text())
    family = get_family(ckpt.info.task_family)
    kind = ckpt.info.training["reference"]
    assert kind in ("trmrl", "oracle", "memoryless")
    assert ckpt.info.task_params_in_obs == (kind == "oracle")
    expected_obs = family.obs_dim + (family.task_param_dim if kind == "oracle" else 0)
    assert ckpt.config.obs_dim == expected_obs
    assert ckpt.config.act_dim == family.act_dim
    assert ckpt.info.action_low == family.action_low
    assert config["step"] > 0 and "test/return" in config["metrics"]
    result = evaluate(ckpt.model, family, family.sample_tasks("test", 2, seed=7), 1, oracle=kind == "oracle")
    assert np.isfinite(result.returns).all()


@pytest.mark.parametrize("name", TRIOS)
def test_shipped_trmrl_policy_beats_its_memoryless_reference(name: str) -> None:
    """On a few held-out tasks, the adapting policy and the oracle both beat the policy without memory."""
    returns = {}
    for kind, suffix in (("trmrl", ""), ("oracle", "-oracle"), ("memoryless", "-memoryless")):
        ckpt = load_checkpoint(CHECKPOINTS / f"{name}{suffix}")
        family = get_family(ckpt.info.task_family)
        tasks = family.sample_tasks("test", 4, seed=11)
        returns[kind] = evaluate(ckpt.model, family, tasks, 1, oracle=kind == "oracle").returns.mean()
    assert returns["memoryless"] < returns["trmrl"]
    assert returns["memoryless"] < returns["oracle"]


BASELINES = sorted(p for p in (CHECKPOINTS / "baselines").iterdir() if (p / CONFIG_FILE).is_file())
"""RL² baselines shipped beside the TrMRL policies (in a folder the demo and model directories skip)."""


def test_rl2_baselines_are_shipped() -> None:
    assert "point-nav-rl2" in {p.name for p in BASELINES}


@pytest.mark.parametrize("path", BASELINES, ids=[p.name for p in BASELINES])
def test_shipped_rl2_baseline_loads_and_beats_the_memoryless_reference(path: Path) -> None:
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt.model, RL2) and ckpt.info.training["policy"] == "rl2"
    family = get_family(ckpt.info.task_family)
    memoryless = load_checkpoint(CHECKPOINTS / f"{family.name}-memoryless")
    tasks = family.sample_tasks("test", 4, seed=11)
    returns = {
        "rl2": evaluate(ckpt.model, family, tasks, 2).returns.mean(),
        "memoryless": evaluate(memoryless.model, family, tasks, 2).returns.mean(),
    }
    assert returns["memoryless"] < returns["rl2"]


SEEDS = sorted(p for p in (CHECKPOINTS / "seeds").iterdir() if (p / CONFIG_FILE).is_file())
"""More seeds of shipped policies (TrMRL and RL²), for the seed tables of docs/results.md."""


@pytest.mark.parametrize("path", SEEDS, ids=[p.name for p in SEEDS])
def test_shipped_seed_loads_and_beats_the_memoryless_reference(path: Path) -> None:
    ckpt = load_checkpoint(path)
    assert ckpt.info.training["seed"] != 0
    family = get_family(ckpt.info.task_family)
    memoryless = load_checkpoint(CHECKPOINTS / f"{family.name}-memoryless")
    tasks = family.sample_tasks("test", 4, seed=11)
    assert (
        evaluate(memoryless.model, family, tasks, 2).returns.mean()
        < evaluate(ckpt.model, family, tasks, 2).returns.mean()
    )


ARCHIVE_DIR = CHECKPOINTS / "archive"
ARCHIVE = (
    sorted(p for p in ARCHIVE_DIR.iterdir() if (p / CONFIG_FILE).is_file()) if ARCHIVE_DIR.is_dir() else []
)
"""Policies trained under an earlier preset setting, kept for the tables of docs/results.md that compare
them (halfcheetah-vel TrMRL and RL², three seeds each, at exploration noise 0.5)."""


def test_halfcheetah_vel_seeds_at_the_earlier_exploration_noise_are_archived() -> None:
    names = {p.name for p in ARCHIVE}
    for kind in ("halfcheetah-vel", "halfcheetah-vel-rl2"):
        assert {f"{kind}-std05-s{seed}" for seed in range(3)} <= names


@pytest.mark.parametrize("path", ARCHIVE, ids=[p.name for p in ARCHIVE])
def test_archived_policy_loads_evaluates_and_records_its_setting(path: Path) -> None:
    ckpt = load_checkpoint(path)
    training = ckpt.info.training
    assert training["init_std"] == 0.5 and path.name.endswith(f"-s{training['seed']}")
    family = get_family(ckpt.info.task_family)
    result = evaluate(ckpt.model, family, family.sample_tasks("test", 2, seed=7), 1)
    assert np.isfinite(result.returns).all()


def test_shipped_ml1_reach_policy_reaches_held_out_goals_with_mean_actions() -> None:
    """The Meta-World policy is trained on goals drawn afresh (``ml1-reach-fresh``) and tested on the
    benchmark's 50 test goals, mean actions: success is ``info["success"]`` at any step of an episode."""
    ckpt = load_checkpoint(CHECKPOINTS / "ml1-reach-fresh")
    assert ckpt.info.task_family == "ml1-reach-fresh" and ckpt.info.training["reference"] == "trmrl"
    metrics = json.loads((CHECKPOINTS / "ml1-reach-fresh" / CONFIG_FILE).read_text())["metrics"]
    assert metrics["test/success"] >= 0.9
    family = get_family("ml1-reach-fresh")
    tasks = family.sample_tasks("test", 4, seed=11)
    assert all(t.label.startswith("reach-v3#") for t in tasks)  # the benchmark's own test goals
    result = evaluate(ckpt.model, family, tasks, 1)
    assert result.success is not None
    assert float(np.mean(result.success)) >= 0.75
