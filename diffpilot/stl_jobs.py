"""The STL report job behind ``diffpilot stl report``: score logged, sampled or driven trajectories against the rules.

``stl_report_job(cfg)`` takes a dict shaped like ``conf/stl.yaml`` (missing
keys take its defaults, unknown keys are an error) and writes a compliance
report (:func:`diffpilot.stl.report.compliance_report`) for one of three
sources: a split's logged futures, an STL flow planner's open-loop samples,
or closed-loop rollouts of a baseline or that planner.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import SampleSpec
from diffpilot.conf import with_defaults
from diffpilot.fileio import atomic_write_text
from diffpilot.train import fit

__all__ = ["DEFAULTS_FILE", "SOURCES", "stl_config", "stl_report_job"]

DEFAULTS_FILE = Path(__file__).resolve().parent / "conf" / "stl.yaml"
SOURCES = ("data", "planner", "rollouts")
_OPEN_KEYS = ("params", "margins", "controllability")  # dicts whose keys the user chooses


def stl_config(cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cfg`` over the defaults of ``conf/stl.yaml``; an unknown key raises ValueError naming it."""
    return with_defaults("stl", cfg, _OPEN_KEYS)


def _limit(arrays: dict[str, np.ndarray], cfg: dict[str, Any], scenes: list[str] | None = None) -> dict[str, np.ndarray]:
    """The windows of the first ``max_scenes`` scenes (or ``scenes``), at most ``max_windows`` of them, spread evenly."""
    tokens = np.asarray(arrays["scene_token"]).astype(str)
    keep = np.isin(tokens, scenes) if scenes is not None else np.ones(len(tokens), dtype=bool)
    idx = np.flatnonzero(keep & np.asarray(arrays["ego_future_valid"], dtype=bool).all(axis=1))
    if not len(idx):
        raise DatasetError("no window of the selected scenes has a complete logged future to score")
    mw = cfg.get("max_windows")
    if mw is not None:
        if int(mw) < 1:
            raise ValueError(f"max_windows must be >= 1 or null, got {mw}")
        if len(idx) > int(mw):
            idx = idx[np.linspace(0, len(idx) - 1, int(mw)).round().astype(int)]
    return {k: np.asarray(v)[idx] for k, v in arrays.items()}


def _params(cfg: dict[str, Any], rules: Any, train: dict[str, np.ndarray] | None) -> tuple[dict[str, float], str]:
    """Rule parameters: defaults or calibrated on ``train``, then the explicit overrides; and how they were chosen."""
    from diffpilot.stl import calibrate, calibration_report

    values = dict(rules.defaults())
    how = "rule defaults"
    if cfg["calibrated"]:
        if train is None:
            raise ValueError("calibrated: true needs the train split's windows")
        margins = {k: float(v) for k, v in (cfg["calibration"]["margins"] or {}).items() if k in values}
        cal = calibrate(train, rules, margins)
        q = float(cfg["calibration"]["quantile"])
        shared = calibration_report(train, rules, cal, quantile=q)["shared_params"]
        bad = sorted(k for k, v in shared.items() if not np.isfinite(v))
        if bad:
            raise DatasetError(f"calibration gave no value for {bad}: the train split has no complete window")
        values.update({k: float(v) for k, v in shared.items()})
        how = (f"calibrated on `{cfg['train_split']}` ({len(train['command'])} windows): the {q:g} quantile towards the "
               f"loose side of each window's tightest value, plus margins {margins}")
    over = dict(cfg["params"] or {})
    unknown = sorted(set(over) - set(values))
    if unknown:
        raise ValueError(f"params {unknown} belong to no rule in {rules.names}; known: {sorted(values)}")
    values.update({k: float(v) for k, v in over.items()})
    if over:
        how += f"; set by hand: {sorted(over)}"
    return values, how


