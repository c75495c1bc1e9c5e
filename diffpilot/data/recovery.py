"""Recovery windows: the logged drive displaced sideways at one keyframe, with a future that steers back.

A planner trained only on logged windows has only seen the car on the
logged path. In closed loop, a small lateral error is then never corrected.
It grows until the car leaves its lane: the classic compounding error of
behaviour cloning. ChauffeurNet's remedy is used here. The ego at keyframe
``f`` is shifted sideways by ``d`` and turned by ``psi``. Its past drifts
into that pose, and its future returns to the logged path within
``recover_s``. Both follow cubic Hermite curves of the lateral offset along
the logged path, so positions, headings and the finite-difference ego status
agree. :func:`~diffpilot.data.scene_sample.build_scene_sample` then rebuilds
the agents, lanes and map elements around the displaced ego, as the
simulator does.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from diffpilot.data.errors import DatasetError
from diffpilot.data.geometry import box_corners, boxes_overlap
from diffpilot.data.scenario import DT, SampleSpec, SceneSample, ScenarioLog, wrap_angle
from diffpilot.data.scene_sample import build_scene_sample, ego_status_from_log

__all__ = ["RECOVERY_FORMAT", "RecoverySpec", "displaced_log", "lateral_offset", "recovery_samples"]

RECOVERY_FORMAT = 2
"""Bumped whenever the same settings make different windows (2: the box overlap test), so cached windows rebuild."""


@dataclass(frozen=True)
class RecoverySpec:
    """How many recovery windows to make per logged keyframe, and how far off the logged path they start.

    The offsets are drawn uniformly from ``[-lateral_m, lateral_m]`` and
    ``[-heading_deg, heading_deg]``. Keyframes where the logged ego drives
    slower than ``min_speed`` get none: a car cannot be displaced sideways
    at standstill.
    """

    copies: int = 0
    lateral_m: float = 1.5
    heading_deg: float = 6.0
    recover_s: float = 2.5
    approach_s: float = 2.0
    min_speed: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        bad = []
        if self.copies < 0:
            bad.append(f"copies={self.copies} (must be >= 0)")
        if self.lateral_m < 0:
            bad.append(f"lateral_m={self.lateral_m} (must be >= 0)")
        if not 0 <= self.heading_deg < 45:
            bad.append(f"heading_deg={self.heading_deg} (must be in [0, 45))")
        if self.recover_s < DT or self.approach_s < DT:
            bad.append(f"recover_s={self.recover_s}, approach_s={self.approach_s} (each must be >= {DT} s)")
        if self.min_speed < 0.5:
            bad.append(f"min_speed={self.min_speed} (must be >= 0.5 m/s)")
        if bad:
            raise ValueError("invalid recovery settings: " + "; ".join(bad))


def _hermite(u: np.ndarray, y0: float, m0: float, y1: float, m1: float, length: float) -> tuple[np.ndarray, np.ndarray]:
    """Value and time derivative of the cubic Hermite curve from (y0, slope m0) to (y1, m1) over ``length`` s."""
    u2, u3 = u * u, u * u * u
    value = (2 * u3 - 3 * u2 + 1) * y0 + (u3 - 2 * u2 + u) * length * m0 + (-2 * u3 + 3 * u2) * y1 + (u3 - u2) * length * m1
    slope = ((6 * u2 - 6 * u) * y0 + (3 * u2 - 4 * u + 1) * length * m0 + (-6 * u2 + 6 * u) * y1 + (3 * u2 - 2 * u) * length * m1)
    return value, slope / length


def lateral_offset(t: np.ndarray, lateral_m: float, slope: float, recover_s: float, approach_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Offset (m) and its rate (m/s) at times ``t`` relative to the displaced keyframe.

    Zero before ``-approach_s`` and after ``recover_s``; ``lateral_m`` with
    rate ``slope`` at t = 0; C1 in between.
    """
    t = np.asarray(t, dtype=np.float64)
    d, r = np.zeros_like(t), np.zeros_like(t)
    past = (t > -approach_s) & (t <= 0)
    fut = (t > 0) & (t < recover_s)
    d[past], r[past] = _hermite((t[past] + approach_s) / approach_s, 0.0, 0.0, lateral_m, slope, approach_s)
    d[fut], r[fut] = _hermite(t[fut] / recover_s, lateral_m, slope, 0.0, 0.0, recover_s)
    return d, r


