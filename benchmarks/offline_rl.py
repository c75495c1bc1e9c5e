"""Offline RL side by side: DQL, OFQL, flow BC and diffusion BC on the same data, seeds, budget and evaluation.

For every task the data set is built once (maze2d by the project's
generator, locomotion by the stable-baselines3 SAC recipe of
``diffpilot.data.locomotion``), then every (task, method, seed) run trains
for the same number of gradient steps with the task's options
(``conf/policy/<method>.yaml``, ``per_task`` applied: the chosen eta) and is
evaluated closed loop every ``--eval-every`` steps on the same episodes (the
same environment seeds for every method and checkpoint).

Runs go to ``--out/<task>/<method>/s<seed>-<steps>`` and resume after an
interruption (the trainer's own checkpoint). A finished run is added at once
to ``results/offline_rl_runs.json`` (its curve: normalized score against
gradient steps and against training seconds), and a rerun skips every run
found there, so the grid can be filled over several sittings; ``--table-only``
rebuilds the table and the curves from that file alone.

Speed is timed after the grid in one process, one torch thread, nothing else
running: ``train_s_per_1k_steps`` over ``--timing-steps`` gradient steps and
``decision_hz`` = ``act()`` calls per second at batch 1 on data-set
observations; both are stored next to the runs. Scores are D4RL-normalized
against the references stored in each data set (random and the data set's
expert policy).

Run: python benchmarks/offline_rl.py [--tasks maze2d-umaze hopper-medium] [--steps 20000] [--seeds 0 1 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from results_io import RESULTS, write_results

from diffpilot.data.d4rl import read_d4rl
from diffpilot.fileio import atomic_write_text, save_figure
from diffpilot.policy.registry import load_policy
from diffpilot.train import TrainerConfig
from diffpilot.train.offline_rl import load_policy_yaml, resolve_task, train_offline_rl

NAME = "offline_rl"
STORE = RESULTS / f"{NAME}_runs.json"
TASKS = ("maze2d-umaze", "maze2d-medium", "hopper-medium", "hopper-medium-replay", "walker2d-medium", "halfcheetah-medium")
METHODS = ("dql", "ofql", "flow_bc", "diffusion_bc")
CONF_DATA = Path(__file__).resolve().parent.parent / "diffpilot" / "conf" / "data"
COST = {"dql": 8.0, "ofql": 5.0, "flow_bc": 1.0, "diffusion_bc": 1.0}  # relative step cost, for scheduling only
COLORS = {"dql": "tab:red", "ofql": "tab:blue", "flow_bc": "tab:green", "diffusion_bc": "tab:gray"}


def data_config(task: str, sac_steps: int | None, transitions: int | None) -> dict[str, Any]:
    data = yaml.safe_load((CONF_DATA / f"{task}.yaml").read_text())
    if data["kind"] == "locomotion":
        data.update({k: v for k, v in (("sac_steps", sac_steps), ("transitions", transitions)) if v is not None})
    return data


def dataset_for(task: str, sac_steps: int | None, transitions: int | None) -> Path:
    """The data set's path, built first if missing (the conf defaults, or the given SAC budget and rollout rows)."""
    from diffpilot.jobs import generate_job

    return generate_job(data_config(task, sac_steps, transitions), progress=True)


def run_key(task: str, method: str, seed: int, steps: int, data: Path) -> str:
    return f"{task}/{method}/s{seed}/{steps}/{data.name}"


def read_store(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}, "timing": {}}


def write_store(store: dict[str, Any], path: Path) -> None:
    """Write ``store`` merged over what the file holds now (another sitting may have added runs meanwhile)."""
    merged = read_store(path)
    for part in ("runs", "timing"):
        merged[part].update(store[part])
    store.update(merged)
    atomic_write_text(path, json.dumps(merged, indent=1, sort_keys=True) + "\n")


