"""Closed-loop driving simulation on a logged scene.

The ego starts at its logged state and is then driven by the planner: at
every replanning step (2 Hz by default, on the log's keyframes) the planner
sees a :class:`~diffpilot.data.scenario.SceneSample` built from a copy of
the log whose past holds the *simulated* ego (and, in reactive mode, the
simulated agents); its ego-frame plan is mapped to the global frame and an
LQR (or pure-pursuit) tracker follows it on a kinematic bicycle at 10 Hz
until the next replan. Background agents replay the log (NAVSIM's setting)
or, with ``reactive=True``, follow their logged paths with IDM braking.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import DT, EGO_SIZE, Planner, SampleSpec, SceneSample, ScenarioLog, to_global_frame, wrap_angle
from diffpilot.sim.driving.agents import ReactiveTraffic, replay_agents
from diffpilot.sim.driving.tracker import make_tracker
from diffpilot.sim.driving.vehicle import CONTROL_DT, KinematicBicycle

SampleBuilder = Callable[..., SceneSample]


@dataclass
class Rollout:
    """Everything one closed-loop run produced, in the global frame, at the simulator rate.

    ``ego_states`` rows are (x, y, yaw, speed, steer) at ``times`` (seconds on
    the log's clock), including the initial state. ``plans`` holds each
    replan as (time, global (H, 3) poses); ``plan_ms`` the planner's wall
    time per call.
    """

    scene_token: str
    scene_name: str
    reactive: bool
    times: np.ndarray  # (N,)
    ego_states: np.ndarray  # (N, 5)
    agents_pose: np.ndarray  # (A, N, 3)
    agents_valid: np.ndarray  # (A, N)
    agents_size: np.ndarray  # (A, 2)
    agents_category: np.ndarray  # (A,)
    plans: list[tuple[float, np.ndarray]] = field(default_factory=list)
    plan_ms: list[float] = field(default_factory=list)
    ego_size: tuple[float, float] = EGO_SIZE
    start_frame: int = 0
    end_frame: int = 0

    @property
    def dt(self) -> float:
        return float(self.times[1] - self.times[0]) if len(self.times) > 1 else 0.0


def initial_ego_state(log: ScenarioLog, frame: int, wheelbase: float, max_steer: float) -> np.ndarray:
    """The logged ego state (x, y, yaw, speed, steer) at ``frame``; speed and steer by central differences."""
    poses = np.asarray(log.ego_pose, dtype=np.float64)
    times = np.asarray(log.times, dtype=np.float64)
    n = len(poses)
    if n < 2:
        raise DatasetError(f"scene {log.scene_name!r} has {n} ego poses; the simulator needs at least 2")
    lo, hi = max(frame - 1, 0), min(frame + 1, n - 1)
    span = max(float(times[hi] - times[lo]), 1e-6)
    d = poses[hi, :2] - poses[lo, :2]
    yaw = poses[frame, 2]
    speed = max(float((d[0] * np.cos(yaw) + d[1] * np.sin(yaw)) / span), 0.0)
    yaw_rate = float(wrap_angle(poses[hi, 2] - poses[lo, 2])) / span
    steer = float(np.clip(np.arctan(wheelbase * yaw_rate / speed), -max_steer, max_steer)) if speed > 1.0 else 0.0
    return np.array([poses[frame, 0], poses[frame, 1], yaw, speed, steer])


def _check_log(log: ScenarioLog) -> None:
    T = log.num_frames
    ego = np.asarray(log.ego_pose)
    if T < 2 or ego.shape != (T, 3):
        raise DatasetError(f"scene {log.scene_name!r}: ego_pose must be (T>=2, 3) with T = len(times) = {T}, got {ego.shape}")
    if not np.all(np.isfinite(ego)):
        raise DatasetError(f"scene {log.scene_name!r}: ego_pose contains NaN or inf; fix or drop the scene")
    steps = np.diff(np.asarray(log.times, dtype=np.float64))
    if not np.allclose(steps, DT, atol=0.02):
        raise DatasetError(
            f"scene {log.scene_name!r}: keyframes must be {DT} s apart for closed-loop simulation, "
            f"got spacings {np.unique(np.round(steps, 3))[:5]}; resample the log to {1 / DT:g} Hz"
        )
    A = len(log.agents_token)
    if np.asarray(log.agents_pose).shape != (A, T, 3) or np.asarray(log.agents_valid).shape != (A, T):
        raise DatasetError(
            f"scene {log.scene_name!r}: agents_pose must be ({A}, {T}, 3) and agents_valid ({A}, {T}), "
            f"got {np.asarray(log.agents_pose).shape} and {np.asarray(log.agents_valid).shape}"
        )


class DrivingSimulator:
    """Runs a :class:`~diffpilot.data.scenario.Planner` closed loop on one :class:`ScenarioLog`.

    ``replan_every`` simulator steps must span a whole number of keyframes
    (``replan_every * dt`` a multiple of DT), since the planner's view is
    built at keyframes. ``sample_builder(log, frame, spec)`` defaults to
    :func:`diffpilot.data.scene_sample.build_scene_sample`; it is given the
    log with the driven ego (and, reactive, agents) written into the past
    keyframes, so the ego status it computes comes from the drive.
    """

    def __init__(
        self,
        spec: SampleSpec = SampleSpec(),
        dt: float = CONTROL_DT,
        replan_every: int = 5,
        reactive: bool = False,
        tracker: str = "lqr",
        *,
        model: KinematicBicycle | None = None,
        sample_builder: SampleBuilder | None = None,
    ) -> None:
        if dt <= 0 or replan_every < 1:
            raise ValueError(f"dt must be > 0 and replan_every >= 1, got dt={dt}, replan_every={replan_every}")
        stride = replan_every * dt / DT
        if abs(stride - round(stride)) > 1e-6 or round(stride) < 1:
            raise ValueError(
                f"replan_every * dt = {replan_every * dt:g} s must be a whole number of keyframe intervals ({DT} s); "
                f"e.g. dt=0.1 with replan_every=5 or 10"
            )
        self.spec = spec
        self.dt = float(dt)
        self.replan_every = int(replan_every)
        self.frame_stride = int(round(stride))
        self.reactive = bool(reactive)
        self.model = model if model is not None else KinematicBicycle(dt=dt)
        if abs(self.model.dt - self.dt) > 1e-9:
            raise ValueError(f"the vehicle model's dt ({self.model.dt}) must equal the simulator's dt ({self.dt})")
        self.tracker_name = tracker
        make_tracker(tracker, self.model)  # fail early on an unknown name
        if sample_builder is None:
            from diffpilot.data.scene_sample import build_scene_sample

            sample_builder = build_scene_sample
        self.sample_builder = sample_builder

    def run(self, log: ScenarioLog, planner: Planner, start_frame: int | None = None, end_frame: int | None = None) -> Rollout:
        """Drive ``planner`` from ``start_frame`` (default: ``spec.past_steps``) to ``end_frame`` (default: last keyframe)."""
        _check_log(log)
        T = log.num_frames
        start = self.spec.past_steps if start_frame is None else int(start_frame)
        start = min(start, T - 2) if start_frame is None else start
        end = T - 1 if end_frame is None else int(end_frame)
        if not 0 <= start < end <= T - 1:
            raise ValueError(f"need 0 <= start_frame < end_frame <= {T - 1} for scene {log.scene_name!r}, got {start}, {end}")
        if not hasattr(planner, "plan") or not hasattr(planner, "reset"):
            raise TypeError(f"{type(planner).__name__} is not a Planner: it needs reset(seed) and plan(sample)")
        log_times = np.asarray(log.times, dtype=np.float64)
        t0 = float(log_times[start])
        steps_per_frame = int(round(DT / self.dt))
        n = (end - start) * steps_per_frame
        times = t0 + self.dt * np.arange(n + 1)
        model = self.model
        tracker = make_tracker(self.tracker_name, model)
        tracker.reset()
        planner.reset()

        states = np.empty((n + 1, 5))
        states[0] = initial_ego_state(log, start, model.wheelbase, model.max_steer)
        if self.reactive:
            traffic: ReactiveTraffic | None = ReactiveTraffic(log, times)
            agents_pose, agents_valid = traffic.poses, traffic.valid
        else:
            traffic = None
            agents_pose, agents_valid = replay_agents(log, times)

        ego_log = np.array(log.ego_pose, dtype=np.float64, copy=True)
        ag_pose_log = np.array(log.agents_pose, dtype=np.float64, copy=True)
        ag_valid_log = np.array(log.agents_valid, dtype=bool, copy=True)
        plans: list[tuple[float, np.ndarray]] = []
        plan_ms: list[float] = []
        reference = reference_times = None
        for k in range(n):
            if k % self.replan_every == 0:
                frame = start + k // steps_per_frame
                ego_log[frame] = states[k, :3]
                if self.reactive:
                    ag_pose_log[:, frame] = agents_pose[:, k]
                    ag_valid_log[:, frame] = agents_valid[:, k]
                sim_log = replace(log, ego_pose=ego_log, agents_pose=ag_pose_log, agents_valid=ag_valid_log)
                # The ego status comes from the driven keyframes exactly as training data gets it from the logged
                # ones (finite differences at 2 Hz): a planner sees in closed loop the signal it was trained on,
                # not the tracker's instantaneous speed and 0.1 s acceleration, which it never saw.
                sample = self.sample_builder(sim_log, frame, self.spec)
                tic = time.perf_counter()
                plan = planner.plan(sample)
                plan_ms.append(1e3 * (time.perf_counter() - tic))
                plan = _check_plan(plan, type(planner).__name__)
                origin = np.asarray(sample.ego_pose_global, dtype=np.float64)
                plan_global = to_global_frame(plan, origin)
                plans.append((float(times[k]), plan_global))
                reference = np.concatenate([origin[None], plan_global])
                reference_times = times[k] + DT * np.arange(len(reference))
            elif k % steps_per_frame == 0:
                frame = start + k // steps_per_frame
                ego_log[frame] = states[k, :3]
                if self.reactive:
                    ag_pose_log[:, frame] = agents_pose[:, k]
                    ag_valid_log[:, frame] = agents_valid[:, k]
            accel_cmd, steer_rate = tracker.control(states[k], reference, reference_times, float(times[k]))
            states[k + 1] = model.step(states[k], accel_cmd, steer_rate)
            if traffic is not None:
                traffic.advance(states[k], log.ego_size)
        return Rollout(
            scene_token=log.scene_token,
            scene_name=log.scene_name,
            reactive=self.reactive,
            times=times,
            ego_states=states,
            agents_pose=np.array(agents_pose),
            agents_valid=np.array(agents_valid),
            agents_size=np.asarray(log.agents_size, dtype=np.float64).copy(),
            agents_category=np.asarray(log.agents_category).copy(),
            plans=plans,
            plan_ms=plan_ms,
            ego_size=tuple(log.ego_size),
            start_frame=start,
            end_frame=end,
        )


def _check_plan(plan: np.ndarray, name: str) -> np.ndarray:
    plan = np.asarray(plan, dtype=np.float64)
    if plan.ndim != 2 or plan.shape[1] != 3 or len(plan) < 1:
        raise ValueError(f"planner {name} returned shape {plan.shape}; plan() must return ego-frame poses (H>=1, 3) at DT spacing")
    if not np.all(np.isfinite(plan)):
        raise ValueError(f"planner {name} returned NaN or inf in its plan; it must return finite ego-frame poses")
    return plan
