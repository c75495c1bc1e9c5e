"""Driving signals, rule templates and calibration on constructed trajectories and on simulated logs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import shapely
import torch

from diffpilot.data.scenario import COMMANDS, DT, EGO_SIZE, SceneSample
from diffpilot.data.scene_sample import build_scene_sample, pack_map_elements, stack_samples
from diffpilot.data.traffic.generate import simulate_scenes
from diffpilot.stl.calibration import calibrate, calibration_report, logged_signals
from diffpilot.stl.formula import STLError
from diffpilot.stl.rules import RuleSet, make_rule, stack_param_sets
from diffpilot.stl.signals import driving_signals, scene_from_sample

P = 4  # past steps in the hand-made samples


def _lane(y: float) -> np.ndarray:
    x = np.linspace(-40.0, 80.0, 20)
    return np.column_stack([x, np.full_like(x, y), np.zeros_like(x)])


def _sample(F: int = 8, *, speed0: float = 8.0, accel0: float = 0.0, command: str = "keep_lane",
            agents: list[tuple[float, float, float, float]] | None = None) -> SceneSample:
    """Two parallel lanes along x (ego on y=0, neighbour at y=3.5); static agents (x, y, length, width)."""
    agents = agents or []
    K = max(len(agents), 1)
    W = P + 1 + F
    apose = np.zeros((K, W, 3))
    avalid = np.zeros((K, W), dtype=bool)
    asize = np.zeros((K, 2))
    for k, (x, y, length, width) in enumerate(agents):
        apose[k, :, 0], apose[k, :, 1] = x, y
        avalid[k] = True
        asize[k] = (length, width)
    lanes = np.zeros((3, 20, 3))
    lanes[0], lanes[1] = _lane(0.0), _lane(3.5)
    return SceneSample(
        token="t", scene_token="s", frame=P, ego_pose_global=np.zeros(3), ego_status=np.array([speed0, accel0, 0.0]),
        ego_past=np.zeros((P + 1, 3)), ego_future=np.zeros((F, 3)), ego_future_valid=np.ones(F, dtype=bool),
        agents_pose=apose, agents_valid=avalid, agents_size=asize,
        agents_category=np.where(np.arange(K) < len(agents), 0, -1), lanes=lanes,
        lanes_valid=np.array([True, True, False]), drivable=np.ones((8, 8), dtype=np.uint8),
        command=COMMANDS.index(command),
    )


def _traj_from_speeds(speeds: list[float], y: list[float] | None = None) -> torch.Tensor:
    """(1, T, 3) poses driving along x with the given per-step speeds (and optional lateral positions)."""
    x = np.cumsum(np.asarray(speeds, dtype=np.float64) * DT)
    yy = np.zeros_like(x) if y is None else np.asarray(y, dtype=np.float64)
    yaw = np.zeros_like(x)
    return torch.as_tensor(np.stack([x, yy, yaw], axis=-1))[None]


def _rho(rule: str, traj: torch.Tensor, sample: SceneSample, params: dict | None = None, **scene_kw) -> torch.Tensor:
    scene = scene_from_sample(sample, **scene_kw)
    sig = driving_signals(traj, scene)
    return RuleSet([make_rule(rule)]).evaluate(sig, params)[rule]


def test_speed_limit_violated_by_exactly_two() -> None:
    sample = _sample(speed0=12.0)
    traj = _traj_from_speeds([12.0] * 8)
    assert float(_rho("speed_limit", traj, sample, {"vmax": 10.0})[0]) == -2.0
    # with speeds given as a fourth column
    traj4 = torch.cat([traj, torch.full((1, 8, 1), 12.0, dtype=torch.float64)], dim=-1)
    assert float(_rho("speed_limit", traj4, sample, {"vmax": 10.0})[0]) == -2.0
    assert float(_rho("speed_limit", traj, sample, {"vmax": 13.0})[0]) == 1.0


def test_lane_change_reaching_target_in_time() -> None:
    sample = _sample(command="left")
    scene = scene_from_sample(sample)
    assert int(scene.ref_lane[0]) == 0 and int(scene.target_lane[0]) == 1
    on_time = _traj_from_speeds([8.0] * 8, y=[1.2, 2.5, 3.4, 3.5, 3.5, 3.5, 3.5, 3.5])
    late = _traj_from_speeds([8.0] * 8, y=[0.2, 0.4, 0.8, 1.2, 1.8, 2.4, 3.0, 3.5])
    stay = _traj_from_speeds([8.0] * 8)
    rho = [float(_rho("lane_change", t, sample)[0]) for t in (on_time, late, stay)]
    assert rho[0] == pytest.approx(0.5)  # on the target lane's centre from step 3 on: w_target - 0
    assert rho[1] < 0 and rho[2] == pytest.approx(0.5 - 3.5)
    # lane keeping follows the reference lane: the lane change leaves it
    assert float(_rho("lane_keeping", on_time, sample)[0]) < 0 < float(_rho("lane_keeping", stay, sample)[0])


STOP = np.array([[20.0, 0.0]])  # stop-line centre, ego frame


def test_stop_at_line_rolling_through_violates_stopping_satisfies() -> None:
    sample = _sample(F=15, speed0=7.0)
    rolling = _traj_from_speeds([7.0] * 15)
    slow_roll = _traj_from_speeds([7, 6, 5, 4, 3, 2, 1, 1, 1, 1, 1, 2, 4, 6, 8])
    brief = _traj_from_speeds([7, 6, 5, 4, 3, 2, 1, 0, 2, 4, 6, 8, 8, 8, 8])
    stops = _traj_from_speeds([7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0, 2, 4, 6, 8])
    for t in (rolling, slow_roll, brief, stops):  # every trajectory ends past the line
        assert float(t[0, -1, 0]) + EGO_SIZE[0] / 2 > 20.0
    with_line = replace(sample, **pack_map_elements(STOP))
    rho = {name: float(_rho("stop_at_line", t, with_line)[0])
           for name, t in [("rolling", rolling), ("slow", slow_roll), ("brief", brief), ("stops", stops)]}
    assert rho["rolling"] < 0 and rho["slow"] < 0 and rho["brief"] < 0
    assert rho["stops"] > 0
    # the signal: front bumper to the line, positive before it
    sig = driving_signals(stops, scene_from_sample(with_line))
    x = stops[0, :, 0].numpy()
    np.testing.assert_allclose(sig["stop_distance"][0].numpy(), np.minimum(20.0 - x - EGO_SIZE[0] / 2, 50.0), atol=1e-9)
    # no stop line: the rule holds for any trajectory
    assert float(_rho("stop_at_line", rolling, sample)[0]) > 0


CROSSWALK = [np.array([[18.0, -5.0], [22.0, -5.0], [22.0, 5.0], [18.0, 5.0]])]


def test_yield_to_agent_inside_conflict_zone() -> None:
    ped_inside = _sample(agents=[(20.0, 1.0, 0.6, 0.6)])
    ped_away = _sample(agents=[(20.0, 12.0, 0.6, 0.6)])
    through = _traj_from_speeds([8.0] * 8)  # x = 4 .. 32
    halt = _traj_from_speeds([6, 4, 3, 2, 1, 0, 0, 0])  # stops at x = 8
    ped_inside, ped_away = (replace(s, **pack_map_elements(zones=CROSSWALK)) for s in (ped_inside, ped_away))
    r_through = float(_rho("yield", through, ped_inside)[0])
    r_halt = float(_rho("yield", halt, ped_inside)[0])
    r_away = float(_rho("yield", through, ped_away)[0])
    assert r_through < 0 < r_halt and r_away > 0
    sig = driving_signals(through, scene_from_sample(ped_inside))
    assert sig["zone_occupied"].min() == 1.0 and sig["ego_in_zone"].max() == 1.0 and sig["ego_in_zone"].min() == 0.0


def test_safe_distance_is_a_conservative_box_gap() -> None:
    length, width = 4.5, 1.9
    sample = _sample(agents=[(30.0, 2.6, length, width)])
    rng = np.random.default_rng(0)
    traj = torch.as_tensor(np.stack([rng.uniform(0, 40, (64, 8)), rng.uniform(-3, 3, (64, 8)),
                                     rng.uniform(-0.5, 0.5, (64, 8))], axis=-1))
    sig = driving_signals(traj, scene_from_sample(sample))
    gap = sig["min_distance"].numpy()

    def box(x: float, y: float, yaw: float, ln: float, wd: float) -> shapely.Polygon:
        c, s = np.cos(yaw), np.sin(yaw)
        pts = [(x + c * dx - s * dy, y + s * dx + c * dy) for dx, dy in
               [(ln / 2, wd / 2), (-ln / 2, wd / 2), (-ln / 2, -wd / 2), (ln / 2, -wd / 2)]]
        return shapely.Polygon(pts)

    other = box(30.0, 2.6, 0.0, length, width)
    true = np.array([[shapely.distance(box(*traj[n, t].tolist(), *EGO_SIZE), other) for t in range(8)] for n in range(64)])
    true = np.minimum(true, 50.0)
    assert np.all(gap <= true + 1e-9)  # discs contain the boxes
    # the cover is tight within the disc radius slack of both boxes
    slack = np.sqrt((EGO_SIZE[0] / 6) ** 2 + (EGO_SIZE[1] / 2) ** 2) + np.sqrt((length / 6) ** 2 + (width / 2) ** 2)
    assert np.all(true - gap <= slack + 1e-9)
    crash = _traj_from_speeds([8.0] * 8, y=[2.6] * 8)
    assert float(_rho("safe_distance", crash, sample)[0]) < 0


def test_comfort_bounds() -> None:
    sample = _sample(speed0=10.0, accel0=2.0)
    speeds = 10.0 + 2.0 * DT * np.arange(1, 9)
    traj = _traj_from_speeds(list(speeds))
    sig = driving_signals(traj, scene_from_sample(sample))
    np.testing.assert_allclose(sig["accel_long"].numpy(), 2.0, atol=1e-9)
    np.testing.assert_allclose(sig["jerk_long"].numpy(), 0.0, atol=1e-9)
    assert float(_rho("comfort", traj, sample)[0]) == pytest.approx(2.0)
    assert float(_rho("comfort", traj, sample, {"amax": 1.5})[0]) == pytest.approx(-0.5)


def test_ruleset_trajectories_by_parameter_sets_and_smooth_gradients() -> None:
    sample = _sample(speed0=9.0, command="left", agents=[(25.0, -3.5, 4.5, 1.9)])
    rng = np.random.default_rng(1)
    N, M = 6, 5
    speeds = rng.uniform(6, 12, size=(N, 8))
    traj = torch.cat([_traj_from_speeds(list(s), y=list(np.linspace(0.5, 3.5, 8))) for s in speeds])
    sig = driving_signals(traj, scene_from_sample(sample))
    sets = [{"vmax": float(v), "dsafe": float(d)} for v, d in zip(np.linspace(8, 14, M), np.linspace(0, 2, M))]
    params = stack_param_sets(sets)
    rs = RuleSet(["speed_limit", "safe_distance", "lane_change", "comfort"])
    batch = rs.evaluate({k: v[:, None] for k, v in sig.items()}, params)
    for name, out in batch.items():
        assert out.shape == (N, M)
    for m, s in enumerate(sets):
        single = rs.evaluate(sig, s)
        for name in rs.names:
            torch.testing.assert_close(batch[name][:, m], single[name])
    # smooth robustness of every rule is differentiable in the trajectory
    t = traj.clone().requires_grad_(True)
    smooth = RuleSet().evaluate(driving_signals(t, scene_from_sample(sample)), smooth=0.1)
    total = sum(v.sum() for v in smooth.values())
    total.backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and float(t.grad.abs().sum()) > 0
    with pytest.raises(STLError, match="belong to no rule"):
        rs.evaluate(sig, {"vmaxx": 3.0})
    with pytest.raises(STLError, match="unknown rule"):
        make_rule("speed")


@pytest.fixture(scope="module")
def logged() -> dict:
    _, logs = simulate_scenes(2, seed=3, progress=False)
    return stack_samples([build_scene_sample(log, f) for log in logs for f in range(P, log.num_frames - 1)])


def test_every_logged_window_satisfies_its_calibrated_rules(logged: dict) -> None:
    arrays = logged
    rs = RuleSet()
    sig, complete = logged_signals(arrays)
    assert complete.sum() >= 20 and (~complete).any()
    cal = calibrate(arrays, rs, signals=sig)
    assert set(cal) == set(rs.defaults())
    assert all(np.isnan(v[~complete]).all() and np.isfinite(v[complete]).all() for v in cal.values())
    # tightest values are the extremes of the logged signals
    spd = sig["speed"][complete, 0].numpy()
    np.testing.assert_allclose(cal["vmax"][complete], spd.max(axis=-1), atol=1e-9)
    np.testing.assert_allclose(cal["vmin"][complete], spd.min(axis=-1), atol=1e-9)
    np.testing.assert_allclose(cal["dsafe"][complete], sig["min_distance"][complete, 0].numpy().min(axis=-1), atol=1e-9)
    rep = calibration_report(arrays, rs, cal, signals=sig)
    assert rep["complete_windows"] == int(complete.sum())
    for name, row in rep["rules"].items():
        assert row["own_share"] == 1.0, name
        assert 0.0 <= row["shared_share"] <= 1.0
    # tight: a little tighter than calibrated fails the window that set it
    worst = int(np.nanargmax(cal["vmax"]))
    tighter = {k: torch.as_tensor(np.nan_to_num(v), dtype=torch.float64)[:, None] for k, v in cal.items()}
    tighter["vmax"] = tighter["vmax"] - 1e-3
    out = RuleSet(["speed_limit"]).evaluate({k: v for k, v in sig.items()}, {k: tighter[k] for k in ("vmin", "vmax")})
    assert float(out["speed_limit"][worst, 0]) < 0
    # margins move every value in its loosening direction
    loose = calibrate(arrays, rs, {"vmax": 1.0, "vmin": 0.5, "dsafe": 0.25}, signals=sig)
    np.testing.assert_allclose(loose["vmax"][complete], cal["vmax"][complete] + 1.0, atol=1e-9)
    np.testing.assert_allclose(loose["vmin"][complete], cal["vmin"][complete] - 0.5, atol=1e-9)
    np.testing.assert_allclose(loose["dsafe"][complete], cal["dsafe"][complete] - 0.25, atol=1e-9)
    with pytest.raises(STLError, match="unknown parameter"):
        calibrate(arrays, rs, {"speed": 1.0}, signals=sig)
    with pytest.raises(STLError, match=">= 0"):
        calibrate(arrays, rs, {"vmax": -1.0}, signals=sig)
