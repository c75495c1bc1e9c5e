"""Reference driving planners every learned planner is compared against.

* :class:`LogReplayPlanner` — the human driver: replays the logged future.
* :class:`ConstantVelocityPlanner` — keeps the current speed and heading
  (NAVSIM's weakest baseline; it shows how much a score rewards merely moving).
* :class:`EgoStatusMLPPlanner` — an MLP from ego status and command alone; it
  sees no agents and no map, so it shows how much an open-loop metric can be
  won without perception.
* :class:`LaneFollowerIDMPlanner` — a rule-based planner in the spirit of
  PDM-Closed: follow the centerline of the ego's lane with a speed profile
  from the Intelligent Driver Model; it is the reference for ego progress.
* ``trajopt`` — :class:`diffpilot.planning.receding.TrajOptPlanner`, the STL
  trajectory optimizer replanning at every step (the STL planners' reference).

All of them implement :class:`diffpilot.data.scenario.Planner`: ``plan``
returns ego-frame poses ``(F, 3)`` at ``DT`` spacing starting ``DT`` after now.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from diffpilot.data.errors import DatasetError
from diffpilot.data.geometry import box_corners, boxes_overlap
from diffpilot.data.scenario import COMMANDS, DT, EGO_SIZE, SampleSpec, SceneSample, wrap_angle
from diffpilot.data.traffic.idm import IDMParams, idm_accel_scalar
from diffpilot.policy.ego_mlp import EgoStatusMLPPlanner

__all__ = [
    "ConstantVelocityPlanner",
    "EgoStatusMLPPlanner",
    "LaneFollowerIDMPlanner",
    "LogReplayPlanner",
    "PLANNERS",
    "build_planner",
    "constant_velocity_trajectory",
]


def constant_velocity_trajectory(speed: float, steps: int, yaw_rate: float = 0.0, dt: float = DT) -> np.ndarray:
    """Ego-frame poses ``(steps, 3)`` at ``dt, 2dt, ...`` for constant speed and yaw rate."""
    t = dt * np.arange(1, steps + 1)
    out = np.zeros((steps, 3))
    if abs(yaw_rate) < 1e-6:
        out[:, 0] = speed * t
    else:
        out[:, 0] = speed / yaw_rate * np.sin(yaw_rate * t)
        out[:, 1] = speed / yaw_rate * (1.0 - np.cos(yaw_rate * t))
        out[:, 2] = wrap_angle(yaw_rate * t)
    return out


def _future_steps(sample: SceneSample, override: int | None) -> int:
    steps = int(override) if override is not None else int(np.shape(sample.ego_future)[0])
    if steps < 1:
        raise DatasetError(
            f"sample {sample.token!r} has no future steps (ego_future shape {np.shape(sample.ego_future)}); "
            "pass future_steps= to the planner or build samples with SampleSpec.future_steps >= 1"
        )
    return steps


class LogReplayPlanner:
    """The logged human trajectory; where the log ends early, constant-velocity extrapolation."""

    def reset(self, seed: int | None = None) -> None:
        return None

    def plan(self, sample: SceneSample) -> np.ndarray:
        fut = np.asarray(sample.ego_future, dtype=np.float64)
        valid = np.asarray(sample.ego_future_valid, dtype=bool)
        if fut.ndim != 2 or fut.shape[1] != 3 or valid.shape != fut.shape[:1]:
            raise DatasetError(
                f"sample {sample.token!r}: ego_future must be (F, 3) with ego_future_valid (F,), got "
                f"{fut.shape} and {valid.shape}"
            )
        out = fut.copy()
        if valid.all():
            return out
        # Extrapolate from the last two known poses (now = origin counts as known).
        known = np.concatenate([np.zeros((1, 3)), fut[valid]], axis=0)
        known_t = np.concatenate([[0.0], DT * (1 + np.flatnonzero(valid))])
        if len(known) >= 2:
            vel = (known[-1, :2] - known[-2, :2]) / (known_t[-1] - known_t[-2])
            speed = float(np.hypot(*vel))
            yaw = float(np.arctan2(vel[1], vel[0])) if speed > 1e-3 else float(known[-1, 2])
        else:
            speed, yaw = float(sample.ego_status[0]), 0.0
        last, last_t = known[-1], known_t[-1]
        for i in np.flatnonzero(~valid):
            dt = DT * (i + 1) - last_t
            out[i] = (last[0] + speed * dt * np.cos(yaw), last[1] + speed * dt * np.sin(yaw), last[2])
        return out


class ConstantVelocityPlanner:
    """Drive on at the current speed; straight ahead unless ``use_yaw_rate`` keeps the current turn."""

    def __init__(self, future_steps: int | None = None, use_yaw_rate: bool = False) -> None:
        self.future_steps = future_steps
        self.use_yaw_rate = use_yaw_rate

    def reset(self, seed: int | None = None) -> None:
        return None

    def plan(self, sample: SceneSample) -> np.ndarray:
        status = np.asarray(sample.ego_status, dtype=np.float64)
        yaw_rate = float(status[2]) if self.use_yaw_rate else 0.0
        return constant_velocity_trajectory(float(status[0]), _future_steps(sample, self.future_steps), yaw_rate)


# --------------------------------------------------------------------------- lane follower


class _Polyline:
    """A 2-D polyline parameterized by arclength, extrapolated straight past both ends."""

    def __init__(self, xy: np.ndarray) -> None:
        xy = np.asarray(xy, dtype=np.float64)[:, :2]
        keep = np.concatenate([[True], np.linalg.norm(np.diff(xy, axis=0), axis=1) > 1e-6])
        xy = xy[keep]
        if len(xy) < 2:
            raise ValueError("a polyline needs at least two distinct points")
        self.xy = xy
        seg = np.diff(xy, axis=0)
        self.seg_len = np.linalg.norm(seg, axis=1)
        self.seg_dir = seg / self.seg_len[:, None]
        self.s = np.concatenate([[0.0], np.cumsum(self.seg_len)])
        self.length = float(self.s[-1])
        seg_yaw = np.unwrap(np.arctan2(self.seg_dir[:, 1], self.seg_dir[:, 0]))
        # Vertex headings: mean of the adjacent segments, so yaw varies smoothly along the line.
        self.vertex_yaw = np.concatenate([[seg_yaw[0]], 0.5 * (seg_yaw[:-1] + seg_yaw[1:]), [seg_yaw[-1]]])

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arclength, signed lateral offset (left +) and distance of points ``(M, 2)``."""
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        rel = pts[:, None, :] - self.xy[None, :-1, :]  # (M, S, 2)
        t = np.clip(np.einsum("msk,sk->ms", rel, self.seg_dir), 0.0, self.seg_len[None])
        # Let the first and last segments extend, so points before/after the line project onto it.
        t[:, 0] = np.minimum(np.einsum("mk,k->m", rel[:, 0], self.seg_dir[0]), self.seg_len[0])
        t[:, -1] = np.maximum(np.einsum("mk,k->m", rel[:, -1], self.seg_dir[-1]), 0.0)
        if len(self.seg_len) == 1:
            t[:, 0] = np.einsum("mk,k->m", rel[:, 0], self.seg_dir[0])
        foot = self.xy[None, :-1, :] + t[..., None] * self.seg_dir[None]
        diff = pts[:, None, :] - foot
        d2 = diff[..., 0] ** 2 + diff[..., 1] ** 2
        k = np.argmin(d2, axis=1)
        rows = np.arange(len(pts))
        s = self.s[k] + t[rows, k]
        off = diff[rows, k]
        lat = self.seg_dir[k, 0] * off[:, 1] - self.seg_dir[k, 1] * off[:, 0]
        return s, lat, np.sqrt(d2[rows, k])

    def yaw_at(self, s: np.ndarray) -> np.ndarray:
        return np.interp(s, self.s, self.vertex_yaw)

    def pose_at(self, s: np.ndarray, lateral: np.ndarray | float = 0.0) -> np.ndarray:
        """Poses ``(K, 3)`` at arclengths ``s``, shifted ``lateral`` metres to the left."""
        s = np.atleast_1d(np.asarray(s, dtype=np.float64))
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        before, after = s < 0, s > self.length
        x[before] = self.xy[0, 0] + s[before] * self.seg_dir[0, 0]
        y[before] = self.xy[0, 1] + s[before] * self.seg_dir[0, 1]
        x[after] = self.xy[-1, 0] + (s[after] - self.length) * self.seg_dir[-1, 0]
        y[after] = self.xy[-1, 1] + (s[after] - self.length) * self.seg_dir[-1, 1]
        yaw = self.yaw_at(s)
        lat = np.broadcast_to(np.asarray(lateral, dtype=np.float64), s.shape)
        return np.stack([x - lat * np.sin(yaw), y + lat * np.cos(yaw), wrap_angle(yaw)], axis=1)


