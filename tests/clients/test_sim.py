"""trmrl-sim against a real service: the transports agree, and bad invocations fail early."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from client_support import Service, require_streams
from trmrl_sim import sim


def test_batch_and_http_transports_measure_the_same_returns(service: Service, tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    argv = ["--family", "point-nav", "--envs", "3", "--episodes", "2", "--url", service.url, "--no-progress"]
    assert sim.main([*argv, "--transport", "batch", "--json", str(out)]) == 0
    batch = json.loads(out.read_text())
    assert batch["model"] == "point-nav" and np.asarray(batch["returns"]).shape == (3, 2)
    assert batch["summary"]["latency_p99_ms"] >= batch["summary"]["latency_p50_ms"] > 0
    http = asyncio.run(
        sim.run_sim(service.url, "point-nav", envs=3, episodes=2, transport="http", progress=False)
    )
    np.testing.assert_allclose(http.returns, batch["returns"], atol=1e-3)
    assert http.actions == 3 * 2 * 100 and len(http.latencies_s) == http.actions


def test_the_oracle_gets_the_task_parameters_appended(service: Service) -> None:
    oracle = asyncio.run(
        sim.run_sim(service.url, "point-nav", envs=3, episodes=1, model="point-nav-oracle", progress=False)
    )
    memoryless = asyncio.run(
        sim.run_sim(
            service.url, "point-nav", envs=3, episodes=1, model="point-nav-memoryless", progress=False
        )
    )
    assert oracle.returns.mean() > memoryless.returns.mean() + 10


def test_ws_transport(service: Service) -> None:
    require_streams(service.url)
    result = asyncio.run(
        sim.run_sim(service.url, "point-nav", envs=2, episodes=1, transport="ws", progress=False)
    )
    batch = asyncio.run(sim.run_sim(service.url, "point-nav", envs=2, episodes=1, progress=False))
    np.testing.assert_allclose(result.returns, batch.returns, atol=1e-3)


@pytest.mark.parametrize("transport", ["vstream", "vbatch"])
def test_vector_transports_measure_the_same_returns_as_items(service: Service, transport: str) -> None:
    vector = asyncio.run(
        sim.run_sim(service.url, "point-nav", envs=3, episodes=2, transport=transport, progress=False)
    )
    items = asyncio.run(
        sim.run_sim(service.url, "point-nav", envs=3, episodes=2, transport="batch", progress=False)
    )
    np.testing.assert_allclose(vector.returns, items.returns, atol=1e-3)
    assert vector.transport == transport and vector.actions == items.actions == 3 * 2 * 100
    assert len(vector.latencies_s) == 2 * 100  # one request (or frame) per tick


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--family", "no-such-family"], "unknown task family 'no-such-family'"),
        (["--family", "point-nav", "--url", "http://127.0.0.1:9"], "cannot reach the service"),
        (["--family", "ant-dir"], "no model of family 'ant-dir'"),
        (["--family", "point-nav", "--model", "nope"], "has no model 'nope'"),
    ],
)
def test_bad_invocations_fail_before_any_work(
    service: Service, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    url = [] if "--url" in argv else ["--url", service.url]
    assert sim.main([*argv, *url, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_bad_env_count_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        sim.main(["--family", "point-nav", "--envs", "0"])
    assert info.value.code == 2
    assert "--envs must be at least 1" in capsys.readouterr().err
