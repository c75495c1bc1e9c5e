"""Background traffic for the driving simulator.

* Log replay (non-reactive, NAVSIM's setting): every agent's logged track,
  interpolated from the 2 Hz keyframes to the simulator's rate — positions
  linearly, yaw along the shortest angle; an agent exists between two
  keyframes only if it is annotated at both.
* Reactive: vehicles keep to their logged *path* but choose their own
  speed. Each one tracks its logged along-path position, and an Intelligent
  Driver Model (IDM) term brakes it for whatever is ahead on its path (the
  ego or another agent); the smaller of the two accelerations wins, so a
  vehicle never runs ahead of its log but stops behind a stopped ego.
  Pedestrians, bicycles, static objects and parked vehicles replay the log.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffpilot.data.scenario import CATEGORIES, ScenarioLog, wrap_angle
from diffpilot.data.traffic.idm import IDMParams, idm_accel

VEHICLE = CATEGORIES.index("vehicle")


def interpolate_tracks(poses: np.ndarray, valid: np.ndarray, log_times: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tracks ``(A, T, 3)``/``(A, T)`` at ``log_times`` resampled at ``times`` (N,): ``(A, N, 3)``, ``(A, N)``.

    Times outside the log, or between keyframes where either end is not
    annotated, are invalid (pose zero).
    """
    poses = np.asarray(poses, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    log_times = np.asarray(log_times, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[2] != 3 or valid.shape != poses.shape[:2] or log_times.shape != (poses.shape[1],):
        raise ValueError(f"tracks must be (A, T, 3) with valid (A, T) and log_times (T,), got {poses.shape}, {valid.shape}, {log_times.shape}")
    num_agents, num_frames = valid.shape
    out = np.zeros((num_agents, len(times), 3))
    out_valid = np.zeros((num_agents, len(times)), dtype=bool)
    if num_agents == 0 or num_frames == 0:
        return out, out_valid
    eps = 1e-6
    inside = (times >= log_times[0] - eps) & (times <= log_times[-1] + eps)
    hi = np.clip(np.searchsorted(log_times, times - eps, side="left"), 0, num_frames - 1)
    lo = np.clip(hi - 1, 0, num_frames - 1)
    span = log_times[hi] - log_times[lo]
    w = np.where(span > 0, (times - log_times[lo]) / np.where(span > 0, span, 1.0), 1.0)
    w = np.clip(w, 0.0, 1.0)
    exact = np.abs(times - log_times[hi]) <= eps  # on a keyframe: only that keyframe's validity matters
    a, b = poses[:, lo], poses[:, hi]
    out[..., :2] = a[..., :2] + w[None, :, None] * (b[..., :2] - a[..., :2])
    out[..., 2] = wrap_angle(a[..., 2] + w[None, :] * wrap_angle(b[..., 2] - a[..., 2]))
    out_valid = inside[None, :] & np.where(exact[None, :], valid[:, hi], valid[:, lo] & valid[:, hi])
    out[~out_valid] = 0.0
    return out, out_valid


def replay_agents(log: ScenarioLog, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The log's agents at ``times`` (seconds on the log's clock): ``(A, N, 3)``, ``(A, N)``."""
    return interpolate_tracks(log.agents_pose, log.agents_valid, log.times, times)


def track_velocities(poses: np.ndarray, valid: np.ndarray, dt: float) -> np.ndarray:
    """Finite-difference velocities ``(A, N, 2)`` of tracks at spacing ``dt`` (zero where undefined)."""
    vel = np.zeros(poses.shape[:-1] + (2,))
    if poses.shape[1] < 2:
        return vel
    d = (poses[:, 1:, :2] - poses[:, :-1, :2]) / dt
    ok = valid[:, 1:] & valid[:, :-1]
    d[~ok] = 0.0
    # Forward difference for the first step, backward for the rest.
    vel[:, 1:] = d
    vel[:, 0] = d[:, 0]
    first_ok = valid[:, 1:] & ~valid[:, :-1]  # just appeared: copy the next step's estimate
    if poses.shape[1] > 2:
        nxt = np.concatenate([d[:, 1:], d[:, -1:]], axis=1)
        vel[:, 1:][first_ok] = nxt[first_ok]
    return vel


@dataclass(frozen=True)
class ReactiveParams:
    """Car following (:class:`~diffpilot.data.traffic.idm.IDMParams`) and the log-tracking gains of reactive vehicles."""

    idm: IDMParams = IDMParams(max_accel=1.5, comfort_decel=2.0, time_headway=1.2, min_gap=2.0, max_decel=8.0)
    lookahead_m: float = 50.0
    lateral_margin_m: float = 0.3
    k_station: float = 0.5  # 1/s², pull towards the logged along-path position
    k_speed: float = 1.5  # 1/s, pull towards the logged speed
    min_path_m: float = 2.0  # shorter logged paths (parked cars) replay


class _PathAgent:
    """One reactive vehicle: its logged path (dense, by arc length) and its speed along it."""

    def __init__(self, index: int, key_times: np.ndarray, key_poses: np.ndarray) -> None:
        self.index = index
        seg = np.hypot(*np.diff(key_poses[:, :2], axis=0).T)
        self.key_times = key_times
        self.key_station = np.concatenate([[0.0], np.cumsum(seg)])
        total = float(self.key_station[-1])
        n = max(int(np.ceil(total / 0.5)), 1) + 1
        self.station = np.linspace(0.0, total, n)
        self.xy = np.stack([np.interp(self.station, self.key_station, key_poses[:, k]) for k in (0, 1)], axis=1)
        yaw_unwrapped = np.unwrap(key_poses[:, 2])
        self.yaw = np.interp(self.station, self.key_station, yaw_unwrapped)
        self.max_speed = float(np.max(np.diff(self.key_station) / np.maximum(np.diff(key_times), 1e-6), initial=0.0))
        self.s: float | None = None
        self.v = 0.0

    @property
    def length(self) -> float:
        return float(self.station[-1])

    def logged(self, t: float) -> tuple[float, float]:
        """(station, speed) of the logged motion at time ``t``."""
        s = float(np.interp(t, self.key_times, self.key_station))
        j = int(np.clip(np.searchsorted(self.key_times, t, side="right"), 1, len(self.key_times) - 1))
        v = (self.key_station[j] - self.key_station[j - 1]) / max(self.key_times[j] - self.key_times[j - 1], 1e-6)
        return s, float(v)

    def pose(self) -> np.ndarray:
        s = float(np.clip(self.s if self.s is not None else 0.0, 0.0, self.length))
        return np.array([np.interp(s, self.station, self.xy[:, 0]), np.interp(s, self.station, self.xy[:, 1]),
                         float(wrap_angle(np.interp(s, self.station, self.yaw)))])


class ReactiveTraffic:
    """Agents of a log that react to the ego; advance step by step with :meth:`advance`."""

    def __init__(self, log: ScenarioLog, times: np.ndarray, params: ReactiveParams = ReactiveParams()) -> None:
        self.log = log
        self.times = np.asarray(times, dtype=np.float64)
        self.params = params
        self.dt = float(self.times[1] - self.times[0]) if len(self.times) > 1 else 0.1
        self.poses, self.valid = replay_agents(log, self.times)
        self.sizes = np.asarray(log.agents_size, dtype=np.float64)
        self.agents: list[_PathAgent] = []
        for a in range(len(log.agents_token)):
            if int(log.agents_category[a]) != VEHICLE:
                continue
            keys = np.flatnonzero(log.agents_valid[a])
            if len(keys) < 2:
                continue
            agent = _PathAgent(a, np.asarray(log.times)[keys], np.asarray(log.agents_pose[a, keys], dtype=np.float64))
            if agent.length < params.min_path_m:
                continue
            self.agents.append(agent)
        self.reactive_mask = np.zeros(len(log.agents_token), dtype=bool)
        for agent in self.agents:
            self.reactive_mask[agent.index] = True
        self._step = 0
        for agent in self.agents:
            if self.valid[agent.index, 0]:
                agent.s, agent.v = agent.logged(self.times[0])

    def _leader(self, agent: _PathAgent, others_xy: np.ndarray, others_vel: np.ndarray, others_half: np.ndarray,
                others_halfw: np.ndarray) -> tuple[float, float]:
        """(gap m, leader speed along the path) of the nearest object ahead on ``agent``'s path (inf if none)."""
        p = self.params
        assert agent.s is not None
        here = agent.pose()
        near = np.hypot(*(others_xy - here[:2]).T) < p.lookahead_m + 10.0
        if not near.any():
            return np.inf, 0.0
        lo = int(np.searchsorted(agent.station, agent.s))
        hi = int(np.searchsorted(agent.station, agent.s + p.lookahead_m, side="right"))
        if hi - lo < 1:
            return np.inf, 0.0
        path_xy = agent.xy[lo:hi]
        pts = others_xy[near]
        d2 = np.sum((pts[:, None, :] - path_xy[None]) ** 2, axis=-1)
        j = np.argmin(d2, axis=1)
        lateral = np.sqrt(d2[np.arange(len(pts)), j])
        half_w = 0.5 * self.sizes[agent.index, 1]
        on_path = lateral < half_w + others_halfw[near] + p.lateral_margin_m
        # Points projecting onto the first path sample may lie behind the agent.
        ahead_ok = (j > 0) | (np.sum((pts - here[:2]) * np.array([np.cos(here[2]), np.sin(here[2])]), axis=1) > 0)
        cand = on_path & ahead_ok
        if not cand.any():
            return np.inf, 0.0
        gaps = agent.station[lo + j] - agent.s - 0.5 * self.sizes[agent.index, 0] - others_half[near]
        gaps = np.where(cand, gaps, np.inf)
        k = int(np.argmin(gaps))
        yaw = agent.yaw[lo + j[k]]
        v_lead = float(others_vel[near][k] @ np.array([np.cos(yaw), np.sin(yaw)]))
        return float(gaps[k]), max(v_lead, 0.0)

    def advance(self, ego_state: np.ndarray, ego_size: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        """Move every agent from step ``k`` to ``k + 1`` given the ego's state (5,) at step ``k``."""
        k = self._step
        if k + 1 >= len(self.times):
            raise ValueError(f"reactive traffic has only {len(self.times)} steps; cannot advance past the end")
        p = self.params
        t_next = self.times[k + 1]
        now_xy = self.poses[:, k, :2]
        now_valid = self.valid[:, k]
        vel = np.zeros_like(now_xy)
        if k > 0:
            had = self.valid[:, k - 1] & now_valid
            vel[had] = (now_xy[had] - self.poses[had, k - 1, :2]) / self.dt
        ego_vel = ego_state[3] * np.array([np.cos(ego_state[2]), np.sin(ego_state[2])])
        objs_xy = np.concatenate([ego_state[None, :2], now_xy[now_valid]])
        objs_vel = np.concatenate([ego_vel[None], vel[now_valid]])
        objs_half = np.concatenate([[0.5 * ego_size[0]], 0.5 * self.sizes[now_valid, 0]])
        objs_halfw = np.concatenate([[0.5 * ego_size[1]], 0.5 * self.sizes[now_valid, 1]])
        objs_id = np.concatenate([[-1], np.flatnonzero(now_valid)])
        for agent in self.agents:
            a = agent.index
            if not self.valid[a, k + 1]:
                agent.s = None
                continue
            if agent.s is None or not now_valid[a]:
                agent.s, agent.v = agent.logged(t_next)
                self.poses[a, k + 1] = agent.pose()
                continue
            mask = objs_id != a
            gap, v_lead = self._leader(agent, objs_xy[mask], objs_vel[mask], objs_half[mask], objs_halfw[mask])
            s_log, v_log = agent.logged(self.times[k])
            a_track = p.k_station * (s_log - agent.s) + p.k_speed * (v_log - agent.v)
            a_idm = idm_accel(agent.v, max(1.2 * agent.max_speed, 3.0), gap, agent.v - v_lead, p.idm)
            accel = float(np.clip(min(a_track, a_idm), -p.idm.max_decel, max(p.idm.max_accel, 3.0)))
            agent.v = max(agent.v + accel * self.dt, 0.0)
            agent.s = min(agent.s + agent.v * self.dt, agent.length)
            self.poses[a, k + 1] = agent.pose()
        self._step = k + 1
        return self.poses[:, k + 1], self.valid[:, k + 1]
