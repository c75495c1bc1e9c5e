"""Trajectory trackers that turn a planned pose sequence into bicycle inputs.

NAVSIM scores a planned trajectory by tracking it with an LQR controller on
a kinematic bicycle at 10 Hz; the closed-loop simulator does the same
between replans. A plan is a handful of poses at 0.5 s spacing, so the
tracker first fits a smooth time-parametrized path through them (cubic
spline in time), then

* longitudinally: a PI controller on speed whose target is the mean speed
  that brings the car to the plan's position one horizon (1 s) ahead, so
  it keeps the plan's timing, not only its speed (like nuPlan's LQR, which
  tracks the plan's speed over its tracking horizon);
* laterally: a discrete LQR on (lateral error, heading error, steering
  error) with the steering *rate* as input, linearized about the current
  speed. Gains are precomputed on a speed grid and interpolated (gain
  scheduling), plus the path curvature as steering feed-forward.

:class:`PurePursuitTracker` is the simpler geometric alternative with the
same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.linalg import solve_discrete_are

from diffpilot.sim.driving.vehicle import CONTROL_DT, SPEED, STEER, YAW, KinematicBicycle

_DENSE_DT = 0.05  # seconds between points of the fitted reference path


@dataclass
class ReferencePath:
    """A plan resampled densely in time: poses, speed, acceleration, curvature."""

    times: np.ndarray  # (M,)
    xy: np.ndarray  # (M, 2)
    yaw: np.ndarray  # (M,)
    speed: np.ndarray  # (M,)
    accel: np.ndarray  # (M,)
    curvature: np.ndarray  # (M,)
    station: np.ndarray  # (M,) arc length from the first point

    def at(self, t: float) -> tuple[float, float, float, float]:
        """(station, speed, accel, curvature) of the plan at time ``t``.

        Before the start the first point holds; after the end the plan goes
        on at its final speed, so a tracker looking ahead past the last
        waypoint does not read the end of the plan as a stop.
        """
        last = len(self.times) - 1
        i = float(np.clip((t - self.times[0]) / _DENSE_DT, 0, last))
        lo = int(np.floor(i))
        hi = min(lo + 1, last)
        w = i - lo
        station, speed, accel, curvature = (float((1 - w) * arr[lo] + w * arr[hi]) for arr in (self.station, self.speed, self.accel, self.curvature))
        if t > self.times[-1]:
            station += float(self.speed[-1]) * (t - float(self.times[-1]))
        return station, speed, accel, curvature

    def project(self, xy: np.ndarray, t_max: float) -> int:
        """Index of the path point nearest ``xy`` among points no later than ``t_max``."""
        last = int(np.searchsorted(self.times, t_max, side="right"))
        last = max(last, 1)
        d = np.sum((self.xy[:last] - xy) ** 2, axis=1)
        return int(np.argmin(d))


def fit_reference(reference: np.ndarray, reference_times: np.ndarray) -> ReferencePath:
    """Fit a smooth path through plan poses ``(H, 3)`` at absolute ``reference_times`` (H,)."""
    reference = np.asarray(reference, dtype=np.float64)
    reference_times = np.asarray(reference_times, dtype=np.float64)
    if reference.ndim != 2 or reference.shape[1] != 3 or len(reference) < 2:
        raise ValueError(f"reference must be (H>=2, 3) poses (x, y, yaw), got shape {reference.shape}")
    if reference_times.shape != (len(reference),):
        raise ValueError(f"reference_times must have shape ({len(reference)},), got {reference_times.shape}")
    if not np.all(np.isfinite(reference)) or not np.all(np.isfinite(reference_times)):
        raise ValueError("reference and reference_times must be finite (the plan contains NaN or inf)")
    if np.any(np.diff(reference_times) <= 0):
        raise ValueError("reference_times must be strictly increasing")
    t = np.arange(reference_times[0], reference_times[-1] + 1e-9, _DENSE_DT)
    if len(reference) >= 3:
        spline = CubicSpline(reference_times, reference[:, :2], axis=0)
        xy = spline(t)
        vel = spline(t, 1)
        acc = spline(t, 2)
    else:
        w = (t - reference_times[0]) / (reference_times[1] - reference_times[0])
        xy = reference[0, :2] + w[:, None] * (reference[1, :2] - reference[0, :2])
        vel = np.broadcast_to((reference[1, :2] - reference[0, :2]) / (reference_times[1] - reference_times[0]), xy.shape)
        acc = np.zeros_like(xy)
    speed = np.hypot(vel[:, 0], vel[:, 1])
    # Heading: the direction of travel where the plan moves, the plan's own yaw (unwrapped, interpolated) where it stands.
    plan_yaw = np.interp(t, reference_times, np.unwrap(reference[:, 2]))
    moving = speed > 0.5
    yaw = np.where(moving, np.arctan2(vel[:, 1], vel[:, 0]), plan_yaw)
    safe = np.maximum(speed, 1e-6)
    lon_acc = np.where(moving, (vel[:, 0] * acc[:, 0] + vel[:, 1] * acc[:, 1]) / safe, np.gradient(speed, _DENSE_DT) if len(t) > 1 else 0.0)
    curvature = np.where(moving, (vel[:, 0] * acc[:, 1] - vel[:, 1] * acc[:, 0]) / safe**3, 0.0)
    curvature = np.clip(curvature, -0.5, 0.5)
    seg = np.hypot(*np.diff(xy, axis=0).T)
    station = np.concatenate([[0.0], np.cumsum(seg)])
    return ReferencePath(t, xy, yaw, speed, lon_acc, curvature, station)


class _PathFollower:
    """Shared longitudinal control and reference caching."""

    def __init__(self, dt: float, wheelbase: float, max_steer: float, max_steer_rate: float,
                 kp_speed: float | None, ki_speed: float, speed_horizon_s: float) -> None:
        if dt <= 0 or wheelbase <= 0:
            raise ValueError(f"dt and wheelbase must be > 0, got {dt}, {wheelbase}")
        self.dt = float(dt)
        self.wheelbase = float(wheelbase)
        self.max_steer = float(max_steer)
        self.max_steer_rate = float(max_steer_rate)
        if speed_horizon_s <= 0:
            raise ValueError(f"speed_horizon_s must be > 0, got {speed_horizon_s}")
        self.speed_horizon_s = float(speed_horizon_s)
        # Constant acceleration a reaches mean speed v + a·h/2 over the horizon h: kp = 2/h closes the gap.
        self.kp_speed = 2.0 / self.speed_horizon_s if kp_speed is None else float(kp_speed)
        self.ki_speed = float(ki_speed)
        self._integral = 0.0
        self._key: tuple | None = None
        self._path: ReferencePath | None = None

    def reset(self) -> None:
        """Forget the speed integrator and the cached reference (call at each new scenario)."""
        self._integral = 0.0
        self._key = None
        self._path = None

    def _reference(self, reference: np.ndarray, reference_times: np.ndarray) -> ReferencePath:
        key = (np.asarray(reference).tobytes(), np.asarray(reference_times).tobytes())
        if key != self._key:
            self._path = fit_reference(reference, reference_times)
            self._key = key
        assert self._path is not None
        return self._path

    def _accel(self, state: np.ndarray, path: ReferencePath, idx: int, now: float) -> float:
        # Target: the mean speed that puts the car where the plan will be one horizon from now.
        # It folds speed and along-track (timing) error into one demand, and does not fight a plan
        # whose first metres were fitted from a lagging start.
        station_ahead = path.at(now + self.speed_horizon_s)[0]
        v_target = max((station_ahead - float(path.station[idx])) / self.speed_horizon_s, 0.0)
        err = v_target - float(state[SPEED])
        self._integral = float(np.clip(self._integral + err * self.dt, -5.0, 5.0))
        accel = self.kp_speed * err + self.ki_speed * self._integral
        if v_target < 0.05 and state[SPEED] < 0.3:
            # Come to a clean stop instead of creeping around zero speed.
            self._integral = 0.0
            accel = min(accel, -1.0)
        return float(accel)


@lru_cache(maxsize=32)
def _lqr_gains(dt: float, wheelbase: float, q: tuple[float, float, float], r: float, speeds: tuple[float, ...]) -> np.ndarray:
    """LQR gains (S, 3) of the lateral error dynamics linearized at each speed (straight-path linearization).

    States (lateral error, heading error, steering error), input steering
    rate; cached because every tracker with the same settings shares them.
    """
    qm, rm = np.diag(q), np.array([[r]])
    out = []
    for v in speeds:
        a = np.array([[1.0, v * dt, 0.5 * v * v * dt * dt / wheelbase], [0.0, 1.0, v * dt / wheelbase], [0.0, 0.0, 1.0]])
        b = np.array([[0.0], [0.5 * v * dt * dt / wheelbase], [dt]])
        p = solve_discrete_are(a, b, qm, rm)
        out.append(np.linalg.solve(rm + b.T @ p @ b, b.T @ p @ a)[0])
    gains = np.stack(out)
    gains.flags.writeable = False
    return gains


class LQRTracker(_PathFollower):
    """Lateral LQR (gain-scheduled on speed) + longitudinal PI on speed.

    ``q_lat``, ``q_heading``, ``q_steer`` and ``r_steer_rate`` weight the
    lateral error, heading error, steering error and steering-rate input in
    the LQR cost. Longitudinally a PI controller (``kp_speed``, default
    2/``speed_horizon_s``, and ``ki_speed``) tracks the mean speed that puts
    the car where the plan will be ``speed_horizon_s`` from now.
    """

    def __init__(
        self,
        dt: float = CONTROL_DT,
        wheelbase: float = 2.588,
        max_steer: float = 0.6,
        max_steer_rate: float = 0.8,
        q_lat: float = 1.0,
        q_heading: float = 2.0,
        q_steer: float = 0.1,
        r_steer_rate: float = 1.0,
        kp_speed: float | None = None,
        ki_speed: float = 0.1,
        speed_horizon_s: float = 1.0,
        speed_grid: np.ndarray | None = None,
    ) -> None:
        super().__init__(dt, wheelbase, max_steer, max_steer_rate, kp_speed, ki_speed, speed_horizon_s)
        self.q = np.diag([q_lat, q_heading, q_steer]).astype(np.float64)
        self.r = np.array([[r_steer_rate]], dtype=np.float64)
        self.speed_grid = np.asarray(speed_grid if speed_grid is not None else np.linspace(0.5, 40.0, 80), dtype=np.float64)
        self.gains = _lqr_gains(self.dt, self.wheelbase, tuple(np.diag(self.q)), float(self.r[0, 0]), tuple(self.speed_grid))

    def control(self, state: np.ndarray, reference: np.ndarray, reference_times: np.ndarray, now: float) -> tuple[float, float]:
        """Inputs (accel, steer_rate) that steer ``state`` (5,) onto the plan at time ``now`` (s, absolute)."""
        state = np.asarray(state, dtype=np.float64)
        path = self._reference(reference, reference_times)
        idx = path.project(state[:2], now + 1.5)
        accel = self._accel(state, path, idx, now)
        tangent = np.array([np.cos(path.yaw[idx]), np.sin(path.yaw[idx])])
        d = state[:2] - path.xy[idx]
        e_lat = float(tangent[0] * d[1] - tangent[1] * d[0])
        e_head = float((state[YAW] - path.yaw[idx] + np.pi) % (2 * np.pi) - np.pi)
        steer_ff = float(np.clip(np.arctan(self.wheelbase * path.curvature[idx]), -self.max_steer, self.max_steer))
        e_steer = float(state[STEER]) - steer_ff
        v = float(np.clip(state[SPEED], self.speed_grid[0], self.speed_grid[-1]))
        k = np.array([np.interp(v, self.speed_grid, self.gains[:, j]) for j in range(3)])
        steer_rate = -float(k @ np.array([e_lat, e_head, e_steer]))
        if state[SPEED] < 0.2:
            steer_rate *= state[SPEED] / 0.2  # no steering on the spot
        return accel, float(np.clip(steer_rate, -self.max_steer_rate, self.max_steer_rate))


class PurePursuitTracker(_PathFollower):
    """Pure pursuit on the fitted path (lookahead grows with speed) + the same PI on speed."""

    def __init__(
        self,
        dt: float = CONTROL_DT,
        wheelbase: float = 2.588,
        max_steer: float = 0.6,
        max_steer_rate: float = 0.8,
        lookahead_min: float = 3.0,
        lookahead_time: float = 0.6,
        steer_gain: float = 4.0,
        kp_speed: float | None = None,
        ki_speed: float = 0.1,
        speed_horizon_s: float = 1.0,
    ) -> None:
        super().__init__(dt, wheelbase, max_steer, max_steer_rate, kp_speed, ki_speed, speed_horizon_s)
        self.lookahead_min = float(lookahead_min)
        self.lookahead_time = float(lookahead_time)
        self.steer_gain = float(steer_gain)

    def control(self, state: np.ndarray, reference: np.ndarray, reference_times: np.ndarray, now: float) -> tuple[float, float]:
        """Inputs (accel, steer_rate) that steer ``state`` (5,) onto the plan at time ``now`` (s, absolute)."""
        state = np.asarray(state, dtype=np.float64)
        path = self._reference(reference, reference_times)
        idx = path.project(state[:2], now + 1.5)
        accel = self._accel(state, path, idx, now)
        lookahead = max(self.lookahead_min, self.lookahead_time * float(state[SPEED]))
        target_station = path.station[idx] + lookahead
        j = int(np.searchsorted(path.station, target_station))
        if j >= len(path.station):
            # Past the end of the plan: aim along its final heading.
            extra = target_station - path.station[-1]
            target = path.xy[-1] + extra * np.array([np.cos(path.yaw[-1]), np.sin(path.yaw[-1])])
        else:
            target = path.xy[j]
        d = target - state[:2]
        c, s = np.cos(state[YAW]), np.sin(state[YAW])
        lat = -s * d[0] + c * d[1]
        dist2 = max(float(d @ d), 1e-6)
        steer_des = float(np.clip(np.arctan(2.0 * self.wheelbase * lat / dist2), -self.max_steer, self.max_steer))
        steer_rate = self.steer_gain * (steer_des - float(state[STEER]))
        if state[SPEED] < 0.2:
            steer_rate *= state[SPEED] / 0.2
        return accel, float(np.clip(steer_rate, -self.max_steer_rate, self.max_steer_rate))


def make_tracker(name: str, model: KinematicBicycle) -> LQRTracker | PurePursuitTracker:
    """Tracker by name ("lqr" or "pure_pursuit") matched to ``model``'s geometry and limits."""
    kwargs = dict(dt=model.dt, wheelbase=model.wheelbase, max_steer=model.max_steer, max_steer_rate=model.max_steer_rate)
    if name == "lqr":
        return LQRTracker(**kwargs)
    if name in ("pure_pursuit", "pp"):
        return PurePursuitTracker(**kwargs)
    raise ValueError(f"unknown tracker {name!r}; use 'lqr' or 'pure_pursuit'")


def track(
    model: KinematicBicycle,
    tracker: LQRTracker | PurePursuitTracker,
    initial_state: np.ndarray,
    reference: np.ndarray,
    reference_times: np.ndarray,
    start_time: float,
    duration: float,
) -> np.ndarray:
    """Follow ``reference`` from ``initial_state`` for ``duration`` s: states (N+1, 5) at ``model.dt``."""
    initial_state = np.asarray(initial_state, dtype=np.float64)
    if initial_state.shape != (5,):
        raise ValueError(f"initial_state must be (5,) = (x, y, yaw, speed, steer), got {initial_state.shape}")
    n = int(round(duration / model.dt))
    tracker.reset()
    states = np.empty((n + 1, 5))
    states[0] = initial_state
    for i in range(n):
        accel, steer_rate = tracker.control(states[i], reference, reference_times, start_time + i * model.dt)
        states[i + 1] = model.step(states[i], accel, steer_rate)
    return states
