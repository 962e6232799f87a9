"""``make demo``'s path on point-nav: service up, three models through trmrl-sim, table, service down."""

from __future__ import annotations

import os
import subprocess
import sys

from client_support import REPO


def test_demo_runs_end_to_end_on_point_nav() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trmrl_sim.demo", "--family", "point-nav", "--tasks", "4", "--no-progress"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TRMRL_TORCH_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "demo: service stopped" in out
    table = out[out.index("model ") :].splitlines()
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == {"point-nav", "point-nav-memoryless", "point-nav-oracle"}
    returns = {name: float(row[3]) for name, row in rows.items()}
    assert returns["point-nav-memoryless"] < returns["point-nav"] <= returns["point-nav-oracle"] + 1.0


def test_demo_reports_a_missing_family_without_starting_anything() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trmrl_sim.demo", "--family", "ant-goal"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "no checkpoint of family 'ant-goal'" in done.stderr
