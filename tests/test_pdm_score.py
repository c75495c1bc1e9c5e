"""PDM score (NAVSIM definitions) on constructed drives with known answers, and open-loop metrics."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import DT, MapGeometry, ScenarioLog, to_ego_frame
from diffpilot.sim.driving.openloop import collision_at, l2_at
from diffpilot.sim.driving.scoring import (
    ACTIVE_FRONT,
    ACTIVE_LATERAL,
    ACTIVE_REAR,
    STOPPED_EGO,
    STOPPED_TRACK,
    collision_events,
    comfort,
    comfort_metrics,
    drivable_area_compliance,
    ego_progress,
    no_at_fault_collision,
    out_of_lane_rate,
    pdm_score,
    route_progress,
    score_rollout,
    score_trajectory,
    time_to_collision_ok,
)
from diffpilot.sim.driving.simulator import DrivingSimulator

EGO = (4.084, 1.85)
CAR = (4.5, 1.9)
VEH, PED, BIKE, OTHER = 0, 1, 2, 3
LANE_W = 3.6


def straight_log(ego_x: np.ndarray, agents=()) -> ScenarioLog:
    """Two same-direction lanes along +x (centres y = 0 and 3.6); the drivable area is exactly the two lanes.

    ``agents``: (poses (T, 3), size, category) with every frame annotated.
    """
    T = len(ego_x)
    xs = np.arange(-100.0, 600.0, 0.5)
    lanes = [np.column_stack([xs, np.full_like(xs, y), np.zeros_like(xs)]) for y in (0.0, LANE_W)]
    geom = MapGeometry(lanes=lanes, lane_tokens=["right", "left"], lane_is_connector=np.zeros(2, dtype=bool),
                       drivable=shapely.box(-100.0, -LANE_W / 2, 600.0, 1.5 * LANE_W))
    A = len(agents)
    ap = np.zeros((A, T, 3))
    size, cat = np.zeros((A, 2)), np.zeros(A, dtype=np.int64)
    for i, (poses, sz, c) in enumerate(agents):
        ap[i], size[i], cat[i] = poses, sz, c
    ego = np.column_stack([ego_x, np.zeros(T), np.zeros(T)])
    return ScenarioLog("tok", "straight", "test", [f"s{i}" for i in range(T)], DT * np.arange(T), ego, EGO,
                       [f"a{i}" for i in range(A)], cat, size, ap, np.ones((A, T), dtype=bool), geom, route=["right"])


def line(x0: float, vx: float, y: float, t: np.ndarray, yaw: float = 0.0) -> np.ndarray:
    return np.column_stack([x0 + vx * t, np.full_like(t, y), np.full_like(t, yaw)])


def states_from(x: np.ndarray, y: np.ndarray, speed: np.ndarray, yaw: np.ndarray | float = 0.0) -> np.ndarray:
    yaw = np.broadcast_to(np.asarray(yaw, dtype=np.float64), x.shape)
    return np.column_stack([x, y, yaw, speed, np.zeros_like(x)])


def braking(v0: float, decel: float, n: int, dt: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Positions and speeds of a car braking at ``decel`` from ``v0`` until it stops (exact)."""
    t = dt * np.arange(n)
    t_stop = v0 / decel
    tt = np.minimum(t, t_stop)
    return v0 * tt - 0.5 * decel * tt**2, np.maximum(v0 - decel * t, 0.0)


class LogReplay:
    def reset(self, seed=None) -> None:
        pass

    def plan(self, sample) -> np.ndarray:
        fut = sample.ego_future[sample.ego_future_valid]
        out = np.zeros_like(sample.ego_future)
        out[: len(fut)] = fut
        prev = np.vstack([np.zeros((1, 3)), fut])
        for j in range(len(fut), len(out)):
            out[j] = out[j - 1] + (prev[-1] - prev[-2])
        return out


def _nc(ego_states, agents_pose, agents_size, agents_category, agents_speed, off_lane=None):
    n = len(ego_states)
    A = len(agents_pose)
    return no_at_fault_collision(ego_states[:, :3], ego_states[:, 3], EGO, agents_pose, np.ones((A, n), dtype=bool),
                                 np.asarray(agents_size, dtype=float), np.asarray(agents_category), np.asarray(agents_speed, dtype=float),
                                 off_lane)


def _events(ego_states, agents_pose, agents_size, agents_category, agents_speed, off_lane=None):
    n = len(ego_states)
    A = len(agents_pose)
    return collision_events(ego_states[:, :3], ego_states[:, 3], EGO, agents_pose, np.ones((A, n), dtype=bool),
                            np.asarray(agents_size, dtype=float), np.asarray(agents_category), np.asarray(agents_speed, dtype=float),
                            off_lane)


