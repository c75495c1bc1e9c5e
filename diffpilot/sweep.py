"""Sweeps on Ray Tune: a grid or random search over any trainer or policy setting, ASHA early stopping.

``diffpilot sweep 'sweep.space={train.lr: [1e-3, 3e-4], policy.objective.num_train_steps: [50, 100]}'``
trains one run per combination through the same code as ``diffpilot train``
(:func:`diffpilot.jobs.train_job`), each in ``<out>/trials/<id>`` (its own
resumable checkpoint), reports every training-log row (loss, lr, and the
``eval_*`` scores of the periodic evaluation) to Tune, lets ASHA stop the
weak ones, and writes one table (``results.csv`` + ``results.md``) and
``sweep.png`` (the metric per trial over training). Rerunning the command
restores the Tune experiment: finished trials are kept, unfinished ones
continue from their checkpoints.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import yaml

from diffpilot.fileio import atomic_write_text

__all__ = ["sweep_job", "trial_configs"]

SEARCHES = ("grid", "random")


# --------------------------------------------------------------------------- configuration


def _get(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value


def _has(cfg: dict[str, Any], key: str) -> bool:
    try:
        _get(cfg, key)
    except (KeyError, TypeError):
        return False
    return True


def _check(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``sweep`` block, checked; one error naming the mistake and the fix."""
    sw = dict(cfg["sweep"])
    if sw["search"] not in SEARCHES:
        raise ValueError(f"sweep.search must be one of {list(SEARCHES)}, got {sw['search']!r}")
    if sw["mode"] not in ("min", "max"):
        raise ValueError(f"sweep.mode must be min or max, got {sw['mode']!r}")
    space = sw.get("space")
    if not isinstance(space, dict) or not space:
        raise ValueError("sweep.space must map config keys to value lists, e.g. 'sweep.space={train.lr: [1e-3, 3e-4]}'")
    for key, values in space.items():
        if key.split(".")[0] in ("sweep", "out", "progress", "resume") or not _has(cfg, key):
            raise ValueError(f"sweep.space key {key!r} is not a setting of the training config; use a key such as "
                             f"train.lr, train.batch_size, policy.<option> or seed (see `diffpilot sweep --cfg`)")
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep.space.{key} must be a non-empty list of values, got {values!r}")
        if isinstance(_get(cfg, key), dict):
            raise ValueError(f"sweep.space key {key!r} is a group of settings; sweep its leaves, e.g. {key}.<name>")
    for name in ("samples", "workers"):
        if isinstance(sw[name], bool) or not isinstance(sw[name], int) or sw[name] < 1:
            raise ValueError(f"sweep.{name} must be a positive integer, got {sw[name]!r}")
    asha = sw.get("asha") or {}
    if int(asha.get("grace_period", 1)) < 1 or float(asha.get("reduction_factor", 2)) <= 1:
        raise ValueError("sweep.asha needs grace_period >= 1 and reduction_factor > 1")
    return sw


def trial_configs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The settings of every trial: all combinations (grid) or ``samples`` seeded draws (random)."""
    sw = _check(cfg)
    keys = list(sw["space"])
    if sw["search"] == "grid":
        combos = list(itertools.product(*(sw["space"][k] for k in keys)))
    else:
        rng = random.Random(int(sw.get("seed", 0)))
        combos = [tuple(rng.choice(sw["space"][k]) for k in keys) for _ in range(int(sw["samples"]))]
    return [dict(zip(keys, combo)) for combo in combos]


def _trial_id(settings: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _trial_cfg(base: dict[str, Any], settings: dict[str, Any], out: Path) -> dict[str, Any]:
    cfg = copy.deepcopy({k: v for k, v in base.items() if k != "sweep"})
    for key, value in settings.items():
        _set(cfg, key, value)
    cfg.update(out=str(out / "trials" / _trial_id(settings)), progress=False, resume=True)
    return cfg


def _validate_trial(cfg: dict[str, Any]) -> None:
    """Refuse, before any work, a trial whose settings the trainer or the policy kind would refuse."""
    from diffpilot.jobs import trainer_config
    from diffpilot.policy.registry import policy_class, policy_options
    from diffpilot.train.trainer import check_settings

    kind, _ = policy_options(cfg["policy"], cfg["data"]["name"])
    check_settings(policy_class(kind), trainer_config(cfg))


# --------------------------------------------------------------------------- the trial


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: ``diffpilot train`` with the trial's settings, every log row reported to Tune."""
    import torch
    from ray import tune

    from diffpilot.jobs import train_job

    torch.set_num_threads(1)
    cfg, metric = config["cfg"], config["metric"]
    if (Path(cfg["out"]) / "policy").exists() and (Path(cfg["out"]) / "train_log.csv").exists():
        # restored after the run ended: report its log again so Tune sees the finished trial
        for row in _read_log(Path(cfg["out"]) / "train_log.csv"):
            if metric in row:
                tune.report(row)
        return

    def report(row: dict[str, Any]) -> None:
        if metric not in row:  # e.g. eval_* rows only come with the periodic evaluation
            return
        tune.report({k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(float(v))})

    train_job(cfg, on_log=report)


