"""PDM score (NAVSIM's definition) of a driven ego trajectory.

    PDMS = NC · DAC · (5·TTC + 5·EP + 2·C) / 12

* NC — no at-fault collision ∈ {0, ½, 1}. A collision is classified as in
  nuPlan/NAVSIM: ignored while the ego is stopped and when the other hits
  the ego from behind; at fault when the ego's front hits something, when
  it hits a stopped object, or on a lateral contact while the ego straddles
  lanes or is off the drivable area. At fault with a vehicle, pedestrian or
  bicycle gives 0, with a static object (the 'other' class) ½. Each agent
  counts once.
* DAC — drivable-area compliance ∈ {0, 1}: every corner of the ego box on
  the drivable area at every step.
* TTC — time to collision ∈ {0, 1}: the ego box projected ahead at constant
  velocity by 0, 0.3, 0.6, 0.9 s must not touch an agent (at that future
  time) that is ahead of the ego (or not behind it, while the ego straddles
  lanes or is off-road). Agents already collided with are not counted twice.
* EP — ego progress along the route, relative to a reference planner:
  progress / max(progress, reference), 1 when both are under 5 m.
* C — comfort ∈ {0, 1}: NAVSIM's bounds on longitudinal and lateral
  acceleration, jerk, yaw rate and yaw acceleration, on Savitzky–Golay
  derivatives.

Poses are box centres. The reference planner of NAVSIM (PDM-Closed) is not
available here; by default the reference is the logged human drive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import shapely
from scipy.signal import savgol_filter

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import CATEGORIES, DT, LANE_HALF_WIDTH_M, ScenarioLog, to_global_frame, wrap_angle
from diffpilot.sim.driving.agents import replay_agents, track_velocities
from diffpilot.data.geometry import box_corners, boxes_overlap
from diffpilot.sim.driving.tracker import LQRTracker, track
from diffpilot.sim.driving.vehicle import CONTROL_DT, KinematicBicycle

if TYPE_CHECKING:
    from diffpilot.sim.driving.simulator import Rollout

EGO_STOPPED_SPEED = 5e-2
"""m/s; nuPlan's threshold under which a collision is the other party's (ego stopped)."""
AGENT_STOPPED_SPEED = 0.3
"""m/s; an agent slower than this counts as stopped. Higher than nuPlan's, because agent speeds
here are finite differences of 2 Hz annotations, whose jitter alone reads as ~0.1 m/s."""
REAR_AXLE_TO_CENTER_M = 1.3
"""How far the ego's rear axle sits behind its box centre (nuScenes Renault Zoe)."""
TTC_HORIZONS_S = (0.0, 0.3, 0.6, 0.9)
PROGRESS_FLOOR_M = 5.0
AHEAD_ANGLE_RAD = np.deg2rad(30.0)
BEHIND_ANGLE_RAD = np.deg2rad(150.0)
COMFORT_BOUNDS = {
    "lon_accel_min": -4.05,
    "lon_accel_max": 2.40,
    "lat_accel_abs": 4.89,
    "jerk_abs": 8.37,
    "lon_jerk_abs": 4.13,
    "yaw_accel_abs": 1.93,
    "yaw_rate_abs": 0.95,
}
"""NAVSIM's comfort bounds (m/s², m/s³, rad/s², rad/s)."""
_STATIC = CATEGORIES.index("other")

STOPPED_EGO, STOPPED_TRACK, ACTIVE_REAR, ACTIVE_FRONT, ACTIVE_LATERAL = (
    "stopped_ego", "stopped_track", "active_rear", "active_front", "active_lateral",
)


@dataclass
class CollisionEvent:
    """First contact between the ego and one agent."""

    step: int
    agent: int
    kind: str
    at_fault: bool
    score: float  # what this contact does to NC


