"""Stop lines and crosswalks in every SceneSample: ego-frame geometry, stacking, and the STL stop/yield rules on them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import shapely
import torch

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import EGO_SIZE, MapGeometry, SampleSpec, SceneSample, ScenarioLog, to_ego_frame, to_global_frame
from diffpilot.data.scene_sample import (
    MAP_ELEMENT_FIELDS,
    build_scene_sample,
    pack_map_elements,
    scene_samples_from_arrays,
    stack_samples,
)
from diffpilot.data.traffic.generate import simulate_scenes
from diffpilot.stl import RuleSet, driving_signals, scene_from_arrays, scene_from_sample
from diffpilot.stl.calibration import logged_signals
from diffpilot.stl.report import evaluate_compliance
from diffpilot.stl.signals import STOP_CAP_M, map_context

YAW0 = 2.2  # the road runs north-west, so ego frame and global frame differ by a real rotation
START = np.array([300.0, -120.0, YAW0])
STOP_AHEAD, STOP_AHEAD_2 = 20.0, 35.0  # stop-line centres along the road from the first ego pose
CROSSWALK_EGO = [(3.0, 6.0), (7.0, 6.0), (7.0, 12.0), (3.0, 12.0)]  # to the left of the first ego pose
MAP_RULES = ["stop_at_line", "yield"]


def _g(x: float, y: float) -> np.ndarray:
    """Global x, y of the point (x, y) in the frame of the first ego pose."""
    return to_global_frame(np.array([x, y, 0.0]), START)[:2]


def _box(cx: float, cy: float, half_len: float, half_width: float) -> shapely.Polygon:
    """A rectangle given in the first ego pose's frame, as a global polygon."""
    return shapely.Polygon([_g(cx + a * half_len, cy + b * half_width) for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))])


def _map() -> MapGeometry:
    s = np.arange(-30.0, 100.0, 0.5)
    lane = to_global_frame(np.column_stack([s, np.zeros_like(s), np.zeros_like(s)]), START)
    return MapGeometry(
        lanes=[lane], lane_tokens=["lane"], lane_is_connector=np.array([False]),
        drivable=shapely.buffer(shapely.LineString(lane[:, :2]), 6.0),
        # listed farthest first: the sample must sort them
        stop_lines=[_box(STOP_AHEAD_2, 0.0, 0.3, 3.0), _box(STOP_AHEAD, 0.0, 0.3, 3.0)],
        crosswalks=[_box(200.0, 0.0, 2.0, 6.0), shapely.Polygon([_g(x, y) for x, y in CROSSWALK_EGO])],
    )


def _log(name: str, s: np.ndarray, geom: MapGeometry) -> ScenarioLog:
    """The ego at arc lengths ``s`` along the road (one per keyframe), no agents."""
    T = len(s)
    ego = to_global_frame(np.column_stack([s, np.zeros(T), np.zeros(T)]), START)
    return ScenarioLog(
        scene_token=f"{name}-token", scene_name=name, location="singapore-onenorth",
        sample_tokens=[f"{name}-{t}" for t in range(T)], times=np.arange(T) * 0.5, ego_pose=ego, ego_size=EGO_SIZE,
        agents_token=[], agents_category=np.zeros(0, dtype=np.int64), agents_size=np.zeros((0, 2)),
        agents_pose=np.zeros((0, T, 3)), agents_valid=np.zeros((0, T), dtype=bool), map=geom,
    )


# the front bumper stops 0.06 m before the line for two seconds, then drives on
STOPS = np.array([0, 4, 7.5, 10.5, 13, 15, 16.5, 17.5, 17.9, 17.9, 17.9, 17.9, 17.9, 18.5, 20.5, 24, 28, 32, 36, 40.0])
ROLLS = 3.0 * np.arange(20.0)  # 6 m/s through the line


def _ring_equal(zone: np.ndarray, expected: list[tuple[float, float]]) -> None:
    got = shapely.Polygon(zone)
    want = shapely.Polygon(expected)
    assert got.is_valid and abs(got.area - want.area) < 1e-6
    assert shapely.symmetric_difference(got, want).area < 1e-6


