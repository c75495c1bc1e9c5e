"""The scene simulator: traffic on a built-in road network, recorded as a ScenarioLog.

Vehicles live on lanes (lane index + arclength ``s``), follow their route
through lane successors, pick turns at junctions, and get their
longitudinal acceleration from IDM against the nearest obstacle ahead on
their path: another vehicle, a stop line they may not pass yet, or a
crosswalk with a pedestrian on it. Junctions are conflict-free by
reservation: a vehicle enters a lane connector only after reserving it, and
it may not while a connector that crosses it is held by another vehicle
(signals add their phases, stop signs a full stop and first-come order).
Lane changes on multi-lane roads follow MOBIL and move the vehicle sideways
over a distance, while it still blocks the lane it leaves.

Simulation runs at 10 Hz; the log keeps the 2 Hz keyframes. The ego is one
of the simulated vehicles, with a driver style and the nuScenes ego size.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import shapely

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import CATEGORIES, DT, EGO_SIZE, MapGeometry, ScenarioLog
from diffpilot.data.traffic.idm import DRIVER_STYLES, IDMParams, idm_accel, idm_accel_scalar, mobil_gain
from diffpilot.data.traffic.roads import LANE_WIDTH, RoadNetwork

__all__ = ["SIM_DT", "SceneStats", "TrafficSimulation", "simulate_scene"]

SIM_DT = 0.1
STEPS_PER_FRAME = int(round(DT / SIM_DT))
STOP_OFFSET = 1.0  # front bumper stops this far before the end of a lane with a stop line
LOOKAHEAD = 90.0
SAFE_DECEL = 4.0  # MOBIL: the new follower may not need to brake harder
OBSTACLE_DECEL = 6.0  # a stop obstacle needing harder braking than this is ignored (cannot stop anyway)
SIGNAL_GREEN, SIGNAL_AMBER, SIGNAL_ALL_RED = 14.0, 3.0, 2.0
_VEHICLE, _PEDESTRIAN, _BICYCLE = CATEGORIES.index("vehicle"), CATEGORIES.index("pedestrian"), CATEGORIES.index("bicycle")

# per-map traffic: mean spacing between vehicles (m), inflow per source lane (veh/s), pedestrians per crosswalk (1/s)
_DENSITY = {
    "boston-seaport": (55.0, 0.0, 0.0),
    "singapore-queenstown": (60.0, 0.0, 0.02),
    "singapore-onenorth": (55.0, 0.06, 0.012),
}


@dataclass
class SceneStats:
    """What happened to the ego in one scene (for data-set summaries and tests)."""

    ego_style: str
    ego_distance_m: float
    ego_lane_changes: int
    ego_turns: list[str] = field(default_factory=list)
    ego_stop_sign_stops: int = 0
    attempts: int = 1


def _quintic(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smooth step q(x) on [0, 1] with zero slope and curvature at both ends, and dq/dx."""
    x = np.clip(x, 0.0, 1.0)
    return x**3 * (10 - 15 * x + 6 * x * x), 30 * x * x * (1 - x) ** 2


class _Pedestrian:
    """One pedestrian: waits at the kerb until the crosswalk is clear, crosses, walks away."""

    __slots__ = ("serial", "cw", "pos", "heading", "state", "speed", "target", "leave_dir", "leave_t")

    def __init__(self, serial: int, cw: int, pos: np.ndarray, target: np.ndarray, leave_dir: np.ndarray, speed: float):
        self.serial, self.cw, self.pos, self.target, self.leave_dir, self.speed = serial, cw, pos, target, leave_dir, speed
        d = target - pos
        self.heading = math.atan2(d[1], d[0])
        self.state = 0  # 0 waiting at the kerb, 1 crossing, 2 walking away, 3 gone
        self.leave_t = 0.0