# --- NC -----------------------------------------------------------------------------------------


def test_head_on_collision_gives_nc_zero_and_pdms_zero():
    T = 17
    t = DT * np.arange(T)
    # Logged: the ego keeps its lane at 10 m/s; an oncoming car (wrong-way) comes down the left lane.
    oncoming = (line(110.0, -12.0, LANE_W, t, yaw=np.pi), CAR, VEH)
    log = straight_log(10.0 * t, agents=[oncoming])
    frame = 4
    # Plan: move into the left lane within 2 s, then go on at 10 m/s: straight into the oncoming car.
    tau = DT * np.arange(1, 9)
    y = LANE_W * np.clip(tau / 2.0, 0, 1) ** 2 * (3 - 2 * np.clip(tau / 2.0, 0, 1))
    plan = np.column_stack([10.0 * tau, y, np.zeros(8)])
    scores = score_trajectory(log, frame, plan)
    assert scores["collision"] == 1.0 and scores["at_fault_collision"] == 1.0
    assert scores["nc"] == 0.0
    assert scores["pdms"] == 0.0
    assert scores["dac"] == 1.0  # still on the road: only NC zeroes it
    # The logged (human) plan scores well on the same scene.
    human = score_trajectory(log, frame, to_ego_frame(log.ego_pose[frame + 1 : frame + 9], log.ego_pose[frame]))
    assert human["nc"] == 1.0 and human["dac"] == 1.0 and human["pdms"] > 0.95


def test_being_rear_ended_while_stopped_is_not_at_fault():
    n = 31
    t = 0.1 * np.arange(n)
    ego = states_from(np.zeros(n), np.zeros(n), np.zeros(n))
    from_behind = line(-10.0, 5.0, 0.0, t)[None]
    events = _events(ego, from_behind, [CAR], [VEH], np.full((1, n), 5.0))
    assert [e.kind for e in events] == [STOPPED_EGO]
    assert _nc(ego, from_behind, [CAR], [VEH], np.full((1, n), 5.0)) == 1.0
    # End to end: a logged stopped ego, a car driving into it from behind, a stand-still plan.
    T = 13
    tk = DT * np.arange(T)
    log = straight_log(np.zeros(T), agents=[(line(-25.0, 5.0, 0.0, tk), CAR, VEH)])
    scores = score_trajectory(log, 4, np.zeros((8, 3)))
    assert scores["collision"] == 1.0 and scores["nc"] == 1.0


def test_rear_end_while_moving_is_not_at_fault_but_hitting_a_stopped_car_is():
    n = 31
    t = 0.1 * np.arange(n)
    ego = states_from(5.0 * t, np.zeros(n), np.full(n, 5.0))
    faster_behind = line(-8.0, 10.0, 0.0, t)[None]
    events = _events(ego, faster_behind, [CAR], [VEH], np.full((1, n), 10.0))
    assert [e.kind for e in events] == [ACTIVE_REAR]
    assert _nc(ego, faster_behind, [CAR], [VEH], np.full((1, n), 10.0)) == 1.0
    parked_ahead = line(12.0, 0.0, 0.0, t)[None]
    events = _events(ego, parked_ahead, [CAR], [VEH], np.zeros((1, n)))
    assert [e.kind for e in events] == [STOPPED_TRACK]
    assert _nc(ego, parked_ahead, [CAR], [VEH], np.zeros((1, n))) == 0.0
    slower_ahead = line(8.0, 1.0, 0.0, t)[None]
    assert [e.kind for e in _events(ego, slower_ahead, [CAR], [VEH], np.ones((1, n)))] == [ACTIVE_FRONT]


def test_static_object_gives_half_and_each_agent_counts_once():
    n = 31
    t = 0.1 * np.arange(n)
    ego = states_from(5.0 * t, np.zeros(n), np.full(n, 5.0))
    cone = line(10.0, 0.0, 0.0, t)[None]
    assert _nc(ego, cone, [(0.5, 0.5)], [OTHER], np.zeros((1, n))) == 0.5
    # A pedestrian standing in the way: an agent, so 0.
    assert _nc(ego, cone, [(0.5, 0.5)], [PED], np.zeros((1, n))) == 0.0
    # The ego keeps overlapping the cone for many steps: still one event.
    assert len(_events(ego, cone, [(0.5, 0.5)], [OTHER], np.zeros((1, n)))) == 1


