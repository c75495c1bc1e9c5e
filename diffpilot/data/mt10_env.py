"""Meta-World MT10 access shared by the demonstration generator and the evaluation environment.

One place builds a task's environment (goal-observable Meta-World v3, 39-dim
state), puts an episode's object and goal where its episode seed says,
builds the scripted expert, and renders a frame, so demonstrations and
closed-loop evaluation see the same scenes and the same pictures
(:class:`diffpilot.sim.mt10.MT10Env` is the evaluation environment).

Episode seeds: Meta-World freezes an environment's random object/goal
vector after construction, so every ``reset()`` repeats the same layout.
:func:`reset_episode` unfreezes it, seeds the environment's generator with
the episode seed and resets: the same seed gives the same layout in any
process, different seeds give different layouts.

Frames: :class:`FrameRenderer` renders one fixed camera with shadows and
reflections off. The corner cameras of the Meta-World scene are rolled by
180 degrees; their frames are turned upright.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; read when mujoco is first imported

import warnings  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

# Meta-World's experts warn on every call that their gains exceed the action range (the env clips): expected here.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)

__all__ = ["CAMERAS", "DEFAULT_CAMERA", "RENDER_SETTINGS", "check_camera", "MAX_STEPS", "MT10_TASKS", "STATE_DIM", "ACTION_DIM", "FrameRenderer",
           "check_task", "make_env", "make_expert", "reset_episode"]

MT10_TASKS: tuple[str, ...] = (
    "reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close", "button-press-topdown",
    "peg-insert-side", "window-open", "window-close",
)
"""The ten MT10 tasks (Meta-World ``<name>-v3``)."""
STATE_DIM = 39
ACTION_DIM = 4
MAX_STEPS = 500
"""Meta-World's episode limit (``max_path_length``)."""
DEFAULT_CAMERA = "corner4"
"""The camera every task is recorded and evaluated with: table, objects and gripper in view for all ten."""
RENDER_SETTINGS = {"offsamples": 0, "shadows": False, "reflections": False}
"""How every frame is rendered (part of a demonstration file's cache key: training and evaluation frames must match)."""
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
_UPSIDE_DOWN = ("corner", "corner2", "corner3", "corner4")


def check_task(task: str) -> str:
    """``task`` as an MT10 name (a trailing ``-v3`` is accepted); ValueError naming the valid tasks otherwise."""
    name = str(task)
    if name.endswith("-v3"):
        name = name[:-3]
    if name not in MT10_TASKS:
        raise ValueError(f"unknown MT10 task {task!r}; valid tasks: {list(MT10_TASKS)}")
    return name


def check_camera(camera: str) -> str:
    if camera not in CAMERAS:
        raise ValueError(f"unknown camera {camera!r}; the Meta-World scene has {list(CAMERAS)}")
    return camera


def make_env(task: str, max_steps: int = MAX_STEPS) -> Any:
    """The goal-observable Meta-World v3 environment of ``task`` (reset it with :func:`reset_episode`)."""
    name = check_task(task)
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

        env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{name}-v3-goal-observable"](seed=0)
    env.max_path_length = max(int(max_steps), MAX_STEPS)
    return env


def make_expert(task: str) -> Any:
    """Meta-World's scripted expert of ``task`` (``get_action(state) -> (4,)``; it may write into ``state``)."""
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[f"{check_task(task)}-v3"]()


def reset_episode(env: Any, seed: int) -> np.ndarray:
    """Reset ``env`` to the object/goal layout of episode seed ``seed``; returns the first 39-dim state."""
    env._freeze_rand_vec = False  # noqa: SLF001 - Meta-World's switch; the layout is drawn from env.np_random
    env.seeded_rand_vec = True
    env.seed(int(seed) % (2**32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs, _ = env.reset()
    return np.asarray(obs, dtype=np.float64)


def _new_renderer(mujoco: Any, model: Any, size: int) -> Any:
    """``mujoco.Renderer``; headless (no DISPLAY) with mujoco imported before MUJOCO_GL was set, through EGL.

    Multisampling is off (``offsamples = 0``): at 64 px it changes little and
    costs 4x the frame time of a software renderer (about 30 -> 7 ms here).
    """
    from mujoco import gl_context

    model.vis.quality.offsamples = RENDER_SETTINGS["offsamples"]

    current = gl_context.GLContext
    if os.environ.get("DISPLAY") or current is None or not current.__module__.startswith("mujoco.glfw"):
        return mujoco.Renderer(model, size, size)
    from mujoco.egl import GLContext as EGLContext

    gl_context.GLContext = EGLContext  # only while this renderer makes its context
    try:
        return mujoco.Renderer(model, size, size)
    finally:
        gl_context.GLContext = current


class FrameRenderer:
    """Renders one camera of an environment at ``size`` x ``size`` pixels, shadows and reflections off."""

    def __init__(self, env: Any, size: int = 64, camera: str = DEFAULT_CAMERA) -> None:
        import mujoco

        if int(size) < 8:
            raise ValueError(f"image_size must be >= 8, got {size}")
        self.size, self.camera = int(size), check_camera(camera)
        self._env = env
        self._mujoco = mujoco
        self._renderer = _new_renderer(mujoco, env.model, self.size)

    def render(self) -> np.ndarray:
        """The current frame, uint8 (size, size, 3)."""
        mj = self._mujoco
        r = self._renderer
        r.update_scene(self._env.data, camera=self.camera)
        r.scene.flags[mj.mjtRndFlag.mjRND_SHADOW] = 0
        r.scene.flags[mj.mjtRndFlag.mjRND_REFLECTION] = 0
        frame = r.render()
        if self.camera in _UPSIDE_DOWN:
            frame = frame[::-1, ::-1]
        return np.ascontiguousarray(frame, dtype=np.uint8)

    def close(self) -> None:
        self._renderer.close()
