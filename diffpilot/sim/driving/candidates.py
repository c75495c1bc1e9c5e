"""A bank of scored candidate plans per keyframe, the training data of a plan-selection score head.

A planner that samples several plans and keeps the best needs a head that
predicts each plan's PDM sub-scores. That head has to see good and bad
plans of the same scene to learn what separates them, and the candidates
must not come from the planner being trained (its samples would change as
it learns). :func:`candidate_trajectories` therefore builds model-free
candidates: the logged future, plus unicycle rollouts from the current
speed and yaw rate (constant velocity, braking to a stop, speed changes,
curvature changes, lane changes, swerves, small lateral offsets) whose
parameters use nothing but the state at that keyframe.
:func:`scored_candidates` scores every candidate of every row with the
one-shot NAVSIM-style scorer (:func:`diffpilot.sim.driving.scoring.score_trajectory`)
and caches the bank in one HDF5 file, since scoring costs tens of
milliseconds per candidate.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import DT, ScenarioLog, to_ego_frame, to_global_frame
from diffpilot.planning.dynamics import DEFAULT_LIMITS, controls_from_poses, rollout_numpy

__all__ = ["FAMILIES", "SUBSCORES", "candidate_trajectories", "score_candidates", "scored_candidates"]

SUBSCORES = ("nc", "dac", "ttc", "ep", "comfort", "pdms")
"""The scores of each candidate, in the order of the last axis of ``scores``."""

FAMILIES = ("logged", "constant_velocity", "stop", "speed", "curve", "lane_change", "swerve", "offset")
"""Candidate kinds in the order they fill a row: candidate ``k`` is ``FAMILIES[k]`` for ``k < 8``; later
candidates cycle through the randomized kinds (``stop`` … ``offset``) again with fresh parameters."""

CACHE_FORMAT = 2
"""Bumped whenever the candidates or their scoring change, so older banks rebuild."""

_RANDOM_FAMILIES = FAMILIES[2:]
_ROW_FIELDS = ("scene_token", "frame", "ego_future", "ego_future_valid", "ego_status")


# --------------------------------------------------------------------------- candidates


def _valid_prefix(valid: np.ndarray) -> int:
    """Number of leading valid steps (a logged future is valid up to where the log ends)."""
    bad = np.flatnonzero(~np.asarray(valid, dtype=bool))
    return int(bad[0]) if len(bad) else len(valid)


def _logged(future: np.ndarray, valid: np.ndarray, v0: float, yaw_rate: float) -> np.ndarray:
    """The logged future; past its valid prefix, continued at the last logged speed and yaw rate."""
    F = len(future)
    k = _valid_prefix(valid)
    if k == F:
        return np.asarray(future, dtype=np.float64).copy()
    if k == 0:
        return rollout_numpy(np.tile([yaw_rate, 0.0], (F, 1)), v0)[:, :3]
    prefix = np.asarray(future[:k], dtype=np.float64)
    omega, accel = controls_from_poses(prefix[None], np.array([v0]))[0].T
    v = max(v0 + float(np.sum(accel)) * DT, 0.0)
    rest = rollout_numpy(np.tile([float(omega[-1]), 0.0], (F - k, 1)), v)[:, :3]
    return np.concatenate([prefix, to_global_frame(rest, prefix[-1])])


def _pulse(F: int, start: float, duration: float, area: float) -> np.ndarray:
    """(F,) yaw rate of one full sine period from ``start`` lasting ``duration`` s whose first half turns by
    ``area`` rad: the heading goes out and comes back, so the path ends parallel but shifted sideways."""
    t = DT * np.arange(F)
    phase = (t - start) / duration
    inside = (phase >= 0.0) & (phase < 1.0)
    return np.where(inside, area * np.pi / duration * np.sin(2.0 * np.pi * phase), 0.0)


def _shift_yaw_rate(v: float, shift_m: float, duration: float) -> float:
    """Heading excursion (rad) of a sine yaw-rate period of ``duration`` s that shifts the path ``shift_m``
    sideways at speed ``v`` (lateral ≈ v·∫heading dt = v·area·duration/2)."""
    return float(np.clip(2.0 * shift_m / (max(v, 1.0) * duration), -0.6, 0.6))


def _variation(family: str, F: int, v0: float, yaw_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Controls (F, 2) = (yaw rate, acceleration) of one randomized candidate of ``family``."""
    omega = np.full(F, yaw_rate)
    accel = np.zeros(F)
    sign = float(rng.choice([-1.0, 1.0]))
    if family == "constant_velocity":
        omega[:] = 0.0
    elif family == "stop":
        # Brake to a standstill in 1-5 s (harder than comfortable at the short end).
        accel[:] = -max(v0 / rng.uniform(1.0, 5.0), 0.5)
        omega *= rng.uniform(0.0, 1.0)
    elif family == "speed":
        # Keep the current curvature while speeding up or slowing down, gently or hard.
        accel[:] = rng.choice([rng.uniform(-3.5, -0.5), rng.uniform(0.3, 2.4)])
        if v0 < 1.0:
            accel[:] = abs(accel[0])
    elif family == "curve":
        # A constant yaw-rate change of one of several magnitudes (from nudges to sharp turns).
        omega += sign * rng.choice([0.03, 0.07, 0.15, 0.3, 0.5]) * rng.uniform(0.8, 1.2)
        accel[:] = rng.uniform(-1.0, 0.8) if v0 >= 1.0 else rng.uniform(0.5, 2.0)  # from a standstill: move off
    elif family in ("lane_change", "swerve", "offset"):
        duration = float(rng.choice([2.0, 2.5, 3.0, 4.0]))
        start = float(rng.choice([0.0, 0.5, 1.0]))
        shift = {"lane_change": rng.uniform(2.8, 4.0), "swerve": rng.uniform(1.0, 2.5),
                 "offset": rng.uniform(0.4, 1.4)}[family]
        area = sign * _shift_yaw_rate(v0, shift, duration)
        omega += _pulse(F, start, duration, area)
        if family == "swerve":  # out and straight back: the mirrored pulse right after
            omega -= _pulse(F, start + duration, duration, area)
        accel[:] = rng.uniform(-0.8, 0.6) if v0 >= 1.0 else rng.uniform(0.5, 2.0)
    else:
        raise ValueError(f"unknown candidate family {family!r}; known: {FAMILIES}")
    return np.stack([omega, accel], axis=1)