def test_lateral_collision_at_fault_only_when_ego_straddles_lanes():
    n = 31
    t = 0.1 * np.arange(n)
    ego = states_from(10.0 * t, np.zeros(n), np.full(n, 10.0))
    # A car alongside, slightly behind the ego's centre, drifting into it from the left.
    side = np.column_stack([10.0 * t - 1.0, 2.6 - 0.5 * t, np.full(n, -0.05)])[None]
    size, speed = [(4.0, 1.8)], np.full((1, n), 10.0)
    assert [e.kind for e in _events(ego, side, size, [VEH], speed)] == [ACTIVE_LATERAL]
    assert _nc(ego, side, size, [VEH], speed, off_lane=np.zeros(n, dtype=bool)) == 1.0
    assert _nc(ego, side, size, [VEH], speed, off_lane=np.ones(n, dtype=bool)) == 0.0


# --- DAC ----------------------------------------------------------------------------------------


def test_leaving_the_road_gives_dac_zero():
    T = 17
    log = straight_log(10.0 * DT * np.arange(T))
    tau = DT * np.arange(1, 9)
    off_road = np.column_stack([10.0 * tau, -1.2 * tau, np.full(8, -0.12)])  # drifts right, off the kerb at y = -1.8
    scores = score_trajectory(log, 4, off_road)
    assert scores["dac"] == 0.0 and scores["pdms"] == 0.0
    assert scores["out_of_lane_rate"] > 0.3
    # A corner, not the centre, decides: centre on the road, one corner 5 cm over the edge.
    pose = np.array([[50.0, -LANE_W / 2 + EGO[1] / 2 - 0.05, 0.0]])
    assert drivable_area_compliance(pose, EGO, log.map.drivable) == 0.0
    pose[0, 1] += 0.1
    assert drivable_area_compliance(pose, EGO, log.map.drivable) == 1.0
    empty = straight_log(np.zeros(3))
    empty.map.drivable = shapely.Polygon()
    with pytest.raises(DatasetError, match="no drivable area"):
        drivable_area_compliance(pose, EGO, empty.map.drivable)


# --- comfort ------------------------------------------------------------------------------------


def test_harsh_brake_is_uncomfortable_and_smooth_drives_are_comfortable():
    n = 41
    x, v = braking(15.0, 8.0, n)
    harsh = states_from(x, np.zeros(n), v)
    m = comfort_metrics(harsh, 0.1)
    assert m["lon_accel"].min() == pytest.approx(-8.0, abs=0.3)
    assert comfort(harsh, 0.1) == 0.0
    t = 0.1 * np.arange(n)
    cruise = states_from(10.0 * t, np.zeros(n), np.full(n, 10.0))
    assert comfort(cruise, 0.1) == 1.0
    # A bend of radius 100 m at 10 m/s: lateral acceleration 1 m/s², yaw rate 0.1 rad/s.
    th = 10.0 * t / 100.0
    bend = states_from(100 * np.sin(th), 100 * (1 - np.cos(th)), np.full(n, 10.0), th)
    assert comfort_metrics(bend, 0.1)["lat_accel"] == pytest.approx(np.ones(n), abs=1e-6)
    assert comfort(bend, 0.1) == 1.0
    # Easing into a -3 m/s² brake over 2 s: jerk peaks at 3π/4 ≈ 2.4 m/s³, within 4.13.
    accel = -1.5 * (1 - np.cos(np.pi * np.clip(t / 2.0, 0, 1)))
    speed = 12.0 + np.concatenate([[0.0], np.cumsum(0.5 * (accel[1:] + accel[:-1]) * 0.1)])
    xs = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * 0.1)])
    assert comfort(states_from(xs, np.zeros(n), speed), 0.1) == 1.0
    # The same bend twice as fast: yaw rate 0.2, lateral acceleration 4 — still fine; at 25 m/s, 6.25 is not.
    fast = states_from(100 * np.sin(2.5 * th), 100 * (1 - np.cos(2.5 * th)), np.full(n, 25.0), 2.5 * th)
    assert comfort(fast, 0.1) == 0.0


# --- TTC ----------------------------------------------------------------------------------------