def _as_size(size: tuple[float, float] | np.ndarray) -> np.ndarray:
    size = np.asarray(size, dtype=np.float64).reshape(-1)
    if size.shape != (2,) or np.any(size <= 0):
        raise ValueError(f"ego size must be (length, width) > 0, got {size}")
    return size


def _bearing(from_poses: np.ndarray, points: np.ndarray) -> np.ndarray:
    """|angle| between each pose's heading and the direction to ``points`` (broadcasting)."""
    d = points[..., :2] - from_poses[..., :2]
    return np.abs(wrap_angle(np.arctan2(d[..., 1], d[..., 0]) - from_poses[..., 2]))


def _rear_axle(ego_poses: np.ndarray) -> np.ndarray:
    out = ego_poses.copy()
    out[..., 0] -= REAR_AXLE_TO_CENTER_M * np.cos(ego_poses[..., 2])
    out[..., 1] -= REAR_AXLE_TO_CENTER_M * np.sin(ego_poses[..., 2])
    return out


def collision_events(
    ego_poses: np.ndarray,
    ego_speed: np.ndarray,
    ego_size: tuple[float, float],
    agents_pose: np.ndarray,
    agents_valid: np.ndarray,
    agents_size: np.ndarray,
    agents_category: np.ndarray,
    agents_speed: np.ndarray,
    ego_off_lane: np.ndarray | None = None,
) -> list[CollisionEvent]:
    """Every agent the ego touches, classified at its first contact (nuPlan's collision types)."""
    ego_poses = np.asarray(ego_poses, dtype=np.float64)
    n = len(ego_poses)
    agents_pose = np.asarray(agents_pose, dtype=np.float64).reshape(-1, n, 3)
    agents_valid = np.asarray(agents_valid, dtype=bool).reshape(-1, n)
    if len(agents_pose) == 0:
        return []
    size = _as_size(ego_size)
    off_lane = np.zeros(n, dtype=bool) if ego_off_lane is None else np.asarray(ego_off_lane, dtype=bool)
    ego_c = box_corners(ego_poses, np.broadcast_to(size, (n, 2)))
    ag_c = box_corners(agents_pose, np.broadcast_to(np.asarray(agents_size, dtype=np.float64)[:, None, :], agents_pose.shape[:2] + (2,)))
    hit = boxes_overlap(ego_c[None], ag_c) & agents_valid  # (A, N)
    if not hit.any():
        return []
    # The front bumper as a thin box: contact with it is a frontal collision.
    front = ego_poses.copy()
    front[:, 0] += (0.5 * size[0] - 0.01) * np.cos(ego_poses[:, 2])
    front[:, 1] += (0.5 * size[0] - 0.01) * np.sin(ego_poses[:, 2])
    front_c = box_corners(front, np.broadcast_to(np.array([0.02, size[1]]), (n, 2)))
    rear_axle = _rear_axle(ego_poses)
    events = []
    for a in np.flatnonzero(hit.any(axis=1)):
        i = int(np.argmax(hit[a]))
        category = int(agents_category[a])
        if ego_speed[i] <= EGO_STOPPED_SPEED:
            kind = STOPPED_EGO
        elif agents_speed[a, i] <= AGENT_STOPPED_SPEED or category == _STATIC:
            kind = STOPPED_TRACK
        elif _bearing(rear_axle[i], agents_pose[a, i]) > np.pi / 2:
            kind = ACTIVE_REAR
        elif bool(boxes_overlap(front_c[i], ag_c[a, i])):
            kind = ACTIVE_FRONT
        else:
            kind = ACTIVE_LATERAL
        at_fault = kind in (STOPPED_TRACK, ACTIVE_FRONT) or (kind == ACTIVE_LATERAL and bool(off_lane[i]))
        score = (0.5 if category == _STATIC else 0.0) if at_fault else 1.0
        events.append(CollisionEvent(i, int(a), kind, at_fault, score))
    return sorted(events, key=lambda e: (e.step, e.agent))


