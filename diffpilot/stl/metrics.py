"""Open-loop metrics of sampled driving plans against STL rules (as in the pSTL diffusion-policy paper).

A test set has ``W`` windows; a planner draws ``N`` trajectories per window.
Arrays: trajectories ``(W, N, T, 3|4)`` ego-frame poses (+ speed) at DT,
satisfaction ``(W, N)`` bool, logged futures ``(W, T, 3)``.

* **success**: share of windows where at least one sample satisfies every
  applicable rule.
* **compliance**: share of all samples that satisfy every applicable rule.
* **valid area** (m², per window): area of the union of the *swept paths* of
  the satisfying samples: each path is the polyline from the ego's current
  position through its waypoints, thickened by the ego's half width. Chosen
  over the convex hull of final positions because it is defined for one or
  two samples, counts lateral and longitudinal spread alike and does not
  credit the empty space between two diverging paths. ``method="hull"``
  gives the convex hull of the satisfying final positions instead.
* **entropy** (nats, per window): Shannon entropy of the final positions
  binned on a square grid (``cell_m``); 0 when all land in one cell, ``log N``
  at most.
* **min-ADE / min-FDE** (m, per window): over the samples, the smallest mean
  / final displacement from the logged future (invalid logged steps are
  skipped).
* **time per batch**: wall seconds of one planner call on a batch
  (:func:`time_per_batch`).

Which rules apply depends on the driving mode: ``keep_lane`` drops
``lane_change``; ``left`` / ``right`` drop ``lane_keeping`` (the lane change
takes its place, towards the neighbouring lane on that side).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import shapely
import torch
from torch import Tensor

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import EGO_SIZE, MODE_COMMAND, MODES
from diffpilot.stl.rules import RuleSet
from diffpilot.stl.signals import SCENE_KEYS, driving_signals, scene_from_arrays

__all__ = [
    "MODES",
    "MODE_COMMAND",
    "applicable_rules",
    "compliance",
    "endpoint_entropy",
    "min_ade",
    "min_fde",
    "mode_robustness",
    "open_loop_summary",
    "preferred_plan",
    "rule_robustness",
    "success",
    "time_per_batch",
    "valid_area",
]



def _sat(satisfied: np.ndarray) -> np.ndarray:
    s = np.asarray(satisfied)
    if s.ndim != 2:
        raise DatasetError(f"satisfaction must be (windows, samples) booleans, got shape {s.shape}")
    return s.astype(bool)


def success(satisfied: np.ndarray) -> float:
    """Share of windows with at least one satisfying sample."""
    s = _sat(satisfied)
    return float(s.any(axis=1).mean()) if len(s) else float("nan")


def compliance(satisfied: np.ndarray) -> float:
    """Share of samples that satisfy (over all windows and samples)."""
    s = _sat(satisfied)
    return float(s.mean()) if s.size else float("nan")


def _trajs(trajs: np.ndarray) -> np.ndarray:
    t = np.asarray(trajs, dtype=np.float64)
    if t.ndim != 4 or t.shape[-1] < 2:
        raise DatasetError(f"trajectories must be (windows, samples, steps, >=2), got shape {t.shape}")
    return t


def valid_area(
    trajs: np.ndarray, satisfied: np.ndarray, *, width: float = EGO_SIZE[1], method: str = "swept"
) -> np.ndarray:
    """Per window, m²: union of satisfying samples' swept paths (``swept``) or hull of their final positions (``hull``)."""
    t, s = _trajs(trajs), _sat(satisfied)
    if s.shape != t.shape[:2]:
        raise DatasetError(f"satisfaction {s.shape} does not match trajectories {t.shape[:2]}")
    if method not in ("swept", "hull"):
        raise ValueError(f"unknown valid-area method {method!r}; choose 'swept' or 'hull'")
    out = np.zeros(len(t))
    for w in range(len(t)):
        idx = np.flatnonzero(s[w])
        if not len(idx):
            continue
        if method == "hull":
            out[w] = shapely.MultiPoint(t[w, idx, -1, :2]).convex_hull.area
            continue
        lines = [shapely.LineString(np.vstack([[0.0, 0.0], t[w, i, :, :2]])) for i in idx]
        out[w] = shapely.union_all(shapely.buffer(lines, width / 2.0)).area
    return out


