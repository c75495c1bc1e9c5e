"""The highway-env adapter with the real env: scene geometry by hand, short closed-loop drives."""

from __future__ import annotations

import numpy as np
import pytest

from diffpilot.data.scenario import CATEGORIES, SampleSpec
from diffpilot.policy.driving_baselines import ConstantVelocityPlanner, LaneFollowerIDMPlanner
from diffpilot.sim.driving.highway import HighwaySceneBuilder, make_env, run_highway, steering_to_action
from diffpilot.sim.driving.vehicle import KinematicBicycle

LIGHT = {"vehicles_count": 6, "vehicles_density": 0.6, "lanes_count": 3}


@pytest.fixture(scope="module")
def env():
    e = make_env("highway-fast-v0", duration_s=10.0, config=LIGHT)
    e.reset(seed=3)
    yield e
    e.close()


def test_env_is_configured_for_10hz_continuous_control(env):
    cfg = env.unwrapped.config
    assert cfg["policy_frequency"] == 10 and cfg["simulation_frequency"] % 10 == 0
    assert env.action_space.shape == (2,)
    assert env.unwrapped.render_mode is None
    with pytest.raises(ValueError, match="policy_frequency"):
        make_env("highway-fast-v0", config={"policy_frequency": 5})
    with pytest.raises(ValueError, match="cannot make"):
        make_env("no-such-env-v0")


def test_scene_sample_matches_the_env_state(env):
    spec = SampleSpec()
    builder = HighwaySceneBuilder(spec)
    builder.record(env)
    sample = builder.build(env)
    ego = env.unwrapped.vehicle
    assert np.allclose(sample.ego_past[-1], 0.0) and sample.ego_past.shape == (spec.past_steps + 1, 3)
    np.testing.assert_allclose(sample.ego_pose_global, [*ego.position, ego.heading])
    assert sample.ego_status[0] == pytest.approx(ego.speed)
    # The nearest other vehicle, transformed by hand into the ego frame.
    others = [v for v in env.unwrapped.road.vehicles if v is not ego]
    near = min(others, key=lambda v: np.hypot(*(v.position - ego.position)))
    dx, dy = near.position - ego.position
    c, s = np.cos(ego.heading), np.sin(ego.heading)
    expected = [c * dx + s * dy, -s * dx + c * dy]
    P = spec.past_steps
    np.testing.assert_allclose(sample.agents_pose[0, P, :2], expected, atol=1e-9)
    assert sample.agents_valid[0, P] and not sample.agents_valid[0, P + 1 :].any()
    np.testing.assert_allclose(sample.agents_size[0], [near.LENGTH, near.WIDTH])
    assert sample.agents_category[0] == CATEGORIES.index("vehicle")
    # The ego's lane: a valid centerline passing beside the ego at minus its lateral offset, heading along.
    lat = ego.lane.local_coordinates(ego.position)[1]
    lanes = sample.lanes[sample.lanes_valid]
    closest = min(lanes, key=lambda ln: np.abs(np.interp(0.0, ln[:, 0], ln[:, 1])))
    assert np.interp(0.0, closest[:, 0], closest[:, 1]) == pytest.approx(-lat, abs=1e-6)
    assert np.abs(closest[:, 2]).max() < 1e-6
    # Three parallel lanes 4 m apart: three valid centerlines at y = -lat + {0, +-4, +-8}.
    offsets = sorted(np.interp(0.0, ln[:, 0], ln[:, 1]) + lat for ln in lanes)
    assert len(lanes) == 3 and np.allclose(np.diff(offsets), 4.0)
    # Raster: the ego's pixel is drivable, a pixel 30 m to the side (off the 12 m wide road) is not.
    R = spec.raster_size
    assert sample.drivable[R // 2, R // 2] == 1
    assert sample.drivable.sum() > 0.1 * R * R
    side = R // 2 - int(30 / spec.raster_m_per_px) if lat <= 0 else R // 2 + int(30 / spec.raster_m_per_px)
    assert sample.drivable[R // 2, side] == 0


def test_agent_history_is_recorded_between_replans(env):
    builder = HighwaySceneBuilder(SampleSpec(past_steps=2))
    builder.record(env)
    for _ in range(5):
        env.step(np.zeros(2, dtype=np.float32))
        builder.observe_control_step(env)
    builder.record(env)
    sample = builder.build(env)
    assert sample.agents_valid[0, 1] and not sample.agents_valid[0, 0]  # one recorded past row, older missing
    ego_moved = sample.ego_past[1, 0]
    assert -0.5 * 40 < ego_moved < -0.5 * 10  # the ego was 5..20 m behind half a second ago


def test_steering_conversion_matches_yaw_rates(env):
    model = KinematicBicycle()
    action, applied = steering_to_action(1.0, 0.1, model, env)
    # highway-env: yaw rate = v sin(beta) / (L/2), beta = atan(tan(delta) / 2); ours: v tan(steer) / wheelbase.
    delta = action[1] * np.pi / 4
    beta = np.arctan(np.tan(delta) / 2)
    assert np.sin(beta) / (env.unwrapped.vehicle.LENGTH / 2) == pytest.approx(np.tan(0.1) / model.wheelbase, rel=1e-5)
    assert applied == pytest.approx(0.1, rel=1e-5) and action[0] == pytest.approx(0.2)  # 1 m/s^2 of +-5
    action, applied = steering_to_action(-20.0, 0.6, model, env)
    assert action[0] == -1.0 and action[1] == pytest.approx(1.0) and applied < 0.6  # clipped to the env's range


def test_lane_follower_drives_highway_without_collision():
    (ep,) = run_highway(LaneFollowerIDMPlanner(speed_limit=25.0), "highway-fast-v0", episodes=1, seed=0, duration_s=6.0, config=LIGHT)
    assert ep.steps == 60 and not ep.collided
    assert 15.0 < ep.mean_speed < 26.0
    assert ep.distance_m > 6.0 * 15.0
    assert ep.on_road_fraction == 1.0 and ep.max_abs_lane_offset < 1.0
    assert len(ep.plan_ms) == 12 and len(ep.plans) == 12
    forward = np.diff(ep.trajectory[:, 0])
    assert np.all(forward > 0)


def test_constant_velocity_keeps_its_lane():
    (ep,) = run_highway(ConstantVelocityPlanner(), "highway-fast-v0", episodes=1, seed=1, duration_s=4.0, config={**LIGHT, "vehicles_count": 1})
    assert len(set(ep.lane_ids)) == 1 and ep.max_abs_lane_offset < 0.3
    assert ep.mean_speed == pytest.approx(ep.trajectory[0, 3], abs=0.5)
