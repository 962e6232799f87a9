"""Recording sessions to Parquet: what is written, the summary CLI, opt-in and sampling, and that a
full buffer or a failing disk costs recorded rows (counted), never a step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from service_support import OBS, ServiceClient, action, assert_error

from service import recordings_cli
from service.app import create_app
from service.config import Settings
from service.core.recording import Recorder

pytestmark = pytest.mark.anyio


async def run_app(
    checkpoints: dict[str, Path], body: Any, steps: int, **settings: Any
) -> tuple[list[Any], str]:
    """Serve, step one session ``steps`` times (an episode starts at 0 and at 12), shut down."""
    app = create_app(Settings(models=[checkpoints["point-nav"]], **settings))
    sent = []
    async with app.router.lifespan_context(app), ServiceClient(app) as client:
        r = await client.post("/v1/sessions", json=body)
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        other = (await client.post("/v1/sessions", json={})).json()["session_id"]
        for step in range(steps):
            obs = OBS[step % len(OBS)]
            got = await action(client, sid, obs, reward=0.1 * step, step=step, episode_start=step in (0, 12))
            await action(client, other, obs, step=step)
            sent.append((obs, 0.1 * step, got))
        metrics = (await client.get("/metrics")).text
    return sent, metrics


async def test_recorded_steps_are_written_as_sent_and_answered(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    sent, _ = await run_app(checkpoints, {"record": True}, 30, record_dir=tmp_path)
    files = sorted(tmp_path.glob("*.parquet"))
    assert files and not list(tmp_path.glob(".*.partial"))
    table = pq.read_table(tmp_path).to_pydict()  # the directory, as the docs show
    assert len(table["step"]) == 30  # the other session was not recorded
    assert table["step"] == list(range(30))
    assert table["episode"] == [0] * 12 + [1] * 18
    assert table["step_in_episode"] == list(range(12)) + list(range(18))
    assert table["episode_start"] == [s in (0, 12) for s in range(30)]
    for row, (obs, reward, got) in enumerate(sent):
        np.testing.assert_allclose(table["observation"][row], obs, rtol=1e-6)
        np.testing.assert_allclose(table["action"][row], got, rtol=1e-6)
        want_reward = 0.0 if row in (0, 12) else reward
        assert table["reward"][row] == pytest.approx(want_reward, abs=1e-6)
    assert all(a is None for a in table["applied_action"])
    assert set(table["model"]) == {"point-nav"} and len(set(table["version"])) == 1


async def test_summary_cli(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await run_app(checkpoints, {"record": True}, 30, record_dir=tmp_path)
    assert recordings_cli.main(["summarize", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 sessions, 2 episodes, 30 steps" in out
    # Episode 0 holds rewards 0.1..1.1 (steps 1-11), episode 1 holds 1.3..2.9 (steps 13-29).
    want = (sum(0.1 * s for s in range(1, 12)) + sum(0.1 * s for s in range(13, 30))) / 2
    assert f"return per episode mean {want:.2f}" in out
    assert "adaptation curve" in out
    assert recordings_cli.main(["summarize", str(tmp_path / "missing")]) == 2


async def test_record_needs_a_record_dir(client: ServiceClient) -> None:
    assert_error(await client.post("/v1/sessions", json={"record": True}), 422, "recording_disabled")


async def test_a_sampled_fraction_is_recorded_without_asking(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    await run_app(checkpoints, {}, 3, record_dir=tmp_path, record_fraction=1.0)
    assert len(pq.read_table(sorted(tmp_path.glob("*.parquet")))) == 6  # both sessions


async def test_a_failing_disk_costs_recorded_rows_not_steps(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the recording directory should be")
    app = create_app(Settings(models=[checkpoints["point-nav"]], record_dir=blocked))
    async with app.router.lifespan_context(app), ServiceClient(app) as client:
        sid = (await client.post("/v1/sessions", json={"record": True})).json()["session_id"]
        for step in range(5):
            await action(client, sid, OBS[step], step=step)  # every step is served
    recorder = app.state.registry.recorder
    assert (recorder.rows_lost, recorder.rows_written) == (5, 0)  # written on shutdown, refused by the disk
    text = app.state.metrics.render().decode()
    assert 'trmrl_recording_lost_steps_total{reason="write_error"} 5.0' in text


def block(rows: int) -> dict[str, Any]:
    return {
        "session_id": ["s"] * rows,
        "model": "m",
        "version": "v",
        "episode": np.zeros(rows, np.int64),
        "step_in_episode": np.arange(rows),
        "step": np.arange(rows),
        "observation": np.zeros((rows, 2), np.float32),
        "reward": np.zeros(rows, np.float32),
        "action": np.zeros((rows, 2), np.float32),
        "applied_action": np.full((rows, 2), np.nan, np.float32),
        "episode_start": np.zeros(rows, bool),
        "received_at": np.zeros(rows),
        "server_timing_us": np.zeros(rows, np.int64),
    }


def test_a_full_buffer_drops_and_counts_without_waiting(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, buffer_rows=4, start=False)  # a writer that has not caught up yet
    assert recorder.submit(block(3)) is True
    assert recorder.submit(block(2)) is False and recorder.rows_dropped == 2
    recorder.start()
    recorder.close()
    assert recorder.rows_written == 3 and recorder.pending_rows == 0


def test_files_rotate_by_rows(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, rotate_rows=5, flush_s=0.0, start=False)
    for _ in range(4):
        recorder.submit(block(3))
    recorder.start()
    recorder.close()
    files = sorted(tmp_path.glob("*.parquet"))
    assert [len(pq.read_table(f)) for f in files] == [6, 6]
