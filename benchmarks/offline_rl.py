"""Offline RL side by side: DQL, OFQL, flow BC and diffusion BC on the same data, seeds, budget and evaluation.

For every task the data set is built once (maze2d by the project's
generator, locomotion by the stable-baselines3 SAC recipe of
``diffpilot.data.locomotion``), then every (task, method, seed) run trains
for the same number of gradient steps with the task's hydra options
(``conf/policy/<method>.yaml``, ``per_task`` applied) and is evaluated
closed loop at the end on the same episodes (same environment seeds).
Runs go to ``--out/<task>/<method>/s<seed>`` and resume after an
interruption (the trainer's own checkpoint; a finished run leaves
``summary.json`` and is skipped).

Speed is timed afterwards in one process, one torch thread, nothing else
running: ``train_s_per_1k_steps`` over ``--timing-steps`` gradient steps
and ``decision_hz`` = ``act()`` calls per second at batch 1 on data-set
observations. Scores are D4RL-normalized against the references stored in
each data set (random and the data set's expert policy).

Run: python benchmarks/offline_rl.py [--steps 2000] [--seeds 0 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from results_io import write_results

from diffpilot.data.d4rl import OfflineDataset, read_d4rl
from diffpilot.fileio import atomic_write_text
from diffpilot.policy.registry import load_policy
from diffpilot.train import TrainerConfig
from diffpilot.train.offline_rl import load_policy_yaml, resolve_task, train_offline_rl

NAME = "offline_rl"
TASKS = ("maze2d-umaze", "maze2d-medium", "hopper-medium", "hopper-medium-replay", "walker2d-medium")
METHODS = ("dql", "ofql", "flow_bc", "diffusion_bc")
CONF_DATA = Path(__file__).resolve().parent.parent / "diffpilot" / "conf" / "data"
COST = {"dql": 8.0, "ofql": 5.0, "flow_bc": 1.0, "diffusion_bc": 1.0}  # relative step cost, for scheduling only


def dataset_for(task: str, sac_steps: int, transitions: int) -> Path:
    """The data set's path, built first if missing (maze2d: conf defaults; locomotion: the given SAC budget)."""
    from diffpilot.jobs import generate_job

    data = yaml.safe_load((CONF_DATA / f"{task}.yaml").read_text())
    if data["kind"] == "locomotion":
        data.update(sac_steps=sac_steps, transitions=transitions)
    return generate_job(data, progress=True)