def endpoint_entropy(trajs: np.ndarray, mask: np.ndarray | None = None, *, cell_m: float = 1.0) -> np.ndarray:
    """Per window, nats: entropy of the (masked) final positions on a grid of ``cell_m`` squares; NaN if none."""
    t = _trajs(trajs)
    if cell_m <= 0:
        raise ValueError(f"cell_m must be positive, got {cell_m}")
    m = np.ones(t.shape[:2], dtype=bool) if mask is None else _sat(mask)
    out = np.full(len(t), np.nan)
    for w in range(len(t)):
        end = t[w, m[w], -1, :2]
        if not len(end):
            continue
        cells = np.floor(end / cell_m).astype(np.int64)
        _, counts = np.unique(cells, axis=0, return_counts=True)
        p = counts / counts.sum()
        out[w] = float(-(p * np.log(p)).sum())
    return out


def _displacement(trajs: np.ndarray, gt: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    t = _trajs(trajs)
    g = np.asarray(gt, dtype=np.float64)
    if g.ndim != 3 or g.shape[0] != t.shape[0] or g.shape[1] != t.shape[2]:
        raise DatasetError(f"logged futures must be (windows={t.shape[0]}, steps={t.shape[2]}, >=2), got {g.shape}")
    v = np.ones(g.shape[:2], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    d = np.linalg.norm(t[..., :2] - g[:, None, :, :2], axis=-1)  # (W, N, T)
    return d, v


def min_ade(trajs: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per window, the smallest over samples of the mean displacement over valid logged steps (NaN if none)."""
    d, v = _displacement(trajs, gt, valid)
    n = v.sum(axis=1)
    ade = (d * v[:, None]).sum(axis=-1) / np.maximum(n, 1)[:, None]
    return np.where(n > 0, ade.min(axis=1), np.nan)


def min_fde(trajs: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per window, the smallest over samples of the displacement at the last valid logged step (NaN if none)."""
    d, v = _displacement(trajs, gt, valid)
    has = v.any(axis=1)
    last = np.where(has, v.shape[1] - 1 - np.argmax(v[:, ::-1], axis=1), 0)
    fde = d[np.arange(len(d)), :, last]
    return np.where(has, fde.min(axis=1), np.nan)


def time_per_batch(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` (one planner call on one batch) after ``warmup`` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# --------------------------------------------------------------------------- rule evaluation


def applicable_rules(names: Sequence[str], mode: int) -> list[str]:
    """The rules of ``names`` that apply in ``mode`` (see the module docstring)."""
    if mode not in (0, 1, 2):
        raise DatasetError(f"mode must be 0 (keep_lane), 1 (left) or 2 (right), got {mode}")
    drop = "lane_change" if mode == 0 else "lane_keeping"
    keep = [n for n in names if n != drop]
    return keep or list(names)


def rule_robustness(
    trajs: Tensor | np.ndarray,
    arrays: Mapping[str, np.ndarray],
    index: np.ndarray | Sequence[int],
    rules: RuleSet,
    params: Mapping[str, np.ndarray | Tensor | float],
    modes: np.ndarray | Sequence[int],
    *,
    smooth: float | None = None,
) -> dict[str, Tensor]:
    """Per rule, robustness ``(W, N)`` of trajectories ``(W, N, T, 3|4)`` in scenes ``arrays[index]``.

    ``params`` hold one value per window (``(W,)``) or one for all; a
    window's mode picks the lane-change target (its neighbouring lane).
    Differentiable in ``trajs`` (use ``smooth`` for useful gradients).
    """
    idx = np.asarray(index, dtype=np.int64)
    m = np.asarray(modes, dtype=np.int64).reshape(-1)
    if len(m) != len(idx):
        raise DatasetError(f"{len(m)} modes for {len(idx)} windows; give one mode per window")
    sub = {k: np.asarray(arrays[k])[idx] for k in SCENE_KEYS if k in arrays and k != "command"}
    sub["command"] = np.array([MODE_COMMAND[int(x)] for x in m], dtype=np.int64)
    scene = scene_from_arrays(sub)
    traj = torch.as_tensor(trajs) if not isinstance(trajs, Tensor) else trajs
    sig = driving_signals(traj, scene)
    W = len(idx)
    p: dict[str, Tensor | float] = {}
    for k, v in params.items():
        if isinstance(v, (int, float)):
            p[k] = float(v)
            continue
        t = torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v, dtype=sig["speed"].dtype).reshape(-1)
        if t.numel() == 1:
            p[k] = t.reshape(())
        elif t.numel() == W:
            p[k] = t[:, None]
        else:
            raise DatasetError(f"parameter {k!r} has {t.numel()} values for {W} windows; give one per window or one")
    return rules.evaluate(sig, p, smooth=smooth)


def mode_robustness(per_rule: Mapping[str, Tensor], modes: np.ndarray | Sequence[int], *, smooth: float | None = None) -> Tensor:
    """Robustness ``(W, N)`` of the conjunction of the rules that apply in each window's mode (soft min with ``smooth``)."""
    names = list(per_rule)
    m = np.asarray(modes, dtype=np.int64).reshape(-1)
    stacked = torch.stack([per_rule[n] for n in names], dim=-1)  # (W, N, R)
    use = torch.tensor([[n in applicable_rules(names, int(mi)) for n in names] for mi in m], dtype=torch.bool)
    big = torch.finfo(stacked.dtype).max / 4
    if smooth is None:
        return torch.where(use[:, None], stacked, torch.full_like(stacked, big)).amin(dim=-1)
    masked = torch.where(use[:, None], -stacked / smooth, torch.full_like(stacked, -1e4))
    return -smooth * torch.logsumexp(masked, dim=-1)


def preferred_plan(states: np.ndarray, robustness: np.ndarray) -> int:
    """Which of ``N`` plans ``(N, T, 2+)`` (ego frame, from the origin) to drive, given their robustness ``(N,)``.

    Of the plans that satisfy every rule (robustness > 0) the one with the longest path; the most
    robust one when none does. The most robust plan keeps the farthest from every bound, the speed
    limit's included, so always taking it drives slowly for no gain in compliance.
    """
    xy = np.asarray(states, dtype=np.float64)[..., :2]
    rho = np.asarray(robustness, dtype=np.float64).reshape(-1)
    if xy.ndim != 3 or len(xy) != len(rho) or len(rho) == 0:
        raise ValueError(f"need plans (N, T, 2+) and robustness (N,) with N >= 1, got {xy.shape} and {rho.shape}")
    path = np.concatenate([np.zeros_like(xy[:, :1]), xy], axis=1)
    length = np.linalg.norm(np.diff(path, axis=1), axis=-1).sum(axis=1)
    ok = rho > 0
    if not ok.any():
        return int(np.nanargmax(np.where(np.isnan(rho), -np.inf, rho)))
    return int(np.argmax(np.where(ok, length, -np.inf)))


def open_loop_summary(
    trajs: np.ndarray,
    satisfied: np.ndarray,
    gt: np.ndarray,
    gt_valid: np.ndarray | None = None,
    *,
    seconds_per_batch: float | None = None,
    cell_m: float = 1.0,
) -> dict[str, float]:
    """The open-loop table row: success, compliance, mean valid area, mean entropy, min-ADE/FDE, time per batch."""
    t = _trajs(trajs)
    s = _sat(satisfied)
    area = valid_area(t, s)
    ent = endpoint_entropy(t, s, cell_m=cell_m)
    out = {
        "success": success(s),
        "compliance": compliance(s),
        "valid_area_m2": float(area.mean()),
        "entropy_nats": float(np.nanmean(ent)) if np.isfinite(ent).any() else float("nan"),
        "min_ade_m": float(np.nanmean(min_ade(t, gt, gt_valid))),
        "min_fde_m": float(np.nanmean(min_fde(t, gt, gt_valid))),
    }
    if seconds_per_batch is not None:
        out["time_per_batch_s"] = float(seconds_per_batch)
    return out
