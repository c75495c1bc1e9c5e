"""Score driving planners on a nuScenes-format split: closed loop, open loop and NAVSIM-style one-shot.

* :func:`evaluate_planner` drives a planner closed loop through every scene
  of a split (agents replaying the log, or reactive) and scores each drive
  with the PDM score (:func:`diffpilot.sim.driving.runner.run_episodes`). Scenes are independent, so they run in-process or as
  Ray tasks (local or on a cluster) with identical results.
* :func:`open_loop` compares plans with the logged future (L2 and collision
  rate at 1/2/3 s) on every keyframe of the split.
* :func:`navsim_scores` scores one 4-s plan per sampled keyframe the way
  NAVSIM does (plan once, track it, agents replay the log).

EP needs a reference planner's progress. NAVSIM uses PDM-Closed; its closest
counterpart here is the lane-follower baseline (centerline + IDM), so by
default EP is measured against the lane follower's *closed-loop* progress on
the same scene in the same mode (non-reactive or reactive). That progress is
computed once per scene and mode and kept in ``reference_cache`` for the rest
of the run. As in NAVSIM, the reference's progress counts only where it has
no at-fault collision and stays on the drivable area; where it fails, EP is
1 for any planner that moves. ``reference=None`` uses the logged human drive.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diffpilot.data.errors import DatasetError
from diffpilot.parallel import ordered_map, ray_session
from diffpilot.data.scenario import Planner, SampleSpec, ScenarioLog

__all__ = [
    "METRICS",
    "TIMING_KEYS",
    "evaluate_planner",
    "navsim_scores",
    "open_loop",
    "planner_factory",
    "ray_session",
    "reference_progress",
    "summarize_rows",
]

PlannerFactory = Callable[[], Planner]

METRICS = ("pdms", "nc", "dac", "ttc", "ep", "comfort", "progress_m", "out_of_lane_rate", "collision")
"""Per-scene closed-loop metrics (PDM sub-scores and extras) in every row."""
TIMING_KEYS = ("plan_ms_p50", "sim_s_per_wall_s", "wall_s")
"""Row keys that measure this machine's speed; everything else in a row is deterministic."""
HORIZONS_S = (1.0, 2.0, 3.0)


def planner_factory(name: str, **kwargs: Any) -> PlannerFactory:
    """A picklable factory for a planner: a baseline by name (``ego_mlp`` takes ``checkpoint=DIR``), or any
    saved policy folder whose registered kind plans (``diffpilot train policy=<kind> data=driving`` writes one).

    Ray ships the factory, not the planner, so each task builds its own.
    """
    from diffpilot.policy.driving_baselines import PLANNERS, build_planner
    from diffpilot.policy.registry import POLICIES, load_policy, stored_kind

    if name in PLANNERS:
        return functools.partial(build_planner, name, **kwargs)
    if Path(name).expanduser().is_dir():
        kind = stored_kind(Path(name).expanduser())
        if kind not in POLICIES or not hasattr(POLICIES[kind], "plan"):
            raise ValueError(f"planner folder {name} holds a {kind!r}, which does not plan drives; pass a driving "
                             f"policy folder (e.g. <out>/policy of `diffpilot train policy=stl_flow_planner data=driving`)")
        return functools.partial(load_policy, str(Path(name).expanduser()))
    if name in POLICIES and hasattr(POLICIES[name], "plan"):
        raise ValueError(f"planner {name!r} is a learned kind: train it (`diffpilot train policy={name} data=driving "
                         f"out=runs/{name}`) and pass its folder, e.g. planners=[runs/{name}/policy]")
    learned = sorted(k for k, c in POLICIES.items() if hasattr(c, "plan"))
    raise ValueError(f"unknown planner {name!r}; known planners: {', '.join(sorted(PLANNERS))}, or a saved folder of "
                     f"a driving kind ({', '.join(learned)})")


_baseline = planner_factory  # the module-level factory, where a parameter of the same name shadows it


def _build(factory: PlannerFactory) -> Planner:
    planner = factory()
    if not hasattr(planner, "plan") or not hasattr(planner, "reset"):
        raise TypeError(f"the planner factory returned {type(planner).__name__}, which is not a Planner (needs reset() and plan())")
    return planner


