"""TransDiffuser against every planner we have, closed loop on the embedded driving set.

Trains (resumably, through ``diffpilot train``) on the train split of the
embedded set (``--scenes`` scenes, 20 % held out as val): TransDiffuser with
its learned selection head over ``--seeds`` seeds, the same without the
decorrelation loss, on logs + STL trajectory-optimization augmentation, and as
one-step MeanFlow; the DiffusionDrive-style truncated anchor peer (anchors from
``diffpilot driving anchors``); the STL flow planner (its plan keeps the most rule-robust of 16 samples). Then runs the driving
evaluation of the CLI on the val split: closed loop non-reactive and reactive,
open loop (L2, collision at 1/2/3 s) and NAVSIM-style one-shot PDMS, with the
log replay, constant velocity, ego-status MLP and lane-follower baselines, the
warm-started and the STL-guided TransDiffuser (the seed-0 weights), the same
weights without their plan guards (TransDiffuser without the clearance check,
the peer without clearance check and standstill hold; every seed), and the
oracle best-of-N (the candidate the scorer likes best; one-shot only, an upper
bound, never a planner). Per TransDiffuser variant: mean and std over seeds,
candidate diversity, plan latency p50 in torch and in onnxruntime (batch 1, 1
thread), train s per 1k steps.

Run: python benchmarks/transdiffuser.py [--scenes 200] [--steps 3000] [--seeds 0 1] [--phase all|train|eval]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plan_timing import interleaved_plan_ms
from results_io import write_results

from diffpilot.cli import load_config
from diffpilot.data.nuscenes import NuScenesReader, load_scene_samples
from diffpilot.data.scenario import SampleSpec
from diffpilot.driving_jobs import driving_anchors_job, driving_data_job, driving_eval_job
from diffpilot.fileio import atomic_write_text
from diffpilot.jobs import train_job
from diffpilot.policy.registry import load_policy
from diffpilot.policy.transdiffuser import candidate_diversity

NAME = "transdiffuser"
VARIANTS = {
    "transdiffuser": [],
    "transdiffuser (no decorrelation)": ["policy.decorrelation_weight=0.0"],
    "transdiffuser (decorrelation 0.07)": ["policy.decorrelation_weight=0.07"],
    "transdiffuser (decorrelation 0.2)": ["policy.decorrelation_weight=0.2"],
    "transdiffuser (logs + STL augmentation)": ["AUG"],
    "transdiffuser (MeanFlow 1 step)": ["policy.objective=meanflow", "policy.sampler=meanflow", "policy.sampler_steps=1"],
    "transdiffuser (MeanFlow 1 step, distilled)": ["policy.objective=meanflow", "policy.sampler=meanflow",
                                                   "policy.sampler_steps=1", "TEACHER"],
    "transdiffuser (MeanFlow 1 step, distilled, 1 layer)": ["policy.objective=meanflow", "policy.sampler=meanflow",
                                                            "policy.sampler_steps=1", "policy.layers=1", "TEACHER"],
    "transdiffuser (no recovery windows)": ["data.recovery_copies=0"],
}
PLAN_TIME_VARIANTS = (
    ("transdiffuser (no clearance check)", "transdiffuser", {"clearance_check": False}),
    ("diffusiondrive-style peer (no guards)", "diffusiondrive-style peer", {"clearance_check": False, "hold_below_m": 0.0}),
)
SUB = ("pdms", "nc", "dac", "ttc", "ep", "comfort")
OPEN = ("l2_1s", "l2_2s", "l2_3s", "collision_1s", "collision_2s", "collision_3s")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


def data_overrides(args: argparse.Namespace) -> list[str]:
    return ["data=driving", f"data.num_scenes={args.scenes}", f"data.workers={args.workers}",
            f"data.score_every={args.score_every}", f"data.recovery_copies={args.recovery}", "progress=false"]


def run_overrides(args: argparse.Namespace, steps: int, seed: int, extra: list[str]) -> list[str]:
    """A TransDiffuser run's training overrides: the driving data, steps, batch and seed, then ``extra``."""
    return ["policy=transdiffuser", *data_overrides(args), f"train.steps={steps}", f"train.batch_size={args.batch}",
            f"seed={seed}", f"policy.seed={seed}", *extra]


def teacher_dir(out: Path, seed: int) -> Path:
    """The seed's TransDiffuser policy folder: the teacher of the distilled rows."""
    return out / f"{slug('transdiffuser')}_s{seed}" / "policy"


