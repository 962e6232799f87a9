"""Schemathesis against the live service: the OpenAPI document is the contract.

A real ``python -m service`` (uvicorn on a loopback port, API keys on) is fuzzed by the schemathesis
CLI with **all** of its checks and all of its phases (examples, coverage, fuzzing, stateful), JSON and
MessagePack bodies (``schemathesis_hooks``): no 5xx, every status, content type, header and body as
documented, schema-valid requests accepted and schema-invalid ones refused, 405 with ``Allow``.
``TRMRL_LONG=1`` runs ten times the cases with a fresh seed. Skipped when schemathesis is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_support import KEYS, POINT_NAV, REPO
from trmrl_sim.launch import ServiceProcess

pytest.importorskip("schemathesis")

LONG = os.environ.get("TRMRL_LONG") == "1"
EXAMPLES = 300 if LONG else 30
#: The fleet feed takes an admin or viewer key, not an API key: its operation is run with this one.
VIEWER_KEY = "schemathesis-viewer-key"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def live() -> Iterator[ServiceProcess]:
    env = {
        "PYTHONPATH": str(REPO),
        "TRMRL_TORCH_THREADS": "1",
        "TRMRL_API_KEYS": ",".join(KEYS),
        "TRMRL_VIEWER_KEYS": VIEWER_KEY,
    }
    with ServiceProcess([POINT_NAV], env=env, cwd=REPO) as service:
        yield service


@pytest.mark.timeout(2400)  # a hang guard: the long run takes 2-5 min, more on a busy machine
def test_the_live_service_conforms_to_its_openapi_document(live: ServiceProcess, tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4)) if LONG else 0
    command = [
        sys.executable,
        "-c",
        "from schemathesis.cli import schemathesis; schemathesis()",
        "run",
        f"{live.url}/openapi.json",
        "--checks=all",
        f"--max-examples={EXAMPLES}",
        f"--seed={seed}",
        "--generation-database=none",
        "--request-timeout=30",  # generous: the machine may be busy; a slow reply is not a failure here
        "--no-color",
        "--header",
        f"Authorization: Bearer {KEYS[0]}",
    ]
    pythonpath = os.pathsep.join([str(HERE), str(REPO / "clients"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "SCHEMATHESIS_HOOKS": "schemathesis_hooks"}
    # One rule of the batch route is beyond JSON Schema: every column of a columnar tick has as many
    # rows as it names sessions. Its description says so, and the generated bodies follow it where
    # the hooks can shape them (fuzzing); the coverage phase builds ticks that break it, which the
    # service rightly refuses with 422. The same holds for a snapshot put into a session: whether its
    # memory fits depends on the session's model (a window or a trial context, its rows and width), which
    # no schema of the body can know. For those two routes alone, 422 counts as a valid refusal.
    accept_422 = (
        'checks.positive_data_acceptance.expected-statuses = ["2XX", "3XX", "401", "403", "404", "409", '
        '"422", "429", "5XX"]\n'
    )
    (tmp_path / "schemathesis.toml").write_text(
        "[[operations]]\n"
        'include-path = "/v1/act/batch"\n'
        'include-method = "POST"\n' + accept_422 + "[[operations]]\n"
        'include-path = "/v1/sessions/{session_id}/state"\n'
        'include-method = "PUT"\n' + accept_422 + "[[operations]]\n"
        'include-name = "GET /v1/fleet"\n'
        f'headers = {{ Authorization = "Bearer {VIEWER_KEY}" }}\n'
    )
    started = time.monotonic()
    # Run in a fresh directory: schemathesis keeps a cache of past failures (.schemathesis/) and
    # replays them first, which would make this run depend on the ones before it.
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    report = done.stdout + done.stderr
    cases = re.search(r"(\d+) generated", report)
    print(
        f"\nschemathesis (all checks, seed {seed}, {EXAMPLES} examples per operation): "
        f"{cases.group(1) if cases else '?'} cases in {time.monotonic() - started:.0f} s"
    )
    assert done.returncode == 0, report
    assert cases is not None and int(cases.group(1)) > 0, report
    assert "Warnings:" not in report, report  # e.g. replies it could not validate