def _planner(cfg: dict[str, Any], train: dict[str, np.ndarray] | None, out: Path) -> tuple[Any, str]:
    """A parameter-conditioned planner: any saved one from ``planner.checkpoint`` (the STL flow planner or a
    baseline kind), or an STL flow planner trained on ``train`` and saved in ``<out>/planner``."""
    from diffpilot.policy.registry import build_policy, load_policy
    from diffpilot.policy.stl_flow import ParamConditionedPlanner, data_from_logs

    p = cfg["planner"]
    if p.get("checkpoint"):
        planner = load_policy(p["checkpoint"])
        if not isinstance(planner, ParamConditionedPlanner):
            raise ValueError(f"planner.checkpoint={p['checkpoint']} holds a {planner.KIND!r}; the STL report needs a "
                             "rule-conditioned planner (stl_flow_planner, param_ddpm_planner or conditional_vae_planner)")
        return planner, f"{planner.KIND} loaded from `{p['checkpoint']}`"
    if train is None:
        raise ValueError("training the planner needs the train split's windows")
    planner = build_policy({
        "name": "stl_flow_planner", "objective": str(p["objective"]), "sampler_steps": int(p["sampler_steps"]),
        "d_model": int(p["d_model"]), "n_layers": int(p["n_layers"]), "n_heads": int(p["n_heads"]), "seed": int(p["seed"]),
        "num_samples": int(p["samples"]), "network": str(p["network"]), "param_dropout": float(p["param_dropout"]),
        "relative_speed": bool(p["relative_speed"]),
    })
    data = data_from_logs(train, planner.rules, perturb=int(p["perturb"]), seed=int(p["seed"]))
    tic = time.perf_counter()
    losses = fit(planner, data, steps=int(p["train_steps"]), batch_size=int(p["batch_size"]))
    path = planner.save(out / "planner")
    return planner, (f"STL flow planner ({p['objective']}, {p['sampler_steps']} step(s)) trained {p['train_steps']} steps "
                     f"on {len(data)} rows of `{cfg['train_split']}` in {time.perf_counter() - tic:.0f} s (final loss "
                     f"{np.mean(losses[-20:]):.3g}), saved in `{path}`")


def _guidance(cfg: dict[str, Any]) -> Any:
    if not cfg["planner"]["guidance"]:
        return None
    from diffpilot.policy.stl_flow import GuidanceConfig

    return GuidanceConfig(refine=int(cfg["planner"]["guidance_refine"]))


