"""Driving signals for the STL rules, computed in torch from ego-frame trajectories and a scene.

A trajectory is ``(..., T, 3)`` poses ``(x, y, yaw)`` or ``(..., T, 4)`` with
the speed as a fourth column, in the ego frame of a :class:`SceneSample`,
at :data:`DT` spacing starting one step after now (what a planner returns).
Every signal is ``(B, N, T)``: ``B`` scenes, ``N`` trajectories each.

Geometry choices:

* Lanes are the sample's resampled centerlines; a point is projected onto
  the nearest segment, and the first and last segments are extended as
  straight lines so a trajectory running past the cut lane still gets an
  offset.
* Boxes are covered by :data:`DISCS` discs along their length (radius
  ``sqrt((l / 2n)^2 + (w / 2)^2)``). The discs contain the box, so the
  disc gap never exceeds the true box gap (conservative), differentiable
  and cheap: ``(B, N, T, K, n, n)`` distances, no polygon clipping.
* Agents' future poses come from the sample (the logged future); past the
  logged horizon they move on at their last velocity; an agent unknown at
  a step is ignored there.
* Stop lines and conflict zones (crosswalks) come from the sample's
  ``stop_lines`` / ``zones`` fields (filled from the map by
  ``build_scene_sample``). A scene with none of them valid has the stop
  distance :data:`STOP_CAP_M` and no zone.
* The ego's recent past enters as ``past_speed``, a *time-reversed*
  signal (entry ``t`` = the speed ``t`` steps before now) so the forward
  STL operators read the past; see :func:`past_speeds` for what is known.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import COMMANDS, DT, EGO_SIZE, MapGeometry, SampleSpec, SceneSample
from diffpilot.data.scene_sample import MAP_ELEMENT_FIELDS, map_elements_near

__all__ = [
    "DISCS",
    "DIST_CAP_M",
    "PAST_UNKNOWN_SPEED",
    "SCENE_KEYS",
    "SIGNAL_NAMES",
    "STOP_CAP_M",
    "DrivingScene",
    "driving_signals",
    "map_context",
    "past_speeds",
    "scene_from_arrays",
    "scene_from_sample",
]

DISCS = 3
"""Discs covering each box (ego and agents) for the distance signal."""
DIST_CAP_M = 50.0
"""Distance reported when no agent is known (and the cap on every distance)."""
STOP_CAP_M = 50.0
"""Stop-line distance reported when no stop line lies ahead on the reference lane."""
PAST_UNKNOWN_SPEED = 1e3
"""m/s: ``past_speed`` where the speed is unknown (before the log, past the history, no ``ego_past``).

Far above any speed and any ``eps_stop`` bound, so an unknown step never reads as "stopped"."""
STOP_LINE_LATERAL_M = 3.0
"""A stop line counts for the reference lane if its centre lies within this of the lane centerline."""
TARGET_LANE_OFFSET_M = 3.5
"""Expected lateral spacing of the neighbouring lane when picking a lane-change target."""
_BIG = 1e6
_ZONE_AREA_MIN = 1e-6
"""m²: a valid zone smaller than this is an error (no inside to speak of)."""

_REQUIRED_KEYS = ("lanes", "lanes_valid", "agents_pose", "agents_valid", "agents_size", "ego_status", "command")
SCENE_KEYS = (*_REQUIRED_KEYS, "ego_past", "frame", *MAP_ELEMENT_FIELDS)
"""The stacked-sample arrays :func:`scene_from_arrays` reads; subset arrays with these to keep the ego's past
(``ego_past``, ``frame``), stop lines and zones."""

SIGNAL_NAMES = (
    "speed",
    "accel_long",
    "jerk_long",
    "yaw_rate",
    "accel_lat",
    "lane_offset",
    "heading_error",
    "target_offset",
    "min_distance",
    "stop_distance",
    "zone_conflict",
    "ego_in_zone",
    "zone_occupied",
    "past_speed",
)
"""Every signal :func:`driving_signals` returns (units: m, s, rad; flags are 0/1).