def no_at_fault_collision(
    ego_poses: np.ndarray,
    ego_speed: np.ndarray,
    ego_size: tuple[float, float],
    agents_pose: np.ndarray,
    agents_valid: np.ndarray,
    agents_size: np.ndarray,
    agents_category: np.ndarray,
    agents_speed: np.ndarray,
    ego_off_lane: np.ndarray | None = None,
) -> float:
    """NC ∈ {0, 0.5, 1}: the worst at-fault collision over the drive (see :func:`collision_events`)."""
    events = collision_events(ego_poses, ego_speed, ego_size, agents_pose, agents_valid, agents_size,
                              agents_category, agents_speed, ego_off_lane)
    return float(min((e.score for e in events), default=1.0))


def _prepared(drivable: shapely.Geometry) -> shapely.Geometry:
    if drivable is None or drivable.is_empty:
        raise DatasetError("the scene's map has no drivable area; DAC cannot be scored (rebuild the map geometry)")
    if not shapely.is_prepared(drivable):
        shapely.prepare(drivable)
    return drivable


def corners_on_drivable(ego_poses: np.ndarray, ego_size: tuple[float, float], drivable: shapely.Geometry) -> np.ndarray:
    """(N,) whether all four corners of the ego box lie on the drivable area."""
    ego_poses = np.asarray(ego_poses, dtype=np.float64)
    corners = box_corners(ego_poses, np.broadcast_to(_as_size(ego_size), ego_poses.shape[:-1] + (2,)))
    inside = shapely.intersects_xy(_prepared(drivable), corners[..., 0], corners[..., 1])
    return inside.all(axis=-1)


def drivable_area_compliance(ego_poses: np.ndarray, ego_size: tuple[float, float], drivable: shapely.Geometry) -> float:
    """DAC ∈ {0, 1}: 1 iff every corner of the ego box is on the drivable area at every step."""
    return float(corners_on_drivable(ego_poses, ego_size, drivable).all())


def time_to_collision_ok(
    ego_poses: np.ndarray,
    ego_speed: np.ndarray,
    ego_size: tuple[float, float],
    agents_pose: np.ndarray,
    agents_valid: np.ndarray,
    agents_size: np.ndarray,
    dt: float,
    ego_off_lane: np.ndarray | None = None,
    ignore_agents: np.ndarray | None = None,
    horizons_s: tuple[float, ...] = TTC_HORIZONS_S,
) -> float:
    """TTC ∈ {0, 1}: 0 if the constant-velocity ego box meets an agent ahead within 0.9 s.

    At each step the ego box is shifted along its heading by speed·τ for
    τ in ``horizons_s`` and checked against the agents at that future step;
    a hit counts when the agent is ahead of the projected ego (within 30°
    of its heading, seen from its rear axle) or, while the ego straddles
    lanes or is off-road, anywhere but behind it. ``ignore_agents`` (A,) masks agents the ego collided with.
    """
    ego_poses = np.asarray(ego_poses, dtype=np.float64)
    n = len(ego_poses)
    agents_pose = np.asarray(agents_pose, dtype=np.float64).reshape(-1, n, 3)
    agents_valid = np.asarray(agents_valid, dtype=bool).reshape(-1, n).copy()
    if len(agents_pose) == 0:
        return 1.0
    if ignore_agents is not None:
        agents_valid[np.asarray(ignore_agents, dtype=bool)] = False
    size = _as_size(ego_size)
    off_lane = np.zeros(n, dtype=bool) if ego_off_lane is None else np.asarray(ego_off_lane, dtype=bool)
    ego_speed = np.asarray(ego_speed, dtype=np.float64)
    moving = ego_speed > EGO_STOPPED_SPEED
    heading = np.stack([np.cos(ego_poses[:, 2]), np.sin(ego_poses[:, 2])], axis=1)
    ag_sizes = np.asarray(agents_size, dtype=np.float64)
    for tau in horizons_s:
        k = int(round(tau / dt))
        if k >= n:
            continue
        m = n - k
        shifted = ego_poses[:m].copy()
        shifted[:, :2] += (ego_speed[:m] * tau)[:, None] * heading[:m]
        ego_c = box_corners(shifted, np.broadcast_to(size, (m, 2)))
        fut_pose = agents_pose[:, k:]
        ag_c = box_corners(fut_pose, np.broadcast_to(ag_sizes[:, None, :], fut_pose.shape[:2] + (2,)))
        hit = boxes_overlap(ego_c[None], ag_c) & agents_valid[:, k:] & moving[None, :m]
        if not hit.any():
            continue
        # Ahead of / behind where the projected ego will be, not where it is now.
        bearing = _bearing(_rear_axle(shifted)[None], fut_pose)
        counts = (bearing < AHEAD_ANGLE_RAD) | (off_lane[None, :m] & (bearing < BEHIND_ANGLE_RAD))
        if (hit & counts).any():
            return 0.0
    return 1.0