def test_stop_lines_and_crosswalks_in_the_ego_frame() -> None:
    geom = _map()
    log = _log("stops", STOPS, geom)
    spec = SampleSpec()
    s = build_scene_sample(log, 0, spec)
    assert s.stop_lines.shape == (4, 2) and s.zones.shape == (4, 8, 2)
    # hand computed: the two lines on the road axis, nearest first; padding invalid and zero
    assert s.stop_lines_valid.tolist() == [True, True, False, False]
    np.testing.assert_allclose(s.stop_lines[:2], [[STOP_AHEAD, 0.0], [STOP_AHEAD_2, 0.0]], atol=1e-9)
    assert not s.stop_lines[2:].any()
    # the crosswalk on the left is the only zone (the other is 200 m away); counter-clockwise, padded with its last vertex
    assert s.zones_valid.tolist() == [True, False, False, False]
    z = s.zones[0]
    _ring_equal(z, CROSSWALK_EGO)
    distinct = np.unique(z.round(9), axis=0)
    assert len(distinct) == 4
    assert np.all(z[4:] == z[3])
    x, y = z[:, 0], z[:, 1]
    assert 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) > 0
    # eight metres on, both move back by 8 m in the ego frame
    s4 = build_scene_sample(log, 2, spec)
    np.testing.assert_allclose(s4.stop_lines[0], [STOP_AHEAD - STOPS[2], 0.0], atol=1e-9)
    _ring_equal(s4.zones[0], [(x - STOPS[2], y) for x, y in CROSSWALK_EGO])
    # map_context gives the same arrays for a caller that only has the map and a pose
    ctx = map_context(geom, log.ego_pose[2], spec)
    assert set(ctx) == set(MAP_ELEMENT_FIELDS)
    for k in MAP_ELEMENT_FIELDS:
        np.testing.assert_array_equal(ctx[k], getattr(s4, k))
    # a smaller radius drops the far stop line; fewer slots keep the nearest
    near = build_scene_sample(log, 0, replace(spec, lane_radius_m=30.0, num_stop_lines=1, num_zones=2))
    assert near.stop_lines_valid.tolist() == [True] and near.zones_valid.tolist() == [True, False]
    np.testing.assert_allclose(near.stop_lines[0], [STOP_AHEAD, 0.0], atol=1e-9)


def test_a_crosswalk_with_many_vertices_becomes_an_enclosing_rectangle() -> None:
    round_walk = shapely.Point(*_g(10.0, -8.0)).buffer(3.0, quad_segs=8)  # 32 vertices
    geom = replace(_map(), crosswalks=[round_walk])
    log = _log("round", STOPS, geom)
    few = build_scene_sample(log, 0, SampleSpec(zone_vertices=6)).zones[0]
    assert len(np.unique(few.round(9), axis=0)) == 4
    ring = np.asarray(round_walk.exterior.coords)
    ego_walk = shapely.Polygon(to_ego_frame(np.column_stack([ring, np.zeros(len(ring))]), START)[:, :2])
    assert shapely.Polygon(few).buffer(1e-6).contains(ego_walk)
    np.testing.assert_allclose(shapely.Polygon(few).area, 36.0, rtol=0.02)  # about the square around the circle
    many = build_scene_sample(log, 0, SampleSpec(zone_vertices=40)).zones[0]
    np.testing.assert_allclose(shapely.Polygon(many).area, ego_walk.convex_hull.area, rtol=1e-9)
    with pytest.raises(DatasetError, match="zone_vertices"):
        build_scene_sample(log, 0, SampleSpec(zone_vertices=3))


def test_stacking_keeps_the_fields_and_old_arrays_still_work() -> None:
    log = _log("stops", STOPS, _map())
    samples = [build_scene_sample(log, f) for f in range(4, 10)]
    arrays = stack_samples(samples)
    assert arrays["zones"].shape == (6, 4, 8, 2) and arrays["stop_lines_valid"].dtype == bool
    back = scene_samples_from_arrays(arrays, 2)
    for k in MAP_ELEMENT_FIELDS:
        np.testing.assert_array_equal(getattr(back, k), getattr(samples[2], k))
    # arrays stacked before the fields existed: samples and scenes have no stop line or zone
    old = {k: v for k, v in arrays.items() if k not in MAP_ELEMENT_FIELDS}
    assert not scene_samples_from_arrays(old, 0).stop_lines_valid.any()
    sig = driving_signals(torch.as_tensor(old["ego_future"])[:, None], scene_from_arrays(old))
    assert float(sig["stop_distance"].min()) == STOP_CAP_M
    assert float(scene_from_arrays(arrays).stop_valid.sum()) > 0
    # a half-copied set is an error, not a silent "no stop lines"
    with pytest.raises(DatasetError, match="zones_valid"):
        scene_from_arrays({k: v for k, v in arrays.items() if k != "zones_valid"})
    # a sample built without a map (e.g. highway-env) has none, in the default sizes
    bare = SceneSample(**{k: getattr(samples[0], k) for k in samples[0].__dataclass_fields__ if k not in MAP_ELEMENT_FIELDS})
    assert bare.zones.shape == (4, 8, 2) and not bare.zones_valid.any() and not bare.stop_lines_valid.any()
    # a zone flagged valid must have an area
    flat = replace(samples[0], zones=np.zeros((4, 8, 2)), zones_valid=np.array([True, False, False, False]))
    with pytest.raises(DatasetError, match="no area"):
        scene_from_sample(flat)