# --------------------------------------------------------------------------- closed loop, one scene


def reference_progress(log: ScenarioLog, reactive: bool, reference: str = "lane_follower", spec: SampleSpec = SampleSpec()) -> float:
    """Closed-loop route progress (m) of the ``reference`` baseline on ``log`` (EP's denominator).

    Like NAVSIM's use of PDM-Closed, the reference's own progress counts only
    when it drives without an at-fault collision and on the drivable area.
    """
    from diffpilot.sim.driving.runner import run_episodes

    [ep] = run_episodes(_build(_baseline(reference)), [log], [reactive], spec=spec, reference_progress_m=0.0)
    s = ep.metrics
    return max(s["progress_m"], 0.0) * s["nc"] * s["dac"]


def _scene_row(
    factory: PlannerFactory,
    log: ScenarioLog,
    reactive: bool,
    reference: str | None,
    ref_progress: float | None,
    spec: SampleSpec,
) -> tuple[dict[str, Any], float | None]:
    """One scene's row, and the reference progress used (computed here when not given)."""
    from diffpilot.sim.driving.runner import run_episodes

    if reference is not None and ref_progress is None:
        ref_progress = reference_progress(log, reactive, reference, spec)
    [ep] = run_episodes(_build(factory), [log], [reactive], spec=spec, reference_progress_m=ref_progress)
    m = ep.metrics
    row: dict[str, Any] = {"scene": log.scene_name}
    row.update({k: m[k] for k in (*METRICS, "at_fault_collision", "reference_progress_m", "sim_s", "plan_ms_p50", "wall_s")})
    row["sim_s_per_wall_s"] = m["sim_s"] / max(m["wall_s"], 1e-9)
    return row, ref_progress


# --------------------------------------------------------------------------- Ray (sessions: diffpilot.parallel)


def _scene_row_item(factory: PlannerFactory, reactive: bool, reference: str | None, spec: SampleSpec,
                    item: tuple[ScenarioLog, float | None]) -> tuple[dict[str, Any], float | None]:
    """:func:`_scene_row` for one ``(log, known reference progress)`` item of :func:`ordered_map`."""
    log, ref = item
    return _scene_row(factory, log, reactive, reference, ref, spec)


def _reader(root: str | Path, version: str) -> Any:
    from diffpilot.data.nuscenes import NuScenesReader

    return NuScenesReader(root, version)


def _select_scenes(reader: Any, split: str, scenes: list[str] | None) -> list[str]:
    names = reader.scene_names(split)
    if scenes is None:
        return sorted(names)
    unknown = [s for s in scenes if s not in names]
    if unknown:
        raise DatasetError(f"scene(s) {unknown[:5]} are not in split {split!r} of {reader.root / reader.version}; "
                           f"pick from {names[:5]}...")
    return sorted(dict.fromkeys(scenes))