def train_one(out: Path, overrides: list[str]) -> dict[str, Any]:
    """Train (or resume) one run on one torch thread; its training seconds per 1k steps by the trainer's own clock
    (``train_s`` of the last log row: optimisation only, resumed runs add up, the candidate bank's scoring excluded)."""
    torch.set_num_threads(1)
    cfg = load_config("train", [*overrides, f"out={out}"])
    train_job(cfg)
    with open(out / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    return {"train_s_per_1k_steps": 1e3 * float(last["train_s"]) / max(int(last["step"]), 1), "steps": int(last["step"])}


def train_runs(tasks: list[tuple[Path, list[str]]], jobs: int) -> list[dict[str, Any]]:
    """:func:`train_one` over ``tasks``, ``jobs`` at a time in spawned processes (results in task order)."""
    if jobs <= 1:
        return [train_one(run, overrides) for run, overrides in tasks]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(train_one, *zip(*tasks)))


def augmentation(args: argparse.Namespace, root: Path, out: Path) -> Path:
    """STL trajectory-optimization trajectories for every ``--aug-every``-th train window (resumable)."""
    from diffpilot.planning.augment import augment

    arrays = load_scene_samples(root, "v1.0-diffpilot", "train", SampleSpec(), progress=False)
    complete = np.flatnonzero(np.asarray(arrays["ego_future_valid"], bool).all(1))
    return augment(arrays, out, samples_per_window=args.aug_samples, windows=complete[:: args.aug_every],
                   workers=args.workers, progress=True, steps=100, seed=0, version="v1.0-diffpilot", split="train")


def train_all(args: argparse.Namespace, root: Path) -> dict[str, dict[str, Any]]:
    """Every trained planner: name -> {"dirs": [policy folders per seed], "train_s_per_1k_steps": [...], "steps": n}"""
    out = Path(args.out)
    aug = augmentation(args, root, out / "augmented")
    anchors = driving_anchors_job({"data": {"num_scenes": args.scenes, "workers": args.workers}, "k": 20,
                                   "out": str(out / "anchors"), "progress": False})
    tasks: list[tuple[str, Path, list[str]]] = []
    for name, kind, extra in (("diffusiondrive-style peer", "diffusiondrive_planner", [f"policy.anchors={anchors}"]),
                              ("stl flow planner", "stl_flow_planner", [])):
        tasks.append((name, out / slug(name), [f"policy={kind}", *data_overrides(args), f"train.steps={args.steps}",
                                               f"train.batch_size={args.batch}", *extra]))
    distilled: list[tuple[str, Path, list[str]]] = []  # trained after their teachers, the same seed's TransDiffuser
    for name, extra in VARIANTS.items():
        steps = args.meanflow_steps if "policy.objective=meanflow" in extra and args.meanflow_steps else args.steps
        for seed in args.seeds:
            over = [{"AUG": f"data.augmented={aug}", "TEACHER": f"policy.teacher={teacher_dir(out, seed)}"}.get(e, e)
                    for e in extra]
            (distilled if "TEACHER" in extra else tasks).append(
                (name, out / f"{slug(name)}_s{seed}", run_overrides(args, steps, seed, over)))
    infos = train_runs([(run, overrides) for _, run, overrides in tasks], args.jobs)
    infos += train_runs([(run, overrides) for _, run, overrides in distilled], args.jobs)
    tasks += distilled
    runs: dict[str, dict[str, Any]] = {}
    for (name, run, _), info in zip(tasks, infos):
        r = runs.setdefault(name, {"dirs": [], "train_s_per_1k_steps": [], "steps": info["steps"]})
        r["dirs"].append(str(run / "policy"))
        r["train_s_per_1k_steps"].append(info["train_s_per_1k_steps"])
    return {name: runs[name] for name in [*VARIANTS, "diffusiondrive-style peer", "stl flow planner"]}


def fingerprint(planner: str) -> str:
    """What an evaluation of ``planner`` depends on: a baseline's name, or a saved policy's config and weights."""
    folder = Path(planner)
    if not (folder / "config.yaml").is_file():
        return planner
    digest = hashlib.sha1()
    for name in sorted(p.name for p in folder.iterdir() if p.is_file()):
        digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()