def _old_path(log: ScenarioLog, sample: SceneSample, spec: SampleSpec) -> SceneSample:
    """The sample with stop lines and zones put in the way callers used to: from the map, per window.

    Every stop-line centroid and crosswalk hull within the radius, moved into
    the ego frame with to_ego_frame, independent of build_scene_sample.
    """
    pose = sample.ego_pose_global
    centres = []
    for poly in log.map.stop_lines:
        c = np.asarray(poly.centroid.coords[0])
        if np.hypot(*(c - pose[:2])) <= spec.lane_radius_m:
            centres.append(to_ego_frame(np.array([c[0], c[1], 0.0]), pose)[:2])
    zones = []
    for poly in log.map.crosswalks:
        if shapely.distance(poly.convex_hull, shapely.Point(pose[:2])) <= spec.lane_radius_m:
            hull = np.asarray(poly.convex_hull.exterior.coords)[:-1]
            zones.append(to_ego_frame(np.column_stack([hull, np.zeros(len(hull))]), pose)[:, :2])
    assert len(centres) <= spec.num_stop_lines and len(zones) <= spec.num_zones
    return replace(sample, **pack_map_elements(np.array(centres).reshape(-1, 2), zones, spec))


def test_stop_and_yield_from_stacked_samples_match_the_explicit_map_path() -> None:
    spec = SampleSpec()
    geom = _map()
    logs = [_log("stops", STOPS, geom), _log("rolls", ROLLS, geom)]
    logs += simulate_scenes(3, seed=0, progress=False)[1]  # the junction town: stop lines and crosswalks
    assert sum(len(lg.map.stop_lines) for lg in logs[2:]) > 0
    frames = [(lg, f) for lg in logs for f in range(0, lg.num_frames - 8, 2)]
    samples = [build_scene_sample(lg, f, spec) for lg, f in frames]
    arrays = stack_samples(samples)
    fut = torch.as_tensor(arrays["ego_future"])[:, None]
    rules = RuleSet(MAP_RULES)
    # the data path: nothing but the stacked arrays
    sig = driving_signals(fut, scene_from_arrays(arrays))
    rho = {k: v[:, 0].numpy() for k, v in rules.evaluate(sig).items()}
    # the old path: stop lines and zones from the map, window by window
    ref = {k: np.zeros(len(samples)) for k in MAP_RULES}
    for i, ((lg, _), s) in enumerate(zip(frames, samples)):
        r = rules.evaluate(driving_signals(fut[i], scene_from_sample(_old_path(lg, s, spec))))
        for k in MAP_RULES:
            ref[k][i] = float(r[k][0, 0]) if r[k].dim() > 1 else float(r[k][0])
    for k in MAP_RULES:
        np.testing.assert_allclose(rho[k], ref[k], rtol=0, atol=1e-6, err_msg=k)
    # the rules see something: the hand-made stop holds, rolling through violates, zones come near
    first_stops = next(i for i, (lg, f) in enumerate(frames) if lg.scene_name == "stops")
    first_rolls = next(i for i, (lg, f) in enumerate(frames) if lg.scene_name == "rolls")
    assert rho["stop_at_line"][first_stops] > 0 > rho["stop_at_line"][first_rolls]
    assert np.sum(sig["stop_distance"][:, 0].amin(dim=-1).numpy() < STOP_CAP_M) >= 10
    assert np.sum(rho["yield"] < STOP_CAP_M) >= 10
    # without the fields the same windows would all pass trivially
    blind = {k: v for k, v in arrays.items() if k not in MAP_ELEMENT_FIELDS}
    blind_rho = rules.evaluate(driving_signals(fut, scene_from_arrays(blind)))["stop_at_line"][:, 0].numpy()
    assert np.all(blind_rho == STOP_CAP_M) and not np.allclose(blind_rho, rho["stop_at_line"])
    # the report and the calibration read the same fields
    res = evaluate_compliance(arrays, rules)
    for k in MAP_RULES:
        np.testing.assert_allclose(res.robustness[k], rho[k], rtol=0, atol=1e-6)
    sig2, _ = logged_signals(arrays)
    torch.testing.assert_close(sig2["stop_distance"], sig["stop_distance"])