class TrafficSimulation:
    """Traffic on one road network; ``step()`` advances 0.1 s.

    Vehicle state is held in numpy arrays (capacity grows as vehicles spawn)
    so IDM is one vectorized call per step; leader search and junction
    control walk the lane graph per vehicle.
    """

    def __init__(self, net: RoadNetwork, rng: np.random.Generator, capacity: int = 512) -> None:
        self.net = net
        self.rng = rng
        self.time = 0.0
        self.step_count = 0
        lanes = net.lanes
        self.lane_len = np.array([lane.length for lane in lanes])
        self.lane_ds = np.array([lane.spacing for lane in lanes])
        self.lane_n = np.array([len(lane.points) for lane in lanes])
        self.lane_off = np.concatenate([[0], np.cumsum(self.lane_n)[:-1]])
        self.all_pts = np.concatenate([lane.points for lane in lanes])
        th = self.all_pts[:, 2]
        self.all_cs = np.stack([np.cos(th), np.sin(th)], axis=1)
        self.lane_s = [np.arange(len(lane.points)) * lane.spacing for lane in lanes]
        self.curve_runs = [_curve_runs(lane.curvature, lane.spacing) for lane in lanes]
        self.lane_speed = np.array([lane.speed_limit for lane in lanes])
        self.has_neighbour = np.array([lane.left is not None or lane.right is not None for lane in lanes])
        self.siblings = [
            [j for p in lane.predecessors for j in lanes[p].successors if j != i] if lane.is_connector else []
            for i, lane in enumerate(lanes)
        ]
        # leads to the map boundary (ego avoids these turns so that it stays in the scene)
        self.to_sink = [lane.sink or any(lanes[j].sink for j in lane.successors) for lane in lanes]
        self.holders: dict[int, set[int]] = {}
        self.signal_offset = [float(rng.uniform(0, 2 * (SIGNAL_GREEN + SIGNAL_AMBER + SIGNAL_ALL_RED))) for _ in net.intersections]
        self.cw_occupied = np.zeros(len(net.crosswalks), dtype=bool)
        self.cw_axis = [_crosswalk_axis(cw) for cw in net.crosswalks]
        self.cw_center = np.array([[cw.centroid.x, cw.centroid.y] for cw in net.crosswalks]).reshape(-1, 2)
        self.cw_connectors = [set() for _ in net.crosswalks]
        for i, lane in enumerate(lanes):
            for cw, _, _ in lane.crossings:
                if lane.is_connector:
                    self.cw_connectors[cw].add(i)
        self.pedestrians: list[_Pedestrian] = []
        self.static_agents: list[tuple[np.ndarray, tuple[float, float], int]] = []
        self.n = 0
        self._alloc(capacity)
        self.route: list[list[int]] = []
        self.ego = -1

    # ------------------------------------------------------------ state

    def _alloc(self, cap: int) -> None:
        f = lambda: np.zeros(cap)  # noqa: E731
        self.cap = cap
        self.alive = np.zeros(cap, dtype=bool)
        self.lane = np.zeros(cap, dtype=int)
        self.s, self.v, self.acc = f(), f(), f()
        self.length, self.width = f(), f()
        self.v0f, self.T, self.s0, self.amax, self.b = f(), f(), f(), f(), f()
        self.polite, self.lc_thr, self.alat = f(), f(), f()
        self.category = np.zeros(cap, dtype=int)
        self.lc_d0, self.lc_dist, self.lc_prog = f(), f(), f()
        self.reserved = np.full(cap, -1, dtype=int)
        self.release = np.full(cap, -1, dtype=int)  # connector still held while the rear clears it
        self.stop_wait, self.stop_time, self.dwell = f(), np.full(cap, np.inf), f()
        self.stop_done = np.zeros(cap, dtype=bool)
        self.lane_pref = np.full(cap, -1, dtype=int)  # preferred lane index on multi-lane roads (-1: none)
        self.lane_changes = np.zeros(cap, dtype=int)

    def _grow(self) -> None:
        old = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray) and v.shape[:1] == (self.cap,)}
        n = self.cap
        self._alloc(2 * n)
        for k, v in old.items():
            getattr(self, k)[:n] = v

    def add_vehicle(self, lane: int, s: float, v: float, size: tuple[float, float], style: str,
                    category: int = _VEHICLE, speed_factor: float = 1.0) -> int:
        """Put a vehicle on ``lane`` at arclength ``s``; returns its index."""
        if self.n >= self.cap:
            self._grow()
        i = self.n
        self.n += 1
        st = DRIVER_STYLES[style]
        self.alive[i] = True
        self.lane[i], self.s[i], self.v[i] = lane, s, v
        self.length[i], self.width[i] = size
        self.v0f[i] = st.speed_factor * speed_factor
        self.T[i], self.s0[i], self.amax[i], self.b[i] = st.headway_s, st.min_gap_m, st.max_accel, st.comfort_decel
        self.polite[i], self.lc_thr[i], self.alat[i] = st.politeness, st.lane_change_threshold, st.max_lat_accel
        self.category[i] = category
        self.dwell[i] = self.rng.uniform(1.0, 1.6)
        if self.net.multi_lane and self.rng.random() < 0.3:
            self.lane_pref[i] = int(self.rng.integers(0, 3))
        self.route.append([])
        return i

    def v0(self, i: int) -> float:
        """Vehicle i's desired speed on its current lane (driver factor x speed limit)."""
        return float(self.v0f[i] * self.lane_speed[self.lane[i]])

    # ------------------------------------------------------------ routes

    def _next_lane(self, i: int, k: int) -> int:
        """The k-th lane after the current one on vehicle i's route (-1 past a map exit)."""
        route = self.route[i]
        while len(route) <= k:
            last = route[-1] if route else int(self.lane[i])
            if last < 0:
                return -1
            route.append(self._choose_successor(i, last))
        return route[k]

    def _choose_successor(self, i: int, lane: int) -> int:
        succ = self.net.lanes[lane].successors
        if not succ:
            return -1
        if len(succ) == 1:
            return succ[0]
        if i == self.ego:
            keep = [j for j in succ if not self.to_sink[j]]
            succ = keep or succ
        w = np.array([{"straight": 0.5, "left": 0.25, "right": 0.25}.get(self.net.lanes[j].turn, 1.0) for j in succ])
        return int(succ[self.rng.choice(len(succ), p=w / w.sum())])

    # ------------------------------------------------------------ geometry

    def poses(self, idx: np.ndarray) -> np.ndarray:
        """Global poses (len(idx), 3) of vehicles, lane-change offsets included."""
        lane = self.lane[idx]
        f = self.s[idx] / self.lane_ds[lane]
        i0 = np.clip(np.floor(f).astype(int), 0, self.lane_n[lane] - 2)
        t = np.clip(f - i0, 0.0, 1.0)[:, None]
        a = self.lane_off[lane] + i0
        xy = self.all_pts[a, :2] * (1 - t) + self.all_pts[a + 1, :2] * t
        cs = self.all_cs[a] * (1 - t) + self.all_cs[a + 1] * t
        th = np.arctan2(cs[:, 1], cs[:, 0])
        d, slope = self._lateral(idx)
        xy = xy + d[:, None] * np.stack([-np.sin(th), np.cos(th)], axis=1)
        return np.concatenate([xy, (th + np.arctan(slope))[:, None]], axis=1)

    def _lateral(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lateral offset (left positive) and its slope d(offset)/d(distance) during lane changes."""
        dist = np.maximum(self.lc_dist[idx], 1e-6)
        q, dq = _quintic(self.lc_prog[idx] / dist)
        active = self.lc_dist[idx] > 0
        d = np.where(active, self.lc_d0[idx] * (1 - q), 0.0)
        return d, np.where(active, -self.lc_d0[idx] * dq / dist, 0.0)

    def _map_to(self, lane: int, s: float, other: int) -> float:
        u = np.interp(s, self.lane_s[lane], self.net.lanes[lane].ref_u)
        return float(np.interp(u, self.net.lanes[other].ref_u, self.lane_s[other]))

    # ------------------------------------------------------------ occupancy

    def _occupancy(self) -> dict[int, tuple[list[float], list[int]]]:
        occ: dict[int, list[tuple[float, int]]] = {}
        alive = np.flatnonzero(self.alive[: self.n])
        self._ghosts = {}
        lc = alive[self.lc_dist[alive] > 0]
        if len(lc):
            d, _ = self._lateral(lc)
            for i, di in zip(lc.tolist(), d.tolist()):
                g = self._ghost_lane(i, di)
                if g is not None:
                    self._ghosts[i] = g
        for i, lane, s in zip(alive.tolist(), self.lane[alive].tolist(), self.s[alive].tolist()):
            occ.setdefault(lane, []).append((s, i))
            g = self._ghosts.get(i)
            if g is not None:
                occ.setdefault(g[0], []).append((g[1], i))
        out = {}
        for lane, items in occ.items():
            items.sort()
            out[lane] = ([p[0] for p in items], [p[1] for p in items])
        return out

    def _ghost_lane(self, i: int, d: float) -> tuple[int, float] | None:
        """While changing lanes (lateral offset ``d``) the vehicle still blocks the lane it came from."""
        if abs(d) < 1.2:
            return None
        lane = self.net.lanes[int(self.lane[i])]
        nb = lane.left if d > 0 else lane.right
        if nb is None:
            return None
        return nb, self._map_to(int(self.lane[i]), float(self.s[i]), nb)

    # ------------------------------------------------------------ signals / junctions

    def signal_state(self, inter: int, axis: int, at: float | None = None) -> str:
        """'green', 'amber' or 'red' for one axis of a signalized junction, now or at time ``at``."""
        half = SIGNAL_GREEN + SIGNAL_AMBER + SIGNAL_ALL_RED
        t = ((self.time if at is None else at) + self.signal_offset[inter]) % (2 * half)
        t = t - half * axis
        if t < 0:
            t += 2 * half
        if t < SIGNAL_GREEN:
            return "green"
        if t < SIGNAL_GREEN + SIGNAL_AMBER:
            return "amber"
        return "red"

    def _conflict_free(self, i: int, conn: int) -> bool:
        inter = self.net.intersections[self.net.lanes[conn].intersection]
        for c in inter.conflicts[conn]:
            if any(h != i for h in self.holders.get(c, ())):
                return False
        return not any(self.cw_occupied[cw] for cw, _, _ in self.net.lanes[conn].crossings)

    def _reserve(self, i: int, conn: int) -> None:
        self.reserved[i] = conn
        self.holders.setdefault(conn, set()).add(i)

    def _unreserve(self, i: int, conn: int) -> None:
        self.holders.get(conn, set()).discard(i)

    def _junction_control(self, occ: dict) -> None:
        """Grant, keep or revoke connector reservations for vehicles nearing a stop line."""
        lanes = self.net.lanes
        waiting: list[tuple[float, int, int]] = []
        for i in np.flatnonzero(self.alive[: self.n]):
            lane = lanes[int(self.lane[i])]
            if lane.control is None:
                continue
            conn = self._next_lane(i, 0)
            if conn < 0:
                continue
            ss, ids = occ[int(self.lane[i])]
            first = ids[-1] == i
            v, d_line = float(self.v[i]), float(self.lane_len[self.lane[i]] - self.s[i] - self.length[i] / 2)
            if lane.control == "signal":
                state = self.signal_state(lane.intersection, lane.approach_axis)
                if self.reserved[i] == conn:
                    if state != "green" and d_line - STOP_OFFSET > v * v / (2 * 3.0) + 0.5:
                        self._unreserve(i, conn)
                        self.reserved[i] = -1
                    continue
                if not first:
                    continue
                if state == "green":
                    ok = d_line < v * v / (2 * self.b[i]) + 3 * v + 15
                elif state == "amber":
                    ok = v * v / (2 * 3.5) > d_line - STOP_OFFSET
                else:
                    ok = False
                if ok and self._conflict_free(i, conn):
                    self._reserve(i, conn)
            else:  # all-way stop: full stop, dwell, then first come first served among conflicts
                if self.reserved[i] == conn or not first:
                    continue
                if not self.stop_done[i]:
                    if v < 0.2 and d_line < STOP_OFFSET + 1.5:
                        self.stop_wait[i] += SIM_DT
                        if self.stop_wait[i] >= self.dwell[i]:
                            self.stop_done[i] = True
                            self.stop_time[i] = self.time
                    continue
                waiting.append((float(self.stop_time[i]), int(i), conn))
        waiting.sort()
        granted: list[int] = []
        for _, i, conn in waiting:
            inter = self.net.intersections[lanes[conn].intersection]
            if any(g in inter.conflicts[conn] for g in granted):
                continue
            if self._conflict_free(i, conn):
                self._reserve(i, conn)
            granted.append(conn)  # an earlier arrival blocks later conflicting ones even while it waits

    # ------------------------------------------------------------ leaders

    def _cache(self) -> None:
        """Plain-Python copies of per-vehicle scalars: the per-vehicle loops read them many times."""
        self._py_lane = self.lane.tolist()
        self._py_s = self.s.tolist()
        self._py_v = self.v.tolist()
        self._py_length = self.length.tolist()
        self._py_alat = self.alat.tolist()
        self._py_b = self.b.tolist()
        self._py_v0 = (self.v0f * self.lane_speed[self.lane]).tolist()
        self._py_params = list(zip(self.amax.tolist(), self._py_b, self.T.tolist(), self.s0.tolist()))  # IDMParams order
        if not hasattr(self, "_py_lane_len"):
            self._py_lane_len = self.lane_len.tolist()

    def _ahead(self, i: int, occ: dict) -> tuple[float, float, float]:
        """(bumper gap, leader speed, speed allowed by curves ahead) along vehicle i's route."""
        lanes = self.net.lanes
        length_l, v_l, lane_len = self._py_length, self._py_v, self._py_lane_len
        lane0 = self._py_lane[i]
        s = self._py_s[i]
        half = length_l[i] / 2
        v = v_l[i]
        alat, b = self._py_alat[i], self._py_b[i]
        v_allow = math.inf
        for c0, c1, kabs in self.curve_runs[lane0]:  # curves still ahead on this lane
            if c1 > s:
                v_allow = min(v_allow, math.sqrt(alat / kabs + 2 * b * max(c0 - s - half, 0.0)))
        look = max(LOOKAHEAD, v * 5 + 30)
        best_gap, best_v = math.inf, 0.0
        lanes_to_check = [(lane0, s)]
        g = self._ghosts.get(i)
        if g is not None:
            lanes_to_check.append(g)
        for start_lane, s_start in lanes_to_check:
            l, dist, k = start_lane, -s_start, 0
            while dist < look and l >= 0:
                if l != start_lane:
                    for c0, _, kabs in self.curve_runs[l]:
                        v_allow = min(v_allow, math.sqrt(alat / kabs + 2 * b * max(dist + c0 - half, 0.0)))
                found = False
                entry = occ.get(l)
                if entry is not None:
                    ss, ids = entry
                    lo = bisect.bisect_right(ss, s_start) if l == start_lane else 0
                    for j in range(lo, len(ss)):
                        if ids[j] != i:
                            o = ids[j]
                            gap = dist + ss[j] - half - length_l[o] / 2
                            if gap < best_gap:
                                best_gap, best_v = gap, v_l[o]
                            found = True
                            break
                for sib in self.siblings[l]:
                    e2 = occ.get(sib)
                    if e2 is None:
                        continue
                    lo_s = s_start if l == start_lane else -math.inf
                    for sj, o in zip(*e2):
                        if o != i and lo_s < sj < 10.0:
                            gap = dist + sj - half - length_l[o] / 2
                            if gap < best_gap:
                                best_gap, best_v = gap, v_l[o]
                            found = True
                for cw, c0, _ in lanes[l].crossings:
                    if self.cw_occupied[cw]:
                        gap = dist + c0 - 1.0 - half
                        if gap > 0 and v * v / (2 * max(gap, 0.1)) < OBSTACLE_DECEL and gap < best_gap:
                            best_gap, best_v = gap, 0.0
                            found = True
                if found:
                    break
                if start_lane != lane0:  # the lane being left: only its unique continuation
                    succ = lanes[l].successors
                    dist += lane_len[l]
                    l = succ[0] if len(succ) == 1 else -1
                    continue
                nxt = self._next_lane(i, k)
                if lanes[l].control is not None and (nxt < 0 or self.reserved[i] != nxt):
                    # stop with the front bumper about STOP_OFFSET + 0.3 m before the line
                    gap = dist + lane_len[l] - STOP_OFFSET - half + float(self.s0[i]) - 0.3
                    if gap < best_gap:
                        best_gap, best_v = gap, 0.0
                    break
                dist += lane_len[l]
                l, k = nxt, k + 1
        return best_gap, best_v, v_allow

    # ------------------------------------------------------------ lane changes

    def _vehicle_ahead(self, lane: int, s: float, occ: dict, exclude: int) -> tuple[float, int]:
        """(centre distance, index) of the nearest vehicle ahead along the unique successors, or (inf, -1)."""
        dist, l = 0.0, lane
        lane_len = self._py_lane_len
        while dist < LOOKAHEAD and l >= 0:
            entry = occ.get(l)
            if entry is not None:
                ss, ids = entry
                lo = bisect.bisect_right(ss, s) if l == lane else 0
                for j in range(lo, len(ss)):
                    if ids[j] != exclude:
                        return dist + ss[j] - (s if l == lane else 0.0), ids[j]
            dist += lane_len[l] - (s if l == lane else 0.0)
            succ = self.net.lanes[l].successors
            l = succ[0] if len(succ) == 1 else -1
        return math.inf, -1

    def _vehicle_behind(self, lane: int, s: float, occ: dict, exclude: int) -> tuple[float, int]:
        dist, l, first = 0.0, lane, True
        lane_len = self._py_lane_len
        while dist < LOOKAHEAD and l >= 0:
            entry = occ.get(l)
            if entry is not None:
                ss, ids = entry
                hi = bisect.bisect_left(ss, s) if first else len(ss)
                for j in range(hi - 1, -1, -1):
                    if ids[j] != exclude:
                        return dist + ((s if first else lane_len[l]) - ss[j]), ids[j]
            dist += s if first else lane_len[l]
            pred = self.net.lanes[l].predecessors
            l, first = (pred[0] if len(pred) == 1 else -1), False
        return math.inf, -1

    def _idm1(self, i: int, gap_centre: float, leader: int) -> float:
        length, v = self._py_length, self._py_v
        if leader < 0:
            gap, dv = math.inf, 0.0
        else:
            gap = gap_centre - length[i] / 2 - length[leader] / 2
            dv = v[i] - v[leader]
        return idm_accel_scalar(v[i], self._py_v0[i], gap, dv, IDMParams(*self._py_params[i]))

    def _lane_changes(self, occ: dict) -> None:
        lanes = self.net.lanes
        n = self.n
        due = self.alive[:n] & (self.lc_dist[:n] <= 0) & ((self.step_count + np.arange(n)) % 10 == 0)
        due &= self.has_neighbour[self.lane[:n]] & (self.category[:n] != _PEDESTRIAN)
        for i in np.flatnonzero(due).tolist():
            lane_i = int(self.lane[i])
            lane = lanes[lane_i]
            if lane.left is None and lane.right is None:
                continue
            s = self._py_s[i]
            v = self._py_v[i]
            lc_len = float(np.clip(v * 3.5, 12.0, 45.0))
            ahead_d, ahead = self._vehicle_ahead(lane_i, s, occ, i)
            behind_d, behind = self._vehicle_behind(lane_i, s, occ, i)
            own_old = self._idm1(i, ahead_d, ahead)
            best, best_nb = 0.0, None
            for nb, bias in ((lane.left, -0.1), (lane.right, 0.1)):
                if nb is None:
                    continue
                s_nb = self._map_to(lane_i, s, nb)
                lead_d, lead = self._vehicle_ahead(nb, s_nb, occ, i)
                fol_d, fol = self._vehicle_behind(nb, s_nb, occ, i)
                if lead >= 0 and lead_d - self.length[i] / 2 - self.length[lead] / 2 < max(self.s0[i], 0.5 * v):
                    continue
                if fol >= 0 and fol_d - self.length[i] / 2 - self.length[fol] / 2 < max(self.s0[fol], 0.5 * self.v[fol]):
                    continue
                if ahead >= 0 and ahead_d - self.length[i] / 2 - self.length[ahead] / 2 < 0.25 * lc_len:
                    continue  # no room to move across before reaching the leader
                own_new = self._idm1(i, lead_d, lead)
                if fol >= 0:
                    fol_new = self._idm1(fol, fol_d, i)
                    if fol_new < -SAFE_DECEL:
                        continue
                    fol_old = self._idm1(fol, fol_d + lead_d, lead) if lead >= 0 else self._idm1(fol, math.inf, -1)
                else:
                    fol_new = fol_old = 0.0
                if behind >= 0:
                    old_new = self._idm1(behind, behind_d + ahead_d, ahead) if ahead >= 0 else self._idm1(behind, math.inf, -1)
                    old_old = self._idm1(behind, behind_d, i)
                else:
                    old_new = old_old = 0.0
                gain = mobil_gain(own_new, own_old, fol_new, fol_old, old_new, old_old, float(self.polite[i])) + bias
                pref = self.lane_pref[i]
                if pref >= 0:  # a driver heading for a lane (an exit ahead, a habit) wants to move toward it
                    here, there = lane.lane_index, lanes[nb].lane_index
                    gain += 0.5 if abs(there - pref) < abs(here - pref) else (-0.5 if abs(there - pref) > abs(here - pref) else 0.0)
                if gain > self.lc_thr[i] and gain > best:
                    best, best_nb = gain, nb
            if best_nb is not None:
                s_nb = self._map_to(lane_i, s, best_nb)
                self.lc_d0[i] = LANE_WIDTH * (1.0 if best_nb == lane.right else -1.0)
                self.lc_dist[i], self.lc_prog[i] = lc_len, 0.0
                self.lane[i], self.s[i] = best_nb, s_nb
                self.route[i] = []
                self.lane_changes[i] += 1
                ss, ids = occ.setdefault(best_nb, ([], []))
                k = bisect.bisect_right(ss, s_nb)
                ss.insert(k, s_nb)
                ids.insert(k, int(i))

    # ------------------------------------------------------------ pedestrians

    def _pedestrians(self) -> None:
        rate = _DENSITY[self.net.location][2]
        alive = np.flatnonzero(self.alive[: self.n])
        if len(alive):
            pos = self.poses(alive)[:, :2]
            moving = self.v[alive] > 0.5
        for c in range(len(self.net.crosswalks)):
            if self.rng.random() < rate * SIM_DT:
                a, bnd = self.cw_axis[c]
                if self.rng.random() < 0.5:
                    a, bnd = bnd, a
                axis = (bnd - a) / np.linalg.norm(bnd - a)
                # after crossing, walk on straight away from the kerb (not along it: parked cars, other arms)
                self.pedestrians.append(_Pedestrian(len(self.pedestrians), c, a - axis * 0.8, bnd + axis * 0.8, axis,
                                                    float(self.rng.uniform(1.1, 1.6))))
        occupied = np.zeros(len(self.net.crosswalks), dtype=bool)
        for p in self.pedestrians:
            if p.state == 0:
                clear = True
                if len(alive):
                    dist = np.hypot(*(pos - self.cw_center[p.cw]).T)
                    clear = not np.any((dist < 25.0) & moving) and not np.any(dist < 4.0)
                clear = clear and not any(self.holders.get(cn) for cn in self.cw_connectors[p.cw])
                if clear:
                    p.state = 1
            if p.state == 1:
                d = p.target - p.pos
                n = float(np.hypot(*d))
                step = p.speed * SIM_DT
                if n <= step:
                    p.pos = p.target.copy()
                    p.state, p.heading = 2, math.atan2(p.leave_dir[1], p.leave_dir[0])
                else:
                    p.pos = p.pos + d / n * step
                    occupied[p.cw] = True
            elif p.state == 2:
                p.pos = p.pos + p.leave_dir * p.speed * SIM_DT
                p.leave_t += SIM_DT
                if p.leave_t > 5.0:
                    p.state = 3
        self.cw_occupied = occupied

    # ------------------------------------------------------------ stepping

    def step(self) -> None:
        """Advance the traffic by SIM_DT."""
        self._pedestrians()
        occ = self._occupancy()
        self._cache()
        self._junction_control(occ)
        idx = np.flatnonzero(self.alive[: self.n])
        gap = np.empty(len(idx))
        vl = np.empty(len(idx))
        vallow = np.empty(len(idx))
        for k, i in enumerate(idx):
            gap[k], vl[k], vallow[k] = self._ahead(int(i), occ)
        v = self.v[idx]
        v0 = self.v0f[idx] * self.lane_speed[self.lane[idx]]
        acc = idm_accel(v, v0, gap, v - vl, IDMParams(max_accel=self.amax[idx], comfort_decel=self.b[idx],
                                                      time_headway=self.T[idx], min_gap=self.s0[idx]))
        over = v > vallow
        if over.any():
            # above the braking envelope of a curve ahead: shed the excess speed over about 10 m
            curve = np.where(over, -(v**2 - np.minimum(vallow, v) ** 2) / 20.0 - 0.5, np.inf)
            acc = np.minimum(acc, np.maximum(curve, -self.b[idx] * 1.5))
        self.acc[idx] = acc
        self._lane_changes(occ)
        v_new = v + acc * SIM_DT
        stopping = v_new < 0
        ds = np.where(stopping, v**2 / np.maximum(-2 * acc, 1e-9), v * SIM_DT + 0.5 * acc * SIM_DT**2)
        self.v[idx] = np.maximum(v_new, 0.0)
        self.s[idx] += ds
        lc = idx[self.lc_dist[idx] > 0]
        self.lc_prog[lc] += ds[self.lc_dist[idx] > 0]
        done = lc[self.lc_prog[lc] >= self.lc_dist[lc]]
        self.lc_dist[done] = 0.0
        self._transitions(idx)
        self._spawn()
        self.time += SIM_DT
        self.step_count += 1

    def _transitions(self, idx: np.ndarray) -> None:
        lanes = self.net.lanes
        busy = (self.release[idx] >= 0) | (self.s[idx] > self.lane_len[self.lane[idx]])
        for i in idx[busy].tolist():
            if self.release[i] >= 0 and self.s[i] - self.length[i] / 2 > 1.0:
                self._unreserve(i, int(self.release[i]))
                self.release[i] = -1
            while self.alive[i] and self.s[i] > self.lane_len[self.lane[i]]:
                self.s[i] -= self.lane_len[self.lane[i]]
                old = int(self.lane[i])
                nxt = self._next_lane(i, 0)
                self.route[i].pop(0)
                if nxt < 0:
                    self.alive[i] = False
                    for c in (self.reserved[i], self.release[i]):
                        if c >= 0:
                            self._unreserve(i, int(c))
                    break
                self.lane[i] = nxt
                if lanes[nxt].is_connector and self.reserved[i] != nxt:
                    self._reserve(i, nxt)  # entered without a grant (cannot happen by design); still block conflicts
                if lanes[old].is_connector:
                    if self.release[i] >= 0:
                        self._unreserve(i, int(self.release[i]))
                    self.release[i] = old
                    self.reserved[i] = -1
                self.stop_done[i] = False
                self.stop_wait[i] = 0.0

    def _spawn(self) -> None:
        rate = _DENSITY[self.net.location][1]
        if rate <= 0:
            return
        for l, lane in enumerate(self.net.lanes):
            if not lane.source or self.rng.random() >= rate * SIM_DT:
                continue
            size, style, cat, f = _draw_vehicle(self.rng, allow_bicycle=False)
            clear = True
            for i in np.flatnonzero(self.alive[: self.n] & (self.lane[: self.n] == l)):
                if self.s[i] - self.length[i] / 2 < size[0] + 20.0:
                    clear = False
            if clear:
                self.add_vehicle(l, size[0] / 2 + 0.5, min(8.0, lane.speed_limit), size, style, cat, f)

    # ------------------------------------------------------------ population

    def populate(self) -> None:
        """Initial vehicles spread over the lanes with random gaps, speeds made safe for their leaders."""
        spacing = _DENSITY[self.net.location][0]
        bikes = self.net.multi_lane
        for l, lane in enumerate(self.net.lanes):
            if lane.is_connector:
                continue
            s = 3.0 + self.rng.exponential(spacing / 2)
            while True:
                size, style, cat, f = _draw_vehicle(self.rng, allow_bicycle=bikes)
                s += size[0] / 2
                if s + size[0] / 2 > self.lane_len[l] - 3.0:
                    break
                v = self.rng.uniform(0.6, 1.0) * lane.speed_limit * DRIVER_STYLES[style].speed_factor * f
                self.add_vehicle(l, s, v, size, style, cat, f)
                s += size[0] / 2 + 8.0 + self.rng.exponential(spacing)
        for _ in range(2):
            occ = self._occupancy()
            self._cache()
            for i in range(self.n):
                gap, vl, vallow = self._ahead(i, occ)
                room = max(gap - self.s0[i] - 1.0, 0.0)
                self.v[i] = min(self.v[i], vl + math.sqrt(2 * self.b[i] * room), vallow)

    def add_parked(self, count: int) -> None:
        """Static parked cars beside the outermost lanes (agents, not traffic)."""
        lanes = [i for i, lane in enumerate(self.net.lanes) if not lane.is_connector and lane.right is None]
        for _ in range(count):
            l = int(self.rng.choice(lanes))
            lane = self.net.lanes[l]
            k = int(self.rng.integers(4, len(lane.points) - 4))
            x, y, th = lane.points[k]
            off = -(LANE_WIDTH / 2 + 1.8)
            if lane.crossings or lane.control is not None:
                continue
            pose = np.array([x - off * math.sin(th), y + off * math.cos(th), th])
            if len(self.cw_center) and np.hypot(*(self.cw_center - pose[:2]).T).min() < 15.0:
                continue  # keep crosswalks clear
            size = (float(self.rng.uniform(3.9, 4.9)), float(self.rng.uniform(1.75, 1.95)))
            if any(np.hypot(*(pose[:2] - p[:2])) < (size[0] + s[0]) / 2 + 1.0 for p, s, _ in self.static_agents):
                continue  # keep a gap to the car parked there already
            self.static_agents.append((pose, size, _VEHICLE))

    def choose_ego(self, style: str) -> int:
        """Turn one simulated car into the ego: nuScenes ego size, the given driver style."""
        ok = [
            i for i in range(self.n)
            if self.category[i] == _VEHICLE and self.length[i] >= EGO_SIZE[0] and self.width[i] >= EGO_SIZE[1]
            and self.length[i] < 6.0 and not self.net.lanes[self.lane[i]].sink
        ]
        if not ok:
            raise DatasetError(f"no vehicle on {self.net.location} can become the ego; raise the traffic density")
        i = int(self.rng.choice(ok))
        st = DRIVER_STYLES[style]
        self.length[i], self.width[i] = EGO_SIZE
        self.v0f[i] = st.speed_factor * float(self.rng.uniform(0.95, 1.05))
        self.T[i], self.s0[i], self.amax[i], self.b[i] = st.headway_s, st.min_gap_m, st.max_accel, st.comfort_decel
        self.polite[i], self.lc_thr[i], self.alat[i] = st.politeness, st.lane_change_threshold, st.max_lat_accel
        self.ego = i
        self.route[i] = []
        lane = self.net.lanes[int(self.lane[i])]
        across = 1
        nb = lane
        while nb.right is not None:
            nb, across = self.net.lanes[nb.right], across + 1
        nb = lane
        while nb.left is not None:
            nb, across = self.net.lanes[nb.left], across + 1
        if across > 1 and self.rng.random() < 0.7:  # most egos head for another lane during the scene
            self.lane_pref[i] = int(self.rng.choice([k for k in range(across) if k != lane.lane_index]))
        else:
            self.lane_pref[i] = -1
        return i



def _draw_vehicle(rng: np.random.Generator, allow_bicycle: bool) -> tuple[tuple[float, float], str, int, float]:
    """(size, style, category, speed factor) of a random road user."""
    style = str(rng.choice(["cautious", "normal", "aggressive"], p=[0.3, 0.5, 0.2]))
    r = rng.random()
    if allow_bicycle and r < 0.03:
        return (float(rng.uniform(1.6, 1.9)), float(rng.uniform(0.6, 0.8))), "cautious", _BICYCLE, float(rng.uniform(0.35, 0.45))
    if r < 0.10:
        return (float(rng.uniform(7.0, 10.0)), float(rng.uniform(2.3, 2.55))), style, _VEHICLE, float(rng.uniform(0.8, 0.9))
    return (float(rng.uniform(3.9, 5.1)), float(rng.uniform(1.7, 2.0))), style, _VEHICLE, float(rng.uniform(0.93, 1.07))


def _crosswalk_axis(cw: shapely.Polygon) -> tuple[np.ndarray, np.ndarray]:
    """Ends of a crosswalk's long axis (the midpoints of its short edges)."""
    pts = np.asarray(cw.exterior.coords)[:4]
    edges = [(pts[k], pts[(k + 1) % 4]) for k in range(4)]
    lengths = [np.hypot(*(b - a)) for a, b in edges]
    k = int(np.argmin(lengths))
    a = (edges[k][0] + edges[k][1]) / 2
    b = (edges[(k + 2) % 4][0] + edges[(k + 2) % 4][1]) / 2
    return a, b


def _curve_runs(curvature: np.ndarray, spacing: float) -> list[tuple[float, float, float]]:
    """Stretches of constant non-zero curvature as (s_start, s_end, |curvature|)."""
    k = np.abs(curvature)
    runs, start = [], 0
    for j in range(1, len(k) + 1):
        if j == len(k) or k[j] != k[start]:
            if k[start] > 1e-6:
                runs.append((start * spacing, (j - 1) * spacing, float(k[start])))
            start = j
    return runs


class _EgoLeft(Exception):
    """The ego reached a map exit before the scene ended (the attempt is discarded)."""


def _token(*parts: object) -> str:
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def simulate_scene(
    net: RoadNetwork,
    seed: int,
    name: str,
    map_geometry: MapGeometry | None = None,
    *,
    frames: int = 40,
    warmup_s: float = 6.0,
    record_radius_m: float = 60.0,
    max_attempts: int = 6,
) -> tuple[ScenarioLog, SceneStats]:
    """Simulate one scene on ``net`` and record it as a :class:`ScenarioLog`.

    The ego must travel at least 10 m; otherwise the scene is simulated again
    from the next sub-seed (the attempt count is in the stats), so the result
    depends only on ``seed``.
    """
    if frames < 2:
        raise DatasetError(f"a scene needs at least 2 keyframes, got frames={frames}")
    result = None
    for attempt in range(max_attempts):
        rng = np.random.default_rng([seed, attempt])
        try:
            log, stats = _run(net, rng, name, map_geometry, frames, warmup_s, record_radius_m)
        except _EgoLeft:
            continue
        stats.attempts = attempt + 1
        result = (log, stats)
        if stats.ego_distance_m >= 10.0:
            break
    if result is None:
        raise DatasetError(f"scene {name!r} (seed {seed}): the ego left the map in every attempt; use another seed")
    return result


def _run(net: RoadNetwork, rng: np.random.Generator, name: str, map_geometry: MapGeometry | None,
         frames: int, warmup_s: float, radius: float) -> tuple[ScenarioLog, SceneStats]:
    sim = TrafficSimulation(net, rng)
    sim.populate()
    if not net.multi_lane and net.intersections == []:
        sim.add_parked(int(rng.integers(2, 6)))
    style = str(rng.choice(list(DRIVER_STYLES)))
    ego = sim.choose_ego(style)
    for _ in range(int(round(warmup_s / SIM_DT))):
        sim.step()
    lc0 = int(sim.lane_changes[ego])
    veh_pose: dict[int, np.ndarray] = {}
    veh_valid: dict[int, np.ndarray] = {}
    ped_pose: dict[int, np.ndarray] = {}
    ped_valid: dict[int, np.ndarray] = {}
    ego_pose = np.zeros((frames, 3))
    route: list[int] = []
    turns: list[str] = []
    stop_stops = 0
    was_stopped = False
    for t in range(frames):
        if t > 0:
            for _ in range(STEPS_PER_FRAME):
                sim.step()
                lane = int(sim.lane[ego])
                if route[-1:] != [lane]:
                    route.append(lane)
                    if net.lanes[lane].turn is not None:
                        turns.append(net.lanes[lane].turn)
                stopped = bool(sim.stop_done[ego])
                if stopped and not was_stopped:
                    stop_stops += 1
                was_stopped = stopped
        elif not route:
            route.append(int(sim.lane[ego]))
        if not sim.alive[ego]:
            raise _EgoLeft(name)
        idx = np.flatnonzero(sim.alive[: sim.n])
        poses = sim.poses(idx)
        for k, i in enumerate(idx):
            if i == ego:
                ego_pose[t] = poses[k]
                continue
            if i not in veh_pose:
                veh_pose[i] = np.zeros((frames, 3))
                veh_valid[i] = np.zeros(frames, dtype=bool)
            veh_pose[i][t] = poses[k]
            veh_valid[i][t] = True
        for p in sim.pedestrians:
            if p.state == 3:
                continue
            key = p.serial
            if key not in ped_pose:
                ped_pose[key] = np.zeros((frames, 3))
                ped_valid[key] = np.zeros(frames, dtype=bool)
            ped_pose[key][t] = (p.pos[0], p.pos[1], p.heading)
            ped_valid[key][t] = True
    tokens, cats, sizes, poses_out, valid_out = [], [], [], [], []

    def _add(kind: str, key: int, pose: np.ndarray, valid: np.ndarray, cat: int, size: tuple[float, float]) -> None:
        near = valid & (np.hypot(pose[:, 0] - ego_pose[:, 0], pose[:, 1] - ego_pose[:, 1]) <= radius)
        if not near.any():
            return
        tokens.append(_token(name, "agent", kind, len(tokens)))
        cats.append(cat)
        sizes.append(size)
        poses_out.append(np.where(near[:, None], pose, 0.0))
        valid_out.append(near)

    for i in sorted(veh_pose):
        _add("vehicle", i, veh_pose[i], veh_valid[i], int(sim.category[i]), (float(sim.length[i]), float(sim.width[i])))
    for key in sorted(ped_pose):
        _add("pedestrian", key, ped_pose[key], ped_valid[key], _PEDESTRIAN, (0.6, 0.6))
    for k, (pose, size, cat) in enumerate(sim.static_agents):
        _add("parked", k, np.repeat(pose[None], frames, 0), np.ones(frames, dtype=bool), cat, size)

    geom = map_geometry if map_geometry is not None else net.to_map_geometry()
    log = ScenarioLog(
        scene_token=_token(name, "scene"),
        scene_name=name,
        location=net.location,
        sample_tokens=[_token(name, "sample", t) for t in range(frames)],
        times=np.arange(frames) * DT,
        ego_pose=ego_pose,
        ego_size=EGO_SIZE,
        agents_token=tokens,
        agents_category=np.array(cats, dtype=int),
        agents_size=np.array(sizes, dtype=float).reshape(-1, 2),
        agents_pose=np.array(poses_out, dtype=float).reshape(-1, frames, 3),
        agents_valid=np.array(valid_out, dtype=bool).reshape(-1, frames),
        map=geom,
        route=[net.lanes[l].token for l in route],
    )
    dist = float(np.hypot(*np.diff(ego_pose[:, :2], axis=0).T).sum())
    stats = SceneStats(style, dist, int(sim.lane_changes[ego]) - lc0, turns, stop_stops)
    return log, stats