def ego_progress(progress_m: float, reference_progress_m: float) -> float:
    """EP = progress / max(progress, reference) clipped to [0, 1]; 1 when both are under the 5 m floor."""
    best = max(float(progress_m), float(reference_progress_m))
    if best < PROGRESS_FLOOR_M:
        return 1.0
    return float(np.clip(progress_m / best, 0.0, 1.0))


def _deriv(y: np.ndarray, dt: float, order: int, window: int) -> np.ndarray:
    window = min(window, len(y))
    if window <= 2:  # too short to smooth: plain differences
        out = y
        for _ in range(order):
            out = np.gradient(out, dt) if len(out) > 1 else np.zeros_like(out)
        return out
    return savgol_filter(y, window, min(2, window - 1), deriv=order, delta=dt, mode="interp")


def comfort_metrics(ego_states: np.ndarray, dt: float) -> dict[str, np.ndarray]:
    """Per-step kinematics NAVSIM's comfort bounds apply to (Savitzky–Golay, polynomial order 2)."""
    ego_states = np.asarray(ego_states, dtype=np.float64)
    if ego_states.ndim != 2 or ego_states.shape[1] < 4:
        raise ValueError(f"ego_states must be (N, 5) = (x, y, yaw, speed, steer), got {ego_states.shape}")
    speed = ego_states[:, 3]
    yaw = np.unwrap(ego_states[:, 2])
    lon_accel = _deriv(speed, dt, 1, 8)
    yaw_rate = _deriv(yaw, dt, 1, 15)
    yaw_accel = _deriv(yaw, dt, 2, 15)
    lat_accel = speed * yaw_rate
    lon_jerk = _deriv(lon_accel, dt, 1, 15)
    lat_jerk = _deriv(lat_accel, dt, 1, 15)
    return {
        "lon_accel": lon_accel,
        "lat_accel": lat_accel,
        "jerk": np.hypot(lon_jerk, lat_jerk),
        "lon_jerk": lon_jerk,
        "yaw_accel": yaw_accel,
        "yaw_rate": yaw_rate,
    }


def comfort(ego_states: np.ndarray, dt: float) -> float:
    """C ∈ {0, 1}: 1 iff every comfort quantity stays within NAVSIM's bounds at every step."""
    if len(ego_states) < 2:
        return 1.0
    m = comfort_metrics(ego_states, dt)
    b = COMFORT_BOUNDS
    ok = (
        np.all(m["lon_accel"] >= b["lon_accel_min"])
        and np.all(m["lon_accel"] <= b["lon_accel_max"])
        and np.all(np.abs(m["lat_accel"]) <= b["lat_accel_abs"])
        and np.all(m["jerk"] <= b["jerk_abs"])
        and np.all(np.abs(m["lon_jerk"]) <= b["lon_jerk_abs"])
        and np.all(np.abs(m["yaw_accel"]) <= b["yaw_accel_abs"])
        and np.all(np.abs(m["yaw_rate"]) <= b["yaw_rate_abs"])
    )
    return float(ok)


