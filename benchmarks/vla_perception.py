"""Where a DiffusionVLA image policy thinks the object is: on expert frames, and closed loop on its own states.

The object rows of ``benchmarks/vla.py`` regress the object position (``state[4:7]``) from the image:
``objprobe`` with a training-only linear probe on the action head's condition, ``objinput*`` with an
estimate from the image tokens alone that the head reads. For each trained model found under
``runs/bench/vla`` this compares that position with the simulator's:

- offline, on the expert frames of the training file and of a fresh file of new object positions
  (``diffpilot data mt10`` with another seed, ``--fresh-demos`` episodes per task);
- closed loop, on the benchmark's own evaluation episodes (seed 1000, training phrasings) of the
  object tasks, one reading per replan by the torch policy: the error at the first replan (the
  scene as the expert saw it) and over the whole episode, and the success rate.

A small offline error with a large closed-loop one says that the position is inferred from the
hand's path (which follows the object in every demonstration) rather than seen: once the policy's
hand goes astray, its idea of the object goes with it.

Run: python benchmarks/vla_perception.py [--rows objprobe objinput] [--episodes 10] [--steps 6000] [--demos 100]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from results_io import write_results

from diffpilot.data.mt10 import TRAIN_INSTRUCTIONS, default_path, episode_seed, generate_mt10, load_instructions, load_mt10
from diffpilot.policy.registry import load_policy
from diffpilot.sim.mt10 import MT10Env
from diffpilot.sim.mt10_runner import _pick
from diffpilot.vla_jobs import vla_rows

NAME = "vla_perception"
ROOT = Path("runs/bench/vla")
OBJECT_TASKS = ("push", "pick-place", "peg-insert-side")


def readout(policy: Any, prefix: torch.Tensor, cond: torch.Tensor) -> np.ndarray:
    """(B, 3) object position in metres, as the policy's ``object_loss`` trains it."""
    return policy.object_normalizer.unnormalize(policy.object_readout(prefix, cond)).numpy()


@torch.no_grad()
def offline_errors(policy: Any, path: Path, tasks: tuple[str, ...], limit: int = 3000) -> dict[str, np.ndarray]:
    """Per task, the position error (m) on up to ``limit`` expert frames of a demonstration file."""
    demos = load_mt10(path)
    rows = vla_rows(demos, policy)
    task_of = demos.task[demos.observed_rows]
    keep = np.flatnonzero(np.isin([demos.tasks[t] for t in task_of], tasks))
    pick = np.sort(np.random.default_rng(0).choice(keep, min(len(keep), limit), replace=False))
    batch = {k: v[pick] for k, v in rows.items()}
    prefix, ignore = policy.prefix(batch)
    cond, _ = policy.condition(prefix, ignore, batch["text"].long(), batch["low_dim"])
    err = np.linalg.norm(readout(policy, prefix, cond) - batch["object"].numpy(), axis=1)
    return {t: err[task_of[pick] == demos.tasks.index(t)] for t in tasks}


@torch.no_grad()
def closed_loop(policy: Any, task: str, episodes: int) -> dict[str, Any]:
    """The benchmark's evaluation episodes of ``task`` with the position read at every replan."""
    seen: dict[str, torch.Tensor] = {}
    plain = policy.condition

    def watched(prefix: torch.Tensor, *args: Any) -> Any:
        out = plain(prefix, *args)
        seen["prefix"], seen["cond"] = prefix, out[0]
        return out

    policy.condition = watched
    phrasings = load_instructions(TRAIN_INSTRUCTIONS)[task]
    env = MT10Env(task, image_size=policy.config["image_size"], max_steps=200)
    first, every, success = [], [], []
    try:
        for i in range(episodes):
            seed = episode_seed(1000, task, i)
            policy.reset(seed=seed)
            obs, done, ok, errs = env.reset(seed, render=True), False, False, []
            while not done:
                chunk = policy.plan_chunk({**obs, "instruction": phrasings[_pick(1000, task, i, len(phrasings))]})
                errs.append(float(np.linalg.norm(readout(policy, seen["prefix"], seen["cond"])[0] - obs["state"][4:7])))
                n = policy.exec_horizon
                for k in range(n):
                    obs, ok, done = env.step(chunk[k], render=k == n - 1)
                    if done:
                        break
            first.append(errs[0])
            every.extend(errs)
            success.append(ok)
    finally:
        env.close()
        policy.condition = plain
    return {"first": np.array(first), "all": np.array(every), "success": float(np.mean(success))}


def models(rows: list[str], steps: int, demos: int) -> list[tuple[str, int, Path]]:
    found = []
    for slug in rows:
        for d in sorted(ROOT.glob(f"{slug}-{steps}st-{demos}ep-s*")):
            m = re.fullmatch(rf"{re.escape(slug)}-{steps}st-{demos}ep-s(\d+)", d.name)
            if m and (d / "done").exists():
                found.append((slug, int(m.group(1)), d / "policy"))
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", default=["objprobe", "objinput", "objinput-noshift"])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--demos", type=int, default=100)
    ap.add_argument("--episodes", type=int, default=10, help="closed-loop episodes per object task")
    ap.add_argument("--fresh-demos", type=int, default=10, help="episodes per task of the fresh-position file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    found = models(args.rows, args.steps, args.demos)
    if not found:
        raise SystemExit(f"no finished models of rows {args.rows} at {args.steps} steps x {args.demos} demos under {ROOT}; "
                         "train them with benchmarks/vla.py --rows ...")
    train_file = default_path(args.demos)
    fresh_file = generate_mt10(default_path(args.fresh_demos, seed=7), episodes_per_task=args.fresh_demos, seed=7,
                               tasks=None, progress=False)
    out = []
    for slug, seed, path in found:
        policy = load_policy(path, kind="diffusion_vla").eval()
        if policy.object_head is None:
            raise SystemExit(f"{path} regresses no object position (object_loss=0); pass object rows, e.g. --rows objprobe")
        on_train = offline_errors(policy, train_file, OBJECT_TASKS)
        on_fresh = offline_errors(policy, fresh_file, OBJECT_TASKS)
        for task in OBJECT_TASKS:
            loop = closed_loop(policy, task, args.episodes)
            out.append({"row": slug, "seed": seed, "task": task,
                        "err_train_frames_m": round(float(np.median(on_train[task])), 4),
                        "err_fresh_frames_m": round(float(np.median(on_fresh[task])), 4),
                        "err_loop_first_m": round(float(np.median(loop["first"])), 4),
                        "err_loop_m": round(float(np.median(loop["all"])), 4),
                        "loop_p90_m": round(float(np.quantile(loop["all"], 0.9)), 4),
                        "success": loop["success"]})
            print(out[-1], flush=True)
    notes = ("Object-position error (m, median over frames; loop_p90_m: 90th percentile over the closed-loop "
             "readings) of each model's object readout against the simulator's state[4:7]. Training frames: the "
             f"training file's expert frames; fresh frames: {args.fresh_demos} expert episodes per task at data seed 7 "
             "(new object positions); loop: the benchmark's evaluation episodes (seed 1000, training phrasings, "
             f"{args.episodes} per task) driven by the torch policy, one reading per replan, first = the first replan. "
             "objprobe reads a training-only linear probe on the head's condition; objinput* the image-only estimate "
             "the head reads.")
    cmd = "python benchmarks/vla_perception.py " + " ".join(
        ["--rows", *args.rows, "--episodes", str(args.episodes), "--steps", str(args.steps), "--demos", str(args.demos)])
    write_results(NAME, cmd, out, notes)


if __name__ == "__main__":
    main()
