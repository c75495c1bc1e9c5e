"""Unicycle model of the ego car, batched in torch (for optimization) and in numpy (for checks).

State ``(x, y, theta, v)``, controls ``(omega, a)``, step ``dt`` (default
:data:`~diffpilot.data.scenario.DT` = 0.5 s). One step is

    v'     = v + a * dt                       (a clipped so that v' >= 0)
    theta' = theta + omega * dt
    (x, y)' = (x, y) + v' * dt * (cos m, sin m),  m = (theta + theta') / 2

The position update uses the *new* speed along the *mid-step* heading. With
that choice the speed a reader recovers from the poses alone (displacement
along the mid-step heading over ``dt``, as :func:`diffpilot.stl.driving_signals`
does for ``(x, y, yaw)`` trajectories) is exactly ``v'``, and the
finite-difference acceleration is exactly ``a``: a trajectory scores the same
whether or not its speed column is kept, and comfort bounds on the signals
are bounds on the controls.

Trajectories start one step after now, in the ego frame (``(0, 0, 0, v0)``
now), as a planner returns them: ``(..., T, 4)`` states after each step.
Optimizers work on unbounded "raw" controls mapped through ``tanh`` into the
bounds (the lower acceleration bound depends on the speed so that ``v``
never goes negative), so every iterate is feasible. Generative planners
decode their samples with ``rollout(..., clip=False)`` (no bounds, closed
form: smooth for guidance gradients) and get training controls from logged
poses with :func:`controls_from_poses`, its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import DT, wrap_angle

__all__ = [
    "DEFAULT_LIMITS",
    "UnicycleLimits",
    "controls_from_poses",
    "controls_from_raw",
    "raw_from_controls",
    "rollout",
    "rollout_numpy",
]


@dataclass(frozen=True)
class UnicycleLimits:
    """Control bounds and step of the unicycle (defaults: |omega| <= 0.5 rad/s, a in [-4, 2.4] m/s², dt 0.5 s)."""

    omega_max: float = 0.5
    accel_min: float = -4.0
    accel_max: float = 2.4
    dt: float = DT

    def __post_init__(self) -> None:
        if not (self.omega_max > 0 and self.accel_min < 0 < self.accel_max and self.dt > 0):
            raise DatasetError(
                f"unicycle limits need omega_max > 0, accel_min < 0 < accel_max and dt > 0, got {self}"
            )


DEFAULT_LIMITS = UnicycleLimits()


def _check_controls(shape: tuple[int, ...], what: str) -> None:
    if len(shape) < 1 or shape[-1] != 2:
        raise DatasetError(f"{what} must be (..., T, 2) (omega, a) per step, got shape {shape}")


def _step_pose(x: Tensor, y: Tensor, th: Tensor, v_new: Tensor, om: Tensor, dt: float) -> tuple[Tensor, Tensor, Tensor]:
    th_new = th + om * dt
    mid = 0.5 * (th + th_new)
    return x + v_new * dt * torch.cos(mid), y + v_new * dt * torch.sin(mid), th_new


def controls_from_raw(raw: Tensor, v0: Tensor | float, limits: UnicycleLimits = DEFAULT_LIMITS) -> tuple[Tensor, Tensor]:
    """Map unbounded ``raw`` (..., T, 2) into bounded controls and roll out; returns (controls, states (..., T, 4)).

    ``omega = omega_max * tanh(raw_0)``; ``a`` = ``tanh(raw_1)`` mapped onto
    ``[max(accel_min, -v/dt), accel_max]`` with ``v`` the speed before the step.
    Differentiable everywhere, so gradient ascent never leaves the bounds.
    """
    _check_controls(tuple(raw.shape), "raw controls")
    dt = limits.dt
    v = torch.as_tensor(v0, dtype=raw.dtype).expand(raw.shape[:-2]).clone()
    x = torch.zeros_like(v)
    y = torch.zeros_like(v)
    th = torch.zeros_like(v)
    om_all = limits.omega_max * torch.tanh(raw[..., 0])
    u = 0.5 * (torch.tanh(raw[..., 1]) + 1.0)
    controls, states = [], []
    for k in range(raw.shape[-2]):
        lo = torch.maximum(torch.full_like(v, limits.accel_min), -v / dt)
        a = lo + (limits.accel_max - lo) * u[..., k]
        v = v + a * dt
        x, y, th = _step_pose(x, y, th, v, om_all[..., k], dt)
        controls.append(torch.stack([om_all[..., k], a], dim=-1))
        states.append(torch.stack([x, y, th, v], dim=-1))
    return torch.stack(controls, dim=-2), torch.stack(states, dim=-2)


def raw_from_controls(controls: Tensor, v0: Tensor | float, limits: UnicycleLimits = DEFAULT_LIMITS,
                      eps: float = 1e-4) -> Tensor:
    """Inverse of :func:`controls_from_raw` (controls are clipped into the open bounds first): for warm starts."""
    _check_controls(tuple(controls.shape), "controls")
    dt = limits.dt
    c = controls
    v = torch.as_tensor(v0, dtype=c.dtype).expand(c.shape[:-2]).clone()
    w = (c[..., 0] / limits.omega_max).clamp(-1 + eps, 1 - eps)
    raws = []
    for k in range(c.shape[-2]):
        lo = torch.maximum(torch.full_like(v, limits.accel_min), -v / dt)
        frac = ((c[..., k, 1] - lo) / (limits.accel_max - lo)).clamp(eps, 1 - eps)
        a = lo + (limits.accel_max - lo) * frac
        v = v + a * dt
        raws.append(torch.stack([torch.atanh(w[..., k]), torch.atanh(2 * frac - 1)], dim=-1))
    return torch.stack(raws, dim=-2)


def rollout(controls: Tensor, v0: Tensor | float, limits: UnicycleLimits = DEFAULT_LIMITS, *,
            clip: bool = True) -> tuple[Tensor, Tensor]:
    """Integrate physical controls (..., T, 2) from speed ``v0``; returns (applied controls, states (..., T, 4)).

    ``clip=True`` (optimizers, checks): the controls are clipped into
    ``limits`` step by step (the lower acceleration bound keeps ``v >= 0``);
    NaN controls or a negative ``v0`` raise.

    ``clip=False`` (generative planners): the controls are applied as given
    (only ``limits.dt`` is used; the speed may go negative), in closed form
    with cumulative sums, so the states are a smooth function of the
    controls that robustness gradients pass through cheaply; ``v0`` is a
    tensor ``(...)`` and the applied controls are ``controls`` itself. For
    controls inside the limits both agree to rounding.
    """
    _check_controls(tuple(controls.shape), "controls")
    dt = limits.dt
    if not clip:
        om, acc = controls[..., 0], controls[..., 1]
        theta = torch.cumsum(om, dim=-1) * dt
        mid = theta - 0.5 * om * dt
        v = torch.as_tensor(v0)[..., None] + torch.cumsum(acc, dim=-1) * dt
        x = torch.cumsum(v * torch.cos(mid), dim=-1) * dt
        y = torch.cumsum(v * torch.sin(mid), dim=-1) * dt
        return controls, torch.stack([x, y, theta, v], dim=-1)
    if bool(torch.isnan(controls).any()):
        raise DatasetError("controls contain NaN")
    v = torch.as_tensor(v0, dtype=controls.dtype).expand(controls.shape[:-2]).clone()
    if bool((v < 0).any()):
        raise DatasetError("initial speed v0 must be >= 0 for the unicycle")
    x = torch.zeros_like(v)
    y = torch.zeros_like(v)
    th = torch.zeros_like(v)
    om_all = controls[..., 0].clamp(-limits.omega_max, limits.omega_max)
    applied, states = [], []
    for k in range(controls.shape[-2]):
        lo = torch.maximum(torch.full_like(v, limits.accel_min), -v / dt)
        a = torch.minimum(torch.maximum(controls[..., k, 1], lo), torch.full_like(v, limits.accel_max))
        v = (v + a * dt).clamp_min(0.0)
        x, y, th = _step_pose(x, y, th, v, om_all[..., k], dt)
        applied.append(torch.stack([om_all[..., k], a], dim=-1))
        states.append(torch.stack([x, y, th, v], dim=-1))
    return torch.stack(applied, dim=-2), torch.stack(states, dim=-2)


def controls_from_poses(poses: np.ndarray, v0: np.ndarray, dt: float = DT) -> np.ndarray:
    """Finite-difference controls ``(W, T, 2)`` of ego-frame poses ``(W, T, 3)`` (logged futures).

    The yaw rate comes from the heading change, the speed from the
    displacement along the mid-step heading (as the STL speed signal reads
    it), the acceleration from the speed change (the first from ``v0``
    ``(W,)``). On poses of :func:`rollout` this is its exact inverse (to
    rounding); on logs the sideways slip of a step is dropped (centimetres
    on our data).
    """
    p = np.asarray(poses, dtype=np.float64)
    if p.ndim != 3 or p.shape[-1] < 3:
        raise DatasetError(f"poses must be (windows, steps, 3), got {p.shape}")
    prev = np.concatenate([np.zeros_like(p[:, :1, :3]), p[:, :-1, :3]], axis=1)
    dtheta = wrap_angle(p[..., 2] - prev[..., 2])
    mid = prev[..., 2] + 0.5 * dtheta
    d = p[..., :2] - prev[..., :2]
    v = (d[..., 0] * np.cos(mid) + d[..., 1] * np.sin(mid)) / dt
    prev_v = np.concatenate([np.asarray(v0, dtype=np.float64).reshape(-1, 1), v[:, :-1]], axis=1)
    return np.stack([dtheta / dt, (v - prev_v) / dt], axis=-1)


def rollout_numpy(controls: np.ndarray, v0: float | np.ndarray, limits: UnicycleLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Plain numpy twin of :func:`rollout` (states only), step by step, for checks and for code without torch."""
    c = np.asarray(controls, dtype=np.float64)
    _check_controls(c.shape, "controls")
    v = np.broadcast_to(np.asarray(v0, dtype=np.float64), c.shape[:-2]).copy()
    x, y, th = np.zeros_like(v), np.zeros_like(v), np.zeros_like(v)
    out = np.zeros(c.shape[:-1] + (4,))
    for k in range(c.shape[-2]):
        om = np.clip(c[..., k, 0], -limits.omega_max, limits.omega_max)
        a = np.clip(c[..., k, 1], np.maximum(limits.accel_min, -v / limits.dt), limits.accel_max)
        v = np.maximum(v + a * limits.dt, 0.0)
        th_new = th + om * limits.dt
        mid = 0.5 * (th + th_new)
        x = x + v * limits.dt * np.cos(mid)
        y = y + v * limits.dt * np.sin(mid)
        th = th_new
        out[..., k, :] = np.stack([x, y, th, v], axis=-1)
    return out
