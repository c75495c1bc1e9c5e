"""Kinematic bicycle model of the ego car (the NAVSIM/nuPlan tracking model).

State vector ``(x, y, yaw, speed, steering_angle)``; inputs are the
longitudinal acceleration and the steering rate, both clipped to the car's
limits. Each step integrates the arc exactly for the step's mean speed and
mean steering angle, so a constant-steer drive closes the analytic circle of
radius ``wheelbase / tan(steer)`` instead of spiralling outwards as forward
Euler does. Speed never goes negative (no reversing).
"""

from __future__ import annotations

import numpy as np

CONTROL_DT = 0.1
"""Seconds per step of the closed-loop simulators, the vehicle model and the trackers (10 Hz)."""

STATE_DIM = 5
X, Y, YAW, SPEED, STEER = range(STATE_DIM)


class KinematicBicycle:
    """Rear-axle kinematic bicycle; vectorized over leading state dimensions."""

    def __init__(
        self,
        wheelbase: float = 2.588,
        max_steer: float = 0.6,
        max_steer_rate: float = 0.8,
        accel_limits: tuple[float, float] = (-6.0, 4.0),
        dt: float = CONTROL_DT,
    ) -> None:
        if wheelbase <= 0 or dt <= 0 or max_steer <= 0 or max_steer_rate <= 0:
            raise ValueError(
                f"wheelbase, dt, max_steer and max_steer_rate must be > 0, got "
                f"{wheelbase}, {dt}, {max_steer}, {max_steer_rate}"
            )
        if not accel_limits[0] < 0 < accel_limits[1]:
            raise ValueError(f"accel_limits must be (negative, positive), got {accel_limits}")
        self.wheelbase = float(wheelbase)
        self.max_steer = float(max_steer)
        self.max_steer_rate = float(max_steer_rate)
        self.accel_limits = (float(accel_limits[0]), float(accel_limits[1]))
        self.dt = float(dt)

    def step(self, state: np.ndarray, accel: float | np.ndarray, steer_rate: float | np.ndarray) -> np.ndarray:
        """Advance ``state`` (..., 5) by one ``dt`` under the (clipped) inputs."""
        state = np.asarray(state, dtype=np.float64)
        if state.shape[-1] != STATE_DIM:
            raise ValueError(f"state must end in {STATE_DIM} (x, y, yaw, speed, steer), got shape {state.shape}")
        dt = self.dt
        accel = np.clip(np.asarray(accel, dtype=np.float64), *self.accel_limits)
        steer_rate = np.clip(np.asarray(steer_rate, dtype=np.float64), -self.max_steer_rate, self.max_steer_rate)
        x, y, yaw, v, steer = (state[..., i] for i in range(STATE_DIM))
        v = np.maximum(v, 0.0)
        new_steer = np.clip(steer + steer_rate * dt, -self.max_steer, self.max_steer)
        new_v = v + accel * dt
        # Distance covered: trapezoid, or the braking distance when the car stops inside the step.
        stops = new_v < 0.0
        dist = np.where(stops, v * v / (2.0 * np.maximum(-accel, 1e-9)), 0.5 * (v + np.maximum(new_v, 0.0)) * dt)
        new_v = np.maximum(new_v, 0.0)
        curvature = np.tan(0.5 * (steer + new_steer)) / self.wheelbase
        dyaw = curvature * dist
        # Chord of the arc: length dist * sinc(dyaw/2), direction yaw + dyaw/2.
        chord = dist * np.sinc(dyaw / (2.0 * np.pi))
        heading = yaw + 0.5 * dyaw
        out = np.empty(np.broadcast_shapes(x.shape, accel.shape, steer_rate.shape) + (STATE_DIM,))
        out[..., X] = x + chord * np.cos(heading)
        out[..., Y] = y + chord * np.sin(heading)
        out[..., YAW] = (yaw + dyaw + np.pi) % (2.0 * np.pi) - np.pi
        out[..., SPEED] = new_v
        out[..., STEER] = new_steer
        return out

    def steer_for_curvature(self, curvature: float | np.ndarray) -> np.ndarray:
        """Steering angle that drives the given path curvature (clipped to the limit)."""
        return np.clip(np.arctan(self.wheelbase * np.asarray(curvature, dtype=np.float64)), -self.max_steer, self.max_steer)
