"""Ego-frame and global-frame poses, and angle wrapping (numpy only: the torch-free runtime imports it)."""

from __future__ import annotations

import numpy as np

__all__ = ["to_ego_frame", "to_global_frame", "wrap_angle"]


def to_ego_frame(poses: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Global poses ``(..., 3)`` into the frame of the pose ``origin`` (3,)."""
    c, s = np.cos(origin[2]), np.sin(origin[2])
    dx = poses[..., 0] - origin[0]
    dy = poses[..., 1] - origin[1]
    out = np.empty(np.broadcast_shapes(poses.shape), dtype=np.float64)
    out[..., 0] = c * dx + s * dy
    out[..., 1] = -s * dx + c * dy
    out[..., 2] = wrap_angle(poses[..., 2] - origin[2])
    return out


def to_global_frame(poses: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Ego-frame poses ``(..., 3)`` of the pose ``origin`` back to global."""
    c, s = np.cos(origin[2]), np.sin(origin[2])
    out = np.empty(np.broadcast_shapes(poses.shape), dtype=np.float64)
    out[..., 0] = origin[0] + c * poses[..., 0] - s * poses[..., 1]
    out[..., 1] = origin[1] + s * poses[..., 0] + c * poses[..., 1]
    out[..., 2] = wrap_angle(poses[..., 2] + origin[2])
    return out


def wrap_angle(angle: np.ndarray) -> np.ndarray:
    """Angles into [-pi, pi)."""
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi
