"""A failing test's report carries the output of the services it ran (``tests/conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

FAILING = """
from trmrl_sim.launch import ServiceProcess


def run_a_server() -> None:
    # Not a real service: ``python -m this`` prints the Zen of Python and exits at once. Closed and
    # dropped before the test fails, as a benchmark's server is.
    server = ServiceProcess([], module="this", device=None)
    server.start(wait=False)
    assert server.process is not None and server.process.wait(timeout=60) == 0
    server.close()


def test_a_server_fails() -> None:
    run_a_server()
    assert False, "the test fails after its server wrote something"


def test_passes_with_a_server() -> None:
    server = ServiceProcess([], module="this", device=None)
    server.start(wait=False)
    assert server.process is not None and server.process.wait(timeout=60) == 0
"""


def test_a_failing_test_shows_its_services_output_and_a_passing_one_does_not(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_failing.py").write_text(FAILING)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "clients"), str(TESTS.parent)])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout
    assert done.returncode == 1, out
    assert "FAILED test_failing.py::test_a_server_fails" in out  # the summary names the test
    assert out.count("Captured service log (python -m this at http://127.0.0.1:") == 1, out
    assert "Beautiful is better than ugly." in out  # what the server wrote