def _path_speed(poses: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Speed along the logged path at each keyframe (central differences, one-sided at the ends)."""
    if len(poses) < 2:
        return np.zeros(len(poses))
    return np.linalg.norm(np.gradient(poses[:, :2], times, axis=0), axis=1)


def displaced_log(log: ScenarioLog, frame: int, lateral_m: float, heading_rad: float, recover_s: float = 2.5,
                  approach_s: float = 2.0) -> ScenarioLog:
    """A copy of ``log`` whose ego is ``lateral_m`` to the left (negative: right) of the logged path at ``frame``, turned
    by about ``heading_rad``, drifting in over ``approach_s`` and back onto the path within ``recover_s``.

    Each pose moves along the logged path's left normal. Its heading turns
    by ``atan(rate / speed)``, so the heading follows the displaced path.
    """
    T = log.num_frames
    if not 0 <= frame < T:
        raise DatasetError(f"frame {frame} is outside scene {log.scene_name!r}, which has {T} keyframes (0..{T - 1})")
    poses = np.asarray(log.ego_pose, dtype=np.float64)
    times = np.asarray(log.times, dtype=np.float64)
    speed = np.maximum(_path_speed(poses, times), 1.0)
    slope = float(speed[frame] * np.tan(heading_rad))
    d, rate = lateral_offset(times - times[frame], lateral_m, slope, recover_s, approach_s)
    yaw = poses[:, 2]
    out = poses.copy()
    out[:, 0] -= d * np.sin(yaw)
    out[:, 1] += d * np.cos(yaw)
    out[:, 2] = wrap_angle(yaw + np.arctan2(rate, speed))
    return replace(log, ego_pose=out)


def _clear_of_agents(log: ScenarioLog, frame: int, margin_m: float = 0.3) -> bool:
    """Whether the displaced ego's box, grown by ``margin_m`` on each side, overlaps no agent present at ``frame``."""
    if not len(log.agents_token):
        return True
    valid = np.asarray(log.agents_valid, dtype=bool)[:, frame]
    if not valid.any():
        return True
    ego = box_corners(np.asarray(log.ego_pose, dtype=np.float64)[frame], np.asarray(log.ego_size, dtype=np.float64) + 2 * margin_m)
    agents = box_corners(np.asarray(log.agents_pose, dtype=np.float64)[valid, frame],
                         np.asarray(log.agents_size, dtype=np.float64)[valid])
    return not bool(boxes_overlap(ego[None], agents).any())


def recovery_samples(logs: Iterable[ScenarioLog], spec: SampleSpec, recovery: RecoverySpec) -> list[SceneSample]:
    """``recovery.copies`` displaced windows per keyframe of each log (the keyframes :func:`load_scene_samples` uses).

    Draws depend only on (seed, scene token, frame, copy), so a subset of
    scenes gets the same windows as the full set. Copies whose displaced
    ego would overlap an agent are dropped. Tokens are ``<token>#r<copy>``.
    """
    out: list[SceneSample] = []
    if recovery.copies == 0:
        return out
    max_heading = np.deg2rad(recovery.heading_deg)
    for log in logs:
        for frame in range(spec.past_steps, log.num_frames - 1):
            if ego_status_from_log(log, frame)[0] < recovery.min_speed:
                continue
            for copy in range(recovery.copies):
                rng = np.random.default_rng([recovery.seed, zlib.crc32(log.scene_token.encode()), frame, copy])
                lat = float(rng.uniform(-recovery.lateral_m, recovery.lateral_m))
                psi = float(rng.uniform(-max_heading, max_heading))
                moved = displaced_log(log, frame, lat, psi, recovery.recover_s, recovery.approach_s)
                if not _clear_of_agents(moved, frame):
                    continue
                sample = build_scene_sample(moved, frame, spec)
                out.append(replace(sample, token=f"{sample.token}#r{copy}"))
    return out
