"""One-step TransDiffuser students against their multi-step teacher: PDMS and plan latency side by side.

The one-step target of the TransDiffuser issue: within 0.02 PDMS of the multi-step planner at >= 5x lower plan
latency. Trains (resumably, the same runs and folders as ``benchmarks/transdiffuser.py``) the DDPM planner over
``--seeds`` and, per seed, each student in ``--students``: a one-step MeanFlow planner distilled from that seed's
DDPM planner (``policy.teacher``), ``--student-steps`` steps. Then evaluates all of them with the CLI's driving
evaluation on the val split (closed loop non-reactive and reactive, NAVSIM-style one-shot), beside log replay and
the lane follower, and times the seed-0 graphs in onnxruntime (batch 1, 1 thread, rounds interleaved over 40 val
scenes). Each student row gives its PDMS gap to the teacher (mean over seeds) and its speed-up over the
teacher's graph in the same run. ``--drivable-check`` adds every model again planning with the drivable-area check
on (``policy.drivable_check``; the same weights), and ``--accel-limit A`` adds the last of those sets again with the
kept plan's acceleration capped at A m/s^2 (``policy.accel_limit``); each student is compared with the teacher of
the same options.
Writes ``benchmarks/results/transdiffuser_one_step.{json,md}``.

Run: python benchmarks/transdiffuser_one_step.py [--scenes 200] [--steps 10000] [--student-steps 20000]
     [--seeds 0 1] [--students "1 layer, joint fusion" ...] [--drivable-check] [--accel-limit 2.0]
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
    pdms_by_planner,
    ort_latencies,
    run_overrides,
    slug,
    teacher_dir,
    train_runs,
    val_samples,
    variant_copy,
)

from diffpilot.data.nuscenes import load_scene_samples
from diffpilot.data.scenario import SampleSpec
from diffpilot.driving_jobs import driving_data_job
from diffpilot.export.onnx import export_by_kind
from diffpilot.policy.registry import load_policy

NAME = "transdiffuser_one_step"
TEACHER = "transdiffuser"
ONE_STEP = [e for e in VARIANTS["transdiffuser (MeanFlow 1 step, distilled)"] if e != "TEACHER"]
STUDENTS = {
    "2 layers": [],
    "1 layer": ["policy.layers=1"],
    "1 layer, joint fusion": ["policy.layers=1", "policy.fusion=joint"],
    "1 layer, joint fusion, teacher init": ["policy.layers=1", "policy.fusion=joint", "policy.teacher_init=true"],
}
"""Distilled one-step students by name: their config overrides on top of the one-step MeanFlow ones."""
DRIVABLE = " + drivable check"
"""Suffix of the rows planned with ``drivable_check`` on: the same weights, a plan-time option."""
MODES = ("non-reactive", "reactive", "navsim one-shot")
"""Closed loop (agents replaying the log, or reacting) and the NAVSIM-style one-shot score."""


def student_name(key: str, steps: int) -> str:
    return f"transdiffuser (MeanFlow 1 step, distilled, {key}, {steps // 1000}k steps)"


def train(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Teacher and student runs: name -> {"dirs": [policy folder per seed], "train_s_per_1k_steps": [...]}"""
    out = Path(args.out)
    # the table's TransDiffuser runs (trained once for both benchmarks), then the students distilled from them
    teachers = [(TEACHER, teacher_dir(out, s).parent, run_overrides(args, args.steps, s, [])) for s in args.seeds]
    students = [(name, out / f"{slug(name)}_s{s}",
                 run_overrides(args, args.student_steps, s, [*ONE_STEP, *STUDENTS[key], f"policy.teacher={teacher_dir(out, s)}"]))
                for key in args.students for name in [student_name(key, args.student_steps)] for s in args.seeds]
    infos = [info for group in (teachers, students) for info in train_runs([(run, o) for _, run, o in group], args.jobs)]
    runs: dict[str, dict[str, Any]] = {}
    for (name, run, _), info in zip(teachers + students, infos):
        r = runs.setdefault(name, {"dirs": [], "train_s_per_1k_steps": []})
        r["dirs"].append(str(run / "policy"))
        r["train_s_per_1k_steps"].append(info["train_s_per_1k_steps"])
    return runs