def pdm_score(nc: float, dac: float, ttc: float, ep: float, c: float) -> float:
    """PDMS = NC·DAC·(5·TTC + 5·EP + 2·C)/12."""
    return float(nc * dac * (5.0 * ttc + 5.0 * ep + 2.0 * c) / 12.0)


# --- route and lanes -------------------------------------------------------------------------


def route_poses(log: ScenarioLog) -> np.ndarray:
    """(M, 3) centreline poses of the route lanes (the logged ego path where the scene has no route)."""
    index = {tok: i for i, tok in enumerate(log.map.lane_tokens)}
    pieces = []
    for tok in log.route:
        if tok not in index:
            raise DatasetError(f"scene {log.scene_name!r}: route lane {tok!r} is not in the map's lane_tokens; rebuild the route")
        lane = np.asarray(log.map.lanes[index[tok]], dtype=np.float64)
        if len(lane):
            pieces.append(lane[:, :3])
    if pieces:
        return np.concatenate(pieces)
    return np.asarray(log.ego_pose, dtype=np.float64)


def route_progress(ego_xy: np.ndarray, log: ScenarioLog) -> float:
    """Metres driven along the route lanes by the path ``ego_xy`` (N, 2).

    Each step's displacement is projected on the direction of the nearest
    route centreline point, so sideways motion (a lane change) adds nothing,
    driving against the route subtracts, and route lanes that do not join
    end to end (lane changes, connectors) need no stitching.
    """
    ego_xy = np.asarray(ego_xy, dtype=np.float64)
    if ego_xy.ndim != 2 or ego_xy.shape[1] < 2 or len(ego_xy) < 1 or not np.all(np.isfinite(ego_xy[:, :2])):
        raise ValueError(f"ego_xy must be finite (N>=1, 2), got shape {ego_xy.shape}")
    if len(ego_xy) < 2:
        return 0.0
    route = route_poses(log)
    step = np.diff(ego_xy[:, :2], axis=0)
    mid = 0.5 * (ego_xy[1:, :2] + ego_xy[:-1, :2])
    total = 0.0
    for lo in range(0, len(mid), 256):  # bounded memory on long drives
        m = mid[lo : lo + 256]
        j = np.argmin(np.sum((m[:, None, :] - route[None, :, :2]) ** 2, axis=-1), axis=1)
        yaw = route[j, 2]
        total += float(np.sum(step[lo : lo + 256, 0] * np.cos(yaw) + step[lo : lo + 256, 1] * np.sin(yaw)))
    return total


def ego_off_lane(ego_poses: np.ndarray, ego_size: tuple[float, float], log: ScenarioLog,
                 lane_half_width: float = LANE_HALF_WIDTH_M) -> np.ndarray:
    """(N,) whether the ego box leaves its lane: a corner more than ``lane_half_width`` from the
    centreline of the lane nearest the box centre (same direction of travel), or off the drivable area."""
    ego_poses = np.asarray(ego_poses, dtype=np.float64)
    n = len(ego_poses)
    offroad = ~corners_on_drivable(ego_poses, ego_size, log.map.drivable)
    lanes = [np.asarray(lane, dtype=np.float64) for lane in log.map.lanes if len(lane) > 0]
    if not lanes:
        return offroad
    pts = np.concatenate(lanes)
    lo, hi = ego_poses[:, :2].min(0) - 30.0, ego_poses[:, :2].max(0) + 30.0
    pts = pts[np.all((pts[:, :2] >= lo) & (pts[:, :2] <= hi), axis=1)]
    if len(pts) == 0:
        return np.ones(n, dtype=bool)
    d2 = np.sum((ego_poses[:, None, :2] - pts[None, :, :2]) ** 2, axis=-1)
    same_dir = np.abs(wrap_angle(ego_poses[:, None, 2] - pts[None, :, 2])) < np.pi / 2
    d2 = np.where(same_dir, d2, np.inf)
    j = np.argmin(d2, axis=1)
    no_lane = ~np.isfinite(d2[np.arange(n), j])
    ref = pts[j]
    corners = box_corners(ego_poses, np.broadcast_to(_as_size(ego_size), (n, 2)))
    rel = corners - ref[:, None, :2]
    lateral = -np.sin(ref[:, None, 2]) * rel[..., 0] + np.cos(ref[:, None, 2]) * rel[..., 1]
    return offroad | no_lane | (np.abs(lateral).max(axis=1) > lane_half_width)


