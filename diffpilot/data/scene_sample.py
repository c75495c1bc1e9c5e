"""Turn one keyframe of a :class:`ScenarioLog` into the ego-frame :class:`SceneSample` a planner sees.

The driving simulator calls :func:`build_scene_sample` at every replanning
step, so it needs nothing but the log and stays in numpy/shapely vector
operations (a few milliseconds per call). Training data is the same call
over every logged keyframe, stacked with :func:`stack_samples`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import shapely
import shapely.geometry

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import (
    COMMANDS,
    DT,
    MapGeometry,
    SampleSpec,
    SceneSample,
    ScenarioLog,
    _no_map_elements,
    to_ego_frame,
    wrap_angle,
)

__all__ = [
    "COMMAND_HORIZON_S",
    "build_scene_sample",
    "example_scene_arrays",
    "driving_command",
    "ego_status_from_log",
    "MAP_ELEMENT_FIELDS",
    "map_elements_near",
    "pack_map_elements",
    "scene_samples_from_arrays",
    "stack_samples",
]

COMMAND_HORIZON_S = 3.0
"""How far into the logged future :func:`driving_command` looks."""
STOP_SPEED = 0.5
"""m/s under which the ego counts as stopped."""
TURN_LATERAL_M = 2.0
"""Lateral displacement over the horizon that makes a left/right command."""
TURN_HEADING_RAD = 0.5
"""Heading change over the horizon that makes a left/right command."""


def _dt(times: np.ndarray, a: int, b: int) -> float:
    """Seconds between frames a < b (DT when the log's times are degenerate)."""
    if len(times) > max(a, b):
        dt = float(times[b] - times[a])
        if dt > 1e-6:
            return dt
    return DT * (b - a)


def _speed_into(poses: np.ndarray, times: np.ndarray, f: int) -> float:
    """Signed speed along the heading over the step that ends at frame ``f`` (f >= 1)."""
    d = poses[f, :2] - poses[f - 1, :2]
    yaw = poses[f, 2]
    return float((d[0] * np.cos(yaw) + d[1] * np.sin(yaw)) / _dt(times, f - 1, f))


def ego_status_from_log(log: ScenarioLog, frame: int) -> np.ndarray:
    """(speed, longitudinal acceleration, yaw rate) at ``frame`` by finite differences of the logged poses.

    Uses the step into ``frame`` (backward differences, so nothing after now
    is read); at the first frame the first step stands in.
    """
    poses = log.ego_pose
    times = np.asarray(log.times, dtype=np.float64)
    n = len(poses)
    if n < 2:
        return np.zeros(3)
    f = max(int(frame), 1)
    speed = _speed_into(poses, times, f)
    yaw_rate = float(wrap_angle(poses[f, 2] - poses[f - 1, 2]) / _dt(times, f - 1, f))
    if f >= 2:
        accel = (speed - _speed_into(poses, times, f - 1)) / _dt(times, f - 1, f)
    else:
        accel = 0.0
    return np.array([speed, accel, yaw_rate], dtype=np.float64)


def driving_command(log: ScenarioLog, frame: int) -> int:
    """Index into COMMANDS from the logged future of ``frame``.

    ``stop`` if the ego's speed falls under :data:`STOP_SPEED` within
    :data:`COMMAND_HORIZON_S`; ``left`` / ``right`` if, at the end of that
    horizon, the ego has moved more than :data:`TURN_LATERAL_M` sideways or
    turned more than :data:`TURN_HEADING_RAD`; else ``keep_lane``.
    """
    poses = log.ego_pose
    times = np.asarray(log.times, dtype=np.float64)
    n = len(poses)
    if frame >= n - 1:
        return COMMANDS.index("keep_lane")
    if len(times) == n:
        end = int(np.searchsorted(times, times[frame] + COMMAND_HORIZON_S + 1e-6, side="right")) - 1
    else:
        end = frame + int(round(COMMAND_HORIZON_S / DT))
    end = min(max(end, frame + 1), n - 1)
    seg = poses[frame : end + 1]
    dts = np.array([_dt(times, i, i + 1) for i in range(frame, end)])
    speeds = np.linalg.norm(np.diff(seg[:, :2], axis=0), axis=1) / dts
    if speeds.min() < STOP_SPEED:
        return COMMANDS.index("stop")
    rel = to_ego_frame(poses[end], poses[frame])
    lateral, dyaw = float(rel[1]), float(rel[2])
    if dyaw > TURN_HEADING_RAD or (abs(dyaw) <= TURN_HEADING_RAD and lateral > TURN_LATERAL_M):
        return COMMANDS.index("left")
    if dyaw < -TURN_HEADING_RAD or (abs(dyaw) <= TURN_HEADING_RAD and lateral < -TURN_LATERAL_M):
        return COMMANDS.index("right")
    return COMMANDS.index("keep_lane")


def _resample(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points equally spaced by arc length along an (M, 3) polyline, heading from its tangent."""
    xy = points[:, :2]
    seg = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] < 1e-9:
        out = np.repeat(points[:1], n, axis=0)
        return out
    q = np.linspace(0.0, s[-1], n)
    x = np.interp(q, s, xy[:, 0])
    y = np.interp(q, s, xy[:, 1])
    yaw = np.arctan2(np.interp(q, s, np.sin(points[:, 2])), np.interp(q, s, np.cos(points[:, 2])))
    return np.stack([x, y, yaw], axis=1)


def _lanes_near(geom: MapGeometry, origin: np.ndarray, spec: SampleSpec) -> tuple[np.ndarray, np.ndarray]:
    """The ``num_lanes`` centerlines nearest the ego, cut to ``lane_radius_m``, resampled, ego frame."""
    L, N = spec.num_lanes, spec.lane_points
    lanes_out = np.zeros((L, N, 3))
    valid = np.zeros(L, dtype=bool)
    lanes = [lane for lane in geom.lanes if len(lane) > 0]
    if not lanes or L == 0:
        return lanes_out, valid
    lengths = np.array([len(lane) for lane in lanes])
    pts = np.concatenate(lanes, axis=0)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    d2 = (pts[:, 0] - origin[0]) ** 2 + (pts[:, 1] - origin[1]) ** 2
    best = np.minimum.reduceat(d2, starts)
    r2 = spec.lane_radius_m ** 2
    order = np.argsort(best, kind="stable")
    order = order[best[order] <= r2][:L]
    for k, li in enumerate(order):
        lane_d2 = d2[starts[li] : starts[li] + lengths[li]]
        inside = lane_d2 <= r2
        nearest = int(np.argmin(lane_d2))
        # The contiguous run of points within the radius around the nearest point.
        out_before = np.flatnonzero(~inside[:nearest])
        lo = int(out_before[-1]) + 1 if len(out_before) else 0
        out_after = np.flatnonzero(~inside[nearest:])
        hi = nearest + int(out_after[0]) - 1 if len(out_after) else len(inside) - 1
        piece = lanes[li][lo : hi + 1]
        if len(piece) == 1:
            piece = np.repeat(piece, 2, axis=0)
        lanes_out[k] = to_ego_frame(_resample(piece, N), origin)
        valid[k] = True
    return lanes_out, valid


def _raster(drivable: shapely.Geometry | None, origin: np.ndarray, spec: SampleSpec) -> np.ndarray:
    """Drivable-area raster: row 0 most forward, column 0 most left, the ego at the centre."""
    R, res = spec.raster_size, spec.raster_m_per_px
    if drivable is None or drivable.is_empty or R == 0:
        return np.zeros((R, R), dtype=np.uint8)
    centres = (R / 2.0 - np.arange(R) - 0.5) * res
    ex = centres[:, None]  # forward, by row
    ey = centres[None, :]  # left, by column
    c, s = np.cos(origin[2]), np.sin(origin[2])
    gx = origin[0] + c * ex - s * ey
    gy = origin[1] + s * ex + c * ey
    if not shapely.is_prepared(drivable):
        shapely.prepare(drivable)
    return shapely.contains_xy(drivable, gx, gy).astype(np.uint8)


# ---------------------------------------------------------------------------- stop lines and crosswalks

MAP_ELEMENT_FIELDS = ("stop_lines", "stop_lines_valid", "zones", "zones_valid")
"""The SceneSample fields holding the stop lines and conflict zones the traffic rules read."""


@dataclass
class _Elements:
    """Stop-line centres and crosswalk zones of one map in one frame, ready to crop (computed once per map)."""

    stop_xy: np.ndarray  # (n, 2)
    zone_xy: np.ndarray  # (m, V, 2) counter-clockwise, padded with the last vertex
    zone_geoms: np.ndarray  # (m,) the zones as shapely polygons (for distances)


def _zone_ring(poly: shapely.Geometry, max_vertices: int) -> np.ndarray | None:
    """Counter-clockwise convex-hull vertices ``(max_vertices, 2)`` of ``poly`` padded with the last one; None if flat.

    A hull with too many vertices becomes its smallest enclosing rectangle,
    which still contains the crosswalk (a conservative conflict zone).
    """
    hull = shapely.convex_hull(poly)
    if hull.geom_type != "Polygon" or hull.area <= 1e-9:
        return None
    if len(hull.exterior.coords) - 1 > max_vertices:
        hull = shapely.oriented_envelope(hull)
    ring = np.asarray(shapely.geometry.polygon.orient(hull, sign=1.0).exterior.coords)[:-1]
    out = np.repeat(ring[-1:], max_vertices, axis=0)
    out[: len(ring)] = ring
    return out


def _elements(stop_polys: Sequence[shapely.Geometry], stop_points: np.ndarray | None,
              zone_polys: Sequence[shapely.Geometry], max_vertices: int) -> _Elements:
    if max_vertices < 4 and len(zone_polys):
        raise DatasetError(f"SampleSpec.zone_vertices must be >= 4 to hold a crosswalk (a rectangle), got {max_vertices}")
    if stop_points is None:
        stop_xy = shapely.get_coordinates(shapely.centroid(np.asarray(list(stop_polys), dtype=object)))
    else:
        stop_xy = np.asarray(stop_points, dtype=np.float64).reshape(-1, 2)
    rings = [r for r in (_zone_ring(p, max_vertices) for p in zone_polys) if r is not None]
    zone_xy = np.stack(rings) if rings else np.zeros((0, max_vertices, 2))
    geoms = shapely.polygons(zone_xy) if rings else np.zeros(0, dtype=object)
    return _Elements(stop_xy=stop_xy.reshape(-1, 2), zone_xy=zone_xy, zone_geoms=geoms)


_CACHE: dict[int, tuple[weakref.ref, tuple[int, int, int, int], dict[int, _Elements]]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is ref:
        del _CACHE[key]


def _map_elements(geom: MapGeometry, max_vertices: int) -> _Elements:
    """The map's elements, cached per MapGeometry object (the simulator asks at every replanning step)."""
    key = id(geom)
    signature = (id(geom.stop_lines), len(geom.stop_lines), id(geom.crosswalks), len(geom.crosswalks))
    hit = _CACHE.get(key)
    if hit is None or hit[0]() is not geom or hit[1] != signature:
        ref = weakref.ref(geom, lambda r, k=key: _forget(k, r))
        hit = (ref, signature, {})
        _CACHE[key] = hit
    per_size = hit[2]
    if max_vertices not in per_size:
        per_size[max_vertices] = _elements(geom.stop_lines, None, geom.crosswalks, max_vertices)
    return per_size[max_vertices]


def _ego_xy(xy: np.ndarray, origin: np.ndarray) -> np.ndarray:
    c, s = np.cos(origin[2]), np.sin(origin[2])
    dx, dy = xy[..., 0] - origin[0], xy[..., 1] - origin[1]
    return np.stack([c * dx + s * dy, -s * dx + c * dy], axis=-1)


def _near(el: _Elements, origin: np.ndarray, spec: SampleSpec) -> dict[str, np.ndarray]:
    """The nearest ``num_stop_lines`` / ``num_zones`` elements within ``lane_radius_m`` of ``origin``, ego frame."""
    S, Z, V = spec.num_stop_lines, spec.num_zones, spec.zone_vertices
    r = spec.lane_radius_m
    stops, stops_valid = np.zeros((S, 2)), np.zeros(S, dtype=bool)
    zones, zones_valid = np.zeros((Z, V, 2)), np.zeros(Z, dtype=bool)
    if S and len(el.stop_xy):
        d = np.hypot(el.stop_xy[:, 0] - origin[0], el.stop_xy[:, 1] - origin[1])
        order = np.argsort(d, kind="stable")
        order = order[d[order] <= r][:S]
        stops[: len(order)] = _ego_xy(el.stop_xy[order], origin)
        stops_valid[: len(order)] = True
    if Z and len(el.zone_xy):
        d = shapely.distance(el.zone_geoms, shapely.Point(origin[0], origin[1]))
        order = np.argsort(d, kind="stable")
        order = order[d[order] <= r][:Z]
        zones[: len(order)] = _ego_xy(el.zone_xy[order], origin)
        zones_valid[: len(order)] = True
    return {"stop_lines": stops, "stop_lines_valid": stops_valid, "zones": zones, "zones_valid": zones_valid}


def map_elements_near(geom: MapGeometry, origin: np.ndarray, spec: SampleSpec = SampleSpec()) -> dict[str, np.ndarray]:
    """The SceneSample stop-line and zone fields (:data:`MAP_ELEMENT_FIELDS`) of ``geom`` around the global pose ``origin``.

    Stop lines are their polygons' centroids; zones are the crosswalks'
    convex hulls. Both are nearest first (centroid distance / polygon
    distance), within ``spec.lane_radius_m``, in the ego frame of ``origin``.
    """
    origin = np.asarray(origin, dtype=np.float64).reshape(3)
    return _near(_map_elements(geom, spec.zone_vertices), origin, spec)


def pack_map_elements(
    stop_points: np.ndarray | Sequence[Sequence[float]] = (),
    zones: Sequence[np.ndarray | shapely.Geometry] = (),
    spec: SampleSpec = SampleSpec(),
) -> dict[str, np.ndarray]:
    """The stop-line and zone fields for hand-given ego-frame stop-line centres ``(n, 2)`` and zone polygons.

    Same rules as :func:`map_elements_near` (convex hull, nearest first,
    within ``lane_radius_m``), for scenes that have no :class:`MapGeometry`.
    """
    polys = [z if isinstance(z, shapely.Geometry) else shapely.Polygon(np.asarray(z, dtype=np.float64)) for z in zones]
    return _near(_elements((), np.asarray(stop_points, dtype=np.float64), polys, spec.zone_vertices), np.zeros(3), spec)


def build_scene_sample(
    log: ScenarioLog,
    frame: int,
    spec: SampleSpec = SampleSpec(),
    *,
    ego_status: np.ndarray | None = None,
) -> SceneSample:
    """The ego-frame view of ``log`` at keyframe ``frame``.

    Reads only ``log`` (the simulator passes a log whose past holds simulated
    poses); history before the first frame repeats the first pose. When
    ``ego_status`` is None it is computed from the logged poses by finite
    differences (see :func:`ego_status_from_log`).
    """
    T = log.num_frames
    if not 0 <= frame < T:
        raise DatasetError(f"frame {frame} is outside scene {log.scene_name!r}, which has {T} keyframes (0..{T - 1})")
    P, F, K = spec.past_steps, spec.future_steps, spec.num_agents
    ego = np.asarray(log.ego_pose, dtype=np.float64)
    origin = ego[frame].copy()

    past_idx = np.clip(np.arange(frame - P, frame + 1), 0, T - 1)
    ego_past = to_ego_frame(ego[past_idx], origin)
    ego_past[-1] = 0.0
    fut_idx = np.arange(frame + 1, frame + 1 + F)
    fut_valid = fut_idx < T
    ego_future = np.zeros((F, 3))
    if fut_valid.any():
        ego_future[fut_valid] = to_ego_frame(ego[fut_idx[fut_valid]], origin)

    if ego_status is None:
        status = ego_status_from_log(log, frame)
    else:
        status = np.asarray(ego_status, dtype=np.float64).reshape(3)

    # Agents: the K nearest of those annotated now.
    W = P + 1 + F
    agents_pose = np.zeros((K, W, 3))
    agents_valid = np.zeros((K, W), dtype=bool)
    agents_size = np.zeros((K, 2))
    agents_category = np.full(K, -1, dtype=np.int64)
    A = len(log.agents_token)
    if A and K:
        apose = np.asarray(log.agents_pose, dtype=np.float64)
        avalid = np.asarray(log.agents_valid, dtype=bool)
        now = np.flatnonzero(avalid[:, frame])
        if len(now):
            d2 = np.sum((apose[now, frame, :2] - origin[:2]) ** 2, axis=1)
            pick = now[np.argsort(d2, kind="stable")[:K]]
            idx = np.arange(frame - P, frame + 1 + F)
            inside = (idx >= 0) & (idx < T)
            cols = np.clip(idx, 0, T - 1)
            sel_valid = avalid[pick][:, cols] & inside[None, :]
            sel_pose = to_ego_frame(apose[pick][:, cols], origin)
            sel_pose[~sel_valid] = 0.0
            n = len(pick)
            agents_pose[:n] = sel_pose
            agents_valid[:n] = sel_valid
            agents_size[:n] = np.asarray(log.agents_size, dtype=np.float64)[pick]
            agents_category[:n] = np.asarray(log.agents_category, dtype=np.int64)[pick]

    lanes, lanes_valid = _lanes_near(log.map, origin, spec)
    drivable = _raster(log.map.drivable, origin, spec)
    token = log.sample_tokens[frame] if frame < len(log.sample_tokens) else f"{log.scene_token}:{frame}"
    return SceneSample(
        token=token,
        scene_token=log.scene_token,
        frame=int(frame),
        ego_pose_global=origin,
        ego_status=status,
        ego_past=ego_past,
        ego_future=ego_future,
        ego_future_valid=fut_valid,
        agents_pose=agents_pose,
        agents_valid=agents_valid,
        agents_size=agents_size,
        agents_category=agents_category,
        lanes=lanes,
        lanes_valid=lanes_valid,
        drivable=drivable,
        command=driving_command(log, frame),
        **map_elements_near(log.map, origin, spec),
    )


_STRING_FIELDS = ("token", "scene_token")


def stack_samples(samples: list[SceneSample]) -> dict[str, np.ndarray]:
    """One array per SceneSample field, samples along the first axis (strings as numpy unicode)."""
    if not samples:
        raise DatasetError("no samples to stack: the split or scene selection produced no keyframes")
    out: dict[str, np.ndarray] = {}
    for f in fields(SceneSample):
        values = [getattr(s, f.name) for s in samples]
        if f.name in _STRING_FIELDS:
            out[f.name] = np.array(values, dtype=str)
        elif f.name in ("frame", "command"):
            out[f.name] = np.array(values, dtype=np.int64)
        else:
            out[f.name] = np.stack([np.asarray(v) for v in values])
    return out


def scene_samples_from_arrays(arrays: dict[str, np.ndarray], i: int) -> SceneSample:
    """Sample ``i`` of stacked arrays (from :func:`stack_samples` or the HDF5 cache) back as a SceneSample.

    Arrays stacked before stop lines and zones existed lack those fields;
    the sample then has none (the field defaults).
    """
    kwargs = {}
    for f in fields(SceneSample):
        if f.name not in arrays and f.name in MAP_ELEMENT_FIELDS:
            continue
        if f.name not in arrays:
            raise DatasetError(f"stacked samples lack the field {f.name!r}; rebuild them with stack_samples")
        v = arrays[f.name][i]
        if f.name in _STRING_FIELDS:
            v = v.decode() if isinstance(v, bytes) else str(v)
        elif f.name in ("frame", "command"):
            v = int(v)
        else:
            v = np.array(v)
        kwargs[f.name] = v
    return SceneSample(**kwargs)


def example_scene_arrays(n: int, seed: int = 0, spec: SampleSpec = SampleSpec()) -> dict[str, np.ndarray]:
    """``n`` stacked straight-road samples (three lanes, a lead car, constant-speed ego): smoke tests and tracing.

    Speeds, the lead car's gap and the command vary with ``seed``; every
    future is complete, so hindsight labelling and open-loop scoring work.
    """
    rng = np.random.default_rng(seed)
    P, F, K, L, N = spec.past_steps, spec.future_steps, spec.num_agents, spec.num_lanes, spec.lane_points
    xs = np.linspace(-20.0, 2.0 * spec.lane_radius_m, N)
    samples = []
    for i in range(n):
        v = float(rng.uniform(2.0, 14.0))
        lanes, lanes_valid = np.zeros((L, N, 3)), np.zeros(L, bool)
        for j, y in enumerate((0.0, 3.5, -3.5)[: min(3, L)]):
            lanes[j, :, 0], lanes[j, :, 1], lanes_valid[j] = xs, y, True
        W = P + 1 + F
        t = DT * (np.arange(W) - P)
        a_pose, a_valid = np.zeros((K, W, 3)), np.zeros((K, W), bool)
        a_size, a_cat = np.zeros((K, 2)), np.full(K, -1)
        if K:
            gap, va = float(rng.uniform(10.0, 40.0)), float(rng.uniform(0.0, 12.0))
            a_pose[0, :, 0] = gap + va * t
            a_valid[0], a_size[0], a_cat[0] = True, (4.5, 1.9), 0
        past = np.zeros((P + 1, 3))
        past[:, 0] = v * DT * (np.arange(P + 1) - P)
        future = np.stack([v * DT * np.arange(1, F + 1), np.zeros(F), np.zeros(F)], axis=1)
        samples.append(SceneSample(
            token=f"example-{seed}-{i}", scene_token=f"example-{seed}", frame=i, ego_pose_global=np.zeros(3),
            ego_status=np.array([v, 0.0, 0.0]), ego_past=past, ego_future=future, ego_future_valid=np.ones(F, bool),
            agents_pose=a_pose, agents_valid=a_valid, agents_size=a_size, agents_category=a_cat, lanes=lanes,
            lanes_valid=lanes_valid, drivable=np.ones((spec.raster_size, spec.raster_size), np.uint8),
            command=int(rng.integers(0, len(COMMANDS))),
            **dict(zip(("stop_lines", "stop_lines_valid", "zones", "zones_valid"), _no_map_elements(spec))),
        ))
    return stack_samples(samples)
