"""Open-loop driving metrics on nuScenes-style samples: L2 and collision rate at 1/2/3 s.

Two conventions exist in the literature: the value *at* the horizon
(UniAD) and the mean over all waypoints *up to* the horizon (ST-P3).
``mode="at"`` (default) or ``mode="avg"`` picks one; reports must say which.
Plans and ground truth are ego-frame poses at DT spacing starting DT after now.
"""

from __future__ import annotations

import numpy as np

from diffpilot.data.scenario import DT, EGO_SIZE
from diffpilot.data.geometry import box_corners, boxes_overlap


def _horizon_index(h: float, steps: int) -> int:
    k = int(round(h / DT)) - 1
    if abs((k + 1) * DT - h) > 1e-6 or k < 0:
        raise ValueError(f"horizon {h} s is not a positive multiple of DT = {DT} s")
    if k >= steps:
        raise ValueError(f"horizon {h} s needs {k + 1} waypoints, the trajectories have {steps}")
    return k


def _key(prefix: str, h: float) -> str:
    return f"{prefix}_{h:g}s"


def l2_at(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray, horizons_s=(1.0, 2.0, 3.0), mode: str = "at") -> dict[str, float]:
    """Mean L2 (m) between planned and true xy at each horizon: ``{"l2_1s": …}``.

    ``pred`` and ``gt`` are (B, H, ≥2) or (H, ≥2); ``valid`` (B, H) or (H,)
    masks waypoints past the end of the log. Samples with an invalid
    waypoint at (or, for "avg", up to) the horizon are left out of that
    horizon's mean; the value is NaN when none is left.
    """
    if mode not in ("at", "avg"):
        raise ValueError(f"mode must be 'at' or 'avg', got {mode!r}")
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    if pred.ndim == 2:
        pred, gt, valid = pred[None], gt[None], valid[None]
    if pred.shape[:2] != gt.shape[:2] or valid.shape != pred.shape[:2] or pred.shape[-1] < 2 or gt.shape[-1] < 2:
        raise ValueError(f"pred {pred.shape}, gt {gt.shape} and valid {valid.shape} must agree as (B, H, >=2) and (B, H)")
    err = np.linalg.norm(pred[..., :2] - gt[..., :2], axis=-1)  # (B, H)
    out = {}
    for h in horizons_s:
        k = _horizon_index(h, pred.shape[1])
        if mode == "at":
            ok = valid[:, k]
            vals = err[ok, k]
        else:
            ok = valid[:, : k + 1].all(axis=1)
            vals = err[ok, : k + 1].mean(axis=1)
        out[_key("l2", h)] = float(vals.mean()) if len(vals) else float("nan")
    return out


def collision_at(
    pred: np.ndarray,
    agents_pose: np.ndarray,
    agents_valid: np.ndarray,
    agents_size: np.ndarray,
    past_steps: int,
    horizons_s=(1.0, 2.0, 3.0),
    mode: str = "at",
    ego_size: tuple[float, float] = EGO_SIZE,
) -> dict[str, float]:
    """Fraction of samples whose planned ego box overlaps a (logged) agent box: ``{"collision_1s": …}``.

    ``pred`` (B, H, 3) ego-frame plans; ``agents_pose`` (B, K, P+1+F, 3) and
    ``agents_valid`` (B, K, P+1+F) as in a SceneSample (the plan's waypoint
    j is column ``past_steps + 1 + j``); ``agents_size`` (B, K, 2). "at"
    checks the waypoint at the horizon, "avg" averages the per-waypoint
    collision indicator over the waypoints up to it. Unbatched inputs (no B) work too.
    """
    if mode not in ("at", "avg"):
        raise ValueError(f"mode must be 'at' or 'avg', got {mode!r}")
    pred = np.asarray(pred, dtype=np.float64)
    agents_pose = np.asarray(agents_pose, dtype=np.float64)
    agents_valid = np.asarray(agents_valid, dtype=bool)
    agents_size = np.asarray(agents_size, dtype=np.float64)
    if pred.ndim == 2:
        pred, agents_pose, agents_valid, agents_size = pred[None], agents_pose[None], agents_valid[None], agents_size[None]
    if pred.shape[-1] != 3:
        raise ValueError(f"pred must be ego-frame poses (B, H, 3) with yaw, got {pred.shape}")
    B, H = pred.shape[:2]
    if agents_pose.ndim != 4 or agents_pose.shape[0] != B or agents_valid.shape != agents_pose.shape[:3] or agents_size.shape != agents_pose.shape[:2] + (2,):
        raise ValueError(
            f"agents must be pose (B, K, T, 3), valid (B, K, T), size (B, K, 2) with B = {B}; "
            f"got {agents_pose.shape}, {agents_valid.shape}, {agents_size.shape}"
        )
    cols = past_steps + 1 + np.arange(H)
    if cols[-1] >= agents_pose.shape[2]:
        raise ValueError(f"agents cover {agents_pose.shape[2]} steps; past_steps={past_steps} plus {H} waypoints need {cols[-1] + 1}")
    ego_c = box_corners(pred, np.broadcast_to(np.asarray(ego_size, dtype=np.float64), pred.shape[:2] + (2,)))  # (B, H, 4, 2)
    fut = agents_pose[:, :, cols]  # (B, K, H, 3)
    ag_c = box_corners(fut, np.broadcast_to(agents_size[:, :, None, :], fut.shape[:3] + (2,)))
    hit = (boxes_overlap(ego_c[:, None], ag_c) & agents_valid[:, :, cols]).any(axis=1)  # (B, H)
    out = {}
    for h in horizons_s:
        k = _horizon_index(h, H)
        val = hit[:, k].mean() if mode == "at" else hit[:, : k + 1].mean(axis=1).mean()
        out[_key("collision", h)] = float(val)
    return out
