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
from diffpilot.stl.rules import STOP_HISTORY_STEPS, RuleSet, make_rule, stack_param_sets
from diffpilot.stl.signals import PAST_UNKNOWN_SPEED, driving_signals, scene_from_arrays, scene_from_sample

P = 4  # past steps in the hand-made samples


def _lane(y: float) -> np.ndarray:
    x = np.linspace(-40.0, 80.0, 20)
    return np.column_stack([x, np.full_like(x, y), np.zeros_like(x)])


def _sample(F: int = 8, *, speed0: float = 8.0, accel0: float = 0.0, command: str = "keep_lane",
            agents: list[tuple[float, float, float, float]] | None = None,
            past_x: list[float] | None = None, frame: int | None = None) -> SceneSample:
    """Two parallel lanes along x (ego on y=0, neighbour at y=3.5); static agents (x, y, length, width).

    The ego's past runs along x at ``past_x`` (oldest first, ending at 0; default: ``P`` steps at ``speed0``).
    """
    agents = agents or []
    K = max(len(agents), 1)
    past_x = list(-speed0 * DT * np.arange(P, -1, -1)) if past_x is None else past_x
    ego_past = np.zeros((len(past_x), 3))
    ego_past[:, 0] = past_x
    Ps = len(past_x) - 1
    W = Ps + 1 + F
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
        token="t", scene_token="s", frame=Ps if frame is None else frame, ego_pose_global=np.zeros(3),
        ego_status=np.array([speed0, accel0, 0.0]), ego_past=ego_past, ego_future=np.zeros((F, 3)),
        ego_future_valid=np.ones(F, dtype=bool),
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


def test_stop_at_line_counts_a_stop_just_before_now() -> None:
    """Stopped just before the line 1 s ago for 1.5 s, now pulling away across it: the rule holds."""
    L = EGO_SIZE[0]
    line = np.array([[L / 2 - 0.5, 0.0]])  # 0.5 m ahead of the front bumper while stopped (centre at x = -1)
    # past every 0.5 s from -3 s: rolling in at 2 m/s, standing at x = -1 from -2.5 s to -1 s, then 2 m/s²
    stopped = [-2.0, -1.0, -1.0, -1.0, -1.0, -0.75, 0.0]
    rolled = list(-1.5 * DT * np.arange(6, -1, -1))  # the same ego at a steady 1.5 m/s, never stopping
    pull = _traj_from_speeds([2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5])  # front bumper past the line from step 0
    eps = 0.3
    with_stop = replace(_sample(speed0=1.5, accel0=2.0, past_x=stopped), **pack_map_elements(line))
    no_stop = replace(_sample(speed0=1.5, past_x=rolled), **pack_map_elements(line))
    sig = driving_signals(pull, scene_from_sample(with_stop))
    # past speeds, newest first: now, then the steps into 0.5, 1, 1.5, 2, 2.5 s ago; 3 s ago is unknown
    np.testing.assert_allclose(sig["past_speed"][0, :7].numpy(), [1.5, 0.5, 0.0, 0.0, 0.0, 2.0, PAST_UNKNOWN_SPEED])
    np.testing.assert_allclose(sig["past_speed"][0, 7].numpy(), PAST_UNKNOWN_SPEED)
    x = np.cumsum([2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5]) * DT
    np.testing.assert_allclose(sig["stop_distance"][0].numpy(), -0.5 - x, atol=1e-9)
    rule = RuleSet([make_rule("stop_at_line")])
    # by hand: the future part is Until at t'=0 (eps - max of the first three speeds; later t' also need the
    # already negative stop distance) or G(before) = the last stop distance; the past part is the best
    # window of three past speeds (2, 3, 4 steps back: all 0)
    future = max(eps - 4.5, -0.5 - x[-1])
    assert future == pytest.approx(-4.2)
    rho_stop = float(rule.evaluate(sig)["stop_at_line"][0])
    assert rho_stop == pytest.approx(eps - 0.0)
    blind = dict(sig, past_speed=torch.full_like(sig["past_speed"], PAST_UNKNOWN_SPEED))
    assert float(rule.evaluate(blind)["stop_at_line"][0]) == pytest.approx(future)
    rho_roll = float(rule.evaluate(driving_signals(pull, scene_from_sample(no_stop)))["stop_at_line"][0])
    assert rho_roll == pytest.approx(max(future, eps - 1.5)) and rho_roll < 0
    # the history the rule reads is bounded: a stop ending 0.5 s earlier is out of sight
    earlier = replace(_sample(speed0=1.5, past_x=[-1.0, -1.0, -1.0, -1.0, -0.8, -0.4, 0.0]), **pack_map_elements(line))
    assert STOP_HISTORY_STEPS == 4
    assert float(rule.evaluate(driving_signals(pull, scene_from_sample(earlier)))["stop_at_line"][0]) < 0
    # the default 2 s past sees a stop from 2 s to 0.5 s ago; not if those poses predate the log (frame < P)
    short = replace(_sample(speed0=2.0, past_x=[-1.0, -1.0, -1.0, -1.0, 0.0]), **pack_map_elements(line))
    rho_short = float(rule.evaluate(driving_signals(pull, scene_from_sample(short)))["stop_at_line"][0])
    assert rho_short == pytest.approx(eps)
    clipped = replace(short, frame=2)
    sig_c = driving_signals(pull, scene_from_sample(clipped))
    np.testing.assert_allclose(sig_c["past_speed"][0, :3].numpy(), [2.0, 0.0, PAST_UNKNOWN_SPEED])
    assert float(rule.evaluate(sig_c)["stop_at_line"][0]) < 0


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