def evaluate_planner(
    planner_factory: PlannerFactory,
    root: str | Path,
    version: str,
    split: str,
    *,
    reactive: bool,
    scenes: list[str] | None = None,
    reference: str | None = "lane_follower",
    workers: int = 1,
    ray_address: str | None = None,
    progress: bool = True,
    spec: SampleSpec = SampleSpec(),
    reference_cache: dict[tuple[str, bool, str], float] | None = None,
    logs: list[ScenarioLog] | None = None,
) -> list[dict[str, Any]]:
    """Closed-loop PDM score of the planner built by ``planner_factory`` on each scene of ``split``.

    Returns one row per scene, sorted by scene name: ``scene``, ``pdms``,
    ``nc``, ``dac``, ``ttc``, ``ep``, ``comfort``, ``progress_m``,
    ``out_of_lane_rate``, ``collision``, ``plan_ms_p50``, ``sim_s_per_wall_s``
    (plus ``at_fault_collision``, ``reference_progress_m``, ``sim_s``,
    ``wall_s``). EP is relative to the ``reference`` baseline's closed-loop
    progress on the same scene and mode (the lane follower, our stand-in for
    NAVSIM's PDM-Closed), computed once per scene and mode and stored in
    ``reference_cache`` (pass the same dict to later calls of one run to
    reuse it); ``reference=None`` uses the logged human drive.

    ``workers > 1`` or ``ray_address`` runs the scenes as Ray tasks (see
    :func:`ray_session`); the rows are the same as in-process except for
    the :data:`TIMING_KEYS`. ``planner_factory`` must be picklable for Ray
    (e.g. :func:`planner_factory`). ``logs`` (already read ScenarioLogs of
    these scenes) skips reading the data set again.
    """
    if not callable(planner_factory):
        raise TypeError("planner_factory must be a callable returning a Planner, e.g. planner_factory('lane_follower')")
    if logs is None:
        reader = _reader(root, version)
        names = _select_scenes(reader, split, scenes)
        logs = [reader.scenario_log(n) for n in names]
    else:
        wanted = set(scenes) if scenes is not None else None
        logs = sorted((lg for lg in logs if wanted is None or lg.scene_name in wanted), key=lambda lg: lg.scene_name)
    if not logs:
        raise DatasetError(f"no scenes to evaluate in split {split!r} of {Path(root) / version}")
    cache = reference_cache if reference_cache is not None else {}
    known = [cache.get((lg.scene_token, bool(reactive), reference)) if reference is not None else None for lg in logs]
    mode = "reactive" if reactive else "non-reactive"
    out = ordered_map(functools.partial(_scene_row_item, planner_factory, bool(reactive), reference, spec),
                      list(zip(logs, known)), workers=workers, ray_address=ray_address, progress=progress,
                      desc=f"closed loop ({mode})", unit="scene")
    rows = []
    for log, (row, ref) in zip(logs, out):
        if reference is not None and ref is not None:
            cache[(log.scene_token, bool(reactive), reference)] = ref
        rows.append(row)
    return sorted(rows, key=lambda r: r["scene"])


# --------------------------------------------------------------------------- open loop