def _train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (task, method, seed) run in a worker process with one torch thread; returns its summary."""
    torch.set_num_threads(1)
    out = Path(job["out"])
    done = out / "summary.json"
    if done.exists():
        return json.loads(done.read_text())
    ds = read_d4rl(job["data"])
    cfg = TrainerConfig(ckpt_every=250, log_every=100, progress=False)
    t0 = time.perf_counter()
    summary = train_offline_rl(
        job["method"], ds, job["task"], out, steps=job["steps"], eval_every=0, eval_episodes=job["eval_episodes"],
        seed=job["seed"], config=cfg, policy_config=load_policy_yaml(job["method"], job["task"]), eval_seed=job["eval_seed"],
    )
    summary.update(bench_task=job["task"], seed=job["seed"], wall_s=time.perf_counter() - t0)
    atomic_write_text(done, json.dumps(summary, indent=2) + "\n")
    print(f"done {job['task']} {job['method']} s{job['seed']}: score {summary['final_score']:.1f}", flush=True)
    return summary


def time_training(method: str, task: str, ds: OfflineDataset, steps: int, scratch: Path) -> float:
    """Seconds per 1,000 gradient steps, measured alone on one thread (evaluation and checkpoints excluded)."""
    summary = train_offline_rl(
        method, ds, task, scratch / f"{task}-{method}", steps=steps, eval_episodes=0, seed=0,
        config=TrainerConfig(ckpt_every=10 * steps, log_every=steps, progress=False),
        policy_config=load_policy_yaml(method, task), resume=False,
    )
    return float(summary["train_s_per_1k_steps"])


def decision_hz(policy_dir: Path, observations: np.ndarray, calls: int) -> float:
    """``act()`` calls per second at batch 1 (one observation at a time, one thread)."""
    policy = load_policy(policy_dir)
    policy.eval()
    policy.reset(seed=0)
    for obs in observations[:20]:
        policy.act(obs)
    t0 = time.perf_counter()
    for i in range(calls):
        policy.act(observations[i % len(observations)])
    return calls / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=2000, help="gradient steps per run, the same for every method")
    ap.add_argument("--eval-episodes", type=int, default=5, help="closed-loop episodes per seed at the end")
    ap.add_argument("--workers", type=int, default=2, help="training processes, one torch thread each")
    ap.add_argument("--sac-steps", type=int, default=60_000, help="length of the SAC run behind the locomotion data")
    ap.add_argument("--transitions", type=int, default=100_000, help="rows per policy rollout in the locomotion data")
    ap.add_argument("--timing-steps", type=int, default=100, help="gradient steps timed per method and task")
    ap.add_argument("--decision-calls", type=int, default=200, help="act() calls timed per method and task")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/offline_rl"))
    args = ap.parse_args()
    for task in args.tasks:
        resolve_task(task)  # unknown names fail here, before any work
        if not (CONF_DATA / f"{task}.yaml").is_file():
            sys.exit(f"no data config for task {task!r} in {CONF_DATA}; choose from {sorted(p.stem for p in CONF_DATA.glob('*.yaml'))}")

    paths = {task: dataset_for(task, args.sac_steps, args.transitions) for task in args.tasks}
    jobs = [
        {"task": t, "method": m, "seed": s, "steps": args.steps, "eval_episodes": args.eval_episodes, "eval_seed": 1000,
         "data": str(paths[t]), "out": str(args.out / t / m / f"s{s}")}
        for t in args.tasks for m in args.methods for s in args.seeds
    ]
    jobs.sort(key=lambda j: -COST[j["method"]])  # longest first keeps both workers busy to the end
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        summaries = list(pool.imap_unordered(_train_one, jobs))
    train_wall = time.perf_counter() - t0

    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for task in args.tasks:
        ds = read_d4rl(paths[task])
        obs = resolve_task(task).observations(ds)
        timing_dir = args.out / "_timing"
        for method in args.methods:
            runs = sorted((s for s in summaries if s["bench_task"] == task and s["policy"] == method), key=lambda s: s["seed"])
            scores = np.array([s["final_score"] for s in runs], dtype=float)
            rows.append({
                "task": task,
                "method": method,
                "normalized_score": round(float(scores.mean()), 1),
                "normalized_score_std": round(float(scores.std(ddof=1)) if len(scores) > 1 else 0.0, 1),
                "seeds": len(runs),
                "steps": args.steps,
                "train_s_per_1k_steps": round(time_training(method, task, ds, args.timing_steps, timing_dir), 1),
                "decision_hz": round(decision_hz(Path(runs[0]["last"]), obs, args.decision_calls), 1),
            })
    for row in rows:
        dql = next((r for r in rows if r["task"] == row["task"] and r["method"] == "dql"), None)
        if dql is not None:
            row["score_minus_dql"] = round(row["normalized_score"] - dql["normalized_score"], 1)
            row["train_time_vs_dql"] = round(row["train_s_per_1k_steps"] / dql["train_s_per_1k_steps"], 2)
            row["decision_hz_vs_dql"] = round(row["decision_hz"] / dql["decision_hz"], 1)

    ofql = [r for r in rows if r["method"] == "ofql" and "score_minus_dql" in r]
    targets = ""
    if ofql:
        wins = sum(r["score_minus_dql"] >= 0 for r in ofql)
        targets = (
            f"\nTargets (OFQL vs DQL): score >= DQL's on {wins}/{len(ofql)} tasks; decision frequency "
            f"{min(r['decision_hz_vs_dql'] for r in ofql)}-{max(r['decision_hz_vs_dql'] for r in ofql)}x (target >= 5x); "
            f"training time per step {min(r['train_time_vs_dql'] for r in ofql)}-{max(r['train_time_vs_dql'] for r in ofql)}x "
            f"(target <= 0.6x).\n"
        )
    notes = (
        f"Budget: {args.steps} gradient steps per run (batch 256) for every method, on 2 CPU cores; the papers train "
        f"1M steps. Seeds {args.seeds}; normalized score = mean over seeds of the final policy's score over "
        f"{args.eval_episodes} episodes (the same environment seeds for every method), std over seeds (ddof 1). "
        f"Locomotion data: one SB3 SAC run of {args.sac_steps} steps per environment, {args.transitions} rows per "
        f"rollout; scores normalized by the data set's stored references (uniform random policy, that SAC run's "
        f"final policy). train_s_per_1k_steps: {args.timing_steps} steps timed alone on one thread; decision_hz: "
        f"act() at batch 1 on one thread, {args.decision_calls} calls. Training wall time of the whole grid: "
        f"{train_wall / 60:.1f} min with {args.workers} workers.\n" + targets
    )
    write_results(NAME, "python benchmarks/" + " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)),
                  rows, notes, steps=args.steps, seeds=args.seeds, sac_steps=args.sac_steps)
    print((Path(__file__).parent / "results" / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
