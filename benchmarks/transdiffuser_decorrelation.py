"""The decorrelation loss over more seeds: does its weight raise candidate diversity, and what does it cost in PDMS?

The decorrelation target of the TransDiffuser issue: the loss measurably raises candidate diversity without
lowering PDMS. Trains (resumably, the same runs and folders as ``benchmarks/transdiffuser.py``, so its seeds are
reused) the DDPM planner at each ``--weights`` value over ``--seeds``, evaluates every model with the CLI's driving
evaluation on the val split (closed loop non-reactive and reactive, NAVSIM-style one-shot) and measures its candidate
diversity (mean pairwise distance of the 8 candidates, closed-loop plans over 40 val scenes). Each weight's row gives
the mean and std over seeds, and its paired change against weight 0 (same seed; mean and standard error over seeds).
Writes ``benchmarks/results/transdiffuser_decorrelation.{json,md}``.

Run: python benchmarks/transdiffuser_decorrelation.py [--scenes 200] [--steps 10000] [--seeds 0 1 2 3]
     [--weights 0 0.02 0.07 0.2]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from results_io import write_results
from transdiffuser import (
    VARIANTS,
    evaluate,
    latency_and_diversity,
    pdms_by_planner,
    run_overrides,
    slug,
    train_runs,
    val_samples,
)

from diffpilot.data.nuscenes import load_scene_samples
from diffpilot.data.scenario import SampleSpec
from diffpilot.driving_jobs import driving_data_job
from diffpilot.policy.transdiffuser import TransDiffuserConfig

NAME = "transdiffuser_decorrelation"
MODES = ("non-reactive", "reactive", "navsim one-shot")
KEY = "policy.decorrelation_weight="


def table_names() -> dict[float, str]:
    """The main table's DDPM rows by decorrelation weight (their run folders are shared)."""
    names = {TransDiffuserConfig.decorrelation_weight: "transdiffuser"}
    for name, extra in VARIANTS.items():
        weights = [float(e[len(KEY):]) for e in extra if e.startswith(KEY)]
        if weights and len(extra) == 1:
            names[weights[0]] = name
    return names


def run_name(weight: float) -> str:
    return table_names().get(weight, f"transdiffuser (decorrelation {weight:g})")


def paired(values: dict[float, list[float]], weight: float) -> tuple[float, float] | None:
    """Mean and standard error over seeds of ``weight``'s value minus weight 0's, seed by seed."""
    if weight == 0.0 or 0.0 not in values or len(values[0.0]) != len(values[weight]) or len(values[weight]) < 2:
        return None
    d = np.asarray(values[weight]) - np.asarray(values[0.0])
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.02, 0.07, 0.2])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--score-every", type=int, default=4, help="score candidates of every n-th train window")
    ap.add_argument("--recovery", type=int, default=1, help="recovery windows per logged keyframe")
    ap.add_argument("--navsim-frames", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once, one torch thread each")
    ap.add_argument("--max-val", type=int, default=None)
    ap.add_argument("--out", default="runs/bench/transdiffuser")
    args = ap.parse_args()
    if any(w < 0 for w in args.weights):
        ap.error(f"--weights must be >= 0, got {args.weights}")
    out = Path(args.out)
    root = driving_data_job({"num_scenes": args.scenes, "seed": 0, "workers": args.workers})
    weights = sorted(set(args.weights) | {0.0})  # weight 0 is every change's reference
    runs = {w: [out / f"{slug(run_name(w))}_s{s}" for s in args.seeds] for w in weights}
    tasks = [(run, run_overrides(args, args.steps, s, [f"{KEY}{w}"])) for w in weights for run, s in zip(runs[w], args.seeds)]
    train_runs(tasks, args.jobs)
    dirs = {str(run / "policy"): w for w, rs in runs.items() for run in rs}
    res = evaluate(["lane_follower", *dirs], out / "eval_decorrelation", args)
    scores = pdms_by_planner(res, {d: run_name(w) for d, w in dirs.items()})
    samples = val_samples(load_scene_samples(root, "v1.0-diffpilot", "val", SampleSpec(), progress=False))
    diversity = {w: [latency_and_diversity(str(run / "policy"), samples, out, onnx=False)[0]["diversity_m"] for run in rs]
                 for w, rs in runs.items()}
    metrics = {"diversity": diversity, **{f"pdms {mode}": {v: scores.get((run_name(v), mode), []) for v in weights}
                                          for mode in MODES}}
    rows = []
    for w in weights:
        row: dict[str, Any] = {"decorrelation weight": w, "seeds": len(args.seeds),
                               "diversity m": float(np.mean(diversity[w])),
                               "diversity std": float(np.std(diversity[w], ddof=1)) if len(args.seeds) > 1 else None}
        for mode in MODES:
            vals = scores.get((run_name(w), mode), [])
            if vals:
                row[f"pdms {mode}"] = float(np.mean(vals))
                row[f"pdms std {mode}"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        for metric, values in metrics.items():
            change = paired(values, w)
            if change:
                row[f"{metric} change vs 0"], row[f"{metric} change se"] = change
        row["per seed diversity m"] = [round(x, 4) for x in diversity[w]]
        row["per seed pdms non-reactive / reactive"] = [
            f"{a:.3f} / {b:.3f}" for a, b in zip(scores.get((run_name(w), "non-reactive"), []),
                                                 scores.get((run_name(w), "reactive"), []))]
        rows.append(row)
    cmd = (f"python benchmarks/transdiffuser_decorrelation.py --scenes {args.scenes} --steps {args.steps} --seeds "
           f"{' '.join(map(str, args.seeds))} --weights {' '.join(f'{w:g}' for w in args.weights)} --workers {args.workers} "
           f"--jobs {args.jobs} --recovery {args.recovery}" + (f" --max-val {args.max_val}" if args.max_val else ""))
    notes = (f"{args.scenes} embedded scenes; TransDiffuser (DDPM, {args.steps} steps x batch {args.batch}, 5 DDIM steps "
             f"per plan, 8 candidates, learned selection, plan guards on) at each decorrelation weight, seeds {args.seeds} "
             "(the main table's folders where it trained the same run). `diversity m`: mean pairwise distance of a "
             "plan's candidates (m, mean over waypoints), closed-loop plans over 40 val scenes, mean over seeds. "
             "`... change vs 0`: the weight's value minus weight 0's of the same seed, mean over seeds, with its "
             "standard error (`... change se`). Closed loop and one-shot as in `transdiffuser.md`.")
    write_results(NAME, cmd, rows, notes)


if __name__ == "__main__":
    main()