def _row_candidates(future: np.ndarray, valid: np.ndarray, status: np.ndarray, num: int,
                    rng: np.random.Generator) -> np.ndarray:
    F = len(future)
    v0 = max(float(status[0]), 0.0)
    yaw_rate = float(np.clip(status[2], -DEFAULT_LIMITS.omega_max, DEFAULT_LIMITS.omega_max))
    out = np.zeros((num, F, 3))
    out[0] = _logged(future, valid, v0, yaw_rate)
    for k in range(1, num):
        family = FAMILIES[k] if k < len(FAMILIES) else _RANDOM_FAMILIES[(k - len(FAMILIES)) % len(_RANDOM_FAMILIES)]
        out[k] = rollout_numpy(_variation(family, F, v0, yaw_rate, rng), v0)[:, :3]
    return out


def candidate_trajectories(arrays_row_or_arrays: Mapping[str, np.ndarray], num: int,
                           rng: np.random.Generator) -> np.ndarray:
    """Ego-frame candidate plans ``(num, F, 3)`` for one sample, or ``(W, num, F, 3)`` for stacked samples.

    Reads ``ego_future``, ``ego_future_valid`` and ``ego_status`` (speed,
    acceleration, yaw rate). Candidate 0 is the logged future (continued at
    its last speed and yaw rate where the log ends early); the others are
    unicycle rollouts from the current speed whose kinds follow
    :data:`FAMILIES` and whose magnitudes are drawn from ``rng``. Nothing
    but the current state sets them, so they do not leak the future.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    missing = [k for k in ("ego_future", "ego_future_valid", "ego_status") if k not in arrays_row_or_arrays]
    if missing:
        raise DatasetError(f"samples lack the field(s) {missing}; pass SceneSample arrays (stack_samples)")
    future = np.asarray(arrays_row_or_arrays["ego_future"], dtype=np.float64)
    valid = np.asarray(arrays_row_or_arrays["ego_future_valid"], dtype=bool)
    status = np.asarray(arrays_row_or_arrays["ego_status"], dtype=np.float64)
    if future.ndim == 2:
        return _row_candidates(future, valid, status, num, rng)
    if future.ndim != 3 or future.shape[-1] != 3:
        raise DatasetError(f"ego_future must be (F, 3) or (W, F, 3), got {future.shape}")
    return np.stack([_row_candidates(future[i], valid[i], status[i], num, rng) for i in range(len(future))])


def _row_rng(seed: int, scene_token: str, frame: int) -> np.random.Generator:
    """A generator per (seed, scene, frame): a row's candidates do not depend on which rows come with it."""
    digest = hashlib.sha1(f"{scene_token}\0{int(frame)}".encode()).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


