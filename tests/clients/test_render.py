"""trmrl-sim --render: served episodes rendered offscreen, and what cannot be rendered refused early.

The rendering test runs ``trmrl-sim`` in a child process with ``MUJOCO_GL=osmesa``: MuJoCo picks its
OpenGL backend when it is first imported, and the test process has imported it with rendering off
(the Makefile's ``MUJOCO_GL=disable``). It skips where Debian's ``libosmesa6`` is not installed;
``.ci/run`` installs it, so CI runs it.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from client_support import BUNDLED, REPO, Service
from trmrl_sim import render, sim

NO_SERVICE = "http://127.0.0.1:9"
"""Nobody listens here: a refusal that names the family, not the service, came before any work."""


@pytest.fixture(scope="module")
def cheetah() -> Iterator[Service]:
    """The bundled halfcheetah-vel policy: it runs, so the scene changes from frame to frame (a random
    one soon lies still on its back)."""
    running = Service([BUNDLED / "halfcheetah-vel"])
    try:
        yield running.start()
    finally:
        running.close()


def frames_of(path: Path) -> list[np.ndarray]:
    if path.suffix == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as image:
            return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
    import imageio.v2 as imageio

    return [np.asarray(frame) for frame in imageio.mimread(path)]


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_served_episodes_render_to_frames_that_are_not_blank(
    cheetah: Service, tmp_path: Path, suffix: str
) -> None:
    if ctypes.util.find_library("OSMesa") is None:
        pytest.skip("libOSMesa is not installed (Debian: apt-get install libosmesa6): no offscreen rendering")
    if suffix == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        pytest.skip("imageio-ffmpeg is not installed (pip install 'trmrl-sim[render]'): no MP4 writer")
    out = tmp_path / f"cheetah{suffix}"
    argv = ["--family", "halfcheetah-vel", "--envs", "2", "--episodes", "1", "--url", cheetah.url]
    argv += ["--render", str(out), "--render-env", "1", "--render-size", "160x120", "--render-every", "40"]
    done = subprocess.run(
        [sys.executable, "-m", "trmrl_sim.sim", *argv, "--no-progress"],
        cwd=REPO,
        env={**os.environ, "MUJOCO_GL": "osmesa", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rendered 6 frames of halfcheetah-vel on task v*=0.86 to" in done.stderr
    frames = frames_of(out)
    assert len(frames) == 6  # steps 1, 40, 80, 120, 160, 200 of the 200-step episode
    for frame in frames:
        assert frame.shape == (120, 160, 3)
        assert frame.std() > 20, "a blank frame"
        assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 8, "a frame of a few flat colours"
    # Below the text band, the scene itself changes from one frame to the next (the robot moves).
    scene = [frame[60:].astype(np.float64) for frame in frames]
    for before, after in itertools.pairwise(scene):
        assert np.abs(after - before).mean() > 1.0, "two steps drew the same scene"


def test_a_family_without_a_mujoco_scene_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nav.gif"
    argv = ["--family", "point-nav", "--render", str(out), "--url", NO_SERVICE, "--no-progress"]
    assert sim.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "trmrl-sim: error: family 'point-nav' cannot be rendered: it has no MuJoCo scene\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("clip.avi", "a clip is .gif or .mp4"),
        ("no-such-folder/clip.gif", "no folder"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    argv = ["--family", "halfcheetah-vel", "--render", str(tmp_path / name), "--url", NO_SERVICE]
    assert sim.main([*argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(
    os.environ.get("MUJOCO_GL") != "disable", reason="needs MUJOCO_GL=disable (the Makefile's)"
)
def test_rendering_switched_off_is_refused_with_what_to_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--family", "halfcheetah-vel", "--render", str(tmp_path / "c.gif"), "--url", NO_SERVICE]
    assert sim.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot render offscreen" in err and "MUJOCO_GL=osmesa" in err and "libosmesa6" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--render-size", "320"],
        ["--render-size", "321x240"],
        ["--render-every", "0"],
        ["--envs", "2", "--render-env", "2"],
    ],
)
def test_bad_render_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sim.parse_args(["--family", "halfcheetah-vel", *argv])
    assert exit_info.value.code == 2


def test_the_text_on_a_frame_names_the_task_and_the_step() -> None:
    from trmrl.tasks import get_family

    cheetah, ant, reach = (get_family(n) for n in ("halfcheetah-vel", "ant-dir", "ml1-reach"))
    recorder = render.EpisodeRecorder(0, title="TrMRL")
    recorder.family, recorder.task = cheetah, cheetah.sample_tasks("test", 1, 1000)[0]
    recorder._episode, recorder._step, recorder._return = 0, 7, -3.25
    assert recorder.lines(-0.5, {"x_velocity": 0.41}) == [
        "TrMRL",
        "halfcheetah-vel: target velocity 0.59 m/s",
        "episode 1  step 7  v_x +0.41 m/s",
        "reward -0.50  return -3.2",
    ]
    assert render.task_text(ant, ant.sample_tasks("test", 1, 1000)[0]) == "direction 180°"
    assert render.task_text(reach, reach.sample_tasks("test", 1, 1000)[0]).startswith("goal (")
    assert render.task_kind(ant) == "direction" and render.task_kind(reach) == "goal"
    frame = np.full((120, 160, 3), 90, np.uint8)
    drawn = render.draw_text(frame, recorder.lines(0.0, {}))
    assert (drawn[:40] != 90).any() and (drawn[80:] == 90).all()  # text at the top, scene left alone


def test_clips_join_side_by_side_and_write_as_a_looping_gif(tmp_path: Path) -> None:
    a = [np.full((16, 20, 3), v, np.uint8) for v in (0, 50, 100)]
    b = [np.full((16, 20, 3), 200, np.uint8)]
    joined = render.side_by_side([a, b], gap=2)
    assert [f.shape for f in joined] == [(16, 42, 3)] * 3
    assert (joined[2][:, 22:] == 200).all()  # the shorter panel holds its last frame
    out = tmp_path / "clip.gif"
    render.write_clip(out, joined, fps=10)
    back = frames_of(out)
    assert len(back) == 3 and abs(int(back[1][0, 0, 0]) - 50) <= 4
    with pytest.raises(render.RenderError, match="no frames"):
        render.write_clip(out, [], fps=10)
