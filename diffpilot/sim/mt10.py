"""The Meta-World MT10 evaluation environment: the demonstrations' scenes, camera and renderer, closed loop.

``MT10Env(task).reset(seed)`` puts the object and goal where episode seed
``seed`` says (the seeds stored in a demonstration file's
``episodes/seed`` restore those episodes' layouts), and every observation
is rendered exactly as the generator renders it
(:class:`diffpilot.data.mt10_env.FrameRenderer`). Render only the steps
a policy looks at: ``step(action, render=False)`` then ``observe()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffpilot.data.mt10_env import (
    ACTION_DIM,
    DEFAULT_CAMERA,
    MAX_STEPS,
    MT10_TASKS,
    FrameRenderer,
    check_task,
    make_env,
    reset_episode,
)

__all__ = ["MT10Env", "MT10_TASKS"]


class MT10Env:
    """One MT10 task: ``reset(seed) -> obs``, ``step(action) -> (obs, success, done)``, ``observe()``, ``close()``.

    An observation is ``{"image": uint8 (H, W, 3) or None, "proprio":
    float32 (4,) hand xyz + gripper, "goal": float32 (3,), "state": float32
    (39,), "task": str}``. Actions are ``(dx, dy, dz, grip)``, clipped to
    [-1, 1]. An episode is done at the first success or after ``max_steps``
    steps.
    """

    def __init__(self, task: str, image_size: int = 64, camera: str = DEFAULT_CAMERA, max_steps: int = MAX_STEPS) -> None:
        self.task = check_task(task)
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = int(max_steps)
        self.image_size = int(image_size)
        self.camera = camera
        self._env = make_env(self.task, self.max_steps)
        try:
            self._renderer = FrameRenderer(self._env, self.image_size, camera)
        except BaseException:
            self._env.close()
            raise
        self._state: np.ndarray | None = None
        self.steps = 0
        self.success = False
        self.done = True

    def reset(self, seed: int, render: bool = True) -> dict[str, Any]:
        """Start the episode of episode seed ``seed`` (same seed, same object and goal layout)."""
        self._state = reset_episode(self._env, int(seed))
        self.steps, self.success, self.done = 0, False, False
        return self.observe(render)

    def step(self, action: np.ndarray, render: bool = True) -> tuple[dict[str, Any], bool, bool]:
        """Apply ``action``; returns the new observation, whether the task is solved, and whether the episode is over."""
        if self._state is None or self.done:
            raise RuntimeError("the episode is over (or never started); call reset(seed) first")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != ACTION_DIM or not np.all(np.isfinite(a)):
            raise ValueError(f"an MT10 action is {ACTION_DIM} finite numbers (dx, dy, dz, grip), got {action!r}")
        obs, _, _, _, info = self._env.step(np.clip(a, -1.0, 1.0))
        self._state = np.asarray(obs, dtype=np.float64)
        self.steps += 1
        self.success = bool(info.get("success", False))
        self.done = self.success or self.steps >= self.max_steps
        return self.observe(render), self.success, self.done

    def observe(self, render: bool = True) -> dict[str, Any]:
        """The current observation; ``image`` is None unless ``render``."""
        if self._state is None:
            raise RuntimeError("call reset(seed) before observe()")
        s = self._state.astype(np.float32)
        return {"image": self._renderer.render() if render else None, "proprio": s[:4].copy(),
                "goal": s[36:39].copy(), "state": s, "task": self.task}

    def close(self) -> None:
        self._renderer.close()
        self._env.close()

    def __enter__(self) -> MT10Env:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