# --------------------------------------------------------------------------- scoring


def score_candidates(log: ScenarioLog, frame: int, candidates: np.ndarray) -> np.ndarray:
    """(C, 6) :data:`SUBSCORES` of ego-frame plans (C, H, 3) at ``frame`` of ``log``.

    The same numbers as :func:`~diffpilot.sim.driving.scoring.score_trajectory`
    on each plan, but the logged-future reference that EP compares with is
    tracked once for all candidates instead of once per candidate.
    """
    from diffpilot.sim.driving.agents import replay_agents
    from diffpilot.sim.driving.scoring import _score_states, _track_plan
    from diffpilot.sim.driving.vehicle import CONTROL_DT, KinematicBicycle

    candidates = np.asarray(candidates, dtype=np.float64)
    if candidates.ndim != 3 or candidates.shape[-1] != 3:
        raise ValueError(f"candidates must be (C, H, 3), got {candidates.shape}")
    if not 0 <= frame < log.num_frames - 1:
        raise DatasetError(f"frame {frame} of scene {log.scene_name!r} has no logged future (0..{log.num_frames - 2})")
    model = KinematicBicycle(dt=CONTROL_DT)
    H = candidates.shape[1]
    origin = np.asarray(log.ego_pose[frame], dtype=np.float64)
    reference = to_ego_frame(np.asarray(log.ego_pose[frame + 1 : frame + 1 + H], dtype=np.float64), origin)

    def states_scores(plan: np.ndarray, ref_progress: float | None) -> dict[str, float]:
        states, times = _track_plan(log, frame, plan, model)
        agents, valid = replay_agents(log, times)
        return _score_states(states, model.dt, log.ego_size, agents, valid, log.agents_size, log.agents_category,
                             log, ref_progress)

    ref = states_scores(reference, None)
    ref_progress = max(ref["progress_m"], 0.0) * ref["nc"] * ref["dac"]
    out = np.zeros((len(candidates), len(SUBSCORES)))
    for c, plan in enumerate(candidates):
        s = states_scores(plan, ref_progress)
        out[c] = [s[k] for k in SUBSCORES]
    return out


def _score_scene(log: ScenarioLog, frames: list[int], candidates: np.ndarray) -> np.ndarray:
    """(R, C, 6) scores of the candidates (R, C, H, 3) of the rows of one scene."""
    return np.stack([score_candidates(log, f, c) for f, c in zip(frames, candidates)])


@functools.lru_cache(maxsize=1)
def _remote_score_scene() -> Any:
    import ray

    return ray.remote(num_cpus=1)(_score_scene)