All run forward in time from the first planned step except ``past_speed``,
which runs backward from now (see :class:`DrivingScene`)."""


def _wrap(a: Tensor) -> Tensor:
    return torch.remainder(a + torch.pi, 2 * torch.pi) - torch.pi


@dataclass
class DrivingScene:
    """Scene tensors for ``B`` scenes (leading dim ``B``), all in each scene's ego frame.

    ``ref_lane`` / ``target_lane`` index ``lanes`` (-1: none). ``agents_*``
    hold the agents' *future* (step ``k`` at ``(k+1)·DT``). ``stop_points``
    are stop-line centres with ``stop_valid``; ``zones`` are convex polygons
    as half-planes ``(nx, ny, h)`` with ``n·p <= h`` inside (padding rows
    ``(0, 0, 1e6)``) and ``zones_valid``. ``past_speed`` is the ego's speed
    now and at the ``P`` past steps, newest first (entry ``j`` = ``j``·DT
    ago), :data:`PAST_UNKNOWN_SPEED` where unknown (see :func:`past_speeds`).
    """

    lanes: Tensor  # (B, L, N, 3)
    lanes_valid: Tensor  # (B, L) bool
    ref_lane: Tensor  # (B,) long
    target_lane: Tensor  # (B,) long
    agents_pose: Tensor  # (B, K, F, 3)
    agents_valid: Tensor  # (B, K, F) bool
    agents_size: Tensor  # (B, K, 2)
    speed0: Tensor  # (B,)
    accel0: Tensor  # (B,)
    stop_points: Tensor  # (B, S, 2)
    stop_valid: Tensor  # (B, S) bool
    zones: Tensor  # (B, Z, E, 3)
    zones_valid: Tensor  # (B, Z) bool
    past_speed: Tensor  # (B, P+1), newest first

    @property
    def batch(self) -> int:
        return int(self.lanes.shape[0])


# ---------------------------------------------------------------------------
# Lane geometry
# ---------------------------------------------------------------------------


def project_on_lane(points: Tensor, lane: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Project ``points`` (B, ..., 2) onto polylines ``lane`` (B, N, 3).

    Returns signed lateral offset (left +), lane heading, arc length and the
    distance to the (extended) polyline, each ``(B, ...)``.
    """
    B = lane.shape[0]
    xy = lane[..., :2]
    a = xy[:, :-1]  # (B, S, 2)
    seg = xy[:, 1:] - a
    length = seg.norm(dim=-1)
    yaw_fallback = torch.stack([torch.cos(lane[:, :-1, 2]), torch.sin(lane[:, :-1, 2])], dim=-1)
    ok = length > 1e-6
    d = torch.where(ok[..., None], seg / length.clamp_min(1e-6)[..., None], yaw_fallback)
    cum = torch.cat([torch.zeros_like(length[:, :1]), torch.cumsum(length, dim=1)[:, :-1]], dim=1)
    S = a.shape[1]
    shape = points.shape
    p = points.reshape(B, -1, 1, 2)  # (B, P, 1, 2)
    rel = p - a[:, None]  # (B, P, S, 2)
    u = (rel * d[:, None]).sum(-1)  # along-segment coordinate, metres
    lo = torch.zeros(S, dtype=u.dtype)
    hi = length.clone()
    lo[0] = -_BIG
    hi[:, -1] = _BIG
    u_c = torch.maximum(torch.minimum(u, hi[:, None]), lo[None, None])
    foot = a[:, None] + u_c[..., None] * d[:, None]
    dist = (p - foot).norm(dim=-1)  # (B, P, S)
    best = dist.argmin(dim=-1, keepdim=True)  # (B, P, 1)
    lat = (d[:, None, :, 0] * rel[..., 1] - d[:, None, :, 1] * rel[..., 0])
    pick = lambda x: x.gather(-1, best).squeeze(-1)  # noqa: E731
    heading = torch.atan2(d[..., 1], d[..., 0])[:, None].expand_as(dist)
    s = (cum[:, None] + u_c)
    out = [pick(lat), pick(heading), pick(s), pick(dist)]
    return tuple(o.reshape(shape[:-1]) for o in out)  # type: ignore[return-value]


