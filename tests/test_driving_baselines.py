"""Driving baselines on hand-built scenes: the numbers are checked against geometry worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from diffpilot.data.scenario import COMMANDS, DT, MapGeometry, Planner, ScenarioLog, SceneSample
from diffpilot.policy.checkpoint import CheckpointError, load_checkpoint, load_state_strict
from diffpilot.policy.driving_baselines import (
    ConstantVelocityPlanner,
    EgoStatusMLPPlanner,
    LaneFollowerIDMPlanner,
    LogReplayPlanner,
    build_planner,
)
from diffpilot.train import fit

P, F, K, L, N = 4, 8, 4, 6, 20


def straight_lane(y: float, x0: float = -20.0, x1: float = 120.0) -> np.ndarray:
    xs = np.linspace(x0, x1, N)
    return np.stack([xs, np.full(N, y), np.zeros(N)], axis=1)


def make_sample(
    speed: float = 10.0,
    lanes: list[np.ndarray] | None = None,
    agents: list[tuple[float, float, float, float]] | None = None,
    command: str = "keep_lane",
    ego_future: np.ndarray | None = None,
    future_valid: np.ndarray | None = None,
) -> SceneSample:
    """A scene in the ego frame. ``agents``: (x, y, yaw, speed) at now, moving at constant velocity."""
    lanes = lanes if lanes is not None else [straight_lane(0.0)]
    lane_arr = np.zeros((L, N, 3))
    lane_valid = np.zeros(L, bool)
    for i, lane in enumerate(lanes):
        lane_arr[i], lane_valid[i] = lane, True
    W = P + 1 + F
    a_pose, a_valid = np.zeros((K, W, 3)), np.zeros((K, W), bool)
    a_size, a_cat = np.zeros((K, 2)), np.full(K, -1)
    t = DT * (np.arange(W) - P)
    for k, (x, y, yaw, v) in enumerate(agents or []):
        a_pose[k, :, 0] = x + v * np.cos(yaw) * t
        a_pose[k, :, 1] = y + v * np.sin(yaw) * t
        a_pose[k, :, 2] = yaw
        a_valid[k] = True
        a_size[k], a_cat[k] = (4.5, 1.9), 0
    past = np.zeros((P + 1, 3))
    past[:, 0] = speed * DT * (np.arange(P + 1) - P)
    fut = ego_future if ego_future is not None else np.stack([speed * DT * np.arange(1, F + 1), np.zeros(F), np.zeros(F)], 1)
    return SceneSample(
        token="t",
        scene_token="s",
        frame=0,
        ego_pose_global=np.zeros(3),
        ego_status=np.array([speed, 0.0, 0.0]),
        ego_past=past,
        ego_future=fut,
        ego_future_valid=np.ones(F, bool) if future_valid is None else future_valid,
        agents_pose=a_pose,
        agents_valid=a_valid,
        agents_size=a_size,
        agents_category=a_cat,
        lanes=lane_arr,
        lanes_valid=lane_valid,
        drivable=np.ones((64, 64), np.uint8),
        command=COMMANDS.index(command),
    )


def test_planners_implement_the_protocol():
    for name in ("log_replay", "constant_velocity", "ego_mlp", "lane_follower"):
        assert isinstance(build_planner(name), Planner)


def test_log_replay_returns_the_logged_future_and_extrapolates_the_gap():
    fut = np.cumsum(np.tile([[4.0, 0.5, 0.02]], (F, 1)), axis=0)
    sample = make_sample(ego_future=fut)
    np.testing.assert_array_equal(LogReplayPlanner().plan(sample), fut)
    valid = np.array([True] * 5 + [False] * 3)
    out = LogReplayPlanner().plan(make_sample(ego_future=np.where(valid[:, None], fut, 0.0), future_valid=valid))
    np.testing.assert_array_equal(out[:5], fut[:5])
    # The last two valid poses move (4, 0.5) per step: the gap continues that way.
    np.testing.assert_allclose(out[5:, :2], fut[4, :2] + np.outer([1, 2, 3], [4.0, 0.5]), atol=1e-9)


def test_constant_velocity_goes_straight_at_the_current_speed():
    out = ConstantVelocityPlanner().plan(make_sample(speed=8.0))
    # 8 m/s for 0.5, 1.0, ... 4.0 s: x = 4, 8, ..., 32 m; y and yaw stay 0.
    np.testing.assert_allclose(out[:, 0], [4, 8, 12, 16, 20, 24, 28, 32])
    np.testing.assert_allclose(out[:, 1:], 0.0)
    turning = make_sample(speed=8.0)
    turning.ego_status = np.array([8.0, 0.0, 0.2])
    np.testing.assert_allclose(ConstantVelocityPlanner().plan(turning), out)  # yaw rate ignored by default
    arc = ConstantVelocityPlanner(use_yaw_rate=True).plan(turning)
    # On a circle of radius v / w = 40 m: after 4 s the heading is 0.8 rad.
    np.testing.assert_allclose(arc[-1], [40 * np.sin(0.8), 40 * (1 - np.cos(0.8)), 0.8], atol=1e-9)


def test_lane_follower_tracks_a_curved_lane():
    radius = 60.0
    theta = np.linspace(-0.2, 1.2, N)  # a left-hand arc starting behind the ego, centre at (0, R)
    lane = np.stack([radius * np.sin(theta), radius - radius * np.cos(theta), theta], axis=1)
    planner = LaneFollowerIDMPlanner(speed_limit=12.0)
    out = planner.plan(make_sample(speed=10.0, lanes=[lane, straight_lane(-3.5)]))
    err = np.abs(np.hypot(out[:, 0], out[:, 1] - radius) - radius)
    assert err.max() < 0.15, err
    heading = np.arctan2(out[:, 0], radius - out[:, 1])  # tangent direction on the arc
    np.testing.assert_allclose(out[:, 2], heading, atol=0.03)
    travelled = radius * heading[-1]
    assert 38.0 < travelled < 48.0  # 10 m/s, accelerating gently toward 12 m/s over 4 s


def test_lane_follower_converges_from_a_lateral_offset():
    out = LaneFollowerIDMPlanner().plan(make_sample(speed=8.0, lanes=[straight_lane(1.0)]))
    assert abs(out[0, 1]) < 1.0 and abs(out[-1, 1] - 1.0) < 0.05


def test_lane_follower_stops_behind_a_stopped_agent_in_its_lane_only():
    planner = LaneFollowerIDMPlanner(speed_limit=12.0)
    lanes = [straight_lane(0.0), straight_lane(3.5)]
    free = planner.plan(make_sample(speed=10.0, lanes=lanes))
    blocked = planner.plan(make_sample(speed=10.0, lanes=lanes, agents=[(30.0, 0.0, 0.0, 0.0)]))
    beside = planner.plan(make_sample(speed=10.0, lanes=lanes, agents=[(30.0, 3.5, 0.0, 0.0)]))
    rear_of_agent = 30.0 - 4.5 / 2
    ego_front = 4.084 / 2
    assert blocked[-1, 0] + ego_front < rear_of_agent - 1.0  # stops short, with a gap
    speed = np.diff(blocked[:, 0]) / DT
    assert np.all(np.diff(speed) < 0) and speed[-1] < 3.0  # braking all along
    long = LaneFollowerIDMPlanner(speed_limit=12.0, future_steps=20).plan(
        make_sample(speed=10.0, lanes=lanes, agents=[(30.0, 0.0, 0.0, 0.0)])
    )
    long_speed = np.diff(long[:, 0]) / DT
    assert long_speed[-1] < 0.2 and np.all(long_speed >= -1e-9)  # halts within 10 s, never reverses
    gap = rear_of_agent - (long[-1, 0] + ego_front)
    assert 1.0 < gap < 4.0, gap  # about IDM's minimum gap (2.5 m) behind the stopped car
    np.testing.assert_allclose(beside, free, atol=1e-9)  # the next lane's car changes nothing
    assert free[-1, 0] > 40.0


def test_lane_follower_follows_a_moving_lead_and_respects_the_speed_limit():
    planner = LaneFollowerIDMPlanner(speed_limit=10.0)
    free = planner.plan(make_sample(speed=10.0))
    np.testing.assert_allclose(np.diff(free[:, 0]) / DT, 10.0, atol=0.05)
    lead = planner.plan(make_sample(speed=10.0, agents=[(25.0, 0.0, 0.0, 6.0)]))
    assert lead[-1, 0] < free[-1, 0] - 3.0
    assert lead[-1, 0] < 25.0 + 6.0 * 4.0 - 4.5 / 2 - 4.084 / 2  # still behind the lead at 4 s


def test_lane_follower_yields_to_a_crossing_car():
    planner = LaneFollowerIDMPlanner(speed_limit=8.0)
    free = planner.plan(make_sample(speed=8.0))
    # From the left at 8 m/s, reaching our lane at x = 20 m after 2 s, just when we would be there.
    crossing = planner.plan(make_sample(speed=8.0, agents=[(20.0, 16.0, -np.pi / 2, 8.0)]))
    assert crossing[-1, 0] + 4.084 / 2 < 20.0 - 1.9 / 2  # halts before the crossing car's path
    assert np.all(np.diff(crossing[:, 0]) >= -1e-9)
    # The same car 3 s later (beyond the horizon), or with yielding switched off: no change.
    late = planner.plan(make_sample(speed=8.0, agents=[(20.0, 40.0, -np.pi / 2, 8.0)]))
    np.testing.assert_allclose(late, free, atol=1e-9)
    blind = LaneFollowerIDMPlanner(speed_limit=8.0, yield_to_crossing=False)
    np.testing.assert_allclose(blind.plan(make_sample(speed=8.0, agents=[(20.0, 16.0, -np.pi / 2, 8.0)])), free, atol=1e-9)


def test_lane_follower_changes_lane_on_command():
    lanes = [straight_lane(0.0), straight_lane(3.5), straight_lane(-3.5)]
    left = LaneFollowerIDMPlanner().plan(make_sample(speed=10.0, lanes=lanes, command="left"))
    right = LaneFollowerIDMPlanner().plan(make_sample(speed=10.0, lanes=lanes, command="right"))
    assert abs(left[-1, 1] - 3.5) < 0.1 and abs(right[-1, 1] + 3.5) < 0.1
    assert np.all(np.diff(left[:, 1]) >= -1e-9)  # monotone drift to the left
    only = LaneFollowerIDMPlanner().plan(make_sample(speed=10.0, lanes=[straight_lane(0.0)], command="left"))
    assert np.abs(only[:, 1]).max() < 1e-6  # no lane there: stay


def test_lane_follower_stop_command_brakes_to_a_halt():
    out = LaneFollowerIDMPlanner().plan(make_sample(speed=6.0, command="stop"))
    assert out[-1, 0] < 6.0 * 4.0 * 0.6 and np.diff(out[:, 0])[-1] < 0.3


def _synthetic_arrays(n: int, seed: int) -> dict[str, np.ndarray]:
    """Futures that are a smooth function of speed, yaw rate and command."""
    rng = np.random.default_rng(seed)
    speed = rng.uniform(0, 15, n)
    accel = rng.uniform(-2, 2, n)
    yaw_rate = rng.uniform(-0.3, 0.3, n)
    command = rng.integers(0, 4, n)
    t = DT * np.arange(1, F + 1)
    v = np.maximum(speed[:, None] + accel[:, None] * t, 0.0) * np.where(command == 3, 0.5, 1.0)[:, None]
    yaw = yaw_rate[:, None] * t
    fut = np.stack([v * t * np.cos(yaw), v * t * np.sin(yaw), yaw], axis=2)
    past = np.zeros((n, P + 1, 3))
    past[:, :, 0] = -speed[:, None] * DT * (P - np.arange(P + 1))
    return {
        "ego_status": np.stack([speed, accel, yaw_rate], 1),
        "command": command,
        "ego_past": past,
        "ego_future": fut,
        "ego_future_valid": np.ones((n, F), bool),
    }


def test_ego_mlp_fits_and_round_trips(tmp_path):
    arrays = _synthetic_arrays(512, seed=0)
    planner = EgoStatusMLPPlanner(future_steps=F, past_steps=P, hidden=64, depth=2, lr=3e-3)
    losses = fit(planner, arrays, steps=300, batch_size=128, seed=0)
    first, last = np.mean(losses[:10]), np.mean(losses[-20:])
    assert last < first / 20, (first, last)
    pred = planner.plan_batch(arrays)
    rmse = np.sqrt(np.mean((pred[..., :2] - arrays["ego_future"][..., :2]) ** 2))
    assert rmse < 1.5, rmse  # metres, over futures spanning 0..~70 m
    planner.save(tmp_path / "mlp")
    loaded = build_planner("ego_mlp", checkpoint=tmp_path / "mlp")
    np.testing.assert_array_equal(loaded.plan_batch(arrays), pred)
    sample = make_sample(speed=7.0)
    np.testing.assert_array_equal(loaded.plan(sample), planner.plan(sample))
    again = EgoStatusMLPPlanner(future_steps=F, past_steps=P, hidden=64, depth=2, lr=3e-3)
    assert fit(again, arrays, steps=5, batch_size=128, seed=0) == losses[:5]  # seeded: reproducible


def test_ego_mlp_uses_the_past_when_asked_and_checks_shapes(tmp_path):
    arrays = _synthetic_arrays(64, seed=1)
    with_past = EgoStatusMLPPlanner(future_steps=F, past_steps=P, use_past=True, hidden=16, depth=1)
    assert with_past.features(arrays).shape == (64, 3 + 4 + 3 * P)
    with pytest.raises(ValueError, match="ego_future has shape"):
        fit(EgoStatusMLPPlanner(future_steps=6, hidden=16, depth=1), arrays, steps=1)
    with pytest.raises(ValueError, match="lack 'command'"):
        with_past.features({k: v for k, v in arrays.items() if k != "command"})
    with_past.save(tmp_path / "a")
    tensors, _ = load_checkpoint(tmp_path / "a")
    with pytest.raises(CheckpointError, match="does not fit"):  # no past inputs: a smaller first layer
        load_state_strict(EgoStatusMLPPlanner(future_steps=F, hidden=16, depth=1), tensors, tmp_path / "a")


def test_factory_rejects_unknown_names():
    with pytest.raises(ValueError, match="constant_velocity, ego_mlp, lane_follower, log_replay"):
        build_planner("pdm_closed")
    with pytest.raises(ValueError, match="bad arguments"):
        build_planner("lane_follower", speed_lmit=3)
    assert build_planner("lane_follower", speed_limit=20.0).speed_limit == 20.0


# --------------------------------------------------------------------------- closed loop on a log, and pictures


def _straight_log(frames: int = 16) -> ScenarioLog:
    xs = np.arange(-20.0, 200.0, 0.5)
    lanes = [np.stack([xs, np.full_like(xs, y), np.zeros_like(xs)], 1) for y in (0.0, 3.5)]
    times = DT * np.arange(frames)
    ego = np.stack([8.0 * times, np.zeros(frames), np.zeros(frames)], 1)
    agents = np.stack(
        [
            np.stack([20.0 + 6.0 * times, np.full(frames, 3.5), np.zeros(frames)], 1),  # next lane, slower
            np.stack([np.full(frames, 150.0), np.zeros(frames), np.zeros(frames)], 1),  # parked far ahead in ours
        ]
    )
    return ScenarioLog(
        scene_token="scene-t",
        scene_name="straight-two-lane",
        location="test",
        sample_tokens=[f"s{i}" for i in range(frames)],
        times=times,
        ego_pose=ego,
        ego_size=(4.084, 1.85),
        agents_token=["a0", "a1"],
        agents_category=np.array([0, 0]),
        agents_size=np.array([[4.5, 1.9], [4.5, 1.9]]),
        agents_pose=agents,
        agents_valid=np.ones((2, frames), bool),
        map=MapGeometry(
            lanes=lanes,
            lane_tokens=["l0", "l1"],
            lane_is_connector=np.zeros(2, bool),
            drivable=shapely.box(-20.0, -1.75, 200.0, 5.25),
        ),
    )


def test_lane_follower_closed_loop_and_pictures(tmp_path):
    from PIL import Image

    from diffpilot.data.scene_sample import build_scene_sample
    from diffpilot.sim.driving.plots import animate_rollout, plot_log, plot_scene
    from diffpilot.sim.driving.simulator import DrivingSimulator

    log = _straight_log()
    planner = LaneFollowerIDMPlanner(speed_limit=10.0)
    rollout = DrivingSimulator().run(log, planner, start_frame=4, end_frame=12)
    states = rollout.ego_states
    assert np.abs(states[:, 1]).max() < 0.2  # stays on its lane centre
    assert np.all(np.diff(states[:, 0]) > 0) and 7.5 < states[-1, 3] < 10.5  # speeds up toward the limit

    sample = build_scene_sample(log, 6)
    png = plot_scene(sample, tmp_path / "scene.png", planned=planner.plan(sample), title="test")
    log_png = plot_log(log, tmp_path / "log.png", frame=6, rollout=rollout)
    gif = animate_rollout(rollout, log, tmp_path / "ep.gif", fps=10, every=4)
    for p in (png, log_png, gif):
        assert p.is_file() and p.stat().st_size > 2000
    assert Image.open(png).format == "PNG" and Image.open(log_png).format == "PNG"
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == len(range(0, len(rollout.times), 4))
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ep.gif", "log.png", "scene.png"]  # no temp files left
