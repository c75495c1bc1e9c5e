"""The augmentation job: rule-satisfying trajectories for every logged window, written as HDF5 shards.

For each window with a complete logged future: calibrate the rules on the
logged future (:func:`diffpilot.stl.calibrate`, plus margins), draw
``samples_per_window`` perturbed parameter sets per mode around those
values, optimize one trajectory per (mode, parameter set) — batched
gradient ascent on smooth robustness (:mod:`~diffpilot.planning.gradient`)
or sequential QPs (:mod:`~diffpilot.planning.convex`) — and keep those whose
*exact* robustness is positive for every active rule.

Windows are cut into shards of ``shard_size``; each shard is one HDF5 file
written atomically (``shard_00000.h5``), seeded by (seed, shard index), so a
shard's content does not depend on which process computed it or in what
order: ``workers > 1`` (Ray) writes the same files as ``workers = 1``. A
rerun with ``resume=True`` skips shards that are already complete with the
same configuration (a different configuration in the same folder is refused).

Choices: the horizon defaults to the samples' future length (8 steps = 4 s,
what the driving policies predict), not the paper's 20, because the
calibration reads the logged future and the trained policies consume the
same length; pass ``horizon`` to change it. Lane-change modes drop
``lane_keeping`` for ``lane_change`` and get a heading bound of at least
:data:`LANE_CHANGE_THETA_MIN`, since a calibrated straight-driving heading
bound forbids any lane change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from diffpilot.data.errors import DatasetError
from diffpilot.fileio import atomic_path, atomic_write_text, hdf5_shard_done
from diffpilot.planning.gradient import MODES, _check_modes, active_rules, optimize_controls, rule_union
from diffpilot.stl.calibration import calibrate
from diffpilot.stl.rules import RuleSet
from diffpilot.stl.signals import SCENE_KEYS, scene_from_arrays

__all__ = [
    "DEFAULT_MARGINS",
    "DEFAULT_NOISE",
    "DEFAULT_RULES",
    "augment",
    "read_augmented",
    "run_shard",
    "sample_params",
]

FORMAT_VERSION = 1
DEFAULT_RULES = ("speed_limit", "lane_keeping", "heading", "safe_distance", "comfort")
"""Rules checked on every augmented trajectory (``lane_change`` joins for lane-change modes)."""
DEFAULT_MARGINS = {"vmin": 1.0, "vmax": 1.0, "dmin": 0.3, "dmax": 0.3, "theta_max": 0.05, "dsafe": 0.3,
                   "amax": 0.5, "jmax": 1.0}
"""Calibration margins (parameter units) added in each parameter's loosening direction."""
DEFAULT_NOISE = {"vmin": 0.5, "vmax": 0.5, "dmin": 0.15, "dmax": 0.15, "theta_max": 0.02, "dsafe": 0.2,
                 "amax": 0.2, "jmax": 0.3, "w_target": 0.1}
"""Standard deviation of the Gaussian perturbation of each parameter around its calibrated value."""
LANE_CHANGE_THETA_MIN = 0.3
W_TARGET_BASE = 0.5
_NEEDED = ("lanes", "lanes_valid", "agents_pose", "agents_valid", "agents_size", "ego_status", "ego_past",
           "command", "ego_future", "ego_future_valid", "token")
_MAP_FIELDS = tuple(k for k in SCENE_KEYS if k not in _NEEDED)
"""Stop lines and zones: carried into every shard's scenes when the samples have them."""
_MAP_RULES = ("stop_at_line", "yield")
"""Rules whose result depends on the stop lines and zones (so those join the data fingerprint)."""


# --------------------------------------------------------------------------- parameters