def out_of_lane_rate(ego_poses: np.ndarray, ego_size: tuple[float, float], log: ScenarioLog,
                     lane_half_width: float = LANE_HALF_WIDTH_M) -> float:
    """Fraction of steps in which the ego box is not inside one lane (see :func:`ego_off_lane`)."""
    return float(np.mean(ego_off_lane(ego_poses, ego_size, log, lane_half_width)))


# --- whole drives ----------------------------------------------------------------------------


def _score_states(
    ego_states: np.ndarray,
    dt: float,
    ego_size: tuple[float, float],
    agents_pose: np.ndarray,
    agents_valid: np.ndarray,
    agents_size: np.ndarray,
    agents_category: np.ndarray,
    log: ScenarioLog,
    reference_progress_m: float | None,
) -> dict[str, float]:
    ego_states = np.asarray(ego_states, dtype=np.float64)
    if ego_states.ndim != 2 or ego_states.shape[1] != 5 or not np.all(np.isfinite(ego_states)):
        raise ValueError(f"ego states must be finite (N, 5) = (x, y, yaw, speed, steer), got shape {ego_states.shape}")
    poses = ego_states[:, :3]
    speed = ego_states[:, 3]
    off_lane = ego_off_lane(poses, ego_size, log)
    agents_speed = np.linalg.norm(track_velocities(np.asarray(agents_pose), np.asarray(agents_valid), dt), axis=-1)
    events = collision_events(poses, speed, ego_size, agents_pose, agents_valid, agents_size, agents_category, agents_speed, off_lane)
    nc = float(min((e.score for e in events), default=1.0))
    collided = np.zeros(len(agents_size), dtype=bool)
    for e in events:
        collided[e.agent] = True
    dac = drivable_area_compliance(poses, ego_size, log.map.drivable)
    ttc = time_to_collision_ok(poses, speed, ego_size, agents_pose, agents_valid, agents_size, dt, off_lane, collided)
    progress = route_progress(poses[:, :2], log)
    ep = ego_progress(progress, progress if reference_progress_m is None else reference_progress_m)
    c = comfort(ego_states, dt)
    return {
        "nc": nc,
        "dac": dac,
        "ttc": ttc,
        "ep": ep,
        "comfort": c,
        "pdms": pdm_score(nc, dac, ttc, ep, c),
        "progress_m": progress,
        "out_of_lane_rate": float(np.mean(off_lane)),
        "collision": float(bool(events)),
        "at_fault_collision": float(any(e.at_fault for e in events)),
    }


def logged_progress(log: ScenarioLog, t_start: float, t_end: float) -> float:
    """Route progress of the logged (human) ego between two times on the log's clock."""
    times = np.asarray(log.times, dtype=np.float64)
    ego = np.asarray(log.ego_pose, dtype=np.float64)
    inside = (times > t_start) & (times < t_end)
    ts = np.concatenate([[t_start], times[inside], [t_end]])
    xy = np.column_stack([np.interp(ts, times, ego[:, 0]), np.interp(ts, times, ego[:, 1])])
    return route_progress(xy, log)