def _curve(log_csv: Path) -> list[list[float]]:
    """``[step, train_s, normalized score]`` at every evaluation of a run."""
    with open(log_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval_normalized_score")]
    return [[int(r["step"]), float(r["train_s"]), float(r["eval_normalized_score"])] for r in rows]


def _train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (task, method, seed) run in a worker process with one torch thread; returns its record."""
    torch.set_num_threads(1)
    ds = read_d4rl(job["data"])
    cfg = TrainerConfig(ckpt_every=500, log_every=job["eval_every"], progress=False)
    options = load_policy_yaml(job["method"], job["task"])
    summary = train_offline_rl(
        job["method"], ds, job["task"], Path(job["out"]), steps=job["steps"], eval_every=job["eval_every"],
        eval_episodes=job["eval_episodes"], seed=job["seed"], config=cfg, policy_config=options, eval_seed=job["eval_seed"],
    )
    curve = _curve(Path(summary["log"]))
    record = {
        "task": job["task"], "method": job["method"], "seed": job["seed"], "steps": job["steps"],
        "data": Path(job["data"]).name, "eval_episodes": job["eval_episodes"], "eta": options.get("eta"),
        "final_score": summary["final_score"], "curve": curve, "train_s": curve[-1][1] if curve else None,
        "last": summary["last"], "key": job["key"],
    }
    print(f"done {job['task']} {job['method']} s{job['seed']}: score {summary['final_score']:.1f}", flush=True)
    return record


def time_training(method: str, task: str, data: Path, steps: int, scratch: Path) -> float:
    """Seconds per 1,000 gradient steps, measured alone on one thread (evaluation and checkpoints excluded)."""
    summary = train_offline_rl(
        method, read_d4rl(data), task, scratch / f"{task}-{method}", steps=steps, eval_episodes=0, seed=0,
        config=TrainerConfig(ckpt_every=10 * steps, log_every=steps, progress=False),
        policy_config=load_policy_yaml(method, task), resume=False,
    )
    return float(summary["train_s_per_1k_steps"])


def load_acting(policy_dir: Path, action_selection: dict[str, Any] | None = None) -> torch.nn.Module:
    """A stored policy in eval mode; ``action_selection`` replaces the stored one (acting only, training is unaffected)."""
    policy = load_policy(policy_dir)
    if action_selection is not None:
        policy.config["action_selection"] = dict(action_selection)
    return policy.eval()


def decision_hz(policy_dir: Path, observations: np.ndarray, calls: int, action_selection: dict[str, Any] | None = None) -> float:
    """``act()`` calls per second at batch 1 (one observation at a time, one thread)."""
    policy = load_acting(policy_dir, action_selection)
    policy.reset(seed=0)
    for obs in observations[:20]:
        policy.act(obs)
    t0 = time.perf_counter()
    for i in range(calls):
        policy.act(observations[i % len(observations)])
    return calls / (time.perf_counter() - t0)


def _mean_curve(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean training seconds, mean and std score over the seeds (on the evaluation steps all share)."""
    common = sorted(set.intersection(*(set(int(p[0]) for p in r["curve"]) for r in records)))
    at = [{int(p[0]): p for p in r["curve"]} for r in records]
    secs = np.array([[a[s][1] for a in at] for s in common])
    score = np.array([[a[s][2] for a in at] for s in common])
    return np.array(common), secs.mean(axis=1), score.mean(axis=1), score.std(axis=1)


def time_to_reach(ofql: list[dict[str, Any]], dql: list[dict[str, Any]], share: float = 1.0) -> float | None:
    """OFQL's training seconds to its first mean score >= ``share`` x DQL's final mean score, over DQL's total seconds."""
    _, d_secs, d_score, _ = _mean_curve(dql)
    _, o_secs, o_score, _ = _mean_curve(ofql)
    if share != 1.0 and d_score[-1] <= 0:
        return None  # a share of a non-positive score is no easier target
    hit = np.nonzero(o_score >= share * d_score[-1])[0]
    return round(float(o_secs[hit[0]] / d_secs[-1]), 2) if len(hit) else None


def plot_curves(groups: dict[tuple[str, str], list[dict[str, Any]]], tasks: list[str], path: Path) -> Path:
    """Per task: normalized score against gradient steps and against training seconds, mean +- std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for method in METHODS:
            recs = groups.get((task, method))
            if not recs:
                continue
            steps, secs, mean, std = _mean_curve(recs)
            style = {"color": COLORS[method], "lw": 2 if method in ("dql", "ofql") else 1,
                     "ls": "-" if method in ("dql", "ofql") else "--", "label": f"{method} ({len(recs)} seeds)"}
            for ax, x in zip(row, (steps, secs)):
                ax.plot(x, mean, marker="o", ms=3, **style)
                ax.fill_between(x, mean - std, mean + std, color=COLORS[method], alpha=0.15)
        row[0].set_title(f"{task}: score vs gradient steps")
        row[1].set_title(f"{task}: score vs training seconds (1 thread)")
        row[0].set_xlabel("gradient step")
        row[1].set_xlabel("training seconds")
        for ax in row:
            ax.set_ylabel("normalized score")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def build_table(store: dict[str, Any], tasks: list[str], steps: int) -> tuple[list[dict[str, Any]], str]:
    """The table rows (one per task and method at ``steps``) and the target summary line."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in store["runs"].values():
        if rec["steps"] == steps and rec["task"] in tasks:
            groups.setdefault((rec["task"], rec["method"]), []).append(rec)
    rows: list[dict[str, Any]] = []
    for task in tasks:
        for method in METHODS:
            recs = sorted(groups.get((task, method), []), key=lambda r: r["seed"])
            if not recs:
                continue
            scores = np.array([r["final_score"] for r in recs], dtype=float)
            timing = store["timing"].get(f"{task}/{method}", {})
            row = {
                "task": task, "method": method,
                "normalized_score": round(float(scores.mean()), 1),
                "normalized_score_std": round(float(scores.std(ddof=1)) if len(scores) > 1 else 0.0, 1),
                "seeds": len(recs), "steps": steps, "eval_episodes": recs[0]["eval_episodes"],
                "data": recs[0]["data"], "eta": recs[0].get("eta"),
                "train_s_per_1k_steps": timing.get("train_s_per_1k_steps"), "decision_hz": timing.get("decision_hz"),
            }
            rows.append(row)
        dql = next((r for r in rows if r["task"] == task and r["method"] == "dql"), None)
        for row in (r for r in rows if r["task"] == task and dql is not None):
            row["score_minus_dql"] = round(row["normalized_score"] - dql["normalized_score"], 1)
            if row["train_s_per_1k_steps"] and dql["train_s_per_1k_steps"]:
                row["train_time_vs_dql"] = round(row["train_s_per_1k_steps"] / dql["train_s_per_1k_steps"], 2)
            if row["decision_hz"] and dql["decision_hz"]:
                row["decision_hz_vs_dql"] = round(row["decision_hz"] / dql["decision_hz"], 1)
            if row["method"] == "ofql" and groups.get((task, "dql")):
                row["time_to_dql_final_vs_dql"] = time_to_reach(groups[(task, "ofql")], groups[(task, "dql")])
                row["time_to_95pct_dql_final_vs_dql"] = time_to_reach(groups[(task, "ofql")], groups[(task, "dql")], 0.95)
    if rows:
        plot_curves(groups, [t for t in tasks if any(r["task"] == t for r in rows)], RESULTS / f"{NAME}_curves.png")
    ofql = [r for r in rows if r["method"] == "ofql" and "score_minus_dql" in r]
    if not ofql:
        return rows, ""
    wins = sum(r["score_minus_dql"] >= 0 for r in ofql)

    def span(key: str) -> str:
        vals = [r[key] for r in ofql if r.get(key) is not None]
        return f"{min(vals)}-{max(vals)}x" if vals else "n/a"

    reach = [r.get("time_to_dql_final_vs_dql") for r in ofql]
    reached = [v for v in reach if v is not None]
    near = [r.get("time_to_95pct_dql_final_vs_dql") for r in ofql]
    targets = (
        f"Targets (OFQL vs DQL): score >= DQL's on {wins}/{len(ofql)} tasks; decision frequency {span('decision_hz_vs_dql')} "
        f"(target >= 5x); training time per step {span('train_time_vs_dql')} (target <= 0.6x); DQL's final score reached "
        f"in {', '.join(str(v) for v in reach)} of DQL's training time (target <= 0.5x; None: not reached"
        f"{'' if reached else ' on any task'}); 95 % of it in {', '.join(str(v) for v in near)}.\n"
    )
    return rows, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20_000, help="gradient steps per run, the same for every method")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: steps / 5)")
    ap.add_argument("--eval-episodes", type=int, default=5, help="closed-loop episodes per evaluation")
    ap.add_argument("--workers", type=int, default=2, help="training processes, one torch thread each")
    ap.add_argument("--sac-steps", type=int, default=None, help="length of the SAC run behind the locomotion data (default: conf)")
    ap.add_argument("--transitions", type=int, default=None, help="rows per policy rollout in the locomotion data (default: conf)")
    ap.add_argument("--timing-steps", type=int, default=100, help="gradient steps timed per method and task")
    ap.add_argument("--decision-calls", type=int, default=200, help="act() calls timed per method and task")
    ap.add_argument("--table-only", action="store_true", help="rebuild the table and curves from the stored runs; train nothing")
    ap.add_argument("--skip-timing", action="store_true", help="train only (time later, when nothing else runs)")
    ap.add_argument("--store", type=Path, default=STORE, help="the file of finished runs and timings")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/offline_rl"))
    args = ap.parse_args()
    for task in args.tasks:
        resolve_task(task)  # unknown names fail here, before any work
        if not (CONF_DATA / f"{task}.yaml").is_file():
            sys.exit(f"no data config for task {task!r} in {CONF_DATA}; choose from {sorted(p.stem for p in CONF_DATA.glob('*.yaml'))}")
    eval_every = args.eval_every or max(1, args.steps // 5)

    store = read_store(args.store)
    if not args.table_only:
        paths = {task: dataset_for(task, args.sac_steps, args.transitions) for task in args.tasks}
        jobs = [
            {"task": t, "method": m, "seed": s, "steps": args.steps, "eval_every": eval_every,
             "eval_episodes": args.eval_episodes, "eval_seed": 1000, "data": str(paths[t]),
             "out": str(args.out / t / m / f"s{s}-{args.steps}"), "key": run_key(t, m, s, args.steps, paths[t])}
            for t in args.tasks for m in args.methods for s in args.seeds
        ]
        todo = sorted((j for j in jobs if j["key"] not in store["runs"]), key=lambda j: -COST[j["method"]])
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already in {args.store}; training {len(todo)}", flush=True)
        with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
            for record in pool.imap_unordered(_train_one, todo):
                store["runs"][record["key"]] = record
                write_store(store, args.store)  # each finished run is kept, whatever happens to the rest
    if not args.table_only and not args.skip_timing:
        torch.set_num_threads(1)
        for task in args.tasks:
            for method in args.methods:
                key = f"{task}/{method}"
                if key in store["timing"]:
                    continue
                recs = [r for r in store["runs"].values() if r["task"] == task and r["method"] == method and Path(r["last"]).exists()]
                if not recs:
                    continue
                obs = resolve_task(task).observations(read_d4rl(paths[task]))
                store["timing"][key] = {
                    "train_s_per_1k_steps": round(time_training(method, task, paths[task], args.timing_steps, args.out / "_timing"), 1),
                    "decision_hz": round(decision_hz(Path(recs[0]["last"]), obs, args.decision_calls), 1),
                }
                write_store(store, args.store)

    rows, targets = build_table(store, args.tasks, args.steps)
    notes = (
        f"Budget: {args.steps} gradient steps per run (batch 256) for every method, on 2 CPU cores; the papers train "
        "1M steps. normalized_score: mean over seeds of the final policy's score over eval_episodes episodes (the same "
        f"environment seeds for every method), std over seeds (ddof 1); curves in {NAME}_curves.png. data: the data set file (locomotion: its SAC run "
        "length and rollout rows are in the name). eta: the task's chosen Q weight (conf/policy/<method>.yaml per_task). "
        f"train_s_per_1k_steps: {args.timing_steps} steps timed alone on one thread; decision_hz: act() at batch 1 on one "
        f"thread, {args.decision_calls} calls. time_to_dql_final_vs_dql: OFQL's training seconds until its mean score first "
        "reaches DQL's final mean score, over DQL's training seconds (evaluation excluded); time_to_95pct_dql_final_vs_dql: the "
        "same for 95 % of that score (where a task saturates, seed noise can keep the mean a few tenths below). Each run is stored in "
        f"{STORE.name} as it finishes.\n" + targets
    )
    write_results(NAME, "python benchmarks/" + " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)),
                  rows, notes, steps=args.steps)
    print((RESULTS / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
