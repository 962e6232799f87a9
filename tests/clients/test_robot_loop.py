"""The fixed-rate robot loop driving a real-time MuJoCo environment through the service."""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np
import pytest
from client_support import Service
from trmrl_client import PolicyClient
from trmrl_sim.robot_loop import RobotLoop
from trmrl_sim.robot_loop import main as robot_loop_main

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


class VirtualClock:
    """Time that moves only when the loop sleeps: its schedule is checked exactly, however busy the
    machine (a real-time test of a 20 ms period measures the machine's scheduler, not the loop)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def test_the_loop_keeps_its_rate_and_uses_the_policy(service: Service) -> None:
    env, clock = cheetah(), VirtualClock()
    with PolicyClient(service.url, timeout=30.0) as client:
        # 1 Hz in virtual time: each request gets the 0.75 s deadline as its real timeout, ample for
        # a loopback request however loaded the machine.
        loop = RobotLoop(client, "cheetah-random", act_dim=6, rate_hz=1.0, clock=clock, sleep=clock.sleep)
        stats = loop.run(env, steps=50, reset_seed=0)
    assert stats.steps == len(env.actions) == 50
    # Every tick started on its boundary: 50 ticks of one period, no overrun, a pause after each.
    assert clock.now == pytest.approx(50.0) and stats.overruns == 0 and len(clock.pauses) == 50
    assert stats.misses == 0 and not stats.errors, stats.summary()
    assert len(stats.latencies_s) == 50  # every action came from the policy
    assert loop.session is not None and loop.session.step == 50


def test_with_the_service_down_the_fallback_runs_and_misses_are_counted() -> None:
    env, clock = cheetah(), VirtualClock()
    hold = np.full(6, 0.3, np.float32)
    with PolicyClient("http://127.0.0.1:9", timeout=1.0, retries=0) as client:
        loop = RobotLoop(
            client, "cheetah-random", act_dim=6, rate_hz=50.0, fallback=hold, clock=clock, sleep=clock.sleep
        )
        stats = loop.run(env, steps=25)
    assert stats.misses == stats.steps == 25
    assert set(stats.errors) <= {"unreachable", "timeout"}
    np.testing.assert_array_equal(np.stack(env.actions), np.tile(hold, (25, 1)))
    assert clock.now == pytest.approx(0.5) and stats.overruns == 0  # the loop kept its schedule


def test_hold_last_fallback_after_the_service_goes_away(service: Service) -> None:
    """The network drops for five ticks: the last action is held; afterwards the loop resends the
    missed steps, so the session's memory is complete.

    How many of the ticks after the outage meet their 20 ms deadline depends on how busy the machine
    is, so the memory is checked without timing: after one more step with time to spare, the
    session acts exactly as a twin that was given the robot's last transitions without incident.
    """
    env = cheetah()
    network = Network()
    with PolicyClient(service.url, timeout=1.0, retries=0, transport=network) as client:
        loop = RobotLoop(client, "cheetah-random", act_dim=6, rate_hz=50.0, fallback="hold")
        loop.run(env, steps=10, reset_seed=0)
        session = loop.session
        assert session is not None
        network.up = False
        down = loop.run(env, steps=5)
        network.up = True
        loop.run(env, steps=10)
        session.act(np.full(17, 0.1), reward=0.5, timeout=30.0)  # whatever was late is sent now
        assert session.ledger.unconfirmed == 0
        lived = list(session.ledger.history)  # the robot's newest transitions, window + 1 of them
        assert session.ledger.transitions == 26 and session.step == lived[-1].step + 1
        twin = httpx.post(f"{service.url}/v1/sessions", json={"model": "cheetah-random"}).json()["session_id"]
        items = [
            {
                "session_id": twin,
                "observation": list(tr.observation),
                "reward": tr.reward,
                "episode_start": tr.episode_start,
                "applied_action": list(tr.previous_action or (0.0,) * 6),
            }
            for tr in lived
        ]
        replayed = httpx.post(f"{service.url}/v1/act/batch", json={"items": items}, timeout=30.0).json()
        assert all("action" in item for item in replayed["items"]), replayed
        probe = {"observation": [0.2] * 17, "reward": -0.3, "applied_action": [0.05] * 6}
        got = session.act(probe["observation"], probe["reward"], False, probe["applied_action"], timeout=30.0)
        want = httpx.post(f"{service.url}/v1/act", json={"session_id": twin, **probe}, timeout=30.0).json()
    assert down.misses == 5
    held = np.stack(env.actions[10:15])
    assert (held == held[0]).all()  # the last action held
    np.testing.assert_allclose(got, want["action"], atol=1e-5, rtol=0)  # the memory is complete


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
