"""The report figures: training curves, adaptation curves and per-task trajectories are drawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.plots import main, spread_tasks
from trmrl.tasks import get_family

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
PNG = b"\x89PNG\r\n\x1a\n"


def test_curves_plot_each_run_and_refuse_a_missing_metric(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"update": i, "steps": 1000 * i, "test/return": -10.0 + i} for i in range(1, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curves.png"
    assert main(["curves", str(run), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG)
    with pytest.raises(SystemExit, match=r"no 'ood/return' in metrics\.jsonl"):
        main(["curves", str(run), "--metric", "ood/return", "--out", str(tmp_path / "x.png")])


def test_spread_tasks_span_the_first_parameter() -> None:
    family = get_family("halfcheetah-vel")
    tasks = spread_tasks(family, "test", 3, seed=1000)
    velocities = sorted(t.params[0] for t in family.sample_tasks("test", 30, seed=1000))
    picked = [t.params[0] for t in tasks]
    assert picked[0] == velocities[0] and picked[-1] == velocities[-1]
    assert picked[1] in velocities[10:20]


def test_trajectories_run_the_checkpoints_and_refuse_an_unknown_info_key(tmp_path: Path) -> None:
    ckpts = [str(CHECKPOINTS / n) for n in ("point-nav", "point-nav-oracle")]
    out = tmp_path / "traj.png"
    assert main(["trajectories", *ckpts, "--info", "distance", "--count", "2", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG)
    with pytest.raises(SystemExit, match="reports no 'x_velocity'"):
        main(["trajectories", ckpts[0], "--count", "1", "--out", str(tmp_path / "y.png")])