def _score_all(logs: dict[str, ScenarioLog], rows_by_scene: dict[str, list[int]], frames: np.ndarray,
               candidates: np.ndarray, workers: int, progress: bool) -> np.ndarray:
    """Scores (W, C, 6) of every row, one task per scene, in-process or on Ray (see ``ray_session``)."""
    from tqdm.auto import tqdm

    from diffpilot.sim.driving.evaluate import ray_session

    W, C = candidates.shape[:2]
    scores = np.zeros((W, C, len(SUBSCORES)))
    bar = tqdm(total=W * C, desc="scoring candidates", unit="plan", disable=not progress)
    try:
        with ray_session(workers) as use_ray:
            if not use_ray:
                for token, rows in rows_by_scene.items():
                    for r in rows:  # row by row, so the bar moves smoothly
                        scores[r] = score_candidates(logs[token], int(frames[r]), candidates[r])
                        bar.update(C)
                return scores
            import ray

            remote = _remote_score_scene()
            pending = {remote.remote(ray.put(logs[token]), [int(frames[r]) for r in rows], candidates[rows]): token
                       for token, rows in rows_by_scene.items()}
            waiting = list(pending)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for obj in done:
                    rows = rows_by_scene[pending[obj]]
                    scores[rows] = ray.get(obj)
                    bar.update(len(rows) * C)
            return scores
    finally:
        bar.close()


# --------------------------------------------------------------------------- rows -> logs


