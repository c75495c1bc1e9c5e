"""Oriented boxes: corners and a vectorized separating-axis overlap test.

Collision checks run for every ego step against every agent, so they are
done on arrays here (one numpy pass over all pairs) rather than with one
shapely polygon per box; tests check the two agree.
"""

from __future__ import annotations

import numpy as np

# Corner order: front-left, rear-left, rear-right, front-right (counter-clockwise).
_CORNER_SIGNS = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])


def box_corners(poses: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Corners ``(..., 4, 2)`` of boxes centred at ``poses`` (..., 3) with ``sizes`` (..., 2) = (length, width).

    Order: front-left, rear-left, rear-right, front-right.
    """
    poses = np.asarray(poses, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    if poses.shape[-1] != 3 or sizes.shape[-1] != 2:
        raise ValueError(f"poses must end in 3 (x, y, yaw) and sizes in 2 (length, width), got {poses.shape} and {sizes.shape}")
    half = 0.5 * sizes[..., None, :] * _CORNER_SIGNS  # (..., 4, 2) in the box frame
    c = np.cos(poses[..., 2])[..., None]
    s = np.sin(poses[..., 2])[..., None]
    gx = poses[..., 0][..., None] + c * half[..., 0] - s * half[..., 1]
    gy = poses[..., 1][..., None] + s * half[..., 0] + c * half[..., 1]
    return np.stack([gx, gy], axis=-1)


def _box_axes(corners: np.ndarray) -> np.ndarray:
    """The two edge normals (unit) of each rectangle: (..., 2, 2)."""
    e0 = corners[..., 0, :] - corners[..., 1, :]  # along the length
    e1 = corners[..., 0, :] - corners[..., 3, :]  # along the width
    axes = np.stack([e0, e1], axis=-2)
    norm = np.linalg.norm(axes, axis=-1, keepdims=True)
    return axes / np.maximum(norm, 1e-12)


def boxes_overlap(a_corners: np.ndarray, b_corners: np.ndarray) -> np.ndarray:
    """Whether rectangles overlap (interiors or boundaries touch), broadcasting over leading dims.

    Separating-axis theorem: two convex polygons are disjoint iff the
    projections on one of their edge normals do not overlap; a rectangle
    has two distinct normals, so four axes decide.
    """
    a = np.asarray(a_corners, dtype=np.float64)
    b = np.asarray(b_corners, dtype=np.float64)
    if a.shape[-2:] != (4, 2) or b.shape[-2:] != (4, 2):
        raise ValueError(f"corners must end in (4, 2), got {a.shape} and {b.shape}")
    a, b = np.broadcast_arrays(a, b)
    axes = np.concatenate([_box_axes(a), _box_axes(b)], axis=-2)  # (..., 4, 2)
    pa = np.einsum("...kd,...cd->...kc", axes, a)  # (..., 4 axes, 4 corners)
    pb = np.einsum("...kd,...cd->...kc", axes, b)
    separated = (pa.max(-1) < pb.min(-1)) | (pb.max(-1) < pa.min(-1))
    return ~separated.any(-1)


def points_in_boxes(points: np.ndarray, poses: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Whether ``points`` (..., 2) lie inside boxes (..., 3)/(..., 2), broadcasting."""
    points = np.asarray(points, dtype=np.float64)
    poses = np.asarray(poses, dtype=np.float64)
    dx = points[..., 0] - poses[..., 0]
    dy = points[..., 1] - poses[..., 1]
    c, s = np.cos(poses[..., 2]), np.sin(poses[..., 2])
    lon = c * dx + s * dy
    lat = -s * dx + c * dy
    return (np.abs(lon) <= 0.5 * sizes[..., 0]) & (np.abs(lat) <= 0.5 * sizes[..., 1])