def add_variants(runs: dict[str, dict[str, Any]], options: dict[str, str], names: list[str], suffix: str,
                 folder: str, **changes: Any) -> None:
    """Each run in ``names`` again as plan-time copies with ``changes`` (the same weights), saved beside each seed's
    folder (name + ``folder``), as the row ``name + suffix`` whose options are its source's plus ``suffix``."""
    for name in names:
        dirs = [variant_copy(d, Path(d).parent.with_name(Path(d).parent.name + folder) / "policy", **changes)
                for d in runs[name]["dirs"]]
        runs[name + suffix] = {**runs[name], "dirs": dirs}
        options[name + suffix] = options[name] + suffix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10000, help="training steps of the multi-step (DDPM) teacher")
    ap.add_argument("--student-steps", type=int, default=20000)
    ap.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--score-every", type=int, default=4, help="score candidates of every n-th train window")
    ap.add_argument("--recovery", type=int, default=1, help="recovery windows per logged keyframe")
    ap.add_argument("--navsim-frames", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once, one torch thread each")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds over the 40 val scenes")
    ap.add_argument("--drivable-check", action="store_true",
                    help="also plan every model with the drivable-area check on (policy.drivable_check)")
    ap.add_argument("--accel-limit", type=float, default=0.0,
                    help="also plan the last set of models with the kept plan's acceleration capped (policy.accel_limit)")
    ap.add_argument("--max-val", type=int, default=None)
    ap.add_argument("--out", default="runs/bench/transdiffuser")
    args = ap.parse_args()
    out = Path(args.out)
    root = driving_data_job({"num_scenes": args.scenes, "seed": 0, "workers": args.workers})
    runs = train(args)
    options = {name: "" for name in runs}  # each row's plan-time options, as its name's suffix
    if args.drivable_check:  # every run again with the drivable-area check, each compared with the teacher's the same
        add_variants(runs, options, list(runs), DRIVABLE, "_drivable", drivable_check=True)
    if args.accel_limit > 0:  # the last set again with the kept plan's acceleration capped
        last = [name for name, o in options.items() if o == (DRIVABLE if args.drivable_check else "")]
        add_variants(runs, options, last, f" + accel limit {args.accel_limit:g}", f"_accel{args.accel_limit:g}",
                     accel_limit=args.accel_limit)
    labels = {d: name for name, r in runs.items() for d in r["dirs"]}
    res = evaluate(["log_replay", "lane_follower", *labels], out / "eval_one_step", args)

    scores = pdms_by_planner(res, labels)
    samples = val_samples(load_scene_samples(root, "v1.0-diffpilot", "val", SampleSpec(), progress=False))
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    graphs = {name: str(export_by_kind(load_policy(r["dirs"][0]), out / "onnx" / f"{Path(r['dirs'][0]).parent.name}.onnx",
                                       batch=1)) for name, r in runs.items()}  # the on-board export
    ms = ort_latencies(graphs, samples, args.rounds)
    rows = []
    for name in ["log_replay", "lane_follower", *runs]:
        row: dict[str, Any] = {"planner": name}
        teacher = TEACHER + options.get(name, "")  # the same plan-time options
        for mode in MODES:
            vals = scores.get((name, mode), [])
            if vals:
                row[f"pdms {mode}"] = float(np.mean(vals))
                if len(vals) > 1:
                    row[f"pdms std {mode}"] = float(np.std(vals, ddof=1))
                if name in runs and name != teacher and scores.get((teacher, mode)):
                    row[f"gap to teacher {mode}"] = float(np.mean(vals) - np.mean(scores[(teacher, mode)]))
        if name in ms:
            row["plan_ms_p50_onnxruntime"] = ms[name]
            row["speedup_vs_teacher"] = ms[teacher] / ms[name]
            row["train_s_per_1k_steps"] = float(np.mean(runs[name]["train_s_per_1k_steps"]))
        rows.append(row)
    cmd = (f"python benchmarks/transdiffuser_one_step.py --scenes {args.scenes} --steps {args.steps} "
           f"--student-steps {args.student_steps} --seeds {' '.join(map(str, args.seeds))} --students "
           + " ".join(f'"{s}"' for s in args.students) + f" --workers {args.workers} --jobs {args.jobs} "
           f"--recovery {args.recovery}" + (" --drivable-check" if args.drivable_check else "")
           + (f" --accel-limit {args.accel_limit:g}" if args.accel_limit > 0 else "") + f" --rounds {args.rounds}")
    notes = (f"{args.scenes} embedded scenes; the teacher is the table's TransDiffuser (DDPM, {args.steps} steps, 5 DDIM "
             f"steps per plan); each student is one-step MeanFlow distilled from the same seed's teacher, "
             f"{args.student_steps} steps; PDMS: mean over seeds {args.seeds} (`pdms std`: std over seeds). "
             "`gap to teacher`: student minus teacher, mean PDMS (target: >= -0.02). `plan_ms_p50_onnxruntime`: the seed-0 "
             f"graph exported for on board (batch fixed at 1), 1 thread, {args.rounds} rounds over 40 val scenes, every graph once per round in turn, "
             "including the runtime's feature building; `speedup_vs_teacher`: the teacher's p50 over the row's "
             "(target: >= 5). Rows ending in '+ drivable check': the same weights planning with `drivable_check` on, "
             "compared with the teacher's row of the same options; '+ accel limit A': planning with `accel_limit` A as well. "
             "Closed loop as in `transdiffuser.md`.")
    write_results(NAME, cmd, rows, notes)


if __name__ == "__main__":
    main()
