"""Drive highway-env with the same :class:`~diffpilot.data.scenario.Planner` as the log simulator.

highway-env gives interactive traffic (IDM / MOBIL vehicles that react to
the ego) where the log-replay simulator only replays. The adapter:

* configures the env for continuous control at 10 Hz (``policy_frequency``
  10, one or more simulation frames per action) and replans every ``DT``
  (2 Hz);
* builds a :class:`SceneSample` from ``env.unwrapped.road`` — the ego from
  the controlled vehicle, the other vehicles and obstacles as agents, lane
  centerlines sampled from ``road.network``, a drivable raster from the lane
  widths — with a history it records itself (highway-env keeps none by
  default);
* tracks the plan with the shared LQR tracker on a kinematic-bicycle steering
  state, and converts (acceleration, steering) into highway-env's normalized
  ``[-1, 1]`` action. highway-env's vehicle is a centre-referenced bicycle of
  wheelbase ``LENGTH``; the steering angle sent is the one that gives the
  same yaw rate as the tracker's bicycle.

Never opens a window: the env is created without a render mode.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import highway_env  # noqa: F401  (registers the highway-env environments)
import numpy as np
import shapely

from diffpilot.data.scenario import CATEGORIES, COMMANDS, DT, Planner, SampleSpec, SceneSample, to_ego_frame, to_global_frame, wrap_angle
from diffpilot.data.scene_sample import pack_map_elements
from diffpilot.sim.driving.tracker import LQRTracker
from diffpilot.sim.driving.vehicle import CONTROL_DT, KinematicBicycle

__all__ = ["CONTROL_HZ", "HighwayEpisode", "HighwaySceneBuilder", "base_config", "make_env", "run_highway", "steering_to_action"]

CONTROL_HZ = int(round(1.0 / CONTROL_DT))
"""Rate at which the ego is commanded (the tracker's rate, 10 Hz)."""
_REPLAN_EVERY = int(round(DT * CONTROL_HZ))  # control steps per replanning


@dataclass
class HighwayEpisode:
    """One closed-loop highway-env episode.

    ``trajectory`` holds the ego's (x, y, yaw, speed) in highway-env's frame
    at every control step (first row = after reset); ``lane_offsets`` the
    signed offset from the centre of the lane highway-env puts it in;
    ``lane_ids`` that lane's index; ``on_road`` whether it was on a lane.
    """

    env_id: str
    seed: int
    steps: int
    collided: bool
    distance_m: float
    mean_speed: float
    plan_ms: list[float]
    sim_time_s: float = 0.0
    on_road_fraction: float = 1.0
    trajectory: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    lane_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lane_ids: list[tuple] = field(default_factory=list)
    plans: list[tuple[float, np.ndarray]] = field(default_factory=list)

    @property
    def max_abs_lane_offset(self) -> float:
        return float(np.abs(self.lane_offsets).max()) if len(self.lane_offsets) else 0.0


def base_config(env_id: str, duration_s: float) -> dict[str, Any]:
    """The settings the adapter needs: continuous actions at 10 Hz, no early stop off-road."""
    return {
        "action": {"type": "ContinuousAction"},
        "policy_frequency": CONTROL_HZ,
        "simulation_frequency": CONTROL_HZ,  # one frame per action; a multiple of 10 may be passed in config
        "duration": float(duration_s),
        "offroad_terminal": False,
    }


def make_env(env_id: str = "highway-fast-v0", duration_s: float = 20.0, config: dict | None = None) -> gym.Env:
    """A headless highway-env env configured for the adapter; ``config`` overrides highway-env keys."""
    cfg = base_config(env_id, duration_s)
    for key, value in (config or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    if cfg["action"].get("type") != "ContinuousAction":
        raise ValueError(f"the adapter drives with ContinuousAction, config asks for action type {cfg['action'].get('type')!r}")
    if cfg["policy_frequency"] != CONTROL_HZ:
        raise ValueError(f"policy_frequency must be {CONTROL_HZ} (the tracker's rate), got {cfg['policy_frequency']}")
    if cfg["simulation_frequency"] % CONTROL_HZ:
        raise ValueError(f"simulation_frequency must be a multiple of {CONTROL_HZ}, got {cfg['simulation_frequency']}")
    try:
        return gym.make(env_id, config=cfg)  # no render_mode: nothing is drawn, no window
    except gym.error.Error as e:
        raise ValueError(f"cannot make highway-env environment {env_id!r}: {e}; try 'highway-fast-v0' or 'intersection-v0'") from e


def steering_to_action(accel: float, steer: float, speed_model: KinematicBicycle, env: gym.Env) -> tuple[np.ndarray, float]:
    """highway-env's normalized action for (accel, bicycle steering), and the steering actually applied.

    The bicycle (rear-axle, wheelbase L) turns at ``v tan(steer) / L``;
    highway-env's vehicle at ``v sin(beta) / (LENGTH / 2)`` with
    ``beta = atan(tan(delta) / 2)``. Equal yaw rates give delta. Both
    commands are clipped to the env's ranges; the returned steering is the
    bicycle angle equivalent to what was sent, so the tracker's steering
    state stays true to the car.
    """
    atype = env.unwrapped.action_type
    vehicle = env.unwrapped.vehicle
    half = float(vehicle.LENGTH) / 2.0
    (a_lo, a_hi), (d_lo, d_hi) = atype.acceleration_range, atype.steering_range
    sin_beta = float(np.clip(half * np.tan(steer) / speed_model.wheelbase, -0.999, 0.999))
    delta = float(np.clip(np.arctan(2.0 * np.tan(np.arcsin(sin_beta))), d_lo, d_hi))
    applied_sin_beta = np.sin(np.arctan(0.5 * np.tan(delta)))
    applied_steer = float(np.arctan(applied_sin_beta * speed_model.wheelbase / half))
    accel = float(np.clip(accel, a_lo, a_hi))
    action = np.array([2.0 * (accel - a_lo) / (a_hi - a_lo) - 1.0, 2.0 * (delta - d_lo) / (d_hi - d_lo) - 1.0], dtype=np.float32)
    return np.clip(action, -1.0, 1.0), applied_steer


def _pose(obj: Any) -> np.ndarray:
    return np.array([float(obj.position[0]), float(obj.position[1]), float(obj.heading)])


def _lanes(road: Any) -> list[Any]:
    return [lane for tos in road.network.graph.values() for lanes in tos.values() for lane in lanes]


def _lane_section(lane: Any, origin: np.ndarray, radius: float, step: float = 1.0) -> tuple[np.ndarray, float] | None:
    """Arclengths of the contiguous piece of ``lane`` within ``radius`` of ``origin`` (around its nearest point)."""
    length = float(lane.length)
    if length > 4 * radius:
        s_e = float(lane.local_coordinates(origin[:2])[0])
        lo, hi = max(0.0, s_e - radius - step), min(length, s_e + radius + step)
        if hi <= lo:
            return None
    else:
        lo, hi = 0.0, length
    s = np.linspace(lo, hi, max(2, int(np.ceil((hi - lo) / step)) + 1))
    xy = np.array([lane.position(si, 0.0) for si in s])
    d = np.hypot(xy[:, 0] - origin[0], xy[:, 1] - origin[1])
    k = int(np.argmin(d))
    if d[k] > radius:
        return None
    inside = d <= radius
    a = k
    while a > 0 and inside[a - 1]:
        a -= 1
    b = k
    while b + 1 < len(s) and inside[b + 1]:
        b += 1
    return s[a : b + 1], float(d[k])


class HighwaySceneBuilder:
    """Builds SceneSamples from a highway-env road, keeping the ego and agent history it needs.

    Call :meth:`record` once per replanning step (every ``DT``) and
    :meth:`build` right after. Before the first record the ego's past is
    extrapolated backwards at its current speed; agents' unseen past and
    every future are marked invalid (highway-env gives no ground-truth future).
    """

    def __init__(self, spec: SampleSpec = SampleSpec(), token_prefix: str = "highway") -> None:
        self.spec = spec
        self.token_prefix = token_prefix
        self.reset()

    def reset(self) -> None:
        self._ego: deque[np.ndarray] = deque(maxlen=self.spec.past_steps + 1)
        self._agents: deque[dict[Any, np.ndarray]] = deque(maxlen=self.spec.past_steps + 1)
        self._frame = -1
        self._last_control: tuple[float, float] | None = None  # (speed, yaw) one control step ago
        self._status = np.zeros(3)

    def observe_control_step(self, env: gym.Env) -> None:
        """Update speed/acceleration/yaw-rate estimates; call after every control step."""
        ego = env.unwrapped.vehicle
        speed, yaw = float(ego.speed), float(ego.heading)
        if self._last_control is not None:
            dt = 1.0 / CONTROL_HZ
            self._status = np.array(
                [speed, (speed - self._last_control[0]) / dt, float(wrap_angle(yaw - self._last_control[1])) / dt]
            )
        else:
            self._status = np.array([speed, 0.0, 0.0])
        self._last_control = (speed, yaw)

    def record(self, env: gym.Env) -> None:
        """Snapshot the ego and every other road user (one history row, DT after the previous)."""
        if self._last_control is None:
            self.observe_control_step(env)
        self._ego.append(_pose(env.unwrapped.vehicle))
        self._agents.append({obj: _pose(obj) for obj in self._others(env)})
        self._frame += 1

    @staticmethod
    def _others(env: gym.Env) -> list[Any]:
        road, ego = env.unwrapped.road, env.unwrapped.vehicle
        objs = [v for v in road.vehicles if v is not ego]
        objs += [o for o in road.objects if getattr(o, "collidable", True)]
        return objs

    def build(self, env: gym.Env, command: str = "keep_lane") -> SceneSample:
        """The ego-frame SceneSample of the current env state (call :meth:`record` first)."""
        if self._frame < 0:
            raise RuntimeError("HighwaySceneBuilder.build needs a history: call record(env) at every replanning step")
        spec = self.spec
        P, F, K = spec.past_steps, spec.future_steps, spec.num_agents
        ego = env.unwrapped.vehicle
        origin = _pose(ego)
        # Ego past: recorded rows, older rows extrapolated back at the current speed and heading.
        have = list(self._ego)
        past_global = np.empty((P + 1, 3))
        n_have = len(have)
        past_global[P + 1 - n_have :] = np.array(have)
        oldest = past_global[P + 1 - n_have]
        for k in range(P + 1 - n_have):
            back = (P + 1 - n_have - k) * DT * float(ego.speed)
            past_global[k] = (oldest[0] - back * np.cos(oldest[2]), oldest[1] - back * np.sin(oldest[2]), oldest[2])
        ego_past = to_ego_frame(past_global, origin)
        ego_past[-1] = 0.0

        # Agents: the K nearest now; past from the recorded snapshots, future unknown.
        W = P + 1 + F
        agents_pose = np.zeros((K, W, 3))
        agents_valid = np.zeros((K, W), dtype=bool)
        agents_size = np.zeros((K, 2))
        agents_category = np.full(K, -1, dtype=np.int64)
        others = self._others(env)
        if others and K:
            pos = np.array([_pose(o) for o in others])
            order = np.argsort(np.hypot(pos[:, 0] - origin[0], pos[:, 1] - origin[1]), kind="stable")[:K]
            snaps = list(self._agents)
            for slot, i in enumerate(order):
                obj = others[i]
                for back, snap in enumerate(reversed(snaps[:-1]), start=1):
                    if back > P:
                        break
                    if obj in snap:
                        agents_pose[slot, P - back] = to_ego_frame(snap[obj], origin)
                        agents_valid[slot, P - back] = True
                agents_pose[slot, P] = to_ego_frame(pos[i], origin)
                agents_valid[slot, P] = True
                agents_size[slot] = (float(obj.LENGTH), float(obj.WIDTH))
                is_vehicle = hasattr(obj, "speed") and hasattr(obj, "action")
                agents_category[slot] = CATEGORIES.index("vehicle" if is_vehicle else "other")

        lanes, lanes_valid, drivable_geom = self._map(env, origin)
        drivable = self._raster(drivable_geom, origin)
        token = f"{self.token_prefix}:{self._frame}"
        return SceneSample(
            token=token,
            scene_token=self.token_prefix,
            frame=self._frame,
            ego_pose_global=origin,
            ego_status=self._status.copy(),
            ego_past=ego_past,
            ego_future=np.zeros((F, 3)),
            ego_future_valid=np.zeros(F, dtype=bool),
            agents_pose=agents_pose,
            agents_valid=agents_valid,
            agents_size=agents_size,
            agents_category=agents_category,
            lanes=lanes,
            lanes_valid=lanes_valid,
            drivable=drivable,
            command=COMMANDS.index(command),
            **pack_map_elements(spec=self.spec),  # highway-env roads have no stop lines or crosswalks
        )

    def _map(self, env: gym.Env, origin: np.ndarray) -> tuple[np.ndarray, np.ndarray, shapely.Geometry]:
        spec = self.spec
        L, N = spec.num_lanes, spec.lane_points
        raster_radius = spec.raster_size * spec.raster_m_per_px * 0.75  # covers the raster's corners
        found = []
        polys = []
        for lane in _lanes(env.unwrapped.road):
            near = _lane_section(lane, origin, max(spec.lane_radius_m, raster_radius))
            if near is None:
                continue
            s_all, dist = near
            if dist <= spec.lane_radius_m:
                centre = np.array([lane.position(si, 0.0) for si in s_all])
                inside = np.hypot(centre[:, 0] - origin[0], centre[:, 1] - origin[1]) <= spec.lane_radius_m
                s_in = s_all[inside]
                if len(s_in) >= 1:
                    found.append((dist, lane, float(s_in.min()), float(s_in.max())))
            left = np.array([lane.position(si, lane.width_at(si) / 2) for si in s_all])
            right = np.array([lane.position(si, -lane.width_at(si) / 2) for si in s_all])
            ring = np.concatenate([left, right[::-1]])
            if len(ring) >= 4:
                poly = shapely.Polygon(ring)
                polys.append(poly if poly.is_valid else poly.buffer(0))
        found.sort(key=lambda f: f[0])
        lanes = np.zeros((L, N, 3))
        valid = np.zeros(L, dtype=bool)
        for k, (_, lane, lo, hi) in enumerate(found[:L]):
            s = np.linspace(lo, hi, N)
            pts = np.array([[*lane.position(si, 0.0), lane.heading_at(si)] for si in s])
            lanes[k] = to_ego_frame(pts, origin)
            valid[k] = True
        drivable = shapely.union_all(polys) if polys else shapely.Polygon()
        return lanes, valid, drivable

    def _raster(self, drivable: shapely.Geometry, origin: np.ndarray) -> np.ndarray:
        R, res = self.spec.raster_size, self.spec.raster_m_per_px
        if drivable.is_empty or R == 0:
            return np.zeros((R, R), dtype=np.uint8)
        centres = (R / 2.0 - np.arange(R) - 0.5) * res
        ego_xy = np.stack(np.broadcast_arrays(centres[:, None], centres[None, :], 0.0), axis=-1)  # row: forward, col: left
        g = to_global_frame(ego_xy, origin)
        shapely.prepare(drivable)
        return shapely.contains_xy(drivable, g[..., 0], g[..., 1]).astype(np.uint8)


def _ego_lane_offset(vehicle: Any) -> tuple[float, tuple]:
    lane = vehicle.lane
    if lane is None:
        return float("nan"), ()
    return float(lane.local_coordinates(vehicle.position)[1]), tuple(vehicle.lane_index)


def run_highway(
    planner: Planner,
    env_id: str = "highway-fast-v0",
    episodes: int = 3,
    seed: int = 0,
    duration_s: float = 20.0,
    config: dict | None = None,
    spec: SampleSpec = SampleSpec(),
    command: str = "keep_lane",
) -> list[HighwayEpisode]:
    """Closed-loop episodes of ``planner`` in highway-env (episode ``i`` resets with ``seed + i``)."""
    if episodes < 1 or duration_s <= 0:
        raise ValueError(f"episodes must be >= 1 and duration_s > 0, got {episodes} and {duration_s}")
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; choose one of {COMMANDS}")
    env = make_env(env_id, duration_s, config)
    model = KinematicBicycle(dt=1.0 / CONTROL_HZ)
    tracker = LQRTracker(dt=model.dt, wheelbase=model.wheelbase, max_steer=model.max_steer, max_steer_rate=model.max_steer_rate)
    out = []
    try:
        for ep in range(episodes):
            ep_seed = seed + ep
            env.reset(seed=ep_seed)
            planner.reset(ep_seed)
            tracker.reset()
            builder = HighwaySceneBuilder(spec, token_prefix=f"{env_id}:{ep_seed}")
            ego = env.unwrapped.vehicle
            steer = 0.0
            n_steps = int(round(duration_s * CONTROL_HZ))
            traj = [[*_pose(ego), float(ego.speed)]]
            offsets, lane_ids, on_road = [], [], []
            plans: list[tuple[float, np.ndarray]] = []
            plan_ms: list[float] = []
            ref = ref_t = None
            collided = False
            steps = 0
            builder.observe_control_step(env)
            for step in range(n_steps):
                now = step / CONTROL_HZ
                ego = env.unwrapped.vehicle
                if step % _REPLAN_EVERY == 0:
                    builder.record(env)
                    sample = builder.build(env, command)
                    t0 = time.perf_counter()
                    local = np.asarray(planner.plan(sample), dtype=np.float64)
                    plan_ms.append(1000.0 * (time.perf_counter() - t0))
                    if local.ndim != 2 or local.shape[1] != 3 or len(local) < 1 or not np.isfinite(local).all():
                        raise ValueError(f"planner returned {local.shape} (finite: {np.isfinite(local).all()}); expected finite (H, 3) poses")
                    origin = sample.ego_pose_global
                    plan_global = to_global_frame(local, origin)
                    plans.append((now, plan_global))
                    ref = np.concatenate([origin[None], plan_global])
                    ref_t = now + DT * np.arange(len(ref))
                state = np.array([*_pose(ego), float(ego.speed), steer])
                accel, steer_rate = tracker.control(state, ref, ref_t, now)
                steer_cmd = float(np.clip(steer + steer_rate * model.dt, -model.max_steer, model.max_steer))
                action, steer = steering_to_action(accel, steer_cmd, model, env)
                _, _, terminated, truncated, _ = env.step(action)
                steps += 1
                ego = env.unwrapped.vehicle
                builder.observe_control_step(env)
                traj.append([*_pose(ego), float(ego.speed)])
                off, lid = _ego_lane_offset(ego)
                offsets.append(off)
                lane_ids.append(lid)
                on_road.append(bool(ego.on_road))
                collided = collided or bool(ego.crashed)
                if terminated or truncated:
                    break
            traj_arr = np.asarray(traj)
            out.append(
                HighwayEpisode(
                    env_id=env_id,
                    seed=ep_seed,
                    steps=steps,
                    collided=collided,
                    distance_m=float(np.sum(np.hypot(*np.diff(traj_arr[:, :2], axis=0).T))),
                    mean_speed=float(traj_arr[1:, 3].mean()) if steps else float(traj_arr[0, 3]),
                    plan_ms=plan_ms,
                    sim_time_s=steps / CONTROL_HZ,
                    on_road_fraction=float(np.mean(on_road)) if on_road else 1.0,
                    trajectory=traj_arr,
                    lane_offsets=np.asarray(offsets),
                    lane_ids=lane_ids,
                    plans=plans,
                )
            )
    finally:
        env.close()
    return out