def lane_choice(lanes: np.ndarray, valid: np.ndarray, side: int) -> int:
    """Index of the lane under the ego (side 0) or of the neighbour on the left (+1) / right (-1); -1 if none."""
    if not valid.any():
        return -1
    lt = torch.as_tensor(lanes[valid], dtype=torch.float64)
    origin = torch.zeros(lt.shape[0], 2, dtype=torch.float64)
    lat, heading, s, dist = project_on_lane(origin, lt)
    idx = np.flatnonzero(valid)
    aligned = np.abs(np.asarray(_wrap(heading))) < np.pi / 2
    # the lane's position relative to the ego is minus the ego's offset from the lane
    lane_y = -lat.numpy()
    if side == 0:
        score = np.abs(lane_y) + 0.0
    else:
        score = np.abs(lane_y - side * TARGET_LANE_OFFSET_M)
        aligned &= (side * lane_y > 1.5) & (side * lane_y < 6.0)
    score = np.where(aligned, score, np.inf)
    if not np.isfinite(score).any():
        return -1
    return int(idx[int(np.argmin(score))])


# ---------------------------------------------------------------------------
# Scene construction
# ---------------------------------------------------------------------------


def map_context(geom: MapGeometry, ego_pose_global: np.ndarray, spec: SampleSpec = SampleSpec()) -> dict[str, np.ndarray]:
    """Stop lines and conflict zones of ``geom`` around a global pose, as the SceneSample fields of that name.

    The same arrays ``build_scene_sample`` stores (see
    :func:`diffpilot.data.scene_sample.map_elements_near`); put them into a
    sample with ``dataclasses.replace(sample, **map_context(...))``.
    """
    return map_elements_near(geom, ego_pose_global, spec)


