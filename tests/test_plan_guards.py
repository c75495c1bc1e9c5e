"""The candidate guards: box overlap in torch, constant-velocity forecasts, the drivable-area count, and their use in
selection."""

from __future__ import annotations

import numpy as np
import torch

from diffpilot.data.geometry import box_corners, boxes_overlap
from diffpilot.data.scenario import DT
from diffpilot.policy.plan_guards import (cap_acceleration, clearance_steps, clearest, obb_overlap, offroad_corners,
                                         stop_short)
from diffpilot.policy.transdiffuser import select_candidates

EGO = (4.084, 1.85)
F = 8


def test_obb_overlap_agrees_with_the_numpy_separating_axis_test():
    rng = np.random.default_rng(0)
    n = 4000
    pa = np.column_stack([rng.uniform(-4, 4, (n, 2)), rng.uniform(-np.pi, np.pi, n)])
    pb = np.column_stack([rng.uniform(-4, 4, (n, 2)), rng.uniform(-np.pi, np.pi, n)])
    sa, sb = rng.uniform(0.5, 5.0, (n, 2)), rng.uniform(0.5, 5.0, (n, 2))
    expected = boxes_overlap(box_corners(pa, sa), box_corners(pb, sb))
    got = obb_overlap(torch.as_tensor(pa), torch.as_tensor(0.5 * sa), torch.as_tensor(pb), torch.as_tensor(0.5 * sb))
    assert 0.2 < expected.mean() < 0.8  # both outcomes are exercised
    np.testing.assert_array_equal(got.numpy(), expected)


def _straight(speed: float) -> np.ndarray:
    t = DT * np.arange(1, F + 1)
    return np.column_stack([speed * t, np.zeros(F), np.zeros(F)])