def _read_log(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- the job


def sweep_job(cfg: dict[str, Any]) -> Path:
    """Run the sweep ``cfg['sweep']`` describes over the training config ``cfg``; returns the out folder."""
    sw = _check(cfg)
    out = Path(cfg["out"]).expanduser().resolve()
    trials = trial_configs(cfg)
    configs = [_trial_cfg(cfg, s, out) for s in trials]
    for c in {_trial_id(s): c for s, c in zip(trials, configs)}.values():
        _validate_trial(c)
    metric, mode = str(sw["metric"]), str(sw["mode"])
    steps, log_every = int(cfg["train"]["steps"]), int(cfg["train"]["log_every"])
    every = int(cfg["train"]["eval_every"] or steps) if metric.startswith("eval_") else log_every
    max_t = max(1, math.ceil(steps / every))

    try:
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
    except ImportError as e:
        raise ValueError(f"diffpilot sweep needs Ray Tune ({e}); install it with pip install 'ray[tune]' 'pyarrow<22'") from e
    from diffpilot.parallel import ray_session

    if cfg["data"]["kind"] not in ("driving",):  # generate the data set once, before the trials read it
        from diffpilot.jobs import generate_job

        generate_job(cfg["data"], bool(cfg.get("progress", False)))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.yaml", yaml.safe_dump(cfg, sort_keys=False))
    asha = sw.get("asha") or {}
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(int(asha.get("grace_period", 1)), max_t),
                              reduction_factor=float(asha.get("reduction_factor", 2)))
    # one trial per combination, named by its settings: tune.grid_search over the prepared configs
    space = {"cfg": tune.grid_search(configs), "metric": metric}
    trainable = tune.with_resources(_trial, {"cpu": 1})
    experiment = out / "tune"
    with ray_session(int(sw["workers"]), sw.get("ray_address")):
        if (experiment / "sweep").exists() and tune.Tuner.can_restore(str(experiment / "sweep")):
            tuner = tune.Tuner.restore(str(experiment / "sweep"), trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=space)
        else:
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                            max_concurrent_trials=int(sw["workers"])),
                run_config=tune.RunConfig(name="sweep", storage_path=str(experiment), verbose=0),
            )
        grid = tuner.fit()
    _write_results(out, trials, configs, grid, metric, mode, max_t)
    return out


def _write_results(out: Path, trials: list[dict[str, Any]], configs: list[dict[str, Any]], grid: Any, metric: str,
                   mode: str, max_t: int) -> None:
    """results.csv / results.md (one row per trial, best first) and sweep.png (the metric over training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_out = {}
    for result in grid:
        c = (result.config or {}).get("cfg") or {}
        by_out[c.get("out")] = result
    keys = list(trials[0]) if trials else []
    rows, curves = [], {}
    for settings, c in zip(trials, configs):
        tid = _trial_id(settings)
        result = by_out.get(c["out"])
        df = result.metrics_dataframe if result is not None else None
        values = [float(v) for v in df[metric].tolist()] if df is not None and metric in df else []
        iters = int(df["training_iteration"].max()) if df is not None and "training_iteration" in df and len(df) else 0
        best = (min(values) if mode == "min" else max(values)) if values else float("nan")
        status = "error" if result is None or result.error is not None else ("finished" if iters >= max_t else "stopped by ASHA")
        steps = int(df["step"].max()) if df is not None and "step" in df and len(df) else 0
        rows.append({"trial": tid, **{k: settings[k] for k in keys}, f"{metric}_last": values[-1] if values else float("nan"),
                     f"{metric}_best": best, "steps": steps, "status": status})
        if values:
            curves[tid] = (df["step"].tolist() if "step" in df else list(range(1, len(values) + 1)), values)
    sign = 1.0 if mode == "min" else -1.0
    rows.sort(key=lambda r: (math.isnan(r[f"{metric}_best"]), sign * r[f"{metric}_best"] if not math.isnan(r[f"{metric}_best"]) else 0.0))
    cols = list(rows[0]) if rows else []
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    md = [f"# Sweep: {metric} ({mode}), {len(rows)} trials", "", "| " + " | ".join(cols) + " |",
          "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    md += ["", "![metric per trial](sweep.png)", "", f"Trials in `trials/<trial>`; rerun the same command to resume."]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for tid, (x, y) in curves.items():
        ax.plot(x, y, label=tid)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep: {metric} per trial")
    if curves:
        ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = out / ".sweep.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out / "sweep.png")