def _halfplanes(zones: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Convex polygons ``(B, Z, V, 2)`` (padded by repeating a vertex) -> half-planes ``(B, Z, V, 3)``, n·p <= h inside.

    Edge ``i`` runs from vertex ``i`` to ``i + 1`` (the last closes the
    ring); zero-length edges (the padding) and invalid zones become rows
    ``(0, 0, 1e6)`` that every point satisfies. Either orientation works.
    """
    B, Z, V, _ = zones.shape
    out = np.tile(np.array([0.0, 0.0, _BIG]), (B, Z, V, 1))
    if V < 3:
        if valid.any():
            raise DatasetError(f"zones need at least 3 vertices each, got {V}; rebuild the samples with zone_vertices >= 4")
        return out
    nxt = np.roll(zones, -1, axis=2)
    x, y = zones[..., 0], zones[..., 1]
    area = 0.5 * np.sum(x * nxt[..., 1] - nxt[..., 0] * y, axis=-1)  # (B, Z), > 0 counter-clockwise
    flat = valid & (np.abs(area) < _ZONE_AREA_MIN)
    if flat.any():
        b, z = np.argwhere(flat)[0]
        raise DatasetError(f"zone {z} of scene {b} is flagged valid but has no area ({zones[b, z].tolist()}); "
                           "mark it invalid or rebuild the samples")
    e = nxt - zones
    length = np.hypot(e[..., 0], e[..., 1])
    sign = np.where(area >= 0, 1.0, -1.0)[..., None]
    n = sign[..., None] * np.stack([e[..., 1], -e[..., 0]], axis=-1) / np.maximum(length, 1e-12)[..., None]
    h = np.sum(n * zones, axis=-1)
    real = valid[..., None] & (length > 1e-9)
    out[real] = np.concatenate([n, h[..., None]], axis=-1)[real]
    return out


def _map_arrays(arrays: Mapping[str, np.ndarray], sel: np.ndarray | slice, B: int) -> tuple[np.ndarray, ...]:
    """The stop-line and zone fields of rows ``sel``; none at all when the arrays predate them."""
    have = [k for k in MAP_ELEMENT_FIELDS if k in arrays]
    if not have:
        return np.zeros((B, 0, 2)), np.zeros((B, 0), dtype=bool), np.zeros((B, 0, 3, 2)), np.zeros((B, 0), dtype=bool)
    if len(have) != len(MAP_ELEMENT_FIELDS):
        missing = [k for k in MAP_ELEMENT_FIELDS if k not in arrays]
        raise DatasetError(f"stacked samples have {have} but lack {missing}; keep all of {list(MAP_ELEMENT_FIELDS)} "
                           "(e.g. subset with diffpilot.stl.signals.SCENE_KEYS)")
    return tuple(np.asarray(arrays[k])[sel] for k in MAP_ELEMENT_FIELDS)


def scene_from_sample(
    sample: SceneSample,
    *,
    target_side: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> DrivingScene:
    """A one-scene :class:`DrivingScene` from a SceneSample (its lanes, agents, stop lines and zones).

    ``target_side`` is +1 (left), -1 (right) or 0 (stay); by default it follows
    the sample's command (``left`` / ``right`` pick the neighbouring lane).
    """
    return _scenes(
        lanes=sample.lanes[None], lanes_valid=sample.lanes_valid[None], agents_pose=sample.agents_pose[None],
        agents_valid=sample.agents_valid[None], agents_size=sample.agents_size[None],
        ego_status=sample.ego_status[None], past_steps=sample.ego_past.shape[0] - 1,
        ego_past=np.asarray(sample.ego_past)[None], frame=np.array([sample.frame]),
        command=np.array([sample.command]), stop_lines=np.asarray(sample.stop_lines)[None],
        stop_valid=np.asarray(sample.stop_lines_valid)[None], zones=np.asarray(sample.zones)[None],
        zones_valid=np.asarray(sample.zones_valid)[None], target_side=target_side, dtype=dtype,
    )


def scene_from_arrays(
    arrays: Mapping[str, np.ndarray],
    index: np.ndarray | slice | None = None,
    *,
    target_side: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> DrivingScene:
    """Scenes for stacked SceneSample arrays (from ``stack_samples`` / ``load_scene_samples``), rows ``index``.

    Reads :data:`SCENE_KEYS`; arrays without the stop-line and zone fields
    (stacked before they existed) give scenes with none. Without ``ego_past``
    the past is unknown (``past_speed`` holds the current speed only, and the
    agents' columns are split at ``SampleSpec().past_steps``); without
    ``frame`` every past pose counts as logged.
    """
    missing = [k for k in _REQUIRED_KEYS if k not in arrays]
    if missing:
        raise DatasetError(f"stacked samples lack {missing}; build them with diffpilot.data.scene_sample.stack_samples")
    sel = slice(None) if index is None else index
    command = np.asarray(arrays["command"])[sel]
    stops, stop_valid, zones, zones_valid = _map_arrays(arrays, sel, len(command))
    past = np.asarray(arrays["ego_past"])[sel] if "ego_past" in arrays else None
    frame = np.asarray(arrays["frame"])[sel] if "frame" in arrays else None
    return _scenes(
        lanes=arrays["lanes"][sel], lanes_valid=arrays["lanes_valid"][sel], agents_pose=arrays["agents_pose"][sel],
        agents_valid=arrays["agents_valid"][sel], agents_size=arrays["agents_size"][sel],
        ego_status=arrays["ego_status"][sel], command=command, ego_past=past, frame=frame,
        past_steps=past.shape[-2] - 1 if past is not None else SampleSpec().past_steps,
        stop_lines=stops, stop_valid=stop_valid, zones=zones, zones_valid=zones_valid, target_side=target_side,
        dtype=dtype,
    )


def _used(valid: np.ndarray) -> np.ndarray:
    """Column indices up to the last one valid in any row (index 0 alone when none is)."""
    cols = np.flatnonzero(valid.any(axis=0)) if valid.size else np.zeros(0, dtype=np.int64)
    return np.arange(int(cols[-1]) + 1 if len(cols) else 1)


def past_speeds(ego_past: np.ndarray | None, ego_status: np.ndarray, frame: np.ndarray | None = None) -> np.ndarray:
    """The ego's speed now and at each past step, newest first: ``(B, P+1)`` from ``ego_past`` ``(B, P+1, 3)``.

    Entry 0 is ``|ego_status[:, 0]|``; entry ``j`` (1 <= j < P) is the
    backward difference ``|p(-j) - p(-j-1)| / DT`` of the past poses (oldest
    first in ``ego_past``, as in :class:`SceneSample`), i.e. the speed over
    the step *into* ``j``·DT ago, the same convention as the current speed.
    The oldest entry ``P`` has no earlier pose and stays unknown, as does
    every entry reading a pose before the log's first frame (``frame``: the
    window's frame in its log; history before it repeats the first pose and
    would look like a stop). Unknown entries are :data:`PAST_UNKNOWN_SPEED`.
    ``ego_past=None`` gives ``(B, 1)``: the current speed only.
    """
    status = np.asarray(ego_status, dtype=np.float64)
    if status.ndim != 2 or status.shape[1] < 1:
        raise DatasetError(f"ego_status must be (B, 3), got {status.shape}")
    now = np.abs(status[:, :1])
    if ego_past is None:
        return now
    past = np.asarray(ego_past, dtype=np.float64)
    B = len(status)
    if past.ndim != 3 or past.shape[0] != B or past.shape[2] < 2 or past.shape[1] < 1:
        raise DatasetError(f"ego_past must be (B, P+1, 3) poses for {B} scenes, got {past.shape}")
    P = past.shape[1] - 1
    out = np.full((B, P + 1), PAST_UNKNOWN_SPEED)
    out[:, :1] = now
    if P >= 2:
        newest_first = past[:, ::-1, :2]  # row i = i steps ago
        out[:, 1:P] = np.linalg.norm(newest_first[:, 1:P] - newest_first[:, 2 : P + 1], axis=-1) / DT
    if frame is not None:
        fr = np.asarray(frame, dtype=np.int64).reshape(-1)
        if fr.shape != (B,):
            raise DatasetError(f"frame must hold one keyframe index per scene ({B}), got shape {fr.shape}")
        j = np.arange(P + 1)
        out[(j[None, :] >= 1) & (j[None, :] + 1 > fr[:, None])] = PAST_UNKNOWN_SPEED
    out[~np.isfinite(out)] = PAST_UNKNOWN_SPEED
    return out


def _scenes(*, lanes, lanes_valid, agents_pose, agents_valid, agents_size, ego_status, past_steps, command,  # noqa: ANN001
            stop_lines, stop_valid, zones, zones_valid, target_side, dtype, ego_past=None, frame=None) -> DrivingScene:
    lanes = np.asarray(lanes, dtype=np.float64)
    lanes_valid = np.asarray(lanes_valid, dtype=bool)
    B = lanes.shape[0]
    stop_lines = np.asarray(stop_lines, dtype=np.float64)
    stop_valid = np.asarray(stop_valid, dtype=bool)
    zones = np.asarray(zones, dtype=np.float64)
    zones_valid = np.asarray(zones_valid, dtype=bool)
    S, Z = stop_valid.shape[-1], zones_valid.shape[-1]
    if stop_lines.shape != (B, S, 2) or stop_valid.shape != (B, S):
        raise DatasetError(f"stop_lines must be (B, S, 2) with stop_lines_valid (B, S) for {B} scenes, "
                           f"got {stop_lines.shape} / {stop_valid.shape}")
    if zones.ndim != 4 or zones.shape[:2] != (B, Z) or zones.shape[-1] != 2:
        raise DatasetError(f"zones must be (B, Z, V, 2) with zones_valid (B, Z) for {B} scenes, "
                           f"got {zones.shape} / {zones_valid.shape}")
    if not (np.isfinite(stop_lines[stop_valid]).all() and np.isfinite(zones[zones_valid]).all()):
        raise DatasetError("a stop line or zone flagged valid holds NaN or inf; repair or invalidate it")
    ref = np.array([lane_choice(lanes[b], lanes_valid[b], 0) for b in range(B)])
    tgt = np.empty(B, dtype=np.int64)
    for b in range(B):
        side = target_side
        if side is None:
            cmd = COMMANDS[int(command[b])]
            side = 1 if cmd == "left" else -1 if cmd == "right" else 0
        tgt[b] = ref[b] if side == 0 else lane_choice(lanes[b], lanes_valid[b], int(side))
    P = int(past_steps)
    fut = np.asarray(agents_pose, dtype=np.float64)[:, :, P + 1 :]
    fut_valid = np.asarray(agents_valid, dtype=bool)[:, :, P + 1 :]
    # Keep only as many stop lines, zones and edges as some scene uses (at least one, invalid, so no
    # reduction runs over an empty axis): the zone test costs points x zones x edges.
    if S == 0:
        stop_lines, stop_valid = np.zeros((B, 1, 2)), np.zeros((B, 1), dtype=bool)
    keep_s = _used(stop_valid)
    stop_lines = np.where(stop_valid[..., None], stop_lines, 0.0)[:, keep_s]
    stop_valid = stop_valid[:, keep_s]
    zone_arr = _halfplanes(zones, zones_valid)
    if Z == 0 or zone_arr.shape[2] == 0:
        zone_arr = np.tile(np.array([0.0, 0.0, _BIG]), (B, max(Z, 1), 1, 1))
        zones_valid = np.zeros((B, max(Z, 1)), dtype=bool)
    keep_z = _used(zones_valid)
    zone_arr, zones_valid = zone_arr[:, keep_z], zones_valid[:, keep_z]
    padding = zone_arr[..., 2] >= _BIG
    zone_arr = np.take_along_axis(zone_arr, np.argsort(padding, axis=-1, kind="stable")[..., None], axis=2)
    zone_arr = zone_arr[:, :, : max(1, int((~padding).sum(axis=-1).max(initial=0)))]
    status = np.asarray(ego_status, dtype=np.float64)
    past_speed = past_speeds(ego_past, status, frame)
    t = lambda x, dt=dtype: torch.as_tensor(np.asarray(x), dtype=dt)  # noqa: E731
    return DrivingScene(
        lanes=t(lanes), lanes_valid=t(lanes_valid, torch.bool), ref_lane=t(ref, torch.long),
        target_lane=t(tgt, torch.long), agents_pose=t(fut), agents_valid=t(fut_valid, torch.bool),
        agents_size=t(agents_size), speed0=t(status[:, 0]), accel0=t(status[:, 1]), stop_points=t(stop_lines),
        stop_valid=t(stop_valid, torch.bool), zones=t(zone_arr), zones_valid=t(zones_valid, torch.bool),
        past_speed=t(past_speed),
    )


# ---------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------


def _discs(pose: Tensor, length: Tensor, width: Tensor) -> tuple[Tensor, Tensor]:
    """Disc centres ``(..., DISCS, 2)`` and radii ``(...)`` covering boxes at ``pose`` (..., 3)."""
    n = DISCS
    frac = (torch.arange(n, dtype=pose.dtype) + 0.5) / n - 0.5  # along the length, centred
    along = frac * length[..., None]  # (..., n)
    c, s = torch.cos(pose[..., 2:3]), torch.sin(pose[..., 2:3])
    centres = torch.stack([pose[..., 0:1] + along * c, pose[..., 1:2] + along * s], dim=-1)
    radius = torch.sqrt((length / (2 * n)) ** 2 + (width / 2) ** 2)
    return centres, radius


def agents_over_horizon(scene: DrivingScene, T: int) -> tuple[Tensor, Tensor]:
    """Agent future poses and validity for T steps, extended at constant velocity past the log."""
    pose, valid = scene.agents_pose, scene.agents_valid
    F = pose.shape[2]
    if T <= F:
        return pose[:, :, :T], valid[:, :, :T]
    extra = T - F
    if F >= 2:
        vel = pose[:, :, -1] - pose[:, :, -2]
        ok = valid[:, :, -1] & valid[:, :, -2]
    else:
        vel = torch.zeros_like(pose[:, :, -1])
        ok = valid[:, :, -1] if F else torch.zeros(pose.shape[:2], dtype=torch.bool)
    vel = vel.clone()
    vel[..., 2] = 0.0
    k = torch.arange(1, extra + 1, dtype=pose.dtype)
    more = pose[:, :, -1:] + k[None, None, :, None] * vel[:, :, None]
    return torch.cat([pose, more], dim=2), torch.cat([valid, ok[..., None].expand(-1, -1, extra)], dim=2)


def _zone_depth(points: Tensor, zones: Tensor) -> Tensor:
    """Signed depth of points ``(B, *P, 2)`` in convex zones ``(B, Z, E, 3)``: ``(B, *P, Z)``, > 0 inside."""
    B = points.shape[0]
    p = points.reshape(B, -1, 1, 1, 2)
    z = zones[:, None]  # (B, 1, Z, E, 3)
    slack = z[..., 2] - (z[..., 0] * p[..., 0] + z[..., 1] * p[..., 1])  # (B, P, Z, E)
    return slack.amin(dim=-1).reshape(*points.shape[:-1], zones.shape[1])


def driving_signals(traj: Tensor | np.ndarray, scene: DrivingScene) -> dict[str, Tensor]:
    """Every signal of :data:`SIGNAL_NAMES` for ``traj`` ``(B, N, T, 3|4)`` (or ``(N, T, 3|4)`` for one scene).

    Speeds, accelerations and jerks are finite differences at :data:`DT`
    that start from the scene's current speed and acceleration (so step 0
    is the change from now to the first waypoint). Distances are in metres.
    ``past_speed`` is the scene's, not the trajectory's: entry ``t`` is the
    ego's speed ``t`` steps before now, the same for every trajectory, padded
    with :data:`PAST_UNKNOWN_SPEED` past the known history.
    """
    traj = torch.as_tensor(traj, dtype=scene.lanes.dtype) if not isinstance(traj, Tensor) else traj.to(scene.lanes.dtype)
    squeeze = traj.dim() == 3
    if squeeze:
        traj = traj[None]
    if traj.dim() != 4 or traj.shape[-1] not in (3, 4):
        raise DatasetError(f"trajectories must be (B, N, T, 3|4) or (N, T, 3|4) ego-frame poses, got {tuple(traj.shape)}")
    B, N, T, _ = traj.shape
    if B != scene.batch and scene.batch != 1:
        raise DatasetError(f"{B} trajectory batches for {scene.batch} scenes; give one batch per scene")
    if bool(torch.isnan(traj).any()):
        raise DatasetError("trajectory contains NaN; drop or repair those trajectories first")
    Bs = max(B, scene.batch)
    xy, yaw = traj[..., :2], traj[..., 2]
    if Bs != B:
        xy, yaw, traj = xy.expand(Bs, -1, -1, -1), yaw.expand(Bs, -1, -1), traj.expand(Bs, -1, -1, -1)

    # kinematics -------------------------------------------------------------
    prev_xy = torch.cat([torch.zeros_like(xy[:, :, :1]), xy[:, :, :-1]], dim=2)
    prev_yaw = torch.cat([torch.zeros_like(yaw[:, :, :1]), yaw[:, :, :-1]], dim=2)
    if traj.shape[-1] == 4:
        speed = traj[..., 3]
    else:
        mid = torch.stack([torch.cos(yaw) + torch.cos(prev_yaw), torch.sin(yaw) + torch.sin(prev_yaw)], dim=-1)
        mid = mid / mid.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        speed = ((xy - prev_xy) * mid).sum(-1) / DT
    v0 = scene.speed0.view(-1, 1, 1).expand(Bs, N, 1)
    a0 = scene.accel0.view(-1, 1, 1).expand(Bs, N, 1)
    accel = (speed - torch.cat([v0, speed[:, :, :-1]], dim=2)) / DT
    jerk = (accel - torch.cat([a0, accel[:, :, :-1]], dim=2)) / DT
    yaw_rate = _wrap(yaw - prev_yaw) / DT
    accel_lat = speed * yaw_rate

    # lanes ------------------------------------------------------------------
    def lane_of(idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = idx.expand(Bs) if idx.shape[0] == 1 else idx
        lanes = scene.lanes.expand(Bs, -1, -1, -1) if scene.lanes.shape[0] == 1 else scene.lanes
        has = idx >= 0
        return lanes[torch.arange(Bs), idx.clamp_min(0)], has

    ref, has_ref = lane_of(scene.ref_lane)
    lat, lane_yaw, s_ego, _ = project_on_lane(xy, ref)
    hr = has_ref.view(-1, 1, 1)
    lane_offset = torch.where(hr, lat, torch.zeros_like(lat))
    heading_error = torch.where(hr, _wrap(yaw - lane_yaw), _wrap(yaw))
    tgt, has_tgt = lane_of(scene.target_lane)
    tlat, _, _, _ = project_on_lane(xy, tgt)
    target_offset = torch.where(has_tgt.view(-1, 1, 1), tlat, lane_offset)

    # agents -----------------------------------------------------------------
    apose, avalid = agents_over_horizon(scene, T)
    if apose.shape[0] == 1 and Bs > 1:
        apose, avalid = apose.expand(Bs, -1, -1, -1), avalid.expand(Bs, -1, -1)
    size = scene.agents_size.expand(Bs, -1, -1) if scene.agents_size.shape[0] == 1 else scene.agents_size
    ego_c, ego_r = _discs(traj[..., :3], torch.full_like(yaw, EGO_SIZE[0]), torch.full_like(yaw, EGO_SIZE[1]))
    if apose.shape[1] > 0:
        ag_c, ag_r = _discs(apose, size[:, :, None, 0].expand_as(apose[..., 0]), size[:, :, None, 1].expand_as(apose[..., 0]))
        # ego (B, N, T, n, 2) vs agents (B, K, T, n, 2) -> (B, N, T, K, n, n)
        e = ego_c[:, :, :, None, :, None, :]
        g = ag_c.permute(0, 2, 1, 3, 4)[:, None, :, :, None, :, :]
        centre = (e - g).norm(dim=-1).amin(dim=(-1, -2))  # (B, N, T, K)
        gap = centre - ego_r[..., None] - ag_r.permute(0, 2, 1)[:, None]
        ok = avalid.permute(0, 2, 1)[:, None]
        gap = torch.where(ok, gap, torch.full_like(gap, DIST_CAP_M))
        min_distance = gap.amin(dim=-1).clamp(max=DIST_CAP_M)
    else:
        min_distance = torch.full_like(speed, DIST_CAP_M)

    # stop lines along the reference lane -------------------------------------
    stops = scene.stop_points.expand(Bs, -1, -1) if scene.stop_points.shape[0] == 1 else scene.stop_points
    svalid = scene.stop_valid.expand(Bs, -1) if scene.stop_valid.shape[0] == 1 else scene.stop_valid
    s_lat, _, s_stop, _ = project_on_lane(stops, ref)  # (B, S)
    s_now = project_on_lane(torch.zeros_like(xy[:, :1, 0]), ref)[2]  # (B, 1): the ego's arc length at t=0
    ahead = svalid & has_ref[:, None] & (s_lat.abs() <= STOP_LINE_LATERAL_M) & (s_stop >= s_now)
    s_next = torch.where(ahead, s_stop, torch.full_like(s_stop, _BIG)).amin(dim=-1)  # (B,)
    stop_distance = (s_next.view(-1, 1, 1) - s_ego - EGO_SIZE[0] / 2).clamp(max=STOP_CAP_M)

    # conflict zones ----------------------------------------------------------
    zones = scene.zones.expand(Bs, -1, -1, -1) if scene.zones.shape[0] == 1 else scene.zones
    zvalid = scene.zones_valid.expand(Bs, -1) if scene.zones_valid.shape[0] == 1 else scene.zones_valid
    ego_depth = (_zone_depth(ego_c, zones) + ego_r[..., None, None]).amax(dim=-2)  # (B, N, T, Z)
    if apose.shape[1] > 0:
        ag_c2, ag_r2 = _discs(apose, size[:, :, None, 0].expand_as(apose[..., 0]), size[:, :, None, 1].expand_as(apose[..., 0]))
        other = (_zone_depth(ag_c2, zones) + ag_r2[..., None, None]).amax(dim=-2)  # (B, K, T, Z)
        other = torch.where(avalid[..., None], other, torch.full_like(other, -DIST_CAP_M)).amax(dim=1)  # (B, T, Z)
    else:
        other = torch.full((Bs, T, zones.shape[1]), -DIST_CAP_M, dtype=speed.dtype)
    zmask = zvalid[:, None, None, :]
    both = torch.minimum(ego_depth, other[:, None])
    both = torch.where(zmask, both, torch.full_like(both, -DIST_CAP_M))
    zone_conflict = both.amax(dim=-1).clamp(min=-DIST_CAP_M)
    ego_in = torch.where(zmask, ego_depth, torch.full_like(ego_depth, -1.0)).amax(dim=-1) > 0
    occupied = (torch.where(zvalid[:, None], other, torch.full_like(other, -1.0)).amax(dim=-1) > 0)[:, None].expand(-1, N, -1)

    # the ego's past, newest first, cut or padded to T steps -----------------------
    hist = scene.past_speed.to(speed.dtype)[:, :T]
    if hist.shape[-1] < T:
        hist = torch.cat([hist, hist.new_full((hist.shape[0], T - hist.shape[-1]), PAST_UNKNOWN_SPEED)], dim=-1)
    past_speed = hist[:, None].expand(Bs, N, T)

    out = {
        "speed": speed,
        "accel_long": accel,
        "jerk_long": jerk,
        "yaw_rate": yaw_rate,
        "accel_lat": accel_lat,
        "lane_offset": lane_offset,
        "heading_error": heading_error,
        "target_offset": target_offset,
        "min_distance": min_distance,
        "stop_distance": stop_distance,
        "zone_conflict": zone_conflict,
        "ego_in_zone": ego_in.to(speed.dtype),
        "zone_occupied": occupied.to(speed.dtype),
        "past_speed": past_speed,
    }
    if squeeze:
        out = {k: v[0] for k, v in out.items()}
    return out