def test_ttc_violation_when_closing_fast_on_a_leader():
    n = 41
    dt = 0.1
    t = dt * np.arange(n)
    x, v = braking(15.0, 6.0, n)
    ego = states_from(x, np.zeros(n), v)
    gap = 8.5  # bumper to bumper
    lead_x0 = EGO[0] / 2 + gap + CAR[0] / 2
    leader = line(lead_x0, 5.0, 0.0, t)[None]
    valid = np.ones((1, n), dtype=bool)
    # It brakes in time: no collision (min gap 0.17 m) ...
    assert _nc(ego, leader, [CAR], [VEH], np.full((1, n), 5.0)) == 1.0
    assert not _events(ego, leader, [CAR], [VEH], np.full((1, n), 5.0))
    # ... but its constant-velocity projection 0.9 s ahead (13.5 m vs the leader's 4.5 m) hits the leader.
    assert time_to_collision_ok(ego[:, :3], ego[:, 3], EGO, leader, valid, np.array([CAR]), dt) == 0.0
    # The same leader driving away at 15 m/s: fine.
    fast_leader = line(lead_x0, 15.0, 0.0, t)[None]
    assert time_to_collision_ok(ego[:, :3], ego[:, 3], EGO, fast_leader, valid, np.array([CAR]), dt) == 1.0
    # A car running into the ego from behind does not count (it is not ahead of the ego) ...
    m = 12  # 1.1 s: contact from 0.6 s on, the chaser's centre stays behind the ego's rear axle
    cruise = states_from(10.0 * t[:m], np.zeros(m), np.full(m, 10.0))
    chaser = line(-EGO[0] / 2 - 3.0 - CAR[0] / 2, 15.0, 0.0, t[:m])[None]
    assert _events(cruise, chaser, [CAR], [VEH], np.full((1, m), 15.0))[0].kind == ACTIVE_REAR
    assert time_to_collision_ok(cruise[:, :3], cruise[:, 3], EGO, chaser, valid[:, :m], np.array([CAR]), dt) == 1.0
    # ... and without projecting ahead the braking drive is clear: the projection makes the violation.
    assert time_to_collision_ok(ego[:, :3], ego[:, 3], EGO, leader, valid, np.array([CAR]), dt, horizons_s=(0.0,)) == 1.0


# --- EP, route, PDMS ----------------------------------------------------------------------------


def test_ego_progress_and_its_5m_floor():
    assert ego_progress(3.0, 4.0) == 1.0  # both under 5 m
    assert ego_progress(0.0, 4.9) == 1.0
    assert ego_progress(4.0, 6.0) == pytest.approx(4.0 / 6.0)  # the reference is over the floor
    assert ego_progress(10.0, 20.0) == pytest.approx(0.5)
    assert ego_progress(30.0, 20.0) == 1.0  # better than the reference
    assert ego_progress(-5.0, 20.0) == 0.0


def test_route_progress_and_out_of_lane():
    log = straight_log(np.arange(10.0))
    xy = np.column_stack([np.linspace(3.0, 40.0, 50), np.linspace(0.0, 1.0, 50)])
    assert route_progress(xy, log) == pytest.approx(37.0)
    assert route_progress(xy[::-1], log) == pytest.approx(-37.0)
    # A car centred in its lane is in it; one whose centre sits on the lane line is not.
    in_lane = np.column_stack([np.arange(0.0, 20.0), np.zeros(20), np.zeros(20)])
    assert out_of_lane_rate(in_lane, EGO, log) == 0.0
    on_line = in_lane.copy()
    on_line[10:, 1] = LANE_W / 2
    assert out_of_lane_rate(on_line, EGO, log) == pytest.approx(0.5)


def test_pdm_score_formula():
    assert pdm_score(1, 1, 1, 1, 1) == 1.0
    assert pdm_score(1, 1, 0, 0.5, 1) == pytest.approx((0 + 2.5 + 2) / 12)
    assert pdm_score(0.5, 1, 1, 1, 1) == pytest.approx(0.5)
    assert pdm_score(1, 0, 1, 1, 1) == 0.0
    assert pdm_score(0, 1, 1, 1, 1) == 0.0  # an at-fault collision zeroes the score whatever else happened
    # the weighted part, term by term: TTC and EP weigh 5/12 each, comfort 2/12
    assert pdm_score(1, 1, 1, 0, 0) == pytest.approx(5 / 12)
    assert pdm_score(1, 1, 0, 1, 0) == pytest.approx(5 / 12)
    assert pdm_score(1, 1, 0, 0, 1) == pytest.approx(1 / 6)
    assert pdm_score(1, 1, 1, 0.2, 0) == pytest.approx(0.5)  # (5 + 1) / 12
    # a static-object collision (NC 0.5) halves the weighted part: 0.5 * (0 + 4 + 2) / 12
    assert pdm_score(0.5, 1, 0, 0.8, 1) == pytest.approx(0.25)


