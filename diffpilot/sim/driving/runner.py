"""Closed-loop driving episodes: one planner, a set of logged scenes, one or both agent modes, scored records.

:func:`run_episodes` is the loop behind ``diffpilot driving eval``
(:func:`diffpilot.sim.driving.evaluate.evaluate_planner`, one scene per
call so that scenes can run as Ray tasks), the STL report's closed-loop
source (:mod:`diffpilot.stl_jobs`) and the STL benchmark's closed-loop table
(``benchmarks/stl.py``). Each episode drives the planner through one
:class:`~diffpilot.data.scenario.ScenarioLog` with
:class:`~diffpilot.sim.driving.simulator.DrivingSimulator` (agents replaying
the log, or reactive) and scores the drive with the PDM score
(:func:`~diffpilot.sim.driving.scoring.score_rollout`).

highway-env episodes (:func:`diffpilot.sim.driving.highway.run_highway`)
have no log to replay or score against, so they keep their own loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffpilot.data.scenario import Planner, SampleSpec, ScenarioLog
from diffpilot.sim.driving.simulator import DrivingSimulator, Rollout

__all__ = ["Episode", "as_planner", "run_episodes"]

ReferenceProgress = float | None | Callable[[ScenarioLog, bool], float | None]


@dataclass
class Episode:
    """One closed-loop drive: the scene, the agent mode, the rollout and its metrics.

    ``metrics`` holds every score of :func:`~diffpilot.sim.driving.scoring.score_rollout`
    (``pdms``, ``nc``, ``dac``, ``ttc``, ``ep``, ``comfort``, ``progress_m``,
    ``out_of_lane_rate``, ``collision``, ``at_fault_collision``, ...) as floats, plus
    ``reference_progress_m`` (EP's denominator as given; None: the logged drive's),
    ``sim_s`` (simulated seconds), ``plan_ms_p50`` (median planner call) and ``wall_s``
    (wall time of the drive, planner construction excluded).
    """

    scene: str
    scene_token: str
    reactive: bool
    rollout: Rollout
    metrics: dict[str, Any]


def as_planner(planner: Planner | Callable[[], Planner]) -> Planner:
    """``planner`` itself if it is one (an object with ``reset`` and ``plan``), else what calling it returns (checked)."""
    if not isinstance(planner, type) and hasattr(planner, "plan") and hasattr(planner, "reset"):
        return planner  # type: ignore[return-value]
    if not callable(planner):
        raise TypeError(f"{type(planner).__name__} is neither a Planner (reset() and plan()) nor a factory of one")
    built = planner()
    if not hasattr(built, "plan") or not hasattr(built, "reset"):
        raise TypeError(f"the planner factory returned {type(built).__name__}, which is not a Planner (needs reset() and plan())")
    return built


def run_episodes(
    planner: Planner | Callable[[], Planner],
    logs: Sequence[ScenarioLog],
    modes: Sequence[bool] = (False,),
    *,
    spec: SampleSpec = SampleSpec(),
    max_frames: int | None = None,
    reference_progress_m: ReferenceProgress = None,
) -> list[Episode]:
    """Drive ``planner`` through every log in every mode (``reactive`` flags); one :class:`Episode` each.

    Episodes come mode by mode, logs in the given order. ``planner`` is a
    Planner (``reset()`` and ``plan(sample) -> ego-frame poses``), reused
    for every episode (the simulator resets it at the start of each), or a
    factory called once per episode for a fresh one. A drive starts at
    keyframe ``spec.past_steps`` and ends at the log's last keyframe, or
    after ``max_frames`` keyframes. ``reference_progress_m`` is EP's
    reference progress: a number, None (the logged human drive), or a
    function of (log, reactive) giving either.
    """
    from diffpilot.sim.driving.scoring import score_rollout

    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    episodes = []
    for reactive in modes:
        sim = DrivingSimulator(spec, reactive=bool(reactive))
        for log in logs:
            ref = reference_progress_m(log, bool(reactive)) if callable(reference_progress_m) else reference_progress_m
            drv = as_planner(planner)
            end = None if max_frames is None else min(log.num_frames - 1, spec.past_steps + int(max_frames))
            tic = time.perf_counter()
            rollout = sim.run(log, drv, end_frame=end)
            wall = time.perf_counter() - tic
            scores = score_rollout(rollout, log, reference_progress_m=ref)
            metrics: dict[str, Any] = {k: float(v) for k, v in scores.items()}
            metrics["reference_progress_m"] = float(ref) if ref is not None else None
            metrics["sim_s"] = float(rollout.times[-1] - rollout.times[0])
            metrics["plan_ms_p50"] = float(np.median(rollout.plan_ms)) if rollout.plan_ms else 0.0
            metrics["wall_s"] = wall
            episodes.append(Episode(log.scene_name, log.scene_token, bool(reactive), rollout, metrics))
    return episodes