def _plans_for_arrays(planner: Planner, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Every sample's plan (one batched call for planners with ``plan_batch``)."""
    from diffpilot.data.scene_sample import scene_samples_from_arrays

    if hasattr(planner, "plan_batch"):  # planners that see each sample alone can plan the whole batch at once
        return np.asarray(planner.plan_batch(arrays), dtype=np.float64)
    plans = []
    scene = None
    for i in range(len(arrays["token"])):
        if arrays["scene_token"][i] != scene:
            scene = arrays["scene_token"][i]
            planner.reset()
        plans.append(np.asarray(planner.plan(scene_samples_from_arrays(arrays, i)), dtype=np.float64))
    return np.stack(plans)


def open_loop(
    planner_factory: PlannerFactory,
    root: str | Path,
    version: str,
    split: str,
    spec: SampleSpec = SampleSpec(),
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    arrays: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """nuScenes open-loop metrics over every keyframe of ``split``: ``l2_{1,2,3}s`` and ``collision_{1,2,3}s``.

    Values are at the horizon (UniAD's convention), averaged over samples;
    collisions are against the logged agents. ``arrays`` (from
    :func:`diffpilot.data.nuscenes.load_scene_samples`) skips loading them.
    Open-loop L2 rewards imitation of the log, so always read it beside the
    closed-loop scores.
    """
    from diffpilot.sim.driving.openloop import collision_at, l2_at

    if arrays is None:
        from diffpilot.data.nuscenes import load_scene_samples

        arrays = load_scene_samples(root, version, split, spec, cache_dir=cache_dir, progress=progress)
    planner = _build(planner_factory)
    planner.reset()
    plans = _plans_for_arrays(planner, arrays)
    fut = np.asarray(arrays["ego_future"])
    if plans.ndim != 3 or plans.shape[0] != len(fut) or plans.shape[2] != 3 or plans.shape[1] < fut.shape[1]:
        raise ValueError(f"plans have shape {plans.shape}; need (B={len(fut)}, H>={fut.shape[1]}, 3) to compare with the logged future")
    plans = plans[:, : fut.shape[1]]
    past_steps = int(np.shape(arrays["ego_past"])[1]) - 1
    out = l2_at(plans, fut, arrays["ego_future_valid"], HORIZONS_S)
    out.update(collision_at(plans, arrays["agents_pose"], arrays["agents_valid"], arrays["agents_size"], past_steps, HORIZONS_S))
    out["num_samples"] = int(len(fut))
    return out


# --------------------------------------------------------------------------- NAVSIM-style one-shot


def _frames(num_frames: int, spec: SampleSpec, count: int) -> list[int]:
    """``count`` keyframes spread over the scene with full history and, where possible, a full logged future."""
    lo, hi = spec.past_steps, num_frames - 1 - spec.future_steps
    if hi < lo:
        lo, hi = min(spec.past_steps, num_frames - 2), num_frames - 2
    if hi < lo or hi < 0:
        return []
    return sorted({int(round(f)) for f in np.linspace(lo, hi, max(count, 1))})


def navsim_scores(
    planner_factory: PlannerFactory,
    root: str | Path,
    version: str,
    split: str,
    frames_per_scene: int = 4,
    *,
    reference: str | None = "lane_follower",
    scenes: list[str] | None = None,
    spec: SampleSpec = SampleSpec(),
    progress: bool = True,
    logs: list[ScenarioLog] | None = None,
) -> list[dict[str, Any]]:
    """NAVSIM-style PDMS of one-shot plans: one row per (scene, keyframe), sorted.

    At ``frames_per_scene`` keyframes per scene the planner plans once from
    the logged state; the 4-s plan is tracked (LQR, bicycle, 10 Hz) while
    agents replay the log (:func:`diffpilot.sim.driving.scoring.score_trajectory`).
    EP is relative to the ``reference`` baseline's plan at the same keyframe
    scored the same way (NAVSIM: PDM-Closed); ``None`` uses the logged future.
    """
    from tqdm.auto import tqdm

    from diffpilot.data.scene_sample import build_scene_sample
    from diffpilot.sim.driving.scoring import score_trajectory

    if frames_per_scene < 1:
        raise ValueError(f"frames_per_scene must be >= 1, got {frames_per_scene}")
    if logs is None:
        reader = _reader(root, version)
        logs = [reader.scenario_log(n) for n in _select_scenes(reader, split, scenes)]
    logs = sorted(logs, key=lambda lg: lg.scene_name)
    planner = _build(planner_factory)
    ref_planner = _build(_baseline(reference)) if reference is not None else None
    rows = []
    for log in tqdm(logs, desc="one-shot plans", unit="scene", disable=not progress):
        planner.reset()
        if ref_planner is not None:
            ref_planner.reset()
        for frame in _frames(log.num_frames, spec, frames_per_scene):
            sample = build_scene_sample(log, frame, spec)
            plan = np.asarray(planner.plan(sample), dtype=np.float64)
            ref_plan = np.asarray(ref_planner.plan(sample), dtype=np.float64) if ref_planner is not None else None
            s = score_trajectory(log, frame, plan, ref_plan)
            rows.append({"scene": log.scene_name, "frame": int(frame), **{k: float(s[k]) for k in METRICS}})
    return sorted(rows, key=lambda r: (r["scene"], r["frame"]))


# --------------------------------------------------------------------------- summaries


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every numeric column over the rows (PDMS = mean of the per-scene scores), plus ``num_scenes``.

    ``sim_s_per_wall_s`` is the total simulated time over the total wall
    time when the rows carry ``sim_s`` and ``wall_s``.
    """
    if not rows:
        raise ValueError("no rows to summarize: the evaluation produced no scenes")
    out: dict[str, Any] = {}
    keys = dict.fromkeys(k for r in rows for k in r)
    for k in keys:
        if k in ("scene", "frame"):
            continue
        vals = [r.get(k) for r in rows]
        nums = [float(v) for v in vals if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)]
        if nums:
            out[k] = float(np.mean(nums))
    if all("sim_s" in r and "wall_s" in r for r in rows):
        wall = sum(float(r["wall_s"]) for r in rows)
        out["sim_s_per_wall_s"] = sum(float(r["sim_s"]) for r in rows) / max(wall, 1e-9)
    out["num_scenes"] = len({r["scene"] for r in rows if "scene" in r}) or len(rows)
    return out