def evaluate(planners: list[str], ev: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The CLI's driving evaluation of ``planners`` in ``ev`` (resumable).

    An evaluation of these planners is reused. Planners added since it ran, or saved anew (their config or
    weights changed), are evaluated on their own, beside the lane follower (the reference of EP), and their
    rows merged in, so a new row does not re-run the others.
    """
    def run(names: list[str], where: Path) -> dict[str, Any]:
        driving_eval_job({"data": {"num_scenes": args.scenes, "workers": args.workers}, "planners": names,
                          "max_scenes": args.max_val, "navsim": {"frames_per_scene": args.navsim_frames},
                          "workers": args.workers, "out": str(where), "progress": True, "figures": {"scenes": 1}})
        return json.loads((where / "results.json").read_text())

    def is_row_of(method: str, planner: str) -> bool:  # a saved policy's rows are labelled <kind>:<run folder>
        return method == planner or method.endswith(":" + Path(planner).parent.name)

    listed = ev / "bench_planners.json"
    done = json.loads(listed.read_text()) if listed.exists() else {}
    prints = {p: fingerprint(p) for p in planners}
    current = [p for p in planners if isinstance(done, dict) and done.get(p) == prints[p]]
    if not isinstance(done, dict) or not set(done) <= set(planners) or "lane_follower" not in current:
        res = run(planners, ev)
    else:
        res = json.loads((ev / "results.json").read_text())
        todo = [p for p in planners if p not in current]
        if todo:
            added = run(["lane_follower", *todo], ev / f"added_{len(list(ev.glob('added_*')))}")

            def stale(method: str) -> bool:
                return any(is_row_of(method, p) for p in todo)

            res["summary"] = [r for r in res["summary"] if not stale(r["method"])]
            res["summary"] += [r for r in added["summary"] if r["method"] != "lane_follower"]
            res["navsim"] = [r for r in res.get("navsim", []) if not stale(r["method"])]
            res["navsim"] += [r for r in added.get("navsim", []) if r["method"] != "lane_follower"]
            for key in ("per_scene", "navsim_per_scene"):
                res[key] = {m: v for m, v in res.get(key, {}).items() if not stale(m)}
                res[key].update({m: v for m, v in added.get(key, {}).items() if m != "lane_follower"})
            atomic_write_text(ev / "results.json", json.dumps(res, indent=1))
    atomic_write_text(listed, json.dumps(prints, indent=1))
    return res


def pdms_by_planner(res: dict[str, Any], names: dict[str, str]) -> dict[tuple[str, str], list[float]]:
    """PDMS of each (planner name, mode) of an :func:`evaluate` result, one value per seed: closed-loop modes and
    ``navsim one-shot``. ``names`` maps a saved policy folder to its planner name (rows of other planners keep theirs)."""
    def name_of(method: str) -> str:  # a saved policy's rows are labelled <kind>:<run folder>
        return next((n for d, n in names.items() if method.endswith(":" + Path(d).parent.name)), method)

    scores: dict[tuple[str, str], list[float]] = {}
    for row in [*res["summary"], *({**r, "mode": "navsim one-shot"} for r in res.get("navsim", []))]:
        scores.setdefault((name_of(row["method"]), row["mode"]), []).append(float(row["pdms"]))
    return scores


def variant_copy(src: str, dst: Path, **changes: Any) -> str:
    """A trained planner with changed plan-time options (warm start, guidance, guards), saved as its own folder."""
    policy = load_policy(src)
    for k, v in changes.items():
        setattr(policy.cfg, k, v)
        policy.config[k] = v
    if dst.exists():
        shutil.rmtree(dst)
    policy.save(dst)
    return str(dst)


def val_samples(arrays: dict[str, np.ndarray], n: int = 40) -> list[Any]:
    """``n`` val windows spread over the split: the scenes every latency and diversity figure is taken on."""
    from diffpilot.data.scene_sample import scene_samples_from_arrays

    idx = np.linspace(0, len(arrays["command"]) - 1, n).astype(int)
    return [scene_samples_from_arrays(arrays, int(i)) for i in idx]


def latency_and_diversity(policy_dir: str, samples: list[Any], tmp: Path,
                          onnx: bool = True) -> tuple[dict[str, float | None], str | None]:
    """Plan p50 (ms) in torch at batch 1 on 1 thread and candidate diversity on ``samples``, and with ``onnx`` the
    exported graph's path (timed with the others by :func:`ort_latencies`; None where the options stay in torch)."""
    from diffpilot.export.onnx import export_by_kind

    torch.set_num_threads(1)
    policy = load_policy(policy_dir)
    policy.reset(seed=0)
    times, div = [], []
    for s in samples:
        t0 = time.perf_counter()
        policy.plan(s)
        times.append(1e3 * (time.perf_counter() - t0))
        if getattr(policy, "last_candidates", None) is not None:
            div.append(float(candidate_diversity(torch.as_tensor(policy.last_candidates)[None])[0]))
    out = {"plan_ms_p50_torch": float(np.median(times[3:])), "diversity_m": float(np.mean(div)) if div else None}
    cfg = getattr(policy, "cfg", None)
    if not onnx or getattr(cfg, "warm_start", False) or getattr(cfg, "guidance", False):
        return out, None  # plan-time options that stay in torch
    path = tmp / (Path(policy_dir).parent.name + ".onnx")
    export_by_kind(policy, path)
    return out, str(path)


def ort_latencies(paths: dict[str, str], samples: list[Any], rounds: int = 5) -> dict[str, float]:
    """Plan p50 (ms) of each exported graph in onnxruntime, batch 1, 1 thread: ``rounds`` passes over ``samples``,
    every graph once per round in turn, so a slow spell of the machine falls on all of them alike."""
    from diffpilot.export.runtime import load_runtime

    runtimes = {name: load_runtime(path, threads=1) for name, path in paths.items()}
    return {name: float(np.median(t)) for name, t in interleaved_plan_ms(runtimes, samples, rounds).items()}


def oracle_navsim(policy_dir: str, root: Path, frames: int) -> dict[str, float]:
    """One-shot best-of-N with the ground-truth scorer: the upper bound of any selection rule."""
    from diffpilot.data.scene_sample import build_scene_sample
    from diffpilot.sim.driving.candidates import SUBSCORES, score_candidates

    policy = load_policy(policy_dir)
    reader = NuScenesReader(root, "v1.0-diffpilot")
    logs = reader.scenario_logs("val")
    rows = []
    policy.reset(seed=0)
    for log in logs:
        T = log.num_frames
        for f in np.linspace(policy.cfg.past_steps, T - 2, frames).astype(int):
            sample = build_scene_sample(log, int(f), SampleSpec())
            policy.plan(sample)
            scores = score_candidates(log, int(f), policy.last_candidates)
            rows.append(scores[int(np.argmax(scores[:, SUBSCORES.index("pdms")]))])
    m = np.mean(rows, axis=0)
    return {k: float(m[i]) for i, k in enumerate(SUBSCORES)} | {"samples": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--score-every", type=int, default=4, help="score candidates of every n-th train window")
    ap.add_argument("--aug-every", type=int, default=8, help="augment every n-th complete train window")
    ap.add_argument("--aug-samples", type=int, default=4, help="parameter samples per window and mode")
    ap.add_argument("--navsim-frames", type=int, default=4)
    ap.add_argument("--meanflow-steps", type=int, default=None, help="steps of the MeanFlow variant (default: --steps)")
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once, one torch thread each")
    ap.add_argument("--recovery", type=int, default=1, help="recovery windows per logged keyframe for every learned planner")
    ap.add_argument("--max-val", type=int, default=None)
    ap.add_argument("--phase", choices=("all", "train", "eval"), default="all")
    ap.add_argument("--out", default="runs/bench/transdiffuser")
    args = ap.parse_args()
    out = Path(args.out)
    root = driving_data_job({"num_scenes": args.scenes, "seed": 0, "workers": args.workers})
    runs = train_all(args, root)
    (out / "runs.json").write_text(json.dumps(runs, indent=2))
    if args.phase == "train":
        return

    main_dir = runs["transdiffuser"]["dirs"][0]
    for name, src, changes in PLAN_TIME_VARIANTS:  # the same weights with plan-time options changed, every seed
        runs[name] = {**runs[src], "dirs": [variant_copy(d, out / f"{slug(name)}_s{i}" / "policy", **changes)
                                            for i, d in enumerate(runs[src]["dirs"])]}
    runs["transdiffuser + warm start"] = {"dirs": [variant_copy(main_dir, out / "warm" / "policy", warm_start=True)],
                                         "train_s_per_1k_steps": [None]}
    runs["transdiffuser + STL guidance"] = {"dirs": [variant_copy(main_dir, out / "guided" / "policy", guidance=True)],
                                            "train_s_per_1k_steps": [None]}
    labels: dict[str, tuple[str, int]] = {}
    planners = ["log_replay", "constant_velocity", "ego_mlp", "lane_follower"]
    for name, r in runs.items():
        for i, d in enumerate(r["dirs"]):
            planners.append(d)
            labels[d] = (name, i)
    res = evaluate(planners, out / "eval", args)
    val = load_scene_samples(root, "v1.0-diffpilot", "val", SampleSpec(), progress=False)
    tmp = out / "onnx"
    tmp.mkdir(parents=True, exist_ok=True)

    def method_of(label: str) -> tuple[str, int]:
        for d, v in labels.items():
            if label.endswith(":" + Path(d).parent.name):
                return v
        return label, 0

    rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in res["summary"]:
        name, _ = method_of(row["method"])
        groups.setdefault((name, row["mode"]), []).append(row)
    for row in res.get("navsim", []):
        name, _ = method_of(row["method"])
        groups.setdefault((name, "navsim one-shot"), []).append(row)
    extra: dict[str, dict[str, Any]] = {}
    samples = val_samples(val)
    graphs: dict[str, str] = {}
    for name, r in runs.items():
        if not Path(r["dirs"][0]).exists():
            continue
        measured = [latency_and_diversity(d, samples, tmp, onnx=i == 0) for i, d in enumerate(r["dirs"])]
        stats = [m for m, _ in measured]
        if measured[0][1] is not None:
            graphs[name] = measured[0][1]
        extra[name] = {k: float(np.mean([s[k] for s in stats if s.get(k) is not None]))
                       for k in stats[0] if any(s.get(k) is not None for s in stats)}
        times = [t for t in r["train_s_per_1k_steps"] if t is not None]
        if times:
            extra[name]["train_s_per_1k_steps"] = float(np.mean(times))
        if r.get("steps"):
            extra[name]["train_steps"] = int(r["steps"])
    for name, ms in ort_latencies(graphs, samples).items():
        extra[name]["plan_ms_p50_onnxruntime"] = ms
    for (name, mode), rs in groups.items():
        row = {"method": name, "mode": mode, "seeds": len(rs)}
        for k in (*SUB, "progress_m", "collision", *OPEN):
            vals = [float(x[k]) for x in rs if x.get(k) is not None]
            if vals:
                row[k] = float(np.mean(vals))
                if len(vals) > 1 and k in ("pdms", "collision"):
                    row[f"{k}_std"] = float(np.std(vals, ddof=1))
        row.update(extra.get(name, {}))
        rows.append(row)
    orc = oracle_navsim(main_dir, root, args.navsim_frames)
    rows.append({"method": "oracle best-of-N (ground-truth scorer; upper bound, not a planner)", "mode": "navsim one-shot",
                 "seeds": 1, **{k: orc[k] for k in SUB}})
    cmd = "python benchmarks/transdiffuser.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v is not None and k not in ("phase", "out"))
    notes = (f"{args.scenes} embedded scenes ({len(res.get('scenes', [])) or 'all'} val scenes evaluated), "
             f"{args.steps} steps x batch {args.batch} per learned planner (`train_steps` where a row differs), each on the "
             f"logged windows plus {args.recovery} recovery window(s) per moving keyframe (data.recovery_copies; the "
             "'no recovery windows' row: logs only); TransDiffuser rows: mean over seeds "
             f"{args.seeds} (`pdms_std`, `collision_std`: std over seeds). Closed loop: PDMS of the whole drive, EP relative "
             "to the lane follower's closed-loop progress; the planner's ego status comes from the driven keyframes as "
             "in training. TransDiffuser and the peer run with their plan guards on (standstill hold; the clearance check "
             "against a constant-velocity forecast of the agents ahead, 4 s for TransDiffuser, 2 s for the peer); "
             "TransDiffuser also with plan consistency. "
             "The '(no clearance check)' / '(no guards)' rows are the same weights with those off. NAVSIM one-shot: plans from the logged state at "
             f"{args.navsim_frames} keyframes per scene, tracked and scored with the agents replaying the log. "
             "`diversity_m`: mean pairwise distance of the candidates (m, mean over waypoints). `train_s_per_1k_steps`: the "
             "trainer's own clock, one torch thread, two trainings at once. `plan_ms_p50_*`: one plan "
             "of the policy at batch 1, 1 thread, median over 40 val scenes (warm start and guidance run in torch only); "
             "onnxruntime: 5 rounds over them, every row's graph once per round in turn, so compare within one run. "
             "The oracle row picks, among the seed-0 TransDiffuser's candidates, the one the ground-truth scorer rates "
             "best: it is an upper bound for the selection rule, not a planner.")
    write_results(NAME, cmd, rows, notes)


if __name__ == "__main__":
    main()