def _agents(*tracks: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Agents from (previous pose, present pose) pairs: pose (1, K, 2, 3), valid, size."""
    pose = torch.tensor(np.stack([np.stack([a, b]) for a, b in tracks])[None], dtype=torch.float32)
    return pose, torch.ones(pose.shape[:3], dtype=torch.bool), torch.tensor([[list(EGO)] * len(tracks)], dtype=torch.float32)


def _clear(cands: list[np.ndarray], agents, margin: float = 0.3) -> list[int]:
    c = torch.tensor(np.stack(cands)[None], dtype=torch.float32)
    return clearance_steps(c, *agents, EGO, margin, DT)[0].tolist()


def test_a_plan_into_a_stopped_car_loses_its_clearance_when_the_boxes_meet():
    stopped = np.array([20.0, 0.0, 0.0])
    agents = _agents((stopped, stopped))
    # At 10 m/s the ego's front (2.04 m + 0.3 margin ahead of its centre) meets the car's rear (17.96 m) when the
    # centre passes 15.6 m: at 1.56 s. Checks run every half step (0.25 s), so the first one that sees the contact
    # is at 1.75 s, index 6 (0.25 ... 1.5 s are clear).
    # A plan that stops after 8 m, and one that waits, stay clear all the way.
    creep = np.column_stack([np.minimum(DT * np.arange(1, F + 1) * 4.0, 8.0), np.zeros(F), np.zeros(F)])
    assert _clear([_straight(10.0), creep, np.zeros((F, 3))], agents) == [6, 2 * F, 2 * F]
    # A horizon of 1.5 s does not see that contact; one of 2 s does.
    c = torch.tensor(_straight(10.0)[None, None], dtype=torch.float32)
    assert int(clearance_steps(c, *agents, EGO, 0.3, DT, horizon_s=1.5)) == 2 * F
    assert int(clearance_steps(c, *agents, EGO, 0.3, DT, horizon_s=2.0)) == 6
    # A 4 m stopping gap in front: the box's front reaches 6.34 m ahead of the centre, which passes 11.62 m at
    # 1.16 s; the first check to see it is at 1.25 s (index 4). It reaches ahead only, not sideways or back.
    assert int(clearance_steps(c, *agents, EGO, 0.3, DT, horizon_s=2.0, front_m=4.0)) == 4
    beside = _agents((np.array([10.0, 2.3, 0.0]), np.array([10.0, 2.3, 0.0])))
    assert int(clearance_steps(c, *beside, EGO, 0.3, DT, front_m=4.0)) == 2 * F


def test_moving_traffic_ahead_and_cars_behind_or_beside_do_not_block():
    lead = _agents((np.array([14.0, 0.0, 0.0]), np.array([19.0, 0.0, 0.0])))  # 10 m/s, 19 m ahead
    assert _clear([_straight(10.0)], lead) == [2 * F]
    assert _clear([_straight(16.0)], lead) != [2 * F]  # closing at 6 m/s: it does run into it
    behind = _agents((np.array([-22.0, 0.0, 0.0]), np.array([-14.0, 0.0, 0.0])))  # 16 m/s from behind
    assert _clear([_straight(10.0)], behind) == [2 * F]
    beside = _agents((np.array([-5.0, 3.5, 0.0]), np.array([0.0, 3.5, 0.0])))  # next lane, same speed
    assert _clear([_straight(10.0)], beside) == [2 * F]
    invalid = _agents((np.array([20.0, 0.0, 0.0]), np.array([20.0, 0.0, 0.0])))
    invalid = (invalid[0], torch.zeros_like(invalid[1]), invalid[2])
    assert _clear([_straight(10.0)], invalid) == [2 * F]


def test_selection_keeps_to_the_admissible_candidates():
    cands = torch.tensor(np.stack([_straight(10.0), _straight(10.2), _straight(9.8), _straight(4.0)])[None],
                         dtype=torch.float32)
    ok = torch.tensor([[False, False, False, True]])
    for how in ("first", "medoid", "mode"):
        assert int(select_candidates(cands, how, admissible=ok)) == 3
        assert int(select_candidates(cands, how)) != 3
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    assert int(select_candidates(cands, "score", scores, ok)) == 3
    assert int(select_candidates(cands, "score", scores)) == 0


def _road(half_width_m: float, R: int = 64) -> torch.Tensor:
    """A straight road along the ego's heading, ``half_width_m`` each side of it, as a 1-m drivable raster (1, R, R)."""
    left = R / 2 - np.arange(R) - 0.5  # column centres, metres to the left
    return torch.tensor(np.tile(np.abs(left) < half_width_m, (R, 1))[None], dtype=torch.float32)


def test_offroad_corners_count_the_box_corners_off_the_drivable_area():
    t = DT * np.arange(1, F + 1)
    straight = _straight(6.0)
    drift = np.column_stack([6.0 * t, 0.9 * t ** 2, np.arctan(1.8 * t / 6.0)])  # ends 14 m to the left
    fast = _straight(20.0)  # past the 32-m raster from its 30-m waypoint on: unknown ground counts as drivable
    cands = torch.tensor(np.stack([straight, drift, fast])[None], dtype=torch.float32)
    road = offroad_corners(cands, _road(2.5), EGO, 1.0)[0].tolist()
    assert road[0] == 0 and road[2] == 0
    # the drifting plan: corner y against the road edge, waypoint by waypoint, as a numpy reference
    c, s = np.cos(drift[:, 2:]), np.sin(drift[:, 2:])
    ys = drift[:, 1:2] + s * np.array([1, 1, -1, -1]) * EGO[0] / 2 + c * np.array([1, -1, 1, -1]) * EGO[1] / 2
    left = np.floor(32 - ys)  # column of each corner
    assert road[1] == int((np.abs(32 - left - 0.5) >= 2.5).sum()) > 0
    nowhere = offroad_corners(cands, torch.zeros(1, 64, 64), EGO, 1.0)[0].tolist()
    # only corners inside the raster are judged: at 10 and 20 m all four, at 30 m the two rear ones (the front
    # ones lie 32.04 m ahead, past the raster's 32 m)
    assert nowhere[0] == 4 * F and nowhere[2] == 4 + 4 + 2


def test_clearest_keeps_to_the_fewest_offroad_corners_then_the_longest_clearance():
    steps = torch.tensor([[16, 3, 16, 9]])
    offroad = torch.tensor([[5, 0, 2, 0]])
    assert clearest(steps).tolist() == [[True, False, True, False]]
    assert clearest(steps, offroad).tolist() == [[False, False, False, True]]
    assert clearest(None, offroad).tolist() == [[False, True, False, True]]
    assert clearest(None) is None


def test_oncoming_traffic_does_not_block_but_a_stopped_or_crossing_car_does():
    # A car 30 m ahead, 1.6 m to the left, coming at 10 m/s along a heading that drifts across the ego's lane:
    # its straight-line forecast meets the ego's box within 2 s, as on the inside of a curve.
    drift = np.array([-10.0 * np.cos(0.05), -10.0 * np.sin(0.05)]) * DT
    oncoming = (np.array([30.0 - drift[0], 1.6 - drift[1], np.pi + 0.05]), np.array([30.0, 1.6, np.pi + 0.05]))
    assert _clear([_straight(10.0)], _agents(oncoming)) == [2 * F]
    # The same box standing still counts whatever its heading: a parked car facing the ego is in its way.
    still = np.array([22.0, 0.5, np.pi])
    assert _clear([_straight(10.0)], _agents((still, still))) != [2 * F]
    # Crossing traffic (heading 90 degrees from the ego's) counts.
    crossing = (np.array([16.0, -8.4, np.pi / 2]), np.array([16.0, -6.4, np.pi / 2]))  # at 4 m/s, in the path at 1.6 s
    assert _clear([_straight(10.0)], _agents(crossing)) != [2 * F]
    # A slow car ahead cutting into the ego's lane (heading -0.3 rad, the ego's way) counts.
    cut_in = (np.array([29.0, 1.9, -0.3]), np.array([30.0, 1.6, -0.3]))
    assert _clear([_straight(10.0)], _agents(cut_in)) != [2 * F]


def test_stop_short_brakes_at_one_deceleration_to_the_last_clear_waypoint():
    plans = torch.tensor(np.stack([_straight(10.0)] * 3), dtype=torch.float32)
    out = stop_short(plans, torch.tensor([2 * F, 6, 1])).numpy()
    np.testing.assert_array_equal(out[0], plans[0].numpy())  # clear all the way: unchanged
    # Contact first seen at half step 6 (1.75 s): waypoints 0..2 are clear, so it stops at the third (15 m),
    # braking from 10 m/s at 10^2 / (2 * 15) = 3.3 m/s^2, which takes 3 s.
    x = out[1, :, 0]
    np.testing.assert_allclose(out[1, :, 1:], 0.0, atol=1e-6)  # on the candidate's path
    assert np.all(x <= plans[1, :, 0].numpy() + 1e-5)  # never ahead of the candidate
    np.testing.assert_allclose(x[-1], 15.0, atol=1e-4)
    t = DT * np.arange(1, F + 1)
    np.testing.assert_allclose(x, 15.0 * (1.0 - np.clip(1.0 - t / 3.0, 0.0, None) ** 2), atol=1e-4)
    accel = np.diff(np.concatenate([[0.0], x]), 2) / DT**2
    assert np.all(accel[:4] > -3.4) and np.all(accel <= 1e-3)  # no step harder than the one deceleration
    np.testing.assert_array_equal(out[2], np.zeros((F, 3)))  # not even the first waypoint is clear: standstill


def test_stop_short_follows_a_curved_path():
    yaw = np.linspace(0.1, 0.8, F)
    seg = 4.0 * np.column_stack([np.cos(yaw), np.sin(yaw)])
    plan = np.column_stack([np.cumsum(seg, 0), yaw])
    out = stop_short(torch.tensor(plan[None], dtype=torch.float32), torch.tensor([6])).numpy()[0]
    last = plan[2]  # half step 6: waypoints 0..2 are clear (12 m of path; from 8 m/s it stops within 3 s)
    np.testing.assert_allclose(out[-1], last, atol=1e-4)
    # Every braked pose lies on a segment of the candidate's polyline, its heading between the segment's ends.
    pts = np.vstack([np.zeros(3), plan])
    for p in out:
        d = [np.linalg.norm(np.cross(b[:2] - a[:2], p[:2] - a[:2])) / np.linalg.norm(b[:2] - a[:2])
             for a, b in zip(pts[:-1], pts[1:])]
        assert min(d) < 1e-3
    assert np.all(np.diff(out[:, 2]) >= -1e-6)


def test_cap_acceleration_retimes_a_fast_start_along_its_path_and_leaves_slower_plans_alone():
    t = DT * np.arange(1, F + 1)
    yaw = 0.02 * t  # a gentle curve, pulling away at 4 m/s^2
    s = 0.5 * 4.0 * t**2
    plan = np.column_stack([s * np.cos(yaw), s * np.sin(yaw), yaw])
    cruise = _straight(8.0)
    plans = torch.tensor(np.stack([plan, cruise, cruise]), dtype=torch.float32)
    out = cap_acceleration(plans, torch.tensor([0.0, 8.0, 9.0]), 2.0).numpy()
    step = np.linalg.norm(np.diff(np.vstack([np.zeros(2), out[0, :, :2]]), axis=0), axis=1) / DT
    bound = 2.0 * t  # from standstill, each step's mean speed within accel * t of now
    assert np.all(step <= bound + 1e-3) and step[0] > 0.9  # capped, still moving off
    assert np.all(np.diff(step) <= 2.0 * DT + 1e-3)  # and from step to step
    pts = np.vstack([np.zeros(3), plan])
    for p in out[0]:  # every pose on the plan's own polyline
        d = [np.linalg.norm(np.cross(b[:2] - a[:2], p[:2] - a[:2])) / np.linalg.norm(b[:2] - a[:2]) for a, b in zip(pts[:-1], pts[1:])]
        assert min(d) < 1e-3
    np.testing.assert_allclose(out[1], cruise, atol=1e-4)  # already at its speed: unchanged
    np.testing.assert_allclose(out[2], cruise, atol=1e-4)  # slower than the car now: unchanged