def stl_report_job(cfg: dict[str, Any]) -> Path:
    """Write the STL compliance report ``cfg`` describes; returns the output folder (``report.md`` inside).

    Besides the report: ``compliance.json`` (rates, worst windows,
    parameters), ``settings.json`` (the resolved config) and, where a planner
    was trained, its checkpoint in ``<out>/planner``.
    """
    from diffpilot.data.nuscenes import NuScenesReader, load_scene_samples
    from diffpilot.data.scene_sample import scene_samples_from_arrays
    from diffpilot.driving_jobs import driving_data_job
    from diffpilot.stl import RuleSet
    from diffpilot.stl.report import compliance_report, controllability_figure, trajectories_from_rollouts

    cfg = stl_config(cfg)
    start = time.perf_counter()
    source = str(cfg["source"])
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    rules = RuleSet(list(cfg["rules"]))
    if int(cfg["worst"]) < 0:
        raise ValueError(f"worst must be >= 0, got {cfg['worst']}")
    out = Path(cfg["out"]).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    spec = SampleSpec()
    progress = bool(cfg["progress"])
    root = driving_data_job(cfg["data"])
    version = str(cfg["data"]["version"])
    reader = NuScenesReader(root, version)
    names = sorted(reader.scene_names(cfg["split"]))
    if not names:
        raise DatasetError(f"split {cfg['split']!r} of {root / version} has no scenes")
    if cfg.get("max_scenes") is not None:
        if int(cfg["max_scenes"]) < 1:
            raise ValueError(f"max_scenes must be >= 1 or null, got {cfg['max_scenes']}")
        names = names[: int(cfg["max_scenes"])]
    logs = [reader.scenario_log(n) for n in names]
    need_train = cfg["calibrated"] or (source == "planner" or (source == "rollouts" and cfg["rollouts"]["planner"] == "stl_flow")) \
        and not cfg["planner"].get("checkpoint")
    train = load_scene_samples(root, version, cfg["train_split"], spec, progress=progress) if need_train else None
    if train is not None:
        complete = np.asarray(train["ego_future_valid"], dtype=bool).all(axis=1)
        train = {k: np.asarray(v)[complete] for k, v in train.items()}
    values, how = _params(cfg, rules, train)
    what = [f"- data: `{root}` (version `{version}`), split `{cfg['split']}`, scenes: {', '.join(names)}",
            f"- rules: {', '.join(rules.names)}; parameters: {how}"]
    planner = None
    planner_rules: list[str] = []
    if source == "planner" or (source == "rollouts" and cfg["rollouts"]["planner"] == "stl_flow"):
        planner, info = _planner(cfg, train, out)
        planner_rules = list(planner.param_names)
        planner.set_rule_params(**{k: v for k, v in values.items() if k in planner.plan_params})
        planner.guidance = _guidance(cfg)
        what.append(f"- planner: {info}; conditioned on the report's parameters"
                    + (", with robustness guidance" if planner.guidance else ""))

    sections: list[tuple[str, str]] = []
    if source in ("data", "planner"):
        arrays = _limit(load_scene_samples(root, version, cfg["split"], spec, progress=progress), cfg,
                        [lg.scene_token for lg in logs])
        W = len(arrays["command"])
        if source == "data":
            trajectories, index = None, None
            what.append(f"- scored: the logged futures of {W} windows")
        else:
            n = int(cfg["planner"]["samples"])
            tic = time.perf_counter()
            samples = planner.sample(arrays, np.arange(W), {k: values[k] for k in planner_rules}, n=n,
                                     guidance=planner.guidance)
            wall = time.perf_counter() - tic
            trajectories = samples.states.reshape(W * n, planner.horizon, 4)
            index = np.repeat(np.arange(W), n)
            what.append(f"- scored: {n} samples in each of {W} windows ({samples.nfe} network evaluations, "
                        f"{wall:.2f} s for the batch)")
    else:
        from diffpilot.sim.driving.evaluate import planner_factory
        from diffpilot.sim.driving.runner import run_episodes
        from diffpilot.sim.report import markdown_table

        name = str(cfg["rollouts"]["planner"])
        reactive = bool(cfg["rollouts"]["reactive"])
        # the STL planner drives every scene; a baseline is built fresh for each
        episodes = run_episodes(planner if name == "stl_flow" else planner_factory(name), logs, [reactive], spec=spec)
        rows = [{"scene": ep.scene, **{k: ep.metrics[k] for k in ("progress_m", "collision", "out_of_lane_rate", "pdms",
                                                                   "plan_ms_p50", "wall_s")}} for ep in episodes]
        win = trajectories_from_rollouts([ep.rollout for ep in episodes], logs, spec, horizon=int(cfg["rollouts"]["horizon"]))
        arrays, trajectories, index = win.arrays, win.trajectories, win.index
        what.append(f"- scored: closed-loop drives of `{name}` ({'reactive' if reactive else 'non-reactive'} agents), "
                    f"cut into {len(index)} windows of {trajectories.shape[1]} keyframes of driven future, each in the "
                    "ego frame of the driven pose at its keyframe")
        sections.append(("Closed-loop scores per scene", markdown_table(rows)))

    ctrl = None
    settings = {k: dict(v) for k, v in (cfg["controllability"] or {}).items()}
    if planner is not None and settings:
        keep = {k: {p: float(x) for p, x in v.items() if p in planner.plan_params} for k, v in settings.items()}
        w = int(np.argmin(np.abs(np.asarray(arrays["ego_status"])[:, 0] - np.median(np.asarray(arrays["ego_status"])[:, 0]))))
        ctrl = controllability_figure(planner, scene_samples_from_arrays(arrays, w), keep, out / "controllability.png",
                                      guidance=planner.guidance)
    report = compliance_report(
        out, rules=rules, arrays=arrays, trajectories=trajectories, index=index, params=values,
        title=f"STL compliance: {source}", worst=int(cfg["worst"]), intro="\n".join(what) + "\n", sections=sections,
        controllability=ctrl, m_per_px=spec.raster_m_per_px,
    )
    atomic_write_text(out / "settings.json", json.dumps({"config": cfg, "params": values, "wall_s": time.perf_counter() - start},
                                                        indent=2, default=float) + "\n")
    return report.parent