def test_log_replay_of_the_human_drive_on_a_clean_log():
    T = 41
    t = DT * np.arange(T)
    agents = [
        (line(25.0, 10.0, 0.0, t), CAR, VEH),  # a leader 25 m ahead at the ego's speed
        (line(-5.0, 11.0, LANE_W, t), CAR, VEH),  # overtaking in the left lane
        (np.column_stack([80.0 + 0 * t, np.full(T, -4.0), np.full(T, np.pi / 2)]), (0.6, 0.6), PED),  # on the pavement
    ]
    log = straight_log(10.0 * t, agents=agents)
    rollout = DrivingSimulator().run(log, LogReplay())
    scores = score_rollout(rollout, log)
    assert scores["nc"] == 1.0 and scores["dac"] == 1.0
    assert scores["ttc"] == 1.0 and scores["comfort"] == 1.0
    assert scores["ep"] > 0.99 and scores["pdms"] > 0.99
    assert scores["progress_m"] == pytest.approx(10.0 * (t[-1] - t[4]), abs=0.5)
    assert scores["out_of_lane_rate"] == 0.0
    for frame in (4, 12, 20):
        human = to_ego_frame(log.ego_pose[frame + 1 : frame + 9], log.ego_pose[frame])
        s = score_trajectory(log, frame, human)
        assert s["nc"] == 1.0 and s["dac"] == 1.0 and s["ep"] == 1.0 and s["pdms"] == 1.0
    # A planner that stands still: safe, but no progress.
    still = score_trajectory(log, 4, np.zeros((8, 3)))
    assert still["nc"] == 1.0 and still["progress_m"] < 10.0  # it brakes from 10 m/s at the -6 m/s² limit
    assert still["ep"] == pytest.approx(still["progress_m"] / 40.0, abs=0.01)
    assert still["comfort"] == 0.0 and still["pdms"] < 0.6


# --- open loop ----------------------------------------------------------------------------------


def test_l2_at_hand_computed():
    gt = np.zeros((2, 6, 3))
    gt[..., 0] = np.arange(1, 7)
    pred = gt.copy()
    pred[0, :, 1] = 1.0  # 1 m off everywhere
    pred[1, :, 0] += np.arange(1, 7)  # error 1, 2, ... 6 m
    valid = np.ones((2, 6), dtype=bool)
    out = l2_at(pred, gt, valid)
    assert out == {"l2_1s": pytest.approx((1 + 2) / 2), "l2_2s": pytest.approx((1 + 4) / 2), "l2_3s": pytest.approx((1 + 6) / 2)}
    avg = l2_at(pred, gt, valid, mode="avg")
    assert avg["l2_2s"] == pytest.approx((1 + np.mean([1, 2, 3, 4])) / 2)
    valid[1, 5] = False  # sample 1 has no 3 s ground truth
    assert l2_at(pred, gt, valid)["l2_3s"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs 8 waypoints"):
        l2_at(pred, gt, valid, horizons_s=(4.0,))


def test_collision_at_hand_computed():
    P, H = 4, 6
    plan = np.zeros((H, 3))
    plan[:, 0] = 5.0 * DT * np.arange(1, H + 1)  # 5 m/s straight ahead
    agents = np.zeros((1, P + 1 + H, 3))
    valid = np.zeros((1, P + 1 + H), dtype=bool)
    # An agent sitting on the plan's 2 s waypoint (index 3), annotated only then.
    agents[0, P + 1 + 3] = [plan[3, 0], 0.0, np.pi / 2]
    valid[0, P + 1 + 3] = True
    sizes = np.array([[1.0, 1.0]])
    out = collision_at(plan, agents, valid, sizes, past_steps=P)
    assert out == {"collision_1s": 0.0, "collision_2s": 1.0, "collision_3s": 0.0}
    assert collision_at(plan, agents, valid, sizes, past_steps=P, mode="avg")["collision_2s"] == pytest.approx(0.25)
    # Batched with a second, empty scene: the rate halves.
    batch = collision_at(np.stack([plan, plan]), np.stack([agents, agents]), np.stack([valid, valid & False]),
                         np.stack([sizes, sizes]), past_steps=P)
    assert batch["collision_2s"] == 0.5
    # Moved 3 m to the side, the boxes (ego half-width 0.93 + 0.5) no longer touch.
    agents[0, P + 1 + 3, 1] = 3.0
    assert collision_at(plan, agents, valid, sizes, past_steps=P)["collision_2s"] == 0.0