def _check_rows(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    missing = [k for k in _ROW_FIELDS if k not in arrays]
    if missing:
        raise DatasetError(f"samples lack the field(s) {missing}; pass SceneSample arrays (load_scene_samples)")
    tokens = np.asarray(arrays["scene_token"]).astype(str)
    frames = np.asarray(arrays["frame"], dtype=np.int64)
    W = len(tokens)
    if W == 0:
        raise DatasetError("no samples to build candidates for")
    for k in _ROW_FIELDS[1:]:
        if len(arrays[k]) != W:
            raise DatasetError(f"samples have {W} scene tokens but {len(arrays[k])} rows of {k!r}")
    return tokens, frames


def _logs_for_rows(reader: Any, split: str, tokens: np.ndarray, frames: np.ndarray,
                   arrays: Mapping[str, np.ndarray]) -> dict[str, ScenarioLog]:
    """The split's logs of the rows' scenes; a clear error for rows from elsewhere or off the log."""
    known = {rec["token"]: rec["name"] for rec in reader.nusc.scene}
    in_split = set(reader.scene_names(split))
    by_token = {t: n for t, n in known.items() if n in in_split}
    foreign = [i for i, t in enumerate(tokens) if t not in by_token]
    if foreign:
        shown = ", ".join(
            f"row {i} (scene_token {tokens[i]!r}, "
            f"{f'scene {known[tokens[i]]!r}' if tokens[i] in known else 'in no scene of this data set'}, "
            f"frame {int(frames[i])})" for i in foreign[:5])
        raise DatasetError(f"{len(foreign)} sample row(s) are not from a scene of split {split!r} of "
                           f"{reader.root / reader.version}: {shown}; pass samples of that split "
                           f"(load_scene_samples with the same root, version and split)")
    logs = {t: reader.scenario_log(by_token[t]) for t in dict.fromkeys(tokens)}
    poses = arrays.get("ego_pose_global")
    for i, (t, f) in enumerate(zip(tokens, frames)):
        log = logs[t]
        if not 0 <= f < log.num_frames - 1:
            raise DatasetError(f"row {i}: frame {int(f)} of scene {log.scene_name!r} has no logged future "
                               f"(frames 0..{log.num_frames - 2})")
        if poses is not None and not np.allclose(np.asarray(poses[i], dtype=np.float64)[:2], log.ego_pose[f, :2], atol=1e-3):
            raise DatasetError(f"row {i}: its ego pose is not scene {log.scene_name!r}'s at frame {int(f)}; "
                               "the samples were built from other data than this root/version")
    return logs


# --------------------------------------------------------------------------- cache


def _rows_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """Hash of everything in the rows that the candidates and their scores depend on."""
    h = hashlib.sha1()
    h.update("\n".join(np.asarray(arrays["scene_token"]).astype(str)).encode())
    for k, dtype in (("frame", np.int64), ("ego_future", np.float64), ("ego_future_valid", np.bool_),
                     ("ego_status", np.float64), ("ego_pose_global", np.float64)):
        if k in arrays:
            a = np.ascontiguousarray(np.asarray(arrays[k], dtype=dtype))
            h.update(k.encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def _cache_path(root: Path, version: str, split: str, rows: str, num: int, seed: int, cache_dir: Path) -> Path:
    key = json.dumps({"format": CACHE_FORMAT, "root": str(root.resolve()), "version": version, "split": split,
                      "rows": rows, "num": int(num), "seed": int(seed)}, sort_keys=True)
    return cache_dir / "candidates" / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.h5"


def _read_bank(path: Path, fingerprint: str, shape: tuple[int, ...]) -> dict[str, np.ndarray] | None:
    """The cached bank, or None when absent, built from other files, or of the wrong shape."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("source_files") != fingerprint or tuple(h5["candidates"].shape) != shape:
                return None
            return {"candidates": h5["candidates"][()], "scores": h5["scores"][()]}
    except (OSError, KeyError):
        return None


def _write_bank(path: Path, bank: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    from diffpilot.fileio import atomic_path

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("candidates", data=bank["candidates"], compression="gzip")
            h5.create_dataset("scores", data=bank["scores"], compression="gzip")
            for k, v in meta.items():
                h5.attrs[k] = v


def scored_candidates(
    root: str | Path,
    version: str,
    split: str,
    arrays: Mapping[str, np.ndarray],
    num_candidates: int = 8,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> dict[str, np.ndarray]:
    """Candidate plans of every sample row and their PDM sub-scores, for training a plan-selection head.

    Returns ``candidates`` (W, C, F, 3) float32 ego-frame plans
    (:func:`candidate_trajectories`) and ``scores`` (W, C, 6) float32 in
    :data:`SUBSCORES` order, row ``i`` for row ``i`` of ``arrays`` (matched
    to the logs of ``split`` by ``scene_token`` and ``frame``). Each plan is
    scored as :func:`~diffpilot.sim.driving.scoring.score_trajectory` does,
    EP against the logged future. Use training scenes only, or the head
    learns the evaluation scenes.

    The bank is deterministic given ``seed`` and the same for any
    ``workers`` (``> 1`` scores scenes as Ray tasks). It is cached in one
    HDF5 file per (root, version, split, rows, num_candidates, seed) under
    ``<cache_dir>/candidates/`` and rebuilt when the data set's files change.
    """
    from diffpilot.data.nuscenes import NuScenesReader, _check_root, _fingerprint

    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(root).expanduser()
    _check_root(root, version)
    tokens, frames = _check_rows(arrays)
    F = int(np.shape(arrays["ego_future"])[1])
    if cache_dir is None:
        from diffpilot.fileio import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    path = _cache_path(root, version, split, _rows_digest(arrays), num_candidates, seed, Path(cache_dir))
    fingerprint = json.dumps(_fingerprint(root, version))
    cached = _read_bank(path, fingerprint, (len(tokens), num_candidates, F, 3))
    if cached is not None:
        return cached

    reader = NuScenesReader(root, version)
    logs = _logs_for_rows(reader, split, tokens, frames, arrays)
    # Scored as stored (float32), so re-scoring a stored plan gives its stored scores.
    candidates = np.stack([
        _row_candidates(np.asarray(arrays["ego_future"][i], dtype=np.float64), np.asarray(arrays["ego_future_valid"][i], dtype=bool),
                        np.asarray(arrays["ego_status"][i], dtype=np.float64), num_candidates, _row_rng(seed, tokens[i], frames[i]))
        for i in range(len(tokens))
    ]).astype(np.float32)
    rows_by_scene: dict[str, list[int]] = {}
    for i, t in enumerate(tokens):
        rows_by_scene.setdefault(t, []).append(i)
    start = time.perf_counter()
    scores = _score_all(logs, rows_by_scene, frames, candidates, workers, progress)
    wall = time.perf_counter() - start
    bank = {"candidates": candidates, "scores": scores.astype(np.float32)}
    _write_bank(path, bank, {
        "root": str(root.resolve()), "version": version, "split": split, "num_candidates": int(num_candidates),
        "seed": int(seed), "subscores": json.dumps(SUBSCORES), "families": json.dumps(FAMILIES),
        "source_files": fingerprint, "scoring_wall_s": wall, "workers": int(workers),
    })
    return bank