def _smoothstep(u: np.ndarray) -> np.ndarray:
    u = np.clip(u, 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


class LaneFollowerIDMPlanner:
    """Follow the ego's lane centerline; speed from the Intelligent Driver Model.

    The lane is the valid lane nearest the ego whose heading agrees with the
    ego's (within ``max_heading_error``). It is extended through connected
    lanes (a lane starting where it ends) and then straight on. ``left`` /
    ``right`` commands move to the adjacent lane when one exists (blended over
    ``lane_change_s`` seconds of travel); at a lane's end they prefer the
    successor that turns that way. The lead is the nearest agent whose box
    reaches into the corridor (ego width + ``corridor_margin``) ahead; IDM
    keeps ``min_gap`` behind it and stops behind a stopped one. ``stop``
    brakes comfortably to a halt. Speeds never exceed ``speed_limit``. With
    ``yield_to_crossing`` a moving agent outside the corridor whose
    constant-velocity forecast meets the planned ego (checked every 0.1 s)
    becomes a stop point where its path enters the corridor, unless the ego
    can no longer stop there.
    """

    def __init__(
        self,
        speed_limit: float = 15.0,
        future_steps: int | None = None,
        max_accel: float = 1.5,
        comfort_decel: float = 2.0,
        max_decel: float = 5.0,
        min_gap: float = 2.5,
        time_headway: float = 1.5,
        corridor_margin: float = 0.3,
        max_heading_error: float = np.pi / 4,
        lane_change_s: float = 3.0,
        yield_to_crossing: bool = True,
        ego_size: tuple[float, float] = EGO_SIZE,
    ) -> None:
        if speed_limit <= 0 or max_accel <= 0 or comfort_decel <= 0 or max_decel <= 0:
            raise ValueError("speed_limit, max_accel, comfort_decel and max_decel must be positive")
        self.speed_limit = float(speed_limit)
        self.future_steps = future_steps
        self.max_accel, self.comfort_decel, self.max_decel = float(max_accel), float(comfort_decel), float(max_decel)
        self.min_gap, self.time_headway = float(min_gap), float(time_headway)
        self.corridor_margin = float(corridor_margin)
        self.max_heading_error = float(max_heading_error)
        self.lane_change_s = float(lane_change_s)
        self.yield_to_crossing = bool(yield_to_crossing)
        self.ego_size = (float(ego_size[0]), float(ego_size[1]))
        self.last_debug: dict[str, Any] = {}

    def reset(self, seed: int | None = None) -> None:
        self.last_debug = {}

    # -- lane selection
    def _lanes(self, sample: SceneSample) -> list[tuple[int, _Polyline]]:
        lanes = np.asarray(sample.lanes, dtype=np.float64)
        valid = np.asarray(sample.lanes_valid, dtype=bool).reshape(-1)
        if lanes.ndim != 3 or lanes.shape[2] < 2 or len(valid) != len(lanes):
            raise DatasetError(
                f"sample {sample.token!r}: lanes must be (L, N, 3) with lanes_valid (L,), got "
                f"{lanes.shape} and {valid.shape}"
            )
        out = []
        for i in np.flatnonzero(valid):
            try:
                out.append((int(i), _Polyline(lanes[i])))
            except ValueError:
                continue  # a degenerate (single-point) lane cannot be followed
        return out

    def _ego_lane(self, lanes: list[tuple[int, _Polyline]]) -> tuple[int, _Polyline, float] | None:
        best, best_cost = None, np.inf
        for i, line in lanes:
            s, lat, d = line.project(np.zeros((1, 2)))
            err = abs(float(wrap_angle(line.yaw_at(s)[0])))
            if err > self.max_heading_error or s[0] > line.length - 0.5:
                continue  # pointing elsewhere, or ends behind the ego
            cost = float(d[0]) + 2.0 * err
            if cost < best_cost:
                best, best_cost = (i, line, float(lat[0])), cost
        return best

    def _adjacent(self, lanes: list[tuple[int, _Polyline]], current: int, lat_cur: float, side: int) -> tuple[int, _Polyline, float] | None:
        best, best_cost = None, np.inf
        for i, line in lanes:
            if i == current:
                continue
            s, lat, _ = line.project(np.zeros((1, 2)))
            if not (0.0 <= s[0] <= line.length - 0.5):
                continue
            if abs(float(wrap_angle(line.yaw_at(s)[0]))) > self.max_heading_error:
                continue
            sep = lat_cur - float(lat[0])  # how far the lane centre lies to the left of the current one
            if 2.0 <= side * sep <= 6.0:
                cost = abs(abs(sep) - 3.5)
                if cost < best_cost:
                    best, best_cost = (i, line, float(lat[0])), cost
        return best

    def _extend(self, lanes: list[tuple[int, _Polyline]], start: int, line: _Polyline, command: str, need: float) -> _Polyline:
        """Chain successor lanes (first point near this one's last point) until ``need`` metres exist."""
        pts, used = [line.xy], {start}
        cur = line
        while cur.length < need and len(used) < 8:
            end, end_yaw = cur.xy[-1], cur.vertex_yaw[-1]
            options = []
            for i, cand in lanes:
                if i in used or np.linalg.norm(cand.xy[0] - end) > 1.5:
                    continue
                turn = float(wrap_angle(cand.vertex_yaw[-1] - end_yaw))
                if abs(float(wrap_angle(cand.vertex_yaw[0] - end_yaw))) > np.pi / 3:
                    continue
                score = {"left": -turn, "right": turn}.get(command, abs(turn))
                options.append((score, i, cand))
            if not options:
                break
            _, i, nxt = min(options, key=lambda o: o[0])
            used.add(i)
            pts.append(nxt.xy[1:] if np.linalg.norm(nxt.xy[0] - pts[-1][-1]) < 1e-6 else nxt.xy)
            cur = _Polyline(np.concatenate(pts))
        return cur

    # -- planning
    def plan(self, sample: SceneSample) -> np.ndarray:
        steps = _future_steps(sample, self.future_steps)
        v0 = max(0.0, float(np.asarray(sample.ego_status)[0]))
        command = COMMANDS[int(sample.command)] if 0 <= int(sample.command) < len(COMMANDS) else "keep_lane"
        horizon = steps * DT
        need = max(v0, self.speed_limit) * horizon + 30.0
        lanes = self._lanes(sample)
        chosen = self._ego_lane(lanes)
        if chosen is None:  # no lane to follow: straight ahead with the same speed profile
            route, lat0, blend = _Polyline(np.array([[0.0, 0.0], [need, 0.0]])), 0.0, 1.0
            lane_idx = -1
        else:
            lane_idx, line, lat0 = chosen
            blend = max(1.5 * v0, 8.0)
            if command in ("left", "right"):
                adj = self._adjacent(lanes, lane_idx, lat0, +1 if command == "left" else -1)
                if adj is not None:
                    lane_idx, line, lat0 = adj
                    blend = max(self.lane_change_s * v0, 20.0)
            s_start = float(line.project(np.zeros((1, 2)))[0][0])
            route = self._extend(lanes, lane_idx, line, command, s_start + need)
        # The path starts at the ego and blends from its lateral offset onto the lane centre.
        s_start = float(route.project(np.zeros((1, 2)))[0][0])
        s_grid = s_start + np.arange(0.0, need + 1.0, 1.0)  # 1 m: chord error 1 cm even at 12 m radius
        path_poses = route.pose_at(s_grid, lat0 * (1.0 - _smoothstep((s_grid - s_start) / blend)))
        path = _Polyline(path_poses[:, :2])
        lead_s, lead_v = self._lead(sample, path)
        if command == "stop":
            stop_s = max(v0 * v0 / (2 * self.comfort_decel), 1.0) + self.min_gap + self.ego_size[0] / 2
            if stop_s < lead_s:
                lead_s, lead_v = stop_s, 0.0
        s_plan = self._idm_profile(v0, lead_s, lead_v, steps)
        for _ in range(3 if self.yield_to_crossing else 0):
            conflict = self._crossing_conflict(sample, path, s_plan, v0)
            if conflict is None or conflict >= lead_s:
                break
            lead_s, lead_v = conflict, 0.0
            s_plan = self._idm_profile(v0, lead_s, lead_v, steps)
        out = path.pose_at(s_plan)
        self.last_debug = {"lane": lane_idx, "lead_s": lead_s, "lead_v": lead_v, "command": command}
        return out

    def _lead(self, sample: SceneSample, path: _Polyline) -> tuple[float, float]:
        """Arclength of the nearest in-corridor agent's rear and its speed along the path (inf if none)."""
        poses = np.asarray(sample.agents_pose, dtype=np.float64)
        valid = np.asarray(sample.agents_valid, dtype=bool)
        if poses.size == 0:
            return np.inf, 0.0
        now = int(np.shape(sample.ego_past)[0]) - 1
        sizes = np.asarray(sample.agents_size, dtype=np.float64)
        half = self.ego_size[1] / 2 + self.corridor_margin
        best_s, best_v = np.inf, 0.0
        idx = np.flatnonzero(valid[:, now])
        if not len(idx):
            return best_s, best_v
        # Project every agent's four corners and centre at once: (A, 5) arclengths and offsets.
        pts = np.concatenate([box_corners(poses[idx, now], sizes[idx]), poses[idx, now, None, :2]], axis=1)
        s_all, lat_all, _ = path.project(pts.reshape(-1, 2))
        s_all, lat_all = s_all.reshape(-1, 5), lat_all.reshape(-1, 5)
        for j, a in enumerate(idx):
            inside = (s_all[j] > 0.0) & (s_all[j] < path.length)
            if not inside.any():
                continue
            s, lat = s_all[j][inside], lat_all[j][inside]
            if not (np.abs(lat).min() < half or (lat.min() < 0.0 < lat.max())):
                continue
            rear = float(s.min())
            if rear >= best_s:
                continue
            if now > 0 and valid[a, now - 1]:
                vel = (poses[a, now, :2] - poses[a, now - 1, :2]) / DT
            elif now + 1 < valid.shape[1] and valid[a, now + 1]:
                vel = (poses[a, now + 1, :2] - poses[a, now, :2]) / DT
            else:
                vel = np.zeros(2)
            yaw = path.yaw_at(np.array([np.clip(rear, 0, path.length)]))[0]
            best_s, best_v = rear, max(0.0, float(vel[0] * np.cos(yaw) + vel[1] * np.sin(yaw)))
        return best_s, best_v

    def _agent_velocities(self, sample: SceneSample) -> tuple[np.ndarray, np.ndarray]:
        """Current poses (K, 3) and velocities (K, 2) from the last past step (zeros where unknown)."""
        poses = np.asarray(sample.agents_pose, dtype=np.float64)
        valid = np.asarray(sample.agents_valid, dtype=bool)
        now = int(np.shape(sample.ego_past)[0]) - 1
        vel = np.zeros((len(poses), 2))
        if now > 0:
            ok = valid[:, now] & valid[:, now - 1]
            vel[ok] = (poses[ok, now, :2] - poses[ok, now - 1, :2]) / DT
        return poses[:, now], vel

    def _crossing_conflict(self, sample: SceneSample, path: _Polyline, s_plan: np.ndarray, v0: float) -> float | None:
        """Where to stop for a moving agent whose constant-velocity forecast meets the planned ego boxes.

        Agents already in the corridor ahead are IDM leads, agents behind are
        not ours to avoid; for the rest, the first forecast overlap with the
        ego (boxes inflated by the corridor margin) gives a stop point just
        before the agent's swept path enters the corridor, if the ego can
        still stop there.
        """
        poses, vel = self._agent_velocities(sample)
        now = int(np.shape(sample.ego_past)[0]) - 1
        valid = np.asarray(sample.agents_valid, dtype=bool)[:, now]
        moving = valid & (np.hypot(vel[:, 0], vel[:, 1]) > 0.5)
        if not moving.any():
            return None
        sizes = np.asarray(sample.agents_size, dtype=np.float64)
        # Check at 0.1 s: at 0.5 s spacing a crossing car can slip between two checks.
        t_plan = DT * np.arange(0, len(s_plan) + 1)
        t = np.arange(1, 5 * len(s_plan) + 1) * (DT / 5)
        ego_poses = path.pose_at(np.interp(t, t_plan, np.concatenate([[0.0], s_plan])))
        ego_boxes = box_corners(ego_poses, np.array([self.ego_size[0] + 2.0, self.ego_size[1] + 2 * self.corridor_margin]))  # (T, 4, 2)
        half = self.ego_size[1] / 2 + self.corridor_margin
        front = self.ego_size[0] / 2
        cand = np.flatnonzero(moving)
        _, now_lat, _ = path.project(poses[cand, :2])
        cand = cand[np.abs(now_lat) >= half + sizes[cand, 1] / 2]  # in the corridor now: the IDM lead logic owns it
        if not len(cand):
            return None
        fut = np.repeat(poses[cand][:, None], len(t), axis=1)  # (A, T, 3)
        fut[..., :2] += t[None, :, None] * vel[cand][:, None, :]
        boxes = box_corners(fut, sizes[cand][:, None, :])  # (A, T, 4, 2)
        hits = boxes_overlap(ego_boxes[None], boxes)  # (A, T)
        best: float | None = None
        for j in np.flatnonzero(hits.any(axis=1)):
            first = int(np.argmax(hits[j]))
            s, lat, _ = path.project(boxes[j, : first + 1].reshape(-1, 2))
            inside = (np.abs(lat) < half) & (s > 0.0)
            entry = float(s[inside].min()) if inside.any() else float(np.interp(t[first], t_plan, np.concatenate([[0.0], s_plan])) + front)
            if entry - front - 0.5 < v0 * v0 / (2.0 * self.max_decel):
                continue  # too late to stop before it: carry on rather than brake in its path
            best = entry if best is None else min(best, entry)
        return best

    def _idm_profile(self, v0: float, lead_s: float, lead_v: float, steps: int) -> np.ndarray:
        """Arclengths at DT, 2DT, ... from IDM integrated at 0.1 s with a constant-speed lead."""
        sub = 5
        h = DT / sub
        front = self.ego_size[0] / 2
        v, s, out = v0, 0.0, []
        lead = lead_s
        idm = IDMParams(max_accel=self.max_accel, comfort_decel=self.comfort_decel, time_headway=self.time_headway,
                        min_gap=self.min_gap, max_decel=self.max_decel)
        for _ in range(steps):
            for _ in range(sub):
                acc = idm_accel_scalar(v, self.speed_limit, lead - s - front, v - lead_v, idm)
                v_new = max(0.0, v + acc * h)
                s_prev, s = s, s + 0.5 * (v + v_new) * h
                v = v_new
                if np.isfinite(lead):
                    lead += lead_v * h
                    limit = lead - front - 0.5
                    if s > limit:  # never drive into the lead, whatever IDM's integration error
                        s, v = max(limit, s_prev), min(v, lead_v)
            out.append(s)
        return np.asarray(out)


# --------------------------------------------------------------------------- factory

def _trajopt(**kwargs: Any) -> Any:
    from diffpilot.planning.receding import TrajOptPlanner  # imported on use: the planning package loads cvxpy

    return TrajOptPlanner(**kwargs)


PLANNERS: dict[str, Callable[..., Any]] = {
    "log_replay": LogReplayPlanner,
    "constant_velocity": ConstantVelocityPlanner,
    "ego_mlp": EgoStatusMLPPlanner,
    "lane_follower": LaneFollowerIDMPlanner,
    "trajopt": _trajopt,
}


def build_planner(name: str, **kwargs: Any) -> Any:
    """A baseline planner by name; ``ego_mlp`` with ``checkpoint=DIR`` loads a trained one."""
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}; known planners: {', '.join(sorted(PLANNERS))}")
    if name == "ego_mlp" and "checkpoint" in kwargs:
        ckpt = kwargs.pop("checkpoint")
        if kwargs:
            raise ValueError(f"ego_mlp with checkpoint= takes no other arguments, got {sorted(kwargs)}")
        return EgoStatusMLPPlanner.load(ckpt)
    try:
        return PLANNERS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for planner {name!r}: {e}") from e