def test_past_speed_newest_first_from_logged_poses() -> None:
    _, logs = simulate_scenes(1, seed=3, progress=False)
    log = logs[0]
    pose = np.asarray(log.ego_pose, dtype=np.float64)
    T = 8
    frames = [0, 2, P, P + 5]
    samples = [build_scene_sample(log, f) for f in frames]
    moving = 0
    for f, sample in zip(frames, samples):
        scene = scene_from_sample(sample)
        assert tuple(scene.past_speed.shape) == (1, P + 1)
        sig = driving_signals(np.zeros((3, T, 3)), scene)["past_speed"]
        assert tuple(sig.shape) == (3, T) and torch.equal(sig[0], sig[1]) and torch.equal(sig[0], sig[2])
        want = np.full(T, PAST_UNKNOWN_SPEED)  # beyond the P known steps: padding
        want[0] = abs(sample.ego_status[0])
        for j in range(1, P):  # the step into j steps ago, known when both its poses are in the log
            if f - j - 1 >= 0:
                want[j] = np.linalg.norm(pose[f - j, :2] - pose[f - j - 1, :2]) / DT
                moving += want[j] > 0.5
        np.testing.assert_allclose(sig[0].numpy(), want, rtol=0, atol=1e-9, err_msg=f"frame {f}")
    assert moving >= 2  # the log moves, so the order (newest first) is really tested
    # the stacked path gives the same rows; arrays without ego_past know the current speed only
    arrays = stack_samples(samples)
    stacked = scene_from_arrays(arrays).past_speed
    for i, sample in enumerate(samples):
        torch.testing.assert_close(stacked[i], scene_from_sample(sample).past_speed[0])
    no_past = scene_from_arrays({k: v for k, v in arrays.items() if k != "ego_past"})
    assert tuple(no_past.past_speed.shape) == (len(frames), 1)
    torch.testing.assert_close(no_past.past_speed[:, 0], stacked[:, 0])
    sig = driving_signals(torch.as_tensor(arrays["ego_future"])[:, None], no_past)["past_speed"]
    assert bool((sig[..., 1:] == PAST_UNKNOWN_SPEED).all())


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


@pytest.fixture(scope="module")
def junction() -> dict:
    """Windows of the junction town, where the ego meets stop lines and sometimes pulls away after a stop."""
    _, logs = simulate_scenes(3, seed=0, progress=False)
    return stack_samples([build_scene_sample(log, f) for log in logs for f in range(P, log.num_frames - 1)])


def test_stop_at_line_with_past_matches_stlpy_and_calibrates(junction: dict) -> None:
    from diffpilot.stl.stlpy_bridge import signals_to_stlpy, to_stlpy

    sig, complete = logged_signals(junction)
    rule = make_rule("stop_at_line")
    T = int(sig["speed"].shape[-1])
    f = rule.formula(T)
    assert f.signals() == {"stop_distance", "speed", "past_speed"}
    near = complete & (sig["stop_distance"][:, 0].amin(dim=-1).numpy() < 50.0)
    rs = RuleSet([rule])
    rho = rs.evaluate(sig)["stop_at_line"][:, 0].numpy()
    blind = rs.evaluate(dict(sig, past_speed=torch.full_like(sig["past_speed"], PAST_UNKNOWN_SPEED)))
    rho_blind = blind["stop_at_line"][:, 0].numpy()
    assert np.all(rho >= rho_blind)  # the past only ever adds a way to comply
    assert np.sum(near & (rho >= 0) & (rho_blind < 0)) >= 2  # logged stops just before the window now count
    rows = np.flatnonzero(near)
    order = ["stop_distance", "speed", "past_speed"]
    for eps in (0.3, 1.0):
        # a float64 tensor: a Python float parameter passes through float32 on its way in
        ours = rs.evaluate(sig, {"eps_stop": torch.tensor(eps, dtype=torch.float64)})["stop_at_line"][:, 0].numpy()
        sp = to_stlpy(f, order, {"eps_stop": eps})
        for i in rows:
            y = signals_to_stlpy({k: sig[k][i, 0].numpy() for k in order}, order)
            assert float(np.squeeze(sp.robustness(y, 0))) == pytest.approx(float(ours[i]), abs=1e-9), (eps, i)
    # calibration: eps_stop is never above what the past alone needs (the slowest 3-step stretch of past speed),
    # and every window satisfies its own calibrated rule
    cal = calibrate(junction, rs, signals=sig)["eps_stop"]
    past = sig["past_speed"][:, 0].numpy()
    k = 2
    need = np.min([past[:, j : j + k + 1].max(axis=1) for j in range(STOP_HISTORY_STEPS - k + 1)], axis=0)
    ok = complete & (need < 40.0)
    assert ok.sum() >= 2
    assert np.all(cal[ok] <= need[ok] + 1e-9)
    own = rs.evaluate(sig, {"eps_stop": torch.as_tensor(np.nan_to_num(cal))[:, None]})["stop_at_line"]
    assert bool((own[complete, 0] >= 0).all())
