"""Offscreen rendering of served episodes: MuJoCo frames with the task and the step drawn on them.

``trmrl-sim --render PATH`` records one of its environments with an :class:`EpisodeRecorder` and writes
the frames to a GIF (Pillow) or an MP4 (imageio with imageio-ffmpeg): ``pip install 'trmrl-sim[render]'``.

MuJoCo needs an offscreen OpenGL backend, chosen by ``MUJOCO_GL`` before ``mujoco`` is first imported:
``osmesa`` (software, any machine: Debian's ``libosmesa6``) or ``egl`` (a GPU). When ``MUJOCO_GL`` is not
set, :func:`choose_gl_backend` picks ``osmesa`` where the library is installed, else ``egl``.

Every frame shows the model, the family and task (target velocity, direction, goal), the episode and
step, the last reward and the return so far, and what the step reported of velocity or success. In the
scene itself a direction task gets an arrow above the robot and a goal task a green sphere at the goal.

Only families whose environments simulate a MuJoCo scene can be rendered; :func:`check_can_render`
refuses the others (point-nav) with a message naming the family, before any work starts.

Example:
    >>> recorder = EpisodeRecorder(family, tasks, env_index=0, size=(320, 240), every=2)  # doctest: +SKIP
    >>> # run_sim(..., recorder=recorder), then:
    >>> write_clip(Path("cheetah.gif"), recorder.frames, recorder.fps)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = (".gif", ".mp4")
"""The clip formats, by file suffix."""

DEFAULT_SIZE = (320, 240)
"""Width and height of a rendered frame, in pixels."""

MAX_SIZE = (1280, 960)
"""The largest frame rendered (MuJoCo's offscreen buffer is resized to fit, up to this)."""


class RenderError(Exception):
    """Rendering is not possible: a family without a MuJoCo scene, no OpenGL backend, a missing writer.

    Example:
        >>> str(RenderError("family 'point-nav' cannot be rendered: it has no MuJoCo scene"))
        "family 'point-nav' cannot be rendered: it has no MuJoCo scene"
    """


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` as ``(width, height)``: even numbers (MP4 needs them) from 16 up to :data:`MAX_SIZE`.

    Example:
        >>> parse_size("320x240")
        (320, 240)
    """
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a frame size is WIDTHxHEIGHT, e.g. 320x240, not {text!r}") from None
    if not (16 <= width <= MAX_SIZE[0] and 16 <= height <= MAX_SIZE[1]) or width % 2 or height % 2:
        raise ValueError(
            f"frame size {text!r}: width and height must be even, from 16 to {MAX_SIZE[0]}x{MAX_SIZE[1]}"
        )
    return width, height


def choose_gl_backend() -> str:
    """Set ``MUJOCO_GL`` for offscreen rendering unless it is set, and return it.

    It must happen before ``mujoco`` is imported: later, the backend MuJoCo chose stays.

    Example:
        >>> choose_gl_backend()  # doctest: +SKIP
        'osmesa'
    """
    backend = os.environ.get("MUJOCO_GL")
    if backend is None and "mujoco" not in sys.modules:
        backend = "osmesa" if ctypes.util.find_library("OSMesa") else "egl"
        os.environ["MUJOCO_GL"] = backend
    return backend or "(unset)"


def mujoco_scene(env: Any) -> tuple[Any, Any] | None:
    """The ``(MjModel, MjData)`` an environment simulates, or ``None`` when it has no MuJoCo scene.

    Example:
        >>> mujoco_scene(get_family("point-nav").make_env()) is None  # doctest: +SKIP
        True
    """
    inner = getattr(env, "unwrapped", env)
    model, data = getattr(inner, "model", None), getattr(inner, "data", None)
    if type(model).__name__ != "MjModel" or type(data).__name__ != "MjData":
        return None
    return model, data


def _check_writer(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise RenderError(f"cannot write {path}: a clip is {' or '.join(FORMATS)}")
    try:
        import PIL.ImageDraw  # noqa: F401

        if suffix == ".mp4":
            import imageio.v2  # noqa: F401

            if importlib.util.find_spec("imageio_ffmpeg") is None:
                raise ImportError("no module named 'imageio_ffmpeg'")
    except ImportError as exc:
        raise RenderError(
            f"writing {suffix} needs the render extra (pip install 'trmrl-sim[render]'): {exc}"
        ) from exc
    if not path.parent.exists():
        raise RenderError(f"cannot write {path}: no folder {path.parent}")


def check_can_render(family: Any, path: Path, size: tuple[int, int] = DEFAULT_SIZE) -> None:
    """Fail before any work unless ``family`` can be rendered to ``path``: checks the family has a
    MuJoCo scene, that a writer for the suffix is installed, and renders one frame offscreen.

    Example:
        >>> check_can_render(get_family("point-nav"), Path("x.gif"))  # doctest: +SKIP
        Traceback (most recent call last):
        RenderError: family 'point-nav' cannot be rendered: it has no MuJoCo scene
    """
    env = family.make_env()
    try:
        if mujoco_scene(env) is None:
            raise RenderError(f"family {family.name!r} cannot be rendered: it has no MuJoCo scene")
        _check_writer(path)
        env.reset(seed=0)
        camera = SceneCamera(family)
        try:
            frame = camera.render(env, size)
        finally:
            camera.close()
        if frame.std() == 0:
            raise RenderError(f"{family.name}: the offscreen renderer drew a blank frame ({gl_hint()})")
    finally:
        env.close()


def gl_hint() -> str:
    """What to set for offscreen rendering, after the ``MUJOCO_GL`` in effect.

    Example:
        >>> "MUJOCO_GL=osmesa" in gl_hint()
        True
    """
    backend = os.environ.get("MUJOCO_GL", "(unset)")
    return (
        f"MUJOCO_GL={backend}; render with MUJOCO_GL=osmesa (Debian: apt-get install libosmesa6) "
        "or MUJOCO_GL=egl on a GPU"
    )


class SceneCamera:
    """An offscreen MuJoCo renderer with a view chosen for the family, and task markers in the scene.

    Locomotion robots are followed by a tracking camera from the side; Meta-World's table is seen from a
    fixed free camera. One OpenGL context per camera: :meth:`close` it before opening another.

    Example:
        >>> camera = SceneCamera(get_family("halfcheetah-vel"))  # doctest: +SKIP
        >>> camera.render(env, (320, 240)).shape  # doctest: +SKIP
        (240, 320, 3)
    """

    def __init__(self, family: Any) -> None:
        self.family = family
        self._renderer: Any = None
        self._key: tuple[int, int, int] | None = None

    def _renderer_for(self, model: Any, size: tuple[int, int]) -> Any:
        try:
            import mujoco
        except ImportError as exc:  # pragma: no cover - the sim's environments need it anyway
            raise RenderError(f"rendering needs mujoco: {exc}") from exc
        key = (id(model), *size)
        if self._renderer is None or self._key != key:
            self.close()
            if os.environ.get("MUJOCO_GL") == "disable":
                raise RenderError(f"cannot render offscreen: it is switched off ({gl_hint()})")
            width, height = size
            model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), width)
            model.vis.global_.offheight = max(int(model.vis.global_.offheight), height)
            try:
                self._renderer = mujoco.Renderer(model, height, width)
            except Exception as exc:  # the GL backend's own error types vary (GLError, RuntimeError...)
                raise RenderError(f"cannot render offscreen: {exc} ({gl_hint()})") from exc
            # Software rendering spends most of its time on shadows and reflections: leave them out.
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            self._key = key
        return self._renderer

    def _camera(self, model: Any, data: Any) -> Any:
        import mujoco

        camera = mujoco.MjvCamera()
        camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        if getattr(self.family, "meta_world", False):
            # From the front corner of the table: the arm, the table and the goal below the text.
            camera.lookat[:] = (0.1, 0.6, 0.2)
            camera.distance, camera.azimuth, camera.elevation = 1.6, 215.0, -30.0
            return camera
        # Follows the robot from the side: looks at its torso, at a fixed height (no bobbing).
        body = int(model.body("torso").id) if _has_body(model, "torso") else min(1, model.nbody - 1)
        camera.lookat[:] = data.xpos[body]
        camera.lookat[2] = 0.4
        ant = model.nu == 8
        camera.distance, camera.azimuth, camera.elevation = (7.0 if ant else 4.5), 90.0, -20.0
        return camera

    def render(self, env: Any, size: tuple[int, int], task: Any = None) -> np.ndarray:
        """An ``[height, width, 3]`` uint8 frame of ``env`` now, with ``task``'s marker if it has one."""
        scene = mujoco_scene(env)
        if scene is None:
            raise RenderError(f"family {self.family.name!r} cannot be rendered: it has no MuJoCo scene")
        model, data = scene
        renderer = self._renderer_for(model, size)
        try:
            renderer.update_scene(data, camera=self._camera(model, data))
            if task is not None:
                self._add_marker(renderer.scene, model, data, task)
            return np.asarray(renderer.render()).copy()
        except RenderError:
            raise
        except Exception as exc:
            raise RenderError(f"cannot render offscreen: {exc} ({gl_hint()})") from exc

    def _add_marker(self, scene: Any, model: Any, data: Any, task: Any) -> None:
        """A green arrow on the ground in front of the robot for a direction task, a green sphere at a
        goal."""
        import mujoco

        if scene.ngeom >= scene.maxgeom:
            return
        kind = task_kind(self.family)
        params = np.asarray(task.params, np.float64)
        green = np.array([0.1, 0.85, 0.2, 0.8], np.float32)
        geom = scene.geoms[scene.ngeom]
        if kind == "direction" and len(params) == 2:
            body = int(model.body("torso").id) if _has_body(model, "torso") else 1
            # On the ground between the robot and the camera (which looks along +y), centred under it.
            centre = data.xpos[body].copy()
            centre[1] -= 1.5
            centre[2] = 0.1
            half = np.array([params[0], params[1], 0.0]) * 0.75
            start, end = centre - half, centre + half
            zeros = np.zeros(3)
            mujoco.mjv_initGeom(geom, mujoco.mjtGeom.mjGEOM_ARROW, zeros, zeros, np.zeros(9), green)
            mujoco.mjv_connector(geom, mujoco.mjtGeom.mjGEOM_ARROW, 0.08, start, end)
        elif kind == "goal":
            position = np.zeros(3)
            position[: min(3, len(params))] = params[:3]
            radius = 0.03 if getattr(self.family, "meta_world", False) else 0.25
            size = np.array([radius, 0.0, 0.0])
            mujoco.mjv_initGeom(geom, mujoco.mjtGeom.mjGEOM_SPHERE, size, position, np.eye(3).ravel(), green)
        else:
            return
        scene.ngeom += 1

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
            self._key = None


def _has_body(model: Any, name: str) -> bool:
    try:
        model.body(name)
    except KeyError:
        return False
    return True


def task_kind(family: Any) -> str:
    """How a family's task parameters are drawn: ``goal`` (a position), ``direction`` (a unit vector in
    the plane), or ``text`` (the label only, e.g. a target velocity).

    Example:
        >>> task_kind(get_family("ant-dir"))  # doctest: +SKIP
        'direction'
    """
    if getattr(family, "meta_world", False) or "goal" in family.name:
        return "goal"
    if "ant-dir" in family.name:
        return "direction"
    return "text"


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size)  # Pillow's bundled font: nothing fetched at run time
    except TypeError:  # pragma: no cover - Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def draw_text(frame: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``frame`` with ``lines`` drawn at its top left, white on a dark band.

    Example:
        >>> out = draw_text(np.zeros((48, 96, 3), np.uint8), ["step 1"])
        >>> out.shape, bool(out.any())
        ((48, 96, 3), True)
    """
    from PIL import Image, ImageDraw

    image = Image.fromarray(frame)
    height = frame.shape[0]
    size = max(9, min(14, height // 16))
    font = _font(size)
    draw = ImageDraw.Draw(image, "RGBA")
    widths = [draw.textlength(line, font=font) for line in lines]
    band = (0, 0, int(max(widths, default=0)) + 8, len(lines) * (size + 2) + 6)
    draw.rectangle(band, fill=(0, 0, 0, 150))
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * (size + 2)), line, fill=(255, 255, 255, 255), font=font)
    return np.asarray(image)


def _direction_text(params: Sequence[float]) -> str:
    degrees = math.degrees(math.atan2(params[1], params[0])) % 360
    return f"direction {degrees:.0f}°"


def task_text(family: Any, task: Any) -> str:
    """The task in words: ``target velocity 1.73 m/s``, ``direction 180°``, ``goal (x, y, z)``.

    Example:
        >>> cheetah = get_family("halfcheetah-vel")  # doctest: +SKIP
        >>> task_text(cheetah, cheetah.sample_tasks("test", 1, 1000)[0])  # doctest: +SKIP
        'target velocity 0.59 m/s'
    """
    params = task.params
    if "vel" in family.name and len(params) == 1:
        return f"target velocity {params[0]:.2f} m/s"
    if "dir" in family.name and len(params) == 1:
        return "direction " + ("forward" if params[0] > 0 else "backward")
    if task_kind(family) == "direction" and len(params) == 2:
        return _direction_text(params)
    if task_kind(family) == "goal":
        return "goal (" + ", ".join(f"{p:.2f}" for p in params) + ")"
    return task.label


class EpisodeRecorder:
    """Frames of one environment of a trial, every ``every``-th step, with the task and step drawn.

    Pass it to :func:`trmrl_sim.sim.run_sim` (``recorder=``): it is given the family, tasks and
    environments once they are built (:meth:`attach`) and called after every step (:meth:`on_step`, a
    :data:`trmrl.tasks.trials.OnStep`). :meth:`close` releases the OpenGL context.

    Example:
        >>> recorder = EpisodeRecorder(0, size=(320, 240), every=2, title="halfcheetah-vel")
        >>> recorder.frames
        []
    """

    def __init__(
        self,
        env_index: int = 0,
        *,
        size: tuple[int, int] = DEFAULT_SIZE,
        every: int = 2,
        title: str = "",
        max_frames: int | None = None,
    ) -> None:
        if env_index < 0 or every < 1:
            raise RenderError(f"env_index must be >= 0 and every >= 1, got {env_index} and {every}")
        self.env_index = env_index
        self.size = size
        self.every = every
        self.title = title
        self.max_frames = max_frames
        self.frames: list[np.ndarray] = []
        self.fps = 10.0
        """Frames per second that play the episode in real time (set by :meth:`attach`)."""
        self.family: Any = None
        self.task: Any = None
        self._env: Any = None
        self._camera: SceneCamera | None = None
        self._episode = -1
        self._step = 0
        self._return = 0.0
        self._succeeded_at: int | None = None

    def attach(self, family: Any, tasks: Sequence[Any], envs: Sequence[Any]) -> None:
        """Record ``envs[env_index]``, set to ``tasks[env_index]`` (called by the run once its
        environments are built)."""
        if self.env_index >= len(envs):
            raise RenderError(f"cannot render environment {self.env_index}: there are {len(envs)}")
        self.family = family
        self.task = tasks[self.env_index]
        self._env = envs[self.env_index]
        self._camera = SceneCamera(family)
        dt = float(getattr(getattr(self._env, "unwrapped", self._env), "dt", 0.05) or 0.05)
        self.fps = 1.0 / (dt * self.every)

    def on_step(self, i: int, episode: int, reward: float, info: dict[str, Any]) -> None:
        if i != self.env_index or self._camera is None:
            return
        if episode != self._episode:
            self._episode, self._step, self._return, self._succeeded_at = episode, 0, 0.0, None
        self._step += 1
        self._return += reward
        if info.get("success") and self._succeeded_at is None:
            self._succeeded_at = self._step
        if self._step % self.every and self._step != 1:
            return
        if self.max_frames is not None and len(self.frames) >= self.max_frames:
            return
        frame = self._camera.render(self._env, self.size, self.task)
        self.frames.append(draw_text(frame, self.lines(reward, info)))

    def lines(self, reward: float, info: dict[str, Any]) -> list[str]:
        """What a frame says: model, family and task, episode and step, reward and return, and what
        the steps reported (velocity; the first step of the episode that succeeded)."""
        lines = [self.title] if self.title else []
        lines.append(f"{self.family.name}: {task_text(self.family, self.task)}")
        measured = f"episode {self._episode + 1}  step {self._step}"
        if "x_velocity" in info:
            measured += f"  v_x {float(info['x_velocity']):+.2f} m/s"
        lines.append(measured)
        outcome = f"reward {reward:+.2f}  return {self._return:.1f}"
        if self._succeeded_at is not None:
            outcome += f"  success at step {self._succeeded_at}"
        lines.append(outcome)
        return lines

    def close(self) -> None:
        if self._camera is not None:
            self._camera.close()


def side_by_side(panels: Sequence[Sequence[np.ndarray]], gap: int = 4) -> list[np.ndarray]:
    """Clips of equal frame size joined left to right (the shorter ones hold their last frame).

    Example:
        >>> a, b = [np.zeros((4, 6, 3), np.uint8)] * 2, [np.ones((4, 6, 3), np.uint8)]
        >>> [f.shape for f in side_by_side([a, b], gap=2)]
        [(4, 14, 3), (4, 14, 3)]
    """
    panels = [p for p in panels if len(p)]
    if not panels:
        return []
    length = max(len(p) for p in panels)
    height = panels[0][0].shape[0]
    spacer = np.full((height, gap, 3), 255, np.uint8)
    out = []
    for t in range(length):
        parts: list[np.ndarray] = []
        for k, panel in enumerate(panels):
            if k:
                parts.append(spacer)
            parts.append(panel[min(t, len(panel) - 1)])
        out.append(np.concatenate(parts, axis=1))
    return out


def write_clip(path: Path, frames: Sequence[np.ndarray], fps: float) -> None:
    """Write ``frames`` to ``path``: a looping GIF (Pillow) or an H.264 MP4 (imageio-ffmpeg).

    Example:
        >>> write_clip(Path("/tmp/clip.gif"), [np.zeros((16, 16, 3), np.uint8)] * 2, fps=10)  # doctest: +SKIP
    """
    if not frames:
        raise RenderError(f"no frames to write to {path}")
    _check_writer(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(f).quantize(colors=128, method=Image.Quantize.MEDIANCUT) for f in frames]
        images[0].save(
            path,
            save_all=True,
            append_images=images[1:],
            duration=max(20, round(1000.0 / fps)),
            loop=0,
            optimize=True,
        )
        return
    import imageio.v2 as imageio

    writer: Any = imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=2)
    with writer:
        for frame in frames:
            writer.append_data(frame)
