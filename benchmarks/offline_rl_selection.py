"""Action selection at evaluation: the finished offline-RL policies, re-evaluated with Q-picked candidates.

Training does not depend on how an action is picked, so each final policy of
``benchmarks/offline_rl.py`` (DQL and OFQL, every task and seed in its run
store) is evaluated again on the same episodes with other
``action_selection`` settings:

- OFQL as trained: one candidate, one network evaluation (``first``);
- OFQL with ``--candidates`` candidates from one batched evaluation, the one of
  highest target-critic Q (``argmax``) or one drawn by ``softmax(Q)``;
- DQL as trained (50 candidates, ``softmax``) and with ``--candidates``
  candidates, ``argmax``.

The as-trained rows must reproduce the stored scores (the run checks it), so
every other row differs from them by the selection alone. ``decision_hz`` is
``act()`` at batch 1 on one thread, timed after the evaluations.

Run: python benchmarks/offline_rl_selection.py [--tasks hopper-medium] [--steps 10000] [--candidates 10]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offline_rl import STORE, TASKS, dataset_for, decision_hz, load_acting, read_store
from results_io import RESULTS, write_results

from diffpilot.data.d4rl import read_d4rl
from diffpilot.train.offline_rl import evaluate_policy, resolve_task

NAME = "offline_rl_selection"
EVAL_SEED = 1000  # benchmarks/offline_rl.py evaluates every run on these episodes


def variants(candidates: int) -> list[tuple[str, int, str]]:
    """(method, samples, mode); the first of each method is its trained setting."""
    return [("ofql", 1, "first"), ("ofql", candidates, "argmax"), ("ofql", candidates, "softmax"),
            ("dql", 50, "softmax"), ("dql", candidates, "argmax")]


def _evaluate(job: dict[str, Any]) -> dict[str, Any]:
    """One (task, method, seed, selection) evaluation in a worker process with one torch thread."""
    torch.set_num_threads(1)
    policy = load_acting(Path(job["run_dir"]) / "policy", {"samples": job["samples"], "mode": job["mode"]})
    summary = evaluate_policy(policy, read_d4rl(job["data"]), job["task"], job["episodes"], seed=EVAL_SEED)
    return {**job, "score": summary["normalized_score"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--steps", type=int, default=10_000, help="the run budget to read from the store")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--candidates", type=int, default=10, help="candidates per decision for the Q-picked rows")
    ap.add_argument("--workers", type=int, default=2, help="evaluation processes, one torch thread each")
    ap.add_argument("--decision-calls", type=int, default=200)
    ap.add_argument("--runs", type=Path, default=Path("runs/bench/offline_rl"), help="--out of benchmarks/offline_rl.py")
    ap.add_argument("--store", type=Path, default=STORE)
    args = ap.parse_args()
    if args.candidates < 2:
        sys.exit(f"--candidates must be >= 2 (1 is the as-trained OFQL row), got {args.candidates}")
    store = read_store(args.store)["runs"]

    jobs, stored = [], {}
    data_of = {task: dataset_for(task, None, None) for task in args.tasks}
    for task in args.tasks:
        data = data_of[task]
        for method in ("ofql", "dql"):
            for seed in args.seeds:
                rec = next((r for r in store.values() if (r["task"], r["method"], r["seed"], r["steps"])
                            == (task, method, seed, args.steps)), None)
                run_dir = args.runs / task / method / f"s{seed}-{args.steps}"
                if rec is None or not (run_dir / "policy").is_dir():
                    sys.exit(f"no finished {method} run for {task} seed {seed} at {args.steps} steps in {args.store} "
                             f"and {run_dir}; run benchmarks/offline_rl.py with the same --tasks/--seeds/--steps first")
                stored[(task, method, seed)] = rec["final_score"]
                if data.name != rec["data"]:
                    sys.exit(f"{task}: the run used {rec['data']} but the task's data is now {data.name}")
                for m, samples, mode in variants(args.candidates):
                    if m == method:
                        jobs.append({"task": task, "method": method, "seed": seed, "samples": samples, "mode": mode,
                                     "episodes": rec["eval_episodes"], "data": str(data), "run_dir": str(run_dir)})
    print(f"{len(jobs)} evaluations", flush=True)
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=4) as pool:
        results = list(pool.imap_unordered(_evaluate, jobs))

    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for task in args.tasks:
        obs = resolve_task(task).observations(read_d4rl(data_of[task]))[:1000]
        task_rows = []
        for method, samples, mode in variants(args.candidates):
            scores = {r["seed"]: r["score"] for r in results
                      if (r["task"], r["method"], r["samples"], r["mode"]) == (task, method, samples, mode)}
            if (method, samples, mode) in (("ofql", 1, "first"), ("dql", 50, "softmax")):
                for seed, score in scores.items():  # the as-trained rows reproduce the stored evaluation
                    if abs(score - stored[(task, method, seed)]) > 1e-6:
                        sys.exit(f"{task} {method} seed {seed}: re-evaluated {score:.3f}, stored {stored[(task, method, seed)]:.3f}; "
                                 "the evaluation is not the one the runs were scored on")
            vals = np.array([scores[s] for s in args.seeds])
            run_dir = args.runs / task / method / f"s{args.seeds[0]}-{args.steps}"
            task_rows.append({
                "task": task, "method": method, "samples": samples, "mode": mode,
                "normalized_score": round(float(vals.mean()), 1),
                "normalized_score_std": round(float(vals.std(ddof=1)), 1) if len(vals) > 1 else 0.0,
                "seeds": len(vals), "decision_hz": round(decision_hz(run_dir / "policy", obs, args.decision_calls, {"samples": samples, "mode": mode}), 1),
            })
        dql = next(r for r in task_rows if (r["method"], r["samples"], r["mode"]) == ("dql", 50, "softmax"))
        for r in task_rows:
            r["score_minus_dql"] = round(r["normalized_score"] - dql["normalized_score"], 1)
            r["decision_hz_vs_dql"] = round(r["decision_hz"] / dql["decision_hz"], 1)
        rows += task_rows
        print(*task_rows, sep="\n", flush=True)

    notes = (
        f"The final policies of benchmarks/offline_rl.py ({args.steps} gradient steps, seeds {args.seeds}) evaluated again on the "
        "same episodes with other action selections; training is unchanged. samples: candidates from one batched network "
        "evaluation (DQL: each runs its 5 denoising steps); mode: first (no Q), argmax (the candidate of highest target-critic Q) "
        "or softmax (drawn by softmax(Q), Diffusion-QL's rule). The rows ofql/1/first and dql/50/softmax are the trained settings "
        "and reproduce the stored scores exactly (checked). score_minus_dql and decision_hz_vs_dql compare with dql/50/softmax. "
        f"decision_hz: act() at batch 1, one thread, {args.decision_calls} calls.\n"
    )
    write_results(NAME, "python benchmarks/" + " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)),
                  rows, notes, steps=args.steps, candidates=args.candidates)
    print((RESULTS / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