def score_rollout(rollout: Rollout, log: ScenarioLog, reference_progress_m: float | None = None) -> dict[str, float]:
    """PDM sub-scores and extras of a closed-loop :class:`~diffpilot.sim.driving.simulator.Rollout`.

    ``reference_progress_m`` is the reference planner's progress over the
    same span; by default the logged human drive's.
    """
    if rollout.scene_token != log.scene_token:
        raise ValueError(f"rollout of scene {rollout.scene_token!r} scored against log {log.scene_token!r}; pass the log it was run on")
    if reference_progress_m is None:
        reference_progress_m = logged_progress(log, float(rollout.times[0]), float(rollout.times[-1]))
    return _score_states(rollout.ego_states, rollout.dt, rollout.ego_size, rollout.agents_pose, rollout.agents_valid,
                         rollout.agents_size, rollout.agents_category, log, reference_progress_m)


def _track_plan(log: ScenarioLog, frame: int, trajectory: np.ndarray, model: KinematicBicycle) -> tuple[np.ndarray, np.ndarray]:
    from diffpilot.sim.driving.simulator import initial_ego_state

    trajectory = np.asarray(trajectory, dtype=np.float64)
    if trajectory.ndim != 2 or trajectory.shape[1] != 3 or len(trajectory) < 1 or not np.all(np.isfinite(trajectory)):
        raise ValueError(f"trajectory must be finite ego-frame poses (H>=1, 3) at {DT} s spacing, got shape {trajectory.shape}")
    origin = np.asarray(log.ego_pose[frame], dtype=np.float64)
    reference = np.concatenate([origin[None], to_global_frame(trajectory, origin)])
    t0 = float(log.times[frame])
    ref_times = t0 + DT * np.arange(len(reference))
    state0 = initial_ego_state(log, frame, model.wheelbase, model.max_steer)
    tracker = LQRTracker(dt=model.dt, wheelbase=model.wheelbase, max_steer=model.max_steer, max_steer_rate=model.max_steer_rate)
    states = track(model, tracker, state0, reference, ref_times, t0, DT * len(trajectory))
    times = t0 + model.dt * np.arange(len(states))
    return states, times


def score_trajectory(log: ScenarioLog, frame: int, trajectory: np.ndarray, reference_trajectory: np.ndarray | None = None) -> dict[str, float]:
    """Score one planned trajectory the NAVSIM way (non-reactive, open-loop plan, closed-loop tracking).

    ``trajectory`` is ego-frame (H, 3) at DT spacing from the logged ego at
    ``frame``; it is tracked by LQR on the kinematic bicycle at 10 Hz while
    the agents replay the log. The reference for EP is
    ``reference_trajectory`` (default: the logged human future), tracked
    and scored the same way; its progress counts times its NC·DAC, as in
    NAVSIM.
    """
    T = log.num_frames
    if not 0 <= frame < T - 1:
        raise ValueError(f"frame must be in 0..{T - 2} for scene {log.scene_name!r} (it needs a logged future), got {frame}")
    model = KinematicBicycle(dt=CONTROL_DT)
    if reference_trajectory is None:
        future = np.asarray(log.ego_pose[frame + 1 : frame + 1 + len(trajectory)], dtype=np.float64)
        from diffpilot.data.scenario import to_ego_frame

        reference_trajectory = to_ego_frame(future, np.asarray(log.ego_pose[frame], dtype=np.float64))
    ref_states, ref_times = _track_plan(log, frame, reference_trajectory, model)
    ref_agents, ref_valid = replay_agents(log, ref_times)
    ref = _score_states(ref_states, model.dt, log.ego_size, ref_agents, ref_valid, log.agents_size, log.agents_category, log, None)
    ref_progress = max(ref["progress_m"], 0.0) * ref["nc"] * ref["dac"]
    states, times = _track_plan(log, frame, trajectory, model)
    agents, valid = replay_agents(log, times)
    return _score_states(states, model.dt, log.ego_size, agents, valid, log.agents_size, log.agents_category, log, ref_progress)
