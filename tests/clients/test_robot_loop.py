"""The fixed-rate robot loop driving a real-time MuJoCo environment through the service."""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np
import pytest
from client_support import Service
from trmrl_client import PolicyClient
from trmrl_client.robot_loop import RobotLoop
from trmrl_client.robot_loop import main as robot_loop_main

from trmrl.tasks import get_family


class Recorder:
    """A task env that remembers the actions it was given and when."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.actions: list[np.ndarray] = []
        self.times: list[float] = []

    def reset(self, **kwargs: Any) -> Any:
        return self.env.reset(**kwargs)

    def step(self, action: np.ndarray) -> Any:
        self.actions.append(np.array(action))
        self.times.append(time.monotonic())
        return self.env.step(action)


class Network(httpx.BaseTransport):
    """The link to the service, which can go down."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.up = True

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("network is unreachable", request=request)
        return self.inner.handle_request(request)


def cheetah() -> Recorder:
    family = get_family("halfcheetah-vel")
    return Recorder(family.make_env(family.sample_tasks("test", 1, seed=0)[0]))


def test_the_loop_keeps_its_rate_and_uses_the_policy(service: Service) -> None:
    env = cheetah()
    with PolicyClient(service.url, timeout=1.0) as client:
        loop = RobotLoop(client, "cheetah-random", act_dim=6, rate_hz=50.0, deadline_s=0.018)
        stats = loop.run(env, steps=50, reset_seed=0)
    assert stats.steps == len(env.actions) == 50
    assert 0.9 < env.times[-1] - env.times[0] + 0.02 < 1.5  # real time: 50 ticks of 20 ms
    # A busy CI core may make a few steps late; most actions must still come from the policy.
    assert stats.misses <= 25, stats.summary()
    assert len(stats.latencies_s) == stats.steps - stats.misses
    assert loop.session is not None and loop.session.step == 50


def test_with_the_service_down_the_fallback_runs_and_misses_are_counted() -> None:
    env = cheetah()
    hold = np.full(6, 0.3, np.float32)
    with PolicyClient("http://127.0.0.1:9", timeout=1.0, retries=0) as client:
        loop = RobotLoop(client, "cheetah-random", act_dim=6, rate_hz=50.0, fallback=hold)
        started = time.monotonic()
        stats = loop.run(env, steps=25)
    assert stats.misses == stats.steps == 25
    assert set(stats.errors) <= {"unreachable", "timeout"}
    np.testing.assert_array_equal(np.stack(env.actions), np.tile(hold, (25, 1)))
    assert 0.45 < time.monotonic() - started < 1.0  # the loop kept (about) its rate


def test_hold_last_fallback_after_the_service_goes_away(service: Service) -> None:
    """The network drops for five ticks: the last action is held; afterwards the loop resends the
    missed steps, so the session's memory is complete."""
    env = cheetah()
    network = Network()
    with PolicyClient(service.url, timeout=1.0, retries=0, transport=network) as client:
        loop = RobotLoop(client, "cheetah-random", act_dim=6, rate_hz=50.0, fallback="hold")
        loop.run(env, steps=10, reset_seed=0)
        assert loop.session is not None
        good = loop.session.step
        network.up = False
        down = loop.run(env, steps=5)
        network.up = True
        after = loop.run(env, steps=10)
    assert down.misses == 5
    held = np.stack(env.actions[10:15])
    assert (held == held[0]).all()  # the last action held
    assert after.misses <= 5, after.summary()
    assert loop.session.step == good + 15  # the missed steps were sent again: memory is complete
    assert loop.session.state.unconfirmed == 0 and loop.session.recoveries == 0


def test_cli_runs_against_the_service(service: Service, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--url",
        service.url,
        "--family",
        "halfcheetah-vel",
        "--model",
        "cheetah-random",
        "--seconds",
        "0.4",
    ]
    assert robot_loop_main(argv) == 0
    out = capsys.readouterr().out
    assert "20 steps at" in out and "deadline misses" in out
