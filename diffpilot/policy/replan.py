"""The last kept plan, carried into the next replan (numpy only: the torch planner and the torch-free runtime share it).

Warm start denoises from it and plan consistency keeps to the candidate
nearest it. Both need it in the current ego frame, advanced by the
keyframes elapsed since it was made, which is what :meth:`PlanMemory.shifted` gives.
"""

from __future__ import annotations

import numpy as np

from diffpilot.data.frames import to_ego_frame, to_global_frame

__all__ = ["PlanMemory"]


class PlanMemory:
    """The last kept plan of one episode, in the global frame, with the keyframe it was made at."""

    def __init__(self, horizon: int) -> None:
        self.horizon = int(horizon)
        self._poses: np.ndarray | None = None
        self._frame = 0.0

    def clear(self) -> None:
        """Forget it (a new episode)."""
        self._poses = None

    def remember(self, plan: np.ndarray, origin: np.ndarray, frame: float) -> None:
        """Keep ``plan`` (F, 3), ego-frame poses of the pose ``origin`` (3,), made at keyframe ``frame``."""
        self._poses = to_global_frame(np.asarray(plan, dtype=np.float64), np.asarray(origin, dtype=np.float64))
        self._frame = float(frame)

    def shifted(self, origin: np.ndarray, frame: float) -> tuple[np.ndarray, np.ndarray] | None:
        """The remembered plan in the ego frame of ``origin`` at keyframe ``frame``, or None.

        Returns ``(poses (F, 3), covered (F,) bool)``: the waypoints from the
        elapsed time on, extended by repeating the last step (heading
        unwrapped), and which of them the old plan really covered. None when
        nothing is remembered or it is not 1..F-1 keyframes old.
        """
        if self._poses is None:
            return None
        k = int(round(float(frame) - self._frame))  # keyframes elapsed
        if not 1 <= k < self.horizon:
            return None
        local = to_ego_frame(self._poses, np.asarray(origin, dtype=np.float64))[k:]
        step = local[-1] - (local[-2] if len(local) > 1 else np.zeros(3))
        tail = local[-1] + step * np.arange(1, k + 1)[:, None]
        poses = np.concatenate([local, tail])
        turns = np.diff(poses[:, 2])  # unwrapped: each turn between waypoints taken the short way round
        poses[1:, 2] = poses[0, 2] + np.cumsum(turns - (2 * np.pi) * np.round(turns / (2 * np.pi)))
        return poses, np.arange(self.horizon) < self.horizon - k

    @property
    def moving(self) -> bool:
        """Whether the remembered plan goes anywhere (a standstill plan binds nothing)."""
        return self._poses is not None and bool(np.any(self._poses[:, :2] != self._poses[:1, :2]))
