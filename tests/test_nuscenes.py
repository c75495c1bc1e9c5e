"""nuScenes writer -> real nuscenes-devkit -> reader -> ego-frame samples, on a hand-made two-scene data set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely

from diffpilot.data.errors import DatasetError
from diffpilot.data.nuscenes import NuScenesReader, load_scene_samples, scene_samples_from_arrays
from diffpilot.data.nuscenes_format import EXPANSION_KEYS, OFFICIAL_LOCATIONS, TABLES, write_nuscenes
from diffpilot.data.scenario import (
    CATEGORIES,
    COMMANDS,
    DT,
    EGO_SIZE,
    MapGeometry,
    SampleSpec,
    ScenarioLog,
    to_global_frame,
)
from diffpilot.data.scene_sample import build_scene_sample, driving_command

LOCATION = "singapore-onenorth"
VERSION = "v1.0-test"
YAW0 = np.deg2rad(30.0)
START = np.array([500.0, 800.0])
STRAIGHT_LEN = 120.0
RADIUS = 20.0
SPEED = 8.0
OFFSET = -0.7  # the straight-lane ego drives 0.7 m right of the lane centre (road edges at +5.7 / -4.3 m)
AHEAD, LEFT = 10.0, 3.5  # where the vehicle agent sits in the ego frame


def _straight() -> np.ndarray:
    s = np.arange(0.0, STRAIGHT_LEN + 1e-9, 0.5)
    d = np.array([np.cos(YAW0), np.sin(YAW0)])
    xy = START + s[:, None] * d
    return np.column_stack([xy, np.full(len(s), YAW0)])


def _curve() -> np.ndarray:
    """A left turn of RADIUS through 90 degrees starting where the straight lane ends."""
    end = _straight()[-1]
    centre = end[:2] + RADIUS * np.array([-np.sin(YAW0), np.cos(YAW0)])
    phi = np.linspace(0.0, np.pi / 2, 64)
    ang = YAW0 - np.pi / 2 + phi
    xy = centre + RADIUS * np.column_stack([np.cos(ang), np.sin(ang)])
    return np.column_stack([xy, YAW0 + phi])


def _attach(offset: list[float], ego: np.ndarray) -> np.ndarray:
    """Global poses of a point held at ``offset`` in the ego frame at every frame."""
    return np.stack([to_global_frame(np.asarray(offset), pose) for pose in ego])


def _map() -> MapGeometry:
    straight, curve = _straight(), _curve()
    road = shapely.union_all([shapely.LineString(c[:, :2]).buffer(5.0, cap_style="flat") for c in (straight, curve)])
    d = np.array([np.cos(YAW0), np.sin(YAW0)])
    n = np.array([-d[1], d[0]])
    mid = START + 80.0 * d
    crosswalk = shapely.Polygon([mid - 5 * n - 2 * d, mid + 5 * n - 2 * d, mid + 5 * n + 2 * d, mid - 5 * n + 2 * d])
    stop = START + 75.0 * d
    stop_line = shapely.Polygon([stop - 5 * n - 0.5 * d, stop + 5 * n - 0.5 * d, stop + 5 * n + 0.5 * d,
                                 stop - 5 * n + 0.5 * d])
    return MapGeometry(
        lanes=[straight, curve], lane_tokens=["lane_straight", "lane_curve"],
        lane_is_connector=np.array([False, True]), drivable=road, stop_lines=[stop_line], crosswalks=[crosswalk],
        lane_successors={"lane_straight": ["lane_curve"], "lane_curve": []},
    )


def _straight_log(geom: MapGeometry) -> ScenarioLog:
    """Ego at constant SPEED along the straight lane; a car keeps (AHEAD, LEFT) in its frame; a pedestrian waits."""
    T = 12
    times = np.arange(T) * DT
    d = np.array([np.cos(YAW0), np.sin(YAW0)])
    n = np.array([-d[1], d[0]])
    xy = START + (10.0 + SPEED * times)[:, None] * d + OFFSET * n
    ego = np.column_stack([xy, np.full(T, YAW0)])
    car = _attach([AHEAD, LEFT, 0.0], ego)
    ped = np.tile([*(START + 60.0 * d + 7.0 * n), YAW0 + np.pi / 2], (T, 1))
    valid = np.ones((2, T), dtype=bool)
    valid[1, :2] = False
    valid[1, 9:] = False
    pose = np.stack([car, ped])
    pose[~valid] = 0.0
    return ScenarioLog(
        scene_token="scene-straight-token", scene_name="scene-0001", location=LOCATION,
        sample_tokens=[f"s1-{t:02d}" for t in range(T)], times=times, ego_pose=ego, ego_size=EGO_SIZE,
        agents_token=["car-1", "ped-1"], agents_category=np.array([CATEGORIES.index("vehicle"),
                                                                   CATEGORIES.index("pedestrian")]),
        agents_size=np.array([[4.5, 1.9], [0.7, 0.7]]), agents_pose=pose, agents_valid=valid, map=geom,
        route=["lane_straight"],
    )


def _curve_log(geom: MapGeometry) -> ScenarioLog:
    """Ego turns left along the curve at 5 m/s for 6 steps, then stands still; one cyclist follows."""
    curve = _curve()
    seg = np.linalg.norm(np.diff(curve[:, :2], axis=0), axis=1)
    s_lane = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.array([min(5.0 * DT * t, 5.0 * DT * 6) for t in range(10)])
    x = np.interp(s, s_lane, curve[:, 0])
    y = np.interp(s, s_lane, curve[:, 1])
    yaw = np.interp(s, s_lane, curve[:, 2])
    ego = np.column_stack([x, y, yaw])
    bike = _attach([-8.0, 0.0, 0.0], ego)
    return ScenarioLog(
        scene_token="scene-curve-token", scene_name="scene-0002", location=LOCATION,
        sample_tokens=[f"s2-{t:02d}" for t in range(10)], times=np.arange(10) * DT, ego_pose=ego, ego_size=EGO_SIZE,
        agents_token=["bike-2"], agents_category=np.array([CATEGORIES.index("bicycle")]),
        agents_size=np.array([[1.8, 0.6]]), agents_pose=bike[None], agents_valid=np.ones((1, 10), dtype=bool),
        map=geom, route=["lane_curve"],
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ScenarioLog]]:
    geom = _map()
    logs = [_straight_log(geom), _curve_log(geom)]
    root = tmp_path_factory.mktemp("nusc") / "data"
    write_nuscenes(root, VERSION, {LOCATION: geom}, logs, {"train": ["scene-0001"], "val": ["scene-0002"]})
    return root, logs


@pytest.fixture(scope="module")
def reader(written: tuple[Path, list[ScenarioLog]]) -> NuScenesReader:
    return NuScenesReader(written[0], VERSION)


def test_layout_has_what_the_devkit_needs(written: tuple[Path, list[ScenarioLog]]) -> None:
    root, _ = written
    for table in TABLES:
        assert isinstance(json.loads((root / VERSION / f"{table}.json").read_text()), list)
    maps = json.loads((root / VERSION / "map.json").read_text())
    assert {m["filename"] for m in maps} and all((root / m["filename"]).is_file() for m in maps)
    logs = json.loads((root / VERSION / "log.json").read_text())
    assert {l["token"] for l in logs} <= {t for m in maps for t in m["log_tokens"]}
    for loc in OFFICIAL_LOCATIONS:
        doc = json.loads((root / "maps" / "expansion" / f"{loc}.json").read_text())
        assert set(doc) == set(EXPANSION_KEYS) and len(EXPANSION_KEYS) == 19
        assert doc["version"] >= "1.3"
    assert json.loads((root / VERSION / "diffpilot_splits.json").read_text())["val"] == ["scene-0002"]


def test_devkit_round_trip(reader: NuScenesReader, written: tuple[Path, list[ScenarioLog]]) -> None:
    _, logs = written
    assert reader.scene_names("train") == ["scene-0001"]
    for src in logs:
        got = reader.scenario_log(src.scene_name)
        assert got.location == LOCATION and got.scene_token == src.scene_token
        assert got.sample_tokens == src.sample_tokens
        np.testing.assert_allclose(got.times, src.times, atol=1e-6)
        np.testing.assert_allclose(got.ego_pose, src.ego_pose, atol=1e-6)
        order = [got.agents_token.index(t) for t in src.agents_token]
        np.testing.assert_array_equal(got.agents_category[order], src.agents_category)
        np.testing.assert_allclose(got.agents_size[order], src.agents_size)
        np.testing.assert_array_equal(got.agents_valid[order], src.agents_valid)
        v = src.agents_valid
        np.testing.assert_allclose(got.agents_pose[order][v], src.agents_pose[v], atol=1e-6)
        assert got.route == src.route
        assert set(got.map.lane_tokens) == {"lane_straight", "lane_curve"}
        assert got.map.lane_successors["lane_straight"] == ["lane_curve"]
        assert len(got.map.stop_lines) == 1 and len(got.map.crosswalks) == 1
        assert got.map.drivable.contains(shapely.Point(*src.ego_pose[0, :2]))


def test_discretize_lanes_reproduces_centerlines(written: tuple[Path, list[ScenarioLog]]) -> None:
    from nuscenes.map_expansion.map_api import NuScenesMap

    root, _ = written
    nmap = NuScenesMap(dataroot=str(root), map_name=LOCATION)
    disc = nmap.discretize_lanes(["lane_straight", "lane_curve"], 0.5)
    for token, truth in (("lane_straight", _straight()), ("lane_curve", _curve())):
        pts = np.asarray(disc[token])[:, :2]
        # Both ways: every devkit point near our centerline and every centerline vertex near the devkit's line.
        to_truth = shapely.distance(shapely.points(pts), shapely.LineString(truth[:, :2])).max()
        to_devkit = shapely.distance(shapely.points(truth[:, :2]), shapely.LineString(pts)).max()
        assert to_truth < 0.1 and to_devkit < 0.1
        np.testing.assert_allclose(pts[0], truth[0, :2], atol=1e-6)
        np.testing.assert_allclose(pts[-1], truth[-1, :2], atol=1e-6)
        assert np.linalg.norm(np.diff(pts, axis=0), axis=1).max() <= 0.5 + 1e-9
    assert nmap.get_outgoing_lane_ids("lane_straight") == ["lane_curve"]
    assert nmap.get_incoming_lane_ids("lane_curve") == ["lane_straight"]


def test_scene_sample_matches_hand_computed_values(reader: NuScenesReader) -> None:
    log = reader.scenario_log("scene-0001")
    spec = SampleSpec()
    frame = 5
    s = build_scene_sample(log, frame, spec)
    np.testing.assert_allclose(s.ego_pose_global, log.ego_pose[frame])
    car = log.agents_token.index("car-1")
    row = int(np.argmin(np.linalg.norm(s.agents_pose[:, spec.past_steps, :2] - [AHEAD, LEFT], axis=1)))
    assert s.agents_category[row] == CATEGORIES.index("vehicle")
    np.testing.assert_allclose(s.agents_pose[row, spec.past_steps], [AHEAD, LEFT, 0.0], atol=1e-6)
    np.testing.assert_allclose(s.agents_size[row], log.agents_size[car])
    # The pedestrian is annotated at frames 2..8: its window (1..13) is valid exactly there.
    ped = int(np.flatnonzero(s.agents_category == CATEGORIES.index("pedestrian"))[0])
    window = np.arange(frame - spec.past_steps, frame + spec.future_steps + 1)
    np.testing.assert_array_equal(s.agents_valid[ped], (window >= 2) & (window <= 8))
    assert np.all(s.agents_category[2:] == -1) and not s.agents_valid[2:].any()
    # Constant velocity: speed SPEED, no acceleration, no turning; future at SPEED * DT steps.
    np.testing.assert_allclose(s.ego_status, [SPEED, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(s.ego_future[0], [SPEED * DT, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(s.ego_past[0], [-SPEED * DT * spec.past_steps, 0.0, 0.0], atol=1e-6)
    assert s.ego_future_valid.tolist() == [frame + k < log.num_frames for k in range(1, spec.future_steps + 1)]
    # The nearest lane is the straight one, OFFSET to the ego's right, i.e. at y = -OFFSET.
    assert s.lanes_valid[0]
    lane = s.lanes[0]
    assert np.all(np.diff(lane[:, 0]) > 0)  # direction of travel kept
    np.testing.assert_allclose(np.interp(0.0, lane[:, 0], lane[:, 1]), -OFFSET, atol=1e-3)
    assert np.hypot(lane[:, 0], lane[:, 1]).max() <= spec.lane_radius_m + 1e-6
    # Drivable raster: the ego is on the road (centre), 30 m to the side is not.
    R = spec.raster_size
    assert s.drivable.shape == (R, R) and s.drivable[R // 2, R // 2] == 1 and s.drivable[R // 2 - 1, R // 2 - 1] == 1
    assert s.drivable[R // 2, 0] == 0 and s.drivable[R // 2, R - 1] == 0
    # Column j is y = R/2 - j - 0.5 (column 0 most left): the road spans y in (-4.3, 5.7) -> columns 26..35.
    assert np.flatnonzero(s.drivable[R // 2]).tolist() == list(range(26, 36))
    # Row i is x = R/2 - i - 0.5 (row 0 most forward): at frame 0 the road starts 10 m behind -> rows 0..41.
    first = build_scene_sample(log, 0, spec).drivable
    assert np.flatnonzero(first[:, R // 2]).tolist() == list(range(0, 42))
    assert s.command == COMMANDS.index("keep_lane")
    # The stop line (75 m along the lane) and the crosswalk (78..82 m along, 5 m either side of the lane centre),
    # read back through the devkit's stop_line / ped_crossing records, in the frame of the ego 30 m along and
    # OFFSET to the right of the lane.
    assert s.stop_lines_valid.tolist() == [True] + [False] * (spec.num_stop_lines - 1)
    np.testing.assert_allclose(s.stop_lines[0], [45.0, -OFFSET], atol=1e-3)  # map nodes are stored rounded
    assert s.zones_valid.tolist() == [True] + [False] * (spec.num_zones - 1)
    zone = shapely.Polygon(s.zones[0])
    want = shapely.box(48.0, -5.0 - OFFSET, 52.0, 5.0 - OFFSET)
    assert shapely.symmetric_difference(zone, want).area < 1e-2
    # Two frames earlier the crosswalk (56 m ahead) is beyond lane_radius_m; the stop line (53 m) too.
    early = build_scene_sample(log, 2, spec)
    assert not early.zones_valid.any() and not early.stop_lines_valid.any()
    # An explicit ego status is passed through unchanged.
    np.testing.assert_allclose(build_scene_sample(log, frame, spec, ego_status=np.array([1.0, 2.0, 3.0])).ego_status,
                               [1.0, 2.0, 3.0])


def test_driving_command_left_and_stop(reader: NuScenesReader) -> None:
    log = reader.scenario_log("scene-0002")
    assert driving_command(log, 0) == COMMANDS.index("left")  # 15 m along a 20 m radius: 0.75 rad in 3 s
    assert driving_command(log, 4) == COMMANDS.index("stop")  # halts at frame 6
    mirrored = build_scene_sample(log, 0).ego_status
    assert mirrored[2] > 0  # turning left: positive yaw rate
    np.testing.assert_allclose(mirrored[0], 5.0, rtol=0.02)


def test_cache_is_one_file_and_reloads_equal(written: tuple[Path, list[ScenarioLog]], tmp_path: Path) -> None:
    src, logs = written
    root = tmp_path / "data"
    shutil.copytree(src, root)
    cache = tmp_path / "cache"
    spec = SampleSpec(past_steps=2, future_steps=4, num_agents=4, num_lanes=3, lane_points=10, raster_size=16)
    first = load_scene_samples(root, VERSION, "train", spec, cache_dir=cache, progress=False)
    assert [p.suffix for p in cache.rglob("*") if p.is_file()] == [".h5"]
    second = load_scene_samples(root, VERSION, "train", spec, cache_dir=cache, progress=False)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    T = logs[0].num_frames
    assert first["frame"].tolist() == list(range(spec.past_steps, T - 1))  # full history, at least one future step
    assert set(first["scene_token"].tolist()) == {logs[0].scene_token}

    # One sample back from the arrays equals a freshly built one.
    back = scene_samples_from_arrays(second, 3)
    fresh = build_scene_sample(NuScenesReader(root, VERSION).scenario_log("scene-0001"), back.frame, spec)
    assert back.token == fresh.token and back.command == fresh.command
    for key in ("ego_status", "ego_future", "agents_pose", "agents_valid", "agents_category", "lanes", "drivable",
                "stop_lines", "stop_lines_valid", "zones", "zones_valid"):
        np.testing.assert_allclose(getattr(back, key), getattr(fresh, key))
    assert first["zones"].shape[1:] == (spec.num_zones, spec.zone_vertices, 2)
    assert first["stop_lines_valid"].any() and first["zones_valid"].any() and not first["stop_lines_valid"].all()

    # Rewriting the data set (both scenes now in train) rebuilds the same cache file.
    write_nuscenes(root, VERSION, {LOCATION: logs[0].map}, logs, {"train": ["scene-0001", "scene-0002"]})
    third = load_scene_samples(root, VERSION, "train", spec, cache_dir=cache, progress=False)
    assert len(third["token"]) == (T - 1 - spec.past_steps) + (logs[1].num_frames - 1 - spec.past_steps)
    assert len([p for p in cache.rglob("*") if p.is_file()]) == 1


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_bad_inputs_give_specific_errors(written: tuple[Path, list[ScenarioLog]], tmp_path: Path) -> None:
    root, logs = written
    with pytest.raises(DatasetError, match="does not exist"):
        NuScenesReader(tmp_path / "nowhere", VERSION)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a nuScenes data root"):
        NuScenesReader(tmp_path / "empty", VERSION)
    with pytest.raises(DatasetError, match=r"version folder .*v9.9.* does not exist"):
        NuScenesReader(root, "v9.9")

    bad = _copy(root, tmp_path)
    (bad / VERSION / "sample_annotation.json").unlink()
    with pytest.raises(DatasetError, match=r"lacks the table\(s\) \['sample_annotation'\]"):
        NuScenesReader(bad, VERSION)
    shutil.rmtree(bad)

    bad = _copy(root, tmp_path)
    maps = json.loads((bad / VERSION / "map.json").read_text())
    for m in maps:
        m["log_tokens"] = []
    (bad / VERSION / "map.json").write_text(json.dumps(maps))
    log_token = json.loads((bad / VERSION / "log.json").read_text())[0]["token"]
    with pytest.raises(DatasetError, match=f"scene 'scene-0001': its log '{log_token}' has no map"):
        NuScenesReader(bad, VERSION)
    shutil.rmtree(bad)

    bad = _copy(root, tmp_path)
    (bad / VERSION / "sample_data.json").write_text('[{"token": "a", ')  # truncated
    with pytest.raises(DatasetError, match=r"sample_data.json is not valid JSON"):
        NuScenesReader(bad, VERSION)
    from diffpilot.driving_jobs import driving_data_job

    (bad / "maps" / "expansion" / f"{LOCATION}.json").unlink()
    with pytest.raises(DatasetError, match="map expansion for location"):  # `driving data` checks as fully as eval
        driving_data_job({"root": str(bad), "version": VERSION})
    shutil.rmtree(bad)

    bad = _copy(root, tmp_path)
    (bad / "maps" / "expansion" / f"{LOCATION}.json").unlink()
    with pytest.raises(DatasetError, match=f"map expansion for location '{LOCATION}' is missing: expected .*{LOCATION}.json"):
        NuScenesReader(bad, VERSION).scenario_log("scene-0001")
    shutil.rmtree(bad)

    with pytest.raises(DatasetError, match="split 'test' is not in"):
        NuScenesReader(root, VERSION).scene_names("test")
    with pytest.raises(DatasetError, match="refusing to replace"):
        write_nuscenes(tmp_path, VERSION, {}, [], {})
    with pytest.raises(DatasetError, match="no map was given"):
        write_nuscenes(tmp_path / "new", VERSION, {}, logs[:1], {})
    with pytest.raises(DatasetError, match="named 'scene-0001'"):
        write_nuscenes(tmp_path / "new", VERSION, {LOCATION: logs[0].map}, [logs[0], logs[0]], {})
    assert not (tmp_path / "new").exists()


def test_agent_tracks_agree_with_the_devkit_predict_helper(reader: NuScenesReader) -> None:
    """The reader's agent past/future (global frame) equal what nuscenes-devkit's PredictHelper returns."""
    from nuscenes.prediction import PredictHelper

    helper = PredictHelper(reader.nusc)
    log = reader.scenario_log("scene-0001")
    checked = 0
    for a, instance in enumerate(log.agents_token):
        for t in range(1, log.num_frames - 1):
            if not log.agents_valid[a, t]:
                continue
            sample = log.sample_tokens[t]
            future = np.reshape(helper.get_future_for_agent(instance, sample, seconds=1.0, in_agent_frame=False), (-1, 2))
            past = np.reshape(helper.get_past_for_agent(instance, sample, seconds=1.0, in_agent_frame=False), (-1, 2))
            fut_t = [u for u in range(t + 1, min(t + 3, log.num_frames)) if log.agents_valid[a, u]][: len(future)]
            past_t = [u for u in range(t - 1, max(t - 3, -1), -1) if log.agents_valid[a, u]][: len(past)]
            np.testing.assert_allclose(future, log.agents_pose[a, fut_t, :2], atol=1e-6)
            np.testing.assert_allclose(past, log.agents_pose[a, past_t, :2], atol=1e-6)
            checked += len(future) + len(past)
    assert checked > 10
