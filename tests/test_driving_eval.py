"""Driving evaluation at scale: closed-loop rows, open loop, one-shot PDMS, Ray parity and the eval job.

The data set is hand-made (a straight two-lane road and a 90-degree left
bend, written as nuScenes and read back with the real devkit), so what each
baseline should score follows from the geometry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from diffpilot.data.errors import DatasetError
from diffpilot.data.nuscenes_format import write_nuscenes
from diffpilot.data.scenario import CATEGORIES, DT, EGO_SIZE, MapGeometry, ScenarioLog
from diffpilot.driving_jobs import driving_config, driving_data_job, driving_eval_job
from diffpilot.sim.driving.evaluate import (
    TIMING_KEYS,
    evaluate_planner,
    navsim_scores,
    open_loop,
    planner_factory,
    summarize_rows,
)

LOCATION = "boston-seaport"
VERSION = "v1.0-evaltest"
T = 20  # keyframes per scene (9.5 s)
LANE_W = 3.5
VEHICLE = CATEGORIES.index("vehicle")


def _path(start: np.ndarray, yaw0: float, pieces: list[tuple[float, float]]) -> np.ndarray:
    """Centerline poses every 0.5 m from (length, curvature) pieces."""
    pts, (x, y), yaw = [], start, yaw0
    for length, kappa in pieces:
        for _ in range(int(round(length / 0.5))):
            pts.append((x, y, yaw))
            x, y = x + 0.5 * np.cos(yaw + 0.25 * kappa), y + 0.5 * np.sin(yaw + 0.25 * kappa)
            yaw += 0.5 * kappa
    pts.append((x, y, yaw))
    return np.array(pts)


def _along(lane: np.ndarray, s: np.ndarray, lateral: float = 0.0) -> np.ndarray:
    """Poses at arclengths ``s`` along ``lane``, shifted ``lateral`` metres to the left."""
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(lane[:, :2], axis=0), axis=1))])
    yaw = np.interp(s, arc, np.unwrap(lane[:, 2]))
    x = np.interp(s, arc, lane[:, 0]) - lateral * np.sin(yaw)
    y = np.interp(s, arc, lane[:, 1]) + lateral * np.cos(yaw)
    return np.column_stack([x, y, yaw])


STRAIGHT = _path(np.array([1000.0, 1400.0]), 0.0, [(200.0, 0.0)])
BEND = _path(np.array([1000.0, 1000.0]), 0.0, [(60.0, 0.0), (np.pi / 2 * 20.0, 1 / 20.0), (80.0, 0.0)])


def _map() -> MapGeometry:
    left = STRAIGHT.copy()
    left[:, 1] += LANE_W
    road = shapely.union_all([
        shapely.LineString(STRAIGHT[:, :2]).buffer(LANE_W / 2, cap_style="flat"),
        shapely.LineString(left[:, :2]).buffer(LANE_W / 2, cap_style="flat"),
        shapely.LineString(BEND[:, :2]).buffer(LANE_W, cap_style="flat"),
    ]).buffer(0.05)
    return MapGeometry(lanes=[STRAIGHT, left, BEND], lane_tokens=["lane_right", "lane_left", "lane_bend"],
                       lane_is_connector=np.zeros(3, dtype=bool), drivable=road,
                       lane_successors={"lane_right": [], "lane_left": [], "lane_bend": []})


def _log(name: str, lane: np.ndarray, route: str, speed: float, s0: float, agents: list[tuple[float, float, float]],
         geom: MapGeometry) -> ScenarioLog:
    """Ego at ``speed`` from arclength ``s0``; agents (s0, speed, lateral offset) along the same lane."""
    times = DT * np.arange(T)
    ego = _along(lane, s0 + speed * times)
    poses = np.stack([_along(lane, a0 + v * times, lat) for a0, v, lat in agents]) if agents else np.zeros((0, T, 3))
    A = len(agents)
    return ScenarioLog(
        scene_token=f"tok-{name}", scene_name=name, location=LOCATION, sample_tokens=[f"{name}-{t:02d}" for t in range(T)],
        times=times, ego_pose=ego, ego_size=EGO_SIZE, agents_token=[f"{name}-a{i}" for i in range(A)],
        agents_category=np.full(A, VEHICLE, dtype=np.int64), agents_size=np.tile([4.5, 1.9], (A, 1)).reshape(A, 2),
        agents_pose=poses, agents_valid=np.ones((A, T), dtype=bool), map=geom, route=[route],
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    geom = _map()
    logs = [
        # val: a straight road with a lead car and a faster car in the left lane; a left bend
        _log("scene-bend", BEND, "lane_bend", 8.0, 20.0, [], geom),
        _log("scene-straight", STRAIGHT, "lane_right", 8.0, 10.0, [(35.0, 8.0, 0.0), (0.0, 11.0, LANE_W)], geom),
        # train: the same roads at other speeds
        _log("train-bend", BEND, "lane_bend", 6.0, 15.0, [], geom),
        _log("train-straight", STRAIGHT, "lane_right", 10.0, 5.0, [(40.0, 10.0, 0.0)], geom),
    ]
    root = tmp_path_factory.mktemp("drive") / "data"
    write_nuscenes(root, VERSION, {LOCATION: geom}, logs,
                   {"train": ["train-bend", "train-straight"], "val": ["scene-bend", "scene-straight"]})
    return root


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFPILOT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _in_unit(row: dict, keys=("pdms", "dac", "ttc", "ep", "comfort", "out_of_lane_rate", "collision")) -> None:
    for k in keys:
        assert 0.0 <= row[k] <= 1.0, (k, row[k])
    assert row["nc"] in (0.0, 0.5, 1.0)


def test_rows_one_per_scene_with_values_in_range(data: Path) -> None:
    cache: dict = {}
    rows = evaluate_planner(planner_factory("lane_follower"), data, VERSION, "val", reactive=False, progress=False,
                            reference_cache=cache)
    assert [r["scene"] for r in rows] == ["scene-bend", "scene-straight"]
    for r in rows:
        _in_unit(r)
        assert r["progress_m"] > 30.0  # ~8 m/s for 7.5 s
        assert r["plan_ms_p50"] > 0.0 and r["sim_s_per_wall_s"] > 0.0
        assert r["sim_s"] == pytest.approx((T - 1 - 4) * DT)
        # The lane follower is its own EP reference: it matches itself.
        assert r["ep"] == pytest.approx(1.0)
        assert r["reference_progress_m"] == pytest.approx(r["progress_m"])
    assert sorted(cache) == [("tok-scene-bend", False, "lane_follower"), ("tok-scene-straight", False, "lane_follower")]
    s = summarize_rows(rows)
    assert s["num_scenes"] == 2
    assert s["pdms"] == pytest.approx(np.mean([r["pdms"] for r in rows]))
    assert s["sim_s_per_wall_s"] == pytest.approx(sum(r["sim_s"] for r in rows) / sum(r["wall_s"] for r in rows))


@pytest.mark.parametrize("reactive", [False, True])
def test_log_replay_is_collision_free_and_on_road(data: Path, reactive: bool) -> None:
    rows = evaluate_planner(planner_factory("log_replay"), data, VERSION, "val", reactive=reactive, reference=None,
                            progress=False)
    for r in rows:
        assert r["nc"] == 1.0 and r["dac"] == 1.0 and r["collision"] == 0.0, r
        assert r["out_of_lane_rate"] < 0.05
        assert r["ep"] > 0.9  # the reference is the logged drive itself


def test_constant_velocity_scores_below_the_lane_follower_on_the_bend(data: Path) -> None:
    cache: dict = {}
    kw = dict(reactive=False, scenes=["scene-bend"], progress=False, reference_cache=cache)
    lf = evaluate_planner(planner_factory("lane_follower"), data, VERSION, "val", **kw)[0]
    cv = evaluate_planner(planner_factory("constant_velocity"), data, VERSION, "val", **kw)[0]
    assert lf["dac"] == 1.0 and lf["pdms"] > 0.8
    assert cv["dac"] == 0.0 and cv["out_of_lane_rate"] > 0.2  # it drives straight off the bend
    assert cv["pdms"] < lf["pdms"]
    # EP of both uses the one cached reference.
    assert len(cache) == 1 and cv["reference_progress_m"] == lf["reference_progress_m"]


def test_run_episodes_drives_a_planner_or_a_factory_through_scenes_and_modes() -> None:
    from diffpilot.policy.driving_baselines import LaneFollowerIDMPlanner
    from diffpilot.sim.driving.runner import run_episodes

    geom = _map()
    logs = [_log("scene-straight", STRAIGHT, "lane_right", 8.0, 10.0, [(35.0, 8.0, 0.0)], geom),
            _log("scene-bend", BEND, "lane_bend", 8.0, 20.0, [], geom)]
    eps = run_episodes(LaneFollowerIDMPlanner(), logs, [False, True], max_frames=6, reference_progress_m=lambda lg, r: 40.0)
    assert [(e.scene, e.reactive) for e in eps] == [("scene-straight", False), ("scene-bend", False),
                                                   ("scene-straight", True), ("scene-bend", True)]
    for e in eps:
        _in_unit(e.metrics)
        assert e.rollout.end_frame == 4 + 6 and e.metrics["sim_s"] == pytest.approx(6 * DT)
        assert e.metrics["reference_progress_m"] == 40.0 and e.metrics["plan_ms_p50"] > 0.0 and e.metrics["wall_s"] > 0.0
    again = run_episodes(LaneFollowerIDMPlanner, logs, max_frames=6, reference_progress_m=40.0)  # a factory
    assert [e.metrics["pdms"] for e in again] == [e.metrics["pdms"] for e in eps[:2]]
    with pytest.raises(TypeError, match="not a Planner"):
        run_episodes(lambda: object(), logs)


def test_ray_with_two_workers_gives_the_in_process_rows(data: Path) -> None:
    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    factory = planner_factory("constant_velocity")
    local = evaluate_planner(factory, data, VERSION, "val", reactive=True, progress=False)
    remote = evaluate_planner(factory, data, VERSION, "val", reactive=True, progress=False, workers=2)
    assert len(remote) == 2
    assert strip(remote) == strip(local)


def test_open_loop_and_one_shot_scores(data: Path) -> None:
    replay = open_loop(planner_factory("log_replay"), data, VERSION, "val", progress=False)
    cv = open_loop(planner_factory("constant_velocity"), data, VERSION, "val", progress=False)
    assert replay["num_samples"] == cv["num_samples"] == 2 * (T - 1 - 4)
    for h in ("1s", "2s", "3s"):
        assert replay[f"l2_{h}"] == pytest.approx(0.0, abs=1e-6)
        assert replay[f"collision_{h}"] == 0.0
    # Straight at 8 m/s misses the bend by more the further it looks.
    assert 0.0 < cv["l2_1s"] < cv["l2_2s"] < cv["l2_3s"]

    rows = navsim_scores(planner_factory("log_replay"), data, VERSION, "val", frames_per_scene=3, progress=False)
    assert [(r["scene"]) for r in rows] == ["scene-bend"] * 3 + ["scene-straight"] * 3
    assert all(r["frame"] >= 4 for r in rows)
    for r in rows:
        _in_unit(r)
        assert r["nc"] == 1.0 and r["dac"] == 1.0
    cv_rows = navsim_scores(planner_factory("constant_velocity"), data, VERSION, "val", frames_per_scene=3, progress=False)
    assert summarize_rows(cv_rows)["pdms"] < summarize_rows(rows)["pdms"]


def test_eval_job_writes_results_report_pictures_and_gif(data: Path, tmp_path: Path) -> None:
    out = driving_eval_job({
        "data": {"root": str(data), "version": VERSION},
        "ego_mlp": {"steps": 30, "batch_size": 16, "hidden": 32, "depth": 2},
        "navsim": {"frames_per_scene": 1},
        "figures": {"scenes": 1, "gif_every": 5},
        "out": str(tmp_path / "eval"),
        "progress": False,
    })
    res = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["mode"]) for r in res["summary"]] == [
        (m, mode) for m in ("log_replay", "constant_velocity", "ego_mlp", "lane_follower") for mode in ("non-reactive", "reactive")]
    for r in res["summary"]:
        _in_unit(r)
        assert np.isfinite(r["l2_3s"]) and 0.0 <= r["collision_3s"] <= 1.0
    assert [r["method"] for r in res["navsim"]] == ["log_replay", "constant_velocity", "ego_mlp", "lane_follower"]
    assert (out / "ego_mlp" / "model.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert "| method | mode | pdms |" in report and "lane_follower" in report
    assert (out / "report.html").is_file()
    for png in res["figures"]:
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert sum(p.startswith("bev_scene-bend_") for p in res["figures"]) == 4
    with Image.open(out / res["gif"]) as gif:
        assert gif.format == "GIF" and gif.n_frames == len(range(0, (T - 1 - 4) * 5 + 1, 5))
    assert f"![episode]({res['gif']})" in report


def test_data_job_and_bad_input(data: Path, tmp_path: Path) -> None:
    assert driving_data_job({"root": str(data), "version": VERSION}) == data
    with pytest.raises(DatasetError, match="data.version"):
        driving_data_job({"root": str(data), "version": "v1.0-trainval"})
    with pytest.raises(ValueError, match="ego_mlp.stepz"):
        driving_config({"ego_mlp": {"stepz": 3}})
    with pytest.raises(DatasetError, match="not in split"):
        evaluate_planner(planner_factory("log_replay"), data, VERSION, "val", reactive=False, scenes=["train-bend"], progress=False)
    with pytest.raises(ValueError, match="unknown planner"):
        planner_factory("teleport")
    with pytest.raises(ValueError, match="workers"):
        evaluate_planner(planner_factory("log_replay"), data, VERSION, "val", reactive=False, workers=0, progress=False)