def sample_params(
    calibrated: Mapping[str, np.ndarray],
    rules: RuleSet,
    modes: Sequence[str],
    samples: int,
    noise: Mapping[str, float],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Perturbed parameters ``(W, M, N)`` per name around per-window calibrated values ``(W,)``.

    Values are clipped to each parameter's physical bounds; interval pairs
    (vmin/vmax, dmin/dmax) stay ordered; lane-change modes get ``w_target``
    around :data:`W_TARGET_BASE` and a heading bound of at least
    :data:`LANE_CHANGE_THETA_MIN`.
    """
    modes = _check_modes(modes)
    union = rule_union(rules, modes)
    specs = {k: spec for r in union.rules for k, spec in r.params.items()}
    W = len(next(iter(calibrated.values()))) if calibrated else 0
    M, N = len(modes), int(samples)
    out: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        base = np.asarray(calibrated[name], dtype=np.float64) if name in calibrated else \
            np.full(W, W_TARGET_BASE if name == "w_target" else spec.default)
        val = base[:, None, None] + float(noise.get(name, 0.0)) * rng.standard_normal((W, M, N))
        out[name] = np.clip(val, *spec.bounds)
    for lo, hi in (("vmin", "vmax"), ("dmin", "dmax")):
        if lo in out and hi in out:
            out[lo], out[hi] = np.minimum(out[lo], out[hi]), np.maximum(out[lo], out[hi])
    lc = np.array([m != "keep_lane" for m in modes])
    if "theta_max" in out:
        out["theta_max"][:, lc] = np.maximum(out["theta_max"][:, lc], LANE_CHANGE_THETA_MIN)
    if "w_target" in out:
        out["w_target"] = np.maximum(out["w_target"], 0.2)
    return out


# --------------------------------------------------------------------------- one shard


def run_shard(arrays: Mapping[str, np.ndarray], window_index: np.ndarray, config: Mapping[str, Any],
              shard: int) -> dict[str, np.ndarray]:
    """Compute one shard (its windows' rows of ``arrays``); returns the arrays its HDF5 file holds.

    Pure function of its inputs and ``(config['seed'], shard)``, so any process computes the same shard.
    """
    torch.set_num_threads(1)
    rules = RuleSet(list(config["rules"]))
    modes = tuple(config["modes"])
    N, T = int(config["samples_per_window"]), int(config["horizon"])
    union = rule_union(rules, modes)
    cal = calibrate(arrays, rules, config["margins"])
    rng = np.random.default_rng([int(config["seed"]), int(shard), 0xA06])
    params = sample_params(cal, rules, modes, N, config["param_noise"], rng)
    scene = scene_from_arrays(arrays)
    if config["solver"] == "gradient":
        res = optimize_controls(scene, rules, {k: torch.as_tensor(v) for k, v in params.items()}, modes,
                                steps=int(config["steps"]), samples=N, horizon=T,
                                seed=int(config["seed"]) * 1_000_003 + int(shard))
        traj, ctrl = res.trajectories.numpy(), res.controls.numpy()
        rob = np.stack([res.robustness[n].numpy() for n in union.names], axis=-1)
        sat, valid = res.satisfied.numpy(), res.mode_valid.numpy()
    else:
        traj, ctrl, rob, sat, valid = _convex_shard(scene, rules, union, modes, params, N, T, config, rng)
    attempted = np.where(valid, N, 0).astype(np.int32)
    kept_n = sat.sum(axis=-1).astype(np.int32)
    w_i, m_i, n_i = np.nonzero(sat)
    names = sorted(params)
    return {
        "trajectories": traj[w_i, m_i, n_i].astype(np.float32),
        "controls": ctrl[w_i, m_i, n_i].astype(np.float32),
        "params": np.stack([params[k][w_i, m_i, n_i] for k in names], axis=-1).astype(np.float32)
        if len(names) else np.zeros((len(w_i), 0), np.float32),
        "mode": m_i.astype(np.int8),
        "window": np.asarray(window_index)[w_i].astype(np.int64),
        "robustness": rob[w_i, m_i, n_i].astype(np.float32),
        "windows": np.asarray(window_index, dtype=np.int64),
        "attempted": attempted,
        "kept": kept_n,
        "param_names": np.array(names, dtype=str),
        "rule_names": np.array(union.names, dtype=str),
        "modes": np.array(modes, dtype=str),
    }


def _convex_shard(scene, rules, union, modes, params, N, T, config, rng):  # noqa: ANN001, ANN202
    from diffpilot.planning.convex import ConvexPlanner
    from diffpilot.planning.gradient import take_scene, mode_scenes

    W, M = scene.batch, len(modes)
    traj = np.full((W, M, N, T, 4), np.nan)
    ctrl = np.full((W, M, N, T, 2), np.nan)
    rob = np.full((W, M, N, len(union.names)), np.nan)
    sat = np.zeros((W, M, N), dtype=bool)
    rep, valid = mode_scenes(scene, modes)
    valid = valid.numpy()
    for m, mode in enumerate(modes):
        planner = ConvexPlanner(rules, mode, T, solver=config.get("convex_solver", "CLARABEL"))
        for w in range(W):
            if not valid[w, m]:
                continue
            sc = take_scene(rep, torch.tensor([w * M + m]))
            v0 = float(sc.speed0[0])
            for n in range(N):
                p = {k: float(v[w, m, n]) for k, v in params.items() if k in planner.union.defaults()}
                v_target = max(v0 + rng.uniform(-2.0, 2.0), 0.0)  # diversity across samples
                r = planner.solve(sc, p, v_target=v_target)
                traj[w, m, n], ctrl[w, m, n] = r.trajectory, r.controls
                for k, val in r.robustness.items():
                    rob[w, m, n, union.names.index(k)] = val
                sat[w, m, n] = r.feasible
    return traj, ctrl, rob, sat, valid


# --------------------------------------------------------------------------- files


def _write_shard(path: Path, data: Mapping[str, np.ndarray], config_hash: str, shard: int) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            for k, v in data.items():
                if v.dtype.kind == "U":
                    h5.create_dataset(k, data=np.array([s.encode() for s in v.tolist()], dtype="S"))
                elif v.ndim >= 1 and v.shape[0] > 0 and k in ("trajectories", "controls", "params", "robustness"):
                    h5.create_dataset(k, data=v, compression="lzf", chunks=(min(v.shape[0], 4096), *v.shape[1:]))
                else:
                    h5.create_dataset(k, data=v)
            h5.attrs["config_hash"] = config_hash
            h5.attrs["shard"] = shard
            h5.attrs["format_version"] = FORMAT_VERSION
            h5.attrs["complete"] = True


def _load_arrays(arrays_or_root: Mapping[str, np.ndarray] | str | Path, version: str, split: str,
                 progress: bool) -> dict[str, np.ndarray]:
    if isinstance(arrays_or_root, Mapping):
        arrays = dict(arrays_or_root)
    else:
        from diffpilot.data.nuscenes import load_scene_samples

        arrays = load_scene_samples(arrays_or_root, version, split, progress=progress)
    missing = [k for k in _NEEDED if k not in arrays]
    if missing:
        raise DatasetError(f"stacked samples lack {missing}; build them with diffpilot.data.scene_sample.stack_samples "
                           "or load them with diffpilot.data.nuscenes.load_scene_samples")
    return arrays


def _fingerprint(arrays: Mapping[str, np.ndarray], windows: np.ndarray, map_rules: bool = False) -> str:
    h = hashlib.sha256()
    h.update(np.asarray(windows, dtype=np.int64).tobytes())
    h.update("\n".join(str(t) for t in np.asarray(arrays["token"])[windows]).encode())
    h.update(np.ascontiguousarray(np.asarray(arrays["ego_future"], dtype=np.float64)[windows]).tobytes())
    if map_rules:
        for k in _MAP_FIELDS:
            if k in arrays:
                h.update(k.encode())
                h.update(np.ascontiguousarray(np.asarray(arrays[k], dtype=np.float64)[windows]).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- job


def augment(
    arrays_or_root: Mapping[str, np.ndarray] | str | Path,
    out_dir: str | Path,
    *,
    samples_per_window: int = 64,
    modes: Sequence[str] = MODES,
    param_noise: Mapping[str, float] | None = None,
    solver: str = "gradient",
    shard_size: int = 8,
    workers: int = 1,
    ray_address: str | None = None,
    resume: bool = True,
    progress: bool = True,
    rules: Sequence[str] = DEFAULT_RULES,
    margins: Mapping[str, float] | None = None,
    horizon: int | None = None,
    steps: int = 100,
    seed: int = 0,
    windows: Sequence[int] | np.ndarray | None = None,
    version: str = "v1.0-diffpilot",
    split: str = "train",
) -> Path:
    """Augment every complete window (or the given ``windows``) into HDF5 shards under ``out_dir``; returns it.

    ``arrays_or_root`` is stacked SceneSample arrays or a nuScenes-format
    root (read with ``version`` / ``split``). See the module doc for the
    method; :func:`read_augmented` reads the result back.
    """
    modes = _check_modes(modes)
    if isinstance(samples_per_window, bool) or not isinstance(samples_per_window, (int, np.integer)) \
            or samples_per_window < 1:
        raise DatasetError(f"samples_per_window must be a positive integer, got {samples_per_window!r}")
    if solver not in ("gradient", "convex"):
        raise DatasetError(f"solver must be 'gradient' or 'convex', got {solver!r}")
    if not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise DatasetError(f"shard_size must be a positive integer, got {shard_size!r}")
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise DatasetError(f"workers must be a positive integer, got {workers!r}")
    if steps < 0:
        raise DatasetError(f"steps must be >= 0, got {steps}")
    rs = RuleSet(list(rules))
    noise = {**DEFAULT_NOISE, **(param_noise or {})}
    marg = {**{k: v for k, v in DEFAULT_MARGINS.items() if k in rs.defaults()}, **(margins or {})}
    known = set(rule_union(rs, modes).defaults())
    for what, d in (("param_noise", noise), ("margins", marg)):
        bad = sorted(k for k in d if k not in known and k not in DEFAULT_NOISE)
        if bad:
            raise DatasetError(f"{what} names unknown parameter(s) {bad}; known: {sorted(known)}")
        neg = sorted(k for k, v in d.items() if not np.isfinite(v) or v < 0)
        if neg:
            raise DatasetError(f"{what} must be finite and >= 0; bad: {neg}")
    arrays = _load_arrays(arrays_or_root, version, split, progress)
    complete = np.asarray(arrays["ego_future_valid"], dtype=bool).all(axis=-1)
    if windows is None:
        win = np.flatnonzero(complete)
    else:
        win = np.asarray(windows, dtype=np.int64).reshape(-1)
        n_all = len(complete)
        if len(win) and (win.min() < 0 or win.max() >= n_all):
            raise DatasetError(f"windows must index the {n_all} samples (0..{n_all - 1})")
        if len(win) and not complete[win].all():
            raise DatasetError(f"windows {win[~complete[win]].tolist()} have an incomplete logged future; leave them out")
    if len(win) == 0:
        raise DatasetError("no window with a complete logged future to augment")
    T = int(horizon) if horizon is not None else int(np.asarray(arrays["ego_future"]).shape[-2])
    if T < 2:
        raise DatasetError(f"horizon must be >= 2 steps, got {T}")
    config = {
        "format_version": FORMAT_VERSION, "rules": list(rs.names), "modes": list(modes),
        "samples_per_window": int(samples_per_window), "param_noise": noise, "margins": marg, "solver": solver,
        "shard_size": int(shard_size), "horizon": T, "steps": int(steps), "seed": int(seed),
        "data": _fingerprint(arrays, win, any(r in rs.names for r in _MAP_RULES)), "num_windows": int(len(win)),
    }
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "augment.json"
    if manifest.exists() and resume:
        old = json.loads(manifest.read_text())
        if old.get("config_hash") != config_hash:
            raise DatasetError(f"{out} holds an augmentation with another configuration; "
                               "use a new out_dir or resume=False to overwrite it")
    atomic_write_text(manifest, json.dumps({"config_hash": config_hash, "config": config}, indent=2) + "\n")
    shards = [win[i:i + shard_size] for i in range(0, len(win), shard_size)]
    paths = [out / f"shard_{i:05d}.h5" for i in range(len(shards))]
    todo = [i for i in range(len(shards)) if not (resume and hdf5_shard_done(paths[i], config_hash))]
    for stale in sorted(out.glob("shard_*.h5"))[len(shards):]:
        stale.unlink()

    def subset(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.asarray(arrays[k])[idx] for k in _NEEDED + _MAP_FIELDS if k in arrays}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(shards), initial=len(shards) - len(todo), desc="augmenting", unit="shard",
               disable=not progress)
    try:
        if workers == 1 and not ray_address:
            for i in todo:
                _write_shard(paths[i], run_shard(subset(shards[i]), shards[i], config, i), config_hash, i)
                bar.update(1)
        else:
            _run_ray(todo, shards, paths, subset, config, config_hash, workers, ray_address, bar)
    finally:
        bar.close()
    return out


def _run_ray(todo, shards, paths, subset, config, config_hash, workers, ray_address, bar) -> None:  # noqa: ANN001
    import ray

    from diffpilot.parallel import ray_session

    with ray_session(workers, ray_address):
        remote = ray.remote(num_cpus=1)(run_shard)
        pending = {remote.remote(subset(shards[i]), shards[i], config, i): i for i in todo}
        waiting = list(pending)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                i = pending[ref]
                _write_shard(paths[i], ray.get(ref), config_hash, i)
                bar.update(1)


def read_augmented(out_dir: str | Path) -> dict[str, np.ndarray]:
    """Every shard of ``out_dir`` concatenated: per kept trajectory ``trajectories`` (n, T, 4), ``controls``,
    ``params`` (n, P), ``mode``, ``window``, ``robustness`` (n, R); per window ``windows``, ``attempted`` and
    ``kept`` (W, M); names in ``param_names``, ``rule_names``, ``modes``."""
    out = Path(out_dir)
    manifest = out / "augment.json"
    if not manifest.exists():
        raise DatasetError(f"{out} is no augmentation output (no augment.json); run diffpilot.planning.augment first")
    meta = json.loads(manifest.read_text())
    n_shards = -(-int(meta["config"]["num_windows"]) // int(meta["config"]["shard_size"]))
    parts: dict[str, list[np.ndarray]] = {}
    names: dict[str, np.ndarray] = {}
    for i in range(n_shards):
        path = out / f"shard_{i:05d}.h5"
        if not hdf5_shard_done(path, meta["config_hash"]):
            raise DatasetError(f"shard {path} is missing or incomplete; rerun augment with resume=True to finish it")
        with h5py.File(path, "r") as h5:
            for k in h5:
                v = h5[k][()]
                if k in ("param_names", "rule_names", "modes"):
                    names[k] = np.array([s.decode() for s in v], dtype=str)
                else:
                    parts.setdefault(k, []).append(v)
    result = {k: np.concatenate(v, axis=0) for k, v in parts.items()}
    result.update(names)
    return result
