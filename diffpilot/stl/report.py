"""STL compliance reports: how often a set of driving trajectories meets each rule, and where it fails worst.

The same page serves logged futures of a data set (are the rules and their
parameters sensible on human driving?), a planner's open-loop samples and
closed-loop rollouts (does the planner keep them?). Every trajectory is
scored in the ego frame of its window's :class:`~diffpilot.data.scenario.SceneSample`,
so rollouts are first cut into per-keyframe windows
(:func:`trajectories_from_rollouts`). A rule counts for a trajectory only in
the driving modes where it applies (:func:`diffpilot.stl.metrics.applicable_rules`:
lane keeping in keep-lane windows, the lane change in left/right ones).

:func:`controllability_figure` shows the point of parameter conditioning:
the same scene planned under a cautious and an aggressive setting.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Polygon  # noqa: E402

from diffpilot.data.errors import DatasetError  # noqa: E402
from diffpilot.data.scenario import DT, EGO_SIZE, SampleSpec, SceneSample, ScenarioLog, mode_from_command, to_ego_frame  # noqa: E402
from diffpilot.fileio import atomic_write_text, save_figure  # noqa: E402
from diffpilot.stl.formula import STLError  # noqa: E402
from diffpilot.stl.metrics import MODES, applicable_rules  # noqa: E402
from diffpilot.stl.rules import RuleSet  # noqa: E402
from diffpilot.stl.signals import SCENE_KEYS, driving_signals, scene_from_arrays  # noqa: E402

__all__ = [
    "ComplianceResult",
    "ControllabilityResult",
    "RolloutWindows",
    "compliance_report",
    "controllability_figure",
    "evaluate_compliance",
    "resolve_params",
    "trajectories_from_rollouts",
]

_REQUIRED_KEYS = ("lanes", "lanes_valid", "agents_pose", "agents_valid", "agents_size", "ego_status", "ego_past", "command")
_SETTING_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")


# --------------------------------------------------------------------------- parameters


def resolve_params(rules: RuleSet, params: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
    """Every parameter of ``rules`` as an ``(n,)`` array; ``None`` means the rule defaults.

    Given values must cover every parameter (one value or one per
    trajectory): a silently defaulted threshold makes a report claim
    compliance with a rule nobody set.
    """
    names = sorted(rules.defaults())
    if params is None:
        params = rules.defaults()
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise STLError(f"parameter(s) {unknown} belong to no rule in {rules.names}; known: {names}")
    missing = [k for k in names if k not in params]
    if missing:
        raise STLError(f"parameter(s) {missing} of rules {rules.names} have no value; give them "
                       f"(e.g. from diffpilot.stl.default_params or calibrate) or pass params=None for the defaults")
    out = {}
    for k in names:
        v = np.asarray(params[k], dtype=np.float64).reshape(-1)
        if v.size not in (1, n):
            raise STLError(f"parameter {k!r} has {v.size} values for {n} trajectories; give one or one per trajectory")
        if not np.all(np.isfinite(v)):
            raise STLError(f"parameter {k!r} is NaN or inf; drop the windows it was not calibrated on")
        out[k] = np.broadcast_to(v, (n,)).copy()
    return out


# --------------------------------------------------------------------------- evaluation


@dataclass
class ComplianceResult:
    """Robustness ``(N,)`` per rule of ``N`` trajectories, which rules apply to each, and their verdicts."""

    robustness: dict[str, np.ndarray]
    applies: dict[str, np.ndarray]
    index: np.ndarray
    modes: np.ndarray
    params: dict[str, np.ndarray]

    @property
    def satisfied(self) -> dict[str, np.ndarray]:
        return {k: v >= 0 for k, v in self.robustness.items()}

    @property
    def all_satisfied(self) -> np.ndarray:
        """Per trajectory: every applicable rule holds."""
        ok = np.ones(len(self.index), dtype=bool)
        for k, r in self.robustness.items():
            ok &= (r >= 0) | ~self.applies[k]
        return ok

    @property
    def min_robustness(self) -> np.ndarray:
        """Per trajectory: the smallest robustness over its applicable rules."""
        stack = np.stack([np.where(self.applies[k], r, np.inf) for k, r in self.robustness.items()], axis=-1)
        return stack.min(axis=-1)

    def rows(self) -> list[dict[str, Any]]:
        """One table row per rule plus one for the conjunction of the applicable rules."""
        out = []
        for k, r in self.robustness.items():
            a = self.applies[k]
            n = int(a.sum())
            out.append({
                "rule": k, "applicable": n, "satisfied": int((r[a] >= 0).sum()),
                "satisfaction_rate": float((r[a] >= 0).mean()) if n else float("nan"),
                "robustness_p10": float(np.quantile(r[a], 0.1)) if n else float("nan"),
                "robustness_median": float(np.median(r[a])) if n else float("nan"),
            })
        ok = self.all_satisfied
        m = self.min_robustness
        out.append({"rule": "all applicable", "applicable": len(ok), "satisfied": int(ok.sum()),
                    "satisfaction_rate": float(ok.mean()) if len(ok) else float("nan"),
                    "robustness_p10": float(np.quantile(m, 0.1)) if len(m) else float("nan"),
                    "robustness_median": float(np.median(m)) if len(m) else float("nan")})
        return out


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> int:
    missing = [k for k in _REQUIRED_KEYS if k not in arrays]
    if missing:
        raise DatasetError(f"stacked samples lack {missing}; build them with diffpilot.data.scene_sample.stack_samples")
    return len(np.asarray(arrays["command"]))


def _trajectories(arrays: Mapping[str, np.ndarray], trajectories: np.ndarray | None,
                  index: np.ndarray | Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Trajectories ``(N, T, 3|4)`` and their window index; the logged futures of complete windows by default."""
    W = _check_arrays(arrays)
    if trajectories is None:
        if index is not None:
            raise DatasetError("index without trajectories: give the trajectories it indexes, or neither for logged futures")
        if "ego_future" not in arrays or "ego_future_valid" not in arrays:
            raise DatasetError("no trajectories given and the samples lack ego_future / ego_future_valid")
        idx = np.flatnonzero(np.asarray(arrays["ego_future_valid"], dtype=bool).all(axis=1))
        if not len(idx):
            raise DatasetError("no window has a complete logged future; give trajectories or longer scenes")
        return np.asarray(arrays["ego_future"], dtype=np.float64)[idx], idx
    t = np.asarray(trajectories, dtype=np.float64)
    if t.ndim != 3 or t.shape[-1] not in (3, 4):
        raise DatasetError(f"trajectories must be (N, T, 3|4) ego-frame poses (+ speed), got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise DatasetError("trajectories contain NaN or inf")
    if index is None:
        if len(t) != W:
            raise DatasetError(f"{len(t)} trajectories for {W} windows: give index (the window of each trajectory)")
        idx = np.arange(W)
    else:
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(idx) != len(t):
            raise DatasetError(f"index has {len(idx)} entries for {len(t)} trajectories; give one window per trajectory")
        if len(idx) and (idx.min() < 0 or idx.max() >= W):
            raise DatasetError(f"window index out of range [0, {W}); it indexes the stacked samples")
    return t, idx


def evaluate_compliance(
    arrays: Mapping[str, np.ndarray],
    rules: RuleSet,
    params: Mapping[str, Any] | None = None,
    *,
    trajectories: np.ndarray | None = None,
    index: np.ndarray | Sequence[int] | None = None,
) -> ComplianceResult:
    """Exact robustness of every rule for each trajectory in its window (logged futures by default).

    ``stop_at_line`` and ``yield`` read the windows' own stop lines and
    zones (the SceneSample fields).
    """
    if not isinstance(rules, RuleSet):
        raise STLError(f"rules must be a RuleSet, got {type(rules).__name__}; build one with RuleSet([...names])")
    traj, idx = _trajectories(arrays, trajectories, index)
    p = resolve_params(rules, params, len(idx))
    sub = {k: np.asarray(arrays[k])[idx] for k in SCENE_KEYS if k in arrays}
    scene = scene_from_arrays(sub)
    sig = driving_signals(torch.as_tensor(traj)[:, None], scene)
    rho = rules.evaluate(sig, {k: torch.as_tensor(v)[:, None] for k, v in p.items()})
    modes = mode_from_command(sub["command"])
    applies = {n: np.array([n in applicable_rules(rules.names, int(m)) for m in modes], dtype=bool) for n in rules.names}
    return ComplianceResult(robustness={k: v[:, 0].numpy() for k, v in rho.items()}, applies=applies, index=idx,
                            modes=modes, params=p)


# --------------------------------------------------------------------------- figures


def _histograms(res: ComplianceResult, path: Path) -> Path:
    names = list(res.robustness)
    cols = min(3, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        r = res.robustness[name][res.applies[name]]
        if len(r):
            lo, hi = np.quantile(r, [0.01, 0.99])
            r = np.clip(r, lo, hi)  # capped signals (no agent: 50 m) would squeeze the interesting part
            ax.hist(r, bins=30, color="tab:blue", alpha=0.8)
            rate = float((res.robustness[name][res.applies[name]] >= 0).mean())
            ax.set_title(f"{name}: {rate:.0%} of {len(r)}", fontsize=9)
        else:
            ax.set_title(f"{name}: not applicable", fontsize=9)
        ax.axvline(0.0, color="k", lw=1.0, ls="--")
        ax.set_xlabel("robustness (rule units)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def _draw_scene(ax: Any, sample: SceneSample) -> None:
    """Lanes, agents now and the ego in the ego frame, forward up (the same convention as plot_scene)."""
    def up(xy: np.ndarray) -> np.ndarray:
        return np.stack([-xy[..., 1], xy[..., 0]], axis=-1)

    def box(pose: np.ndarray, length: float, width: float) -> np.ndarray:
        c, s = np.cos(pose[2]), np.sin(pose[2])
        local = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64) * [length / 2, width / 2]
        return up(pose[:2] + local @ np.array([[c, s], [-s, c]]))

    for lane, ok in zip(np.asarray(sample.lanes), np.asarray(sample.lanes_valid, dtype=bool)):
        if ok:
            p = up(lane[:, :2])
            ax.plot(p[:, 0], p[:, 1], color="tab:cyan", lw=0.8, alpha=0.7)
    now = int(np.shape(sample.ego_past)[0]) - 1
    for a in range(len(sample.agents_pose)):
        if sample.agents_valid[a, now]:
            ax.add_patch(Polygon(box(sample.agents_pose[a, now], *sample.agents_size[a]), fc="0.6", ec="k", lw=0.4))
    ax.add_patch(Polygon(box(np.zeros(3), *EGO_SIZE), fc="k", ec="k", lw=0.5))


def _plans(planner: Any, sample: SceneSample, setting: Mapping[str, float], n: int, seed: int,
           guidance: Any) -> tuple[np.ndarray, int]:
    """Plans ``(n, T, 4)`` (poses + speed) under ``setting`` and the index of the one ``plan`` would pick."""
    from diffpilot.data.scene_sample import stack_samples

    if hasattr(planner, "sample") and hasattr(planner, "plan_params"):
        arrays = stack_samples([sample])
        unknown = sorted(set(setting) - set(planner.plan_params))
        if unknown:
            raise ValueError(f"setting parameter(s) {unknown} are not this planner's; it knows {sorted(planner.plan_params)}")
        params = {**planner.plan_params, **setting}
        modes = mode_from_command(arrays["command"])
        noise = torch.randn((n, planner.horizon, 2), generator=torch.Generator().manual_seed(seed))
        out = planner.sample(arrays, [0], params, modes, n=n, noise=noise, guidance=guidance)
        rho = planner.satisfaction(out.states, arrays, [0], params, modes)[0]
        return out.states[0], int(np.argmax(rho))
    if not hasattr(planner, "set_rule_params"):
        raise TypeError(f"{type(planner).__name__} takes no rule parameters (needs set_rule_params or sample)")
    planner.set_rule_params(**setting)
    planner.reset(seed)
    poses = np.asarray(planner.plan(sample), dtype=np.float64)
    prev = np.vstack([np.zeros((1, 2)), poses[:-1, :2]])
    speed = np.linalg.norm(poses[:, :2] - prev, axis=1) / DT
    return np.concatenate([poses, speed[:, None]], axis=1)[None], 0


@dataclass
class ControllabilityResult:
    """The figure, each setting's plans ``(n, T, 4)``, the chosen plan's index and the mean speed of all plans."""

    path: Path
    plans: dict[str, np.ndarray]
    chosen: dict[str, int]
    mean_speed: dict[str, float]


def controllability_figure(
    planner: Any,
    sample: SceneSample,
    settings: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    n: int | None = None,
    seed: int = 0,
    guidance: Any = None,
) -> ControllabilityResult:
    """One scene planned under each rule-parameter setting (e.g. cautious vs aggressive), side by side, with speeds.

    A parameter-conditioned planner (``sample`` / ``plan_params``) draws
    ``n`` plans per setting from the same noise, so the only difference is
    the parameters; the one its ``plan`` would pick is drawn bold. Any other
    planner with ``set_rule_params`` gives its single plan.
    """
    if not settings or len(settings) < 2:
        raise ValueError(f"give at least two settings to compare (name -> parameters), got {list(settings or {})}")
    path = Path(path)
    count = int(n if n is not None else getattr(planner, "num_samples", 8))
    saved = dict(getattr(planner, "plan_params", {}))
    plans, chosen, speeds = {}, {}, {}
    try:
        for name, setting in settings.items():
            plans[name], chosen[name] = _plans(planner, sample, dict(setting), count, seed, guidance)
            speeds[name] = float(plans[name][..., 3].mean())
    finally:
        if saved and hasattr(planner, "plan_params"):
            planner.plan_params.clear()
            planner.plan_params.update(saved)
    k = len(settings)
    fig, axes = plt.subplots(1, k + 1, figsize=(4.0 * (k + 1), 4.4))
    reach = max(12.0, float(max(np.abs(p[..., :2]).max() for p in plans.values())) + 6.0)
    for i, (name, setting) in enumerate(settings.items()):
        ax, color = axes[i], _SETTING_COLORS[i % len(_SETTING_COLORS)]
        _draw_scene(ax, sample)
        for j, p in enumerate(plans[name]):
            xy = np.stack([-p[:, 1], p[:, 0]], axis=-1)
            xy = np.vstack([np.zeros((1, 2)), xy])
            bold = j == chosen[name]
            ax.plot(xy[:, 0], xy[:, 1], "-o" if bold else "-", color=color, lw=2.0 if bold else 0.8,
                    alpha=1.0 if bold else 0.35, ms=2.5, zorder=5 if bold else 4)
        label = ", ".join(f"{a}={float(b):g}" for a, b in setting.items())
        ax.set_title(f"{name}\n{label}", fontsize=9)
        ax.set_xlim(-reach / 2, reach / 2)
        ax.set_ylim(-5.0, reach)
        ax.set_aspect("equal")
        ax.set_xlabel("lateral (m, left <-)", fontsize=8)
        ax.tick_params(labelsize=7)
    ax = axes[-1]
    for i, name in enumerate(settings):
        color = _SETTING_COLORS[i % len(_SETTING_COLORS)]
        p = plans[name]
        t = DT * np.arange(p.shape[1] + 1)
        v0 = float(np.asarray(sample.ego_status)[0])
        for j, traj in enumerate(p):
            bold = j == chosen[name]
            ax.plot(t, np.concatenate([[v0], traj[:, 3]]), color=color, lw=2.0 if bold else 0.7, alpha=1.0 if bold else 0.3,
                    label=f"{name} (mean {speeds[name]:.1f} m/s)" if bold else None)
        if "vmax" in settings[name]:
            ax.axhline(float(settings[name]["vmax"]), color=color, ls="--", lw=0.8)
    ax.set_xlabel("time (s)", fontsize=8)
    ax.set_ylabel("speed (m/s)", fontsize=8)
    ax.set_title("speed profiles (dashed: vmax)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return ControllabilityResult(path=path, plans=plans, chosen=chosen, mean_speed=speeds)


# --------------------------------------------------------------------------- rollouts


@dataclass
class RolloutWindows:
    """Closed-loop drives cut into per-keyframe windows.

    ``trajectories[i]`` ``(T, 4)`` is the driven ego (x, y, yaw, speed) at
    DT, 2·DT, … after keyframe ``frame[i]`` of ``scene[i]``, in the ego frame
    of the *driven* pose at that keyframe; ``arrays`` are the SceneSamples
    the planner saw there (their ``ego_future`` is the driven future) and
    ``index`` maps each trajectory to its row of ``arrays`` (the identity).
    """

    trajectories: np.ndarray
    index: np.ndarray
    arrays: dict[str, np.ndarray]
    scene: np.ndarray
    frame: np.ndarray


def trajectories_from_rollouts(
    rollouts: Sequence[Any], logs: Sequence[ScenarioLog], spec: SampleSpec = SampleSpec(), *, horizon: int | None = None,
) -> RolloutWindows:
    """Windows of every rollout's keyframes that have ``horizon`` (default ``spec.future_steps``) driven steps after them.

    ``logs[i]`` is the log ``rollouts[i]`` drove on. The scene samples are
    built from a copy of the log whose ego (and, for reactive rollouts,
    agents) follow the simulation, so agents and lanes sit where the driven
    ego saw them.
    """
    from diffpilot.data.scene_sample import build_scene_sample, stack_samples

    if len(rollouts) != len(logs):
        raise DatasetError(f"{len(rollouts)} rollouts for {len(logs)} logs; give the log each rollout drove on")
    H = int(spec.future_steps if horizon is None else horizon)
    if H < 1:
        raise ValueError(f"horizon must be >= 1, got {H}")
    if H != spec.future_steps:
        spec = replace(spec, future_steps=H)
    trajs, samples, scenes, frames = [], [], [], []
    for ro, log in zip(rollouts, logs):
        if ro.scene_token != log.scene_token:
            raise DatasetError(f"rollout of scene {ro.scene_name!r} paired with log {log.scene_name!r}; keep them in the same order")
        if len(ro.times) < 2:
            continue
        spf = int(round(DT / ro.dt))
        if spf < 1 or abs(spf * ro.dt - DT) > 1e-6:
            raise DatasetError(f"rollout step {ro.dt:g} s does not divide the keyframe interval {DT} s")
        states = np.asarray(ro.ego_states, dtype=np.float64)
        kf = np.arange(ro.start_frame, ro.end_frame + 1)
        rows = (kf - ro.start_frame) * spf
        ok = rows < len(states)
        kf, rows = kf[ok], rows[ok]
        ego = np.array(log.ego_pose, dtype=np.float64, copy=True)
        ego[kf] = states[rows, :3]
        sim = replace(log, ego_pose=ego)
        if ro.reactive:
            apose = np.array(log.agents_pose, dtype=np.float64, copy=True)
            avalid = np.array(log.agents_valid, dtype=bool, copy=True)
            apose[:, kf] = np.asarray(ro.agents_pose)[:, rows]
            avalid[:, kf] = np.asarray(ro.agents_valid)[:, rows]
            sim = replace(sim, agents_pose=apose, agents_valid=avalid)
        for f, r in zip(kf, rows):
            fut = r + spf * np.arange(1, H + 1)
            if fut[-1] >= len(states):
                break
            origin = states[r, :3]
            poses = to_ego_frame(states[fut, :3], origin)
            trajs.append(np.concatenate([poses, states[fut, 3:4]], axis=1))
            accel = (states[r, 3] - states[r - 1, 3]) / ro.dt if r > 0 else 0.0
            yaw_rate = float(np.angle(np.exp(1j * (states[r, 2] - states[r - 1, 2])))) / ro.dt if r > 0 else 0.0
            samples.append(build_scene_sample(sim, int(f), spec, ego_status=np.array([states[r, 3], accel, yaw_rate])))
            scenes.append(log.scene_name)
            frames.append(int(f))
    if not trajs:
        raise DatasetError(f"no rollout covers a keyframe plus {H} driven keyframes; drive longer or lower the horizon")
    arrays = stack_samples(samples)
    return RolloutWindows(trajectories=np.stack(trajs), index=np.arange(len(trajs)), arrays=arrays,
                          scene=np.array(scenes), frame=np.array(frames, dtype=np.int64))


# --------------------------------------------------------------------------- the report


def _param_rows(rules: RuleSet, params: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    rows = []
    for r in rules.rules:
        for k, spec in r.params.items():
            v = params[k]
            same = bool(np.all(v == v[0]))
            rows.append({"rule": r.name, "parameter": k, "unit": spec.unit,
                         "value": float(v[0]) if same else f"per window: {v.min():.3g} .. {v.max():.3g} (median {np.median(v):.3g})",
                         "default": spec.default})
    return rows


def compliance_report(
    out_dir: str | Path,
    *,
    rules: RuleSet,
    arrays: Mapping[str, np.ndarray],
    trajectories: np.ndarray | None = None,
    index: np.ndarray | Sequence[int] | None = None,
    params: Mapping[str, Any] | None = None,
    title: str = "STL compliance",
    worst: int = 6,
    intro: str = "",
    sections: Sequence[tuple[str, str]] = (),
    controllability: ControllabilityResult | None = None,
    m_per_px: float = 1.0,
) -> Path:
    """Write ``report.md`` / ``report.html`` (+ ``compliance.json``, PNGs) into ``out_dir``; returns report.md.

    ``arrays`` are the stacked SceneSamples (the scene of every window).
    Without ``trajectories`` their complete logged futures are scored;
    otherwise ``trajectories`` ``(N, T, 3|4)`` with ``index`` (the window of
    each; default: one per window). ``params`` gives every parameter (one
    value or one per trajectory) or is None for the rule defaults.
    ``sections`` (heading, Markdown) are appended; a ``controllability``
    figure already written into ``out_dir`` is shown.
    """
    from diffpilot.data.scene_sample import scene_samples_from_arrays
    from diffpilot.sim.driving.plots import plot_scene
    from diffpilot.sim.report import markdown_table, write_report

    if worst < 0:
        raise ValueError(f"worst must be >= 0, got {worst}")
    res = evaluate_compliance(arrays, rules, params, trajectories=trajectories, index=index)
    traj, _ = _trajectories(arrays, trajectories, index)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hist = _histograms(res, out / "robustness_hist.png")

    # worst windows: lowest robustness over the applicable rules, one per window
    order = np.argsort(res.min_robustness, kind="stable")
    picked: list[int] = []
    seen: set[int] = set()
    for i in order:
        w = int(res.index[i])
        if w not in seen:
            seen.add(w)
            picked.append(int(i))
        if len(picked) >= worst:
            break
    worst_rows, worst_md = [], []
    for rank, i in enumerate(picked):
        w = int(res.index[i])
        rho = {k: float(v[i]) for k, v in res.robustness.items() if res.applies[k][i]}
        failing = min(rho, key=rho.get)  # type: ignore[arg-type]
        sample = scene_samples_from_arrays(dict(arrays), w)
        name = f"worst_{rank:02d}.png"
        plot_scene(sample, out / name, planned=traj[i, :, :3],
                   title=f"#{rank} {failing} {rho[failing]:+.2f}", m_per_px=m_per_px)
        worst_rows.append({"rank": rank, "trajectory": int(i), "window": w, "scene": str(np.asarray(arrays["scene_token"])[w]),
                           "frame": int(np.asarray(arrays["frame"])[w]), "mode": MODES[int(res.modes[i])],
                           "worst_rule": failing, "robustness": rho[failing]})
        worst_md.append(f"![{name}]({name})\n")

    table = res.rows()
    prow = _param_rows(rules, res.params)
    summary = {"title": title, "trajectories": int(len(res.index)), "windows": int(len(np.unique(res.index))),
               "rules": table, "worst": worst_rows,
               "params": {k: (float(v[0]) if np.all(v == v[0]) else v.tolist()) for k, v in res.params.items()}}
    atomic_write_text(out / "compliance.json", json.dumps(summary, indent=2, default=float) + "\n")

    body = []
    if intro:
        body.append(("What was scored", intro))
    body.append(("Satisfaction per rule", markdown_table(table) + (
        f"\n{len(res.index)} trajectories in {len(np.unique(res.index))} windows. A rule counts only where it applies "
        "(lane keeping in keep-lane windows, the lane change in left/right ones); robustness is exact, in the rule's "
        "units (m, m/s, rad, ...), >= 0 means satisfied.\n")))
    body.append(("Robustness histograms", f"![robustness]({hist.name})\n\nDashed line: 0 (the satisfaction boundary); "
                 "values are clipped to their 1–99 % range.\n"))
    if picked:
        body.append((f"Worst {len(picked)} windows", markdown_table(worst_rows) + "\nRed: the scored trajectory; dashed "
                     "black: the logged future.\n\n" + "\n".join(worst_md)))
    if controllability is not None:
        sp = ", ".join(f"{k}: {v:.2f} m/s" for k, v in controllability.mean_speed.items())
        body.append(("Controllability: one scene, different rule parameters",
                     f"![controllability]({controllability.path.name})\n\nMean planned speed per setting: {sp}.\n"))
    body.extend(sections)
    body.append(("Parameters", markdown_table(prow)))
    return write_report(out, title, body)
