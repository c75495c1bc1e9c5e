"""Chunk diffusion policy on maze2d-umaze: closed-loop score and latency per sampler, one run.

Trains the chunk policy twice on the same generated data with the same budget
(DDPM objective; flow-matching objective), then evaluates DDPM-100 and
DDIM-10 (the DDPM-trained network) and Euler-10 (the flow-trained network) on
the same evaluation seeds. The waypoint expert that generated the data is the
reference row. Normalized scores use the data set's local reference returns.

Run: python benchmarks/chunk_policy.py [--steps 4000] [--episodes 20]
Runs resume: training continues from runs/bench/chunk_policy/<objective>/state.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from results_io import write_results

from diffpilot.cli import load_config
from diffpilot.data.d4rl import read_d4rl
from diffpilot.data.maze2d import WaypointExpert
from diffpilot.jobs import dataset_path, evaluate, reference_for, train_job
from diffpilot.policy.registry import build_policy, load_policy
from diffpilot.sim.tasks import get_task

NAME = "chunk_policy_maze2d"


def chunk_latency_ms(policy: Any, obs: np.ndarray, calls: int = 30) -> float:
    """Median wall time of planning one chunk at batch 1."""
    hist = torch.from_numpy(np.stack([obs, obs]))[None]
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        policy.predict({"obs": hist})
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def train_policies(out: str, steps: int, batch: int, data_steps: int) -> dict[str, dict]:
    """Train (or resume, or reuse) the DDPM- and flow-objective chunk policies on the same data and budget.

    Returns each objective's resolved config; its policy is saved in ``<cfg["out"]>/policy``.
    """
    common = [f"data.num_steps={data_steps}", f"train.steps={steps}", f"train.batch_size={batch}",
              "policy.network.down_dims=[32,64,128]", "progress=false"]
    cfgs = {}
    for objective, policy_cfg in (("ddpm", "chunk_diffusion"), ("flow", "chunk_flow")):
        cfgs[objective] = load_config("train", [f"policy={policy_cfg}", f"out={out}/{objective}", *common])
        torch.set_num_threads(2)
        train_job(cfgs[objective])
    return cfgs


def train_ms_per_step(policy_cfg: dict, obs_dim: int, act_dim: int, batch: int, steps: int = 40) -> float:
    """Median wall time of one optimizer step on a fresh copy of the policy (2 threads)."""
    policy = build_policy(policy_cfg, obs_dim, act_dim)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    data = {"obs": torch.rand(batch, policy.obs_horizon, obs_dim), "action": torch.rand(batch, policy.action_horizon, act_dim)}
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, _ = policy.compute_loss(data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times[5:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4000, help="gradient steps per policy")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--data-steps", type=int, default=100_000)
    ap.add_argument("--out", default="runs/bench/chunk_policy")
    args = ap.parse_args()
    cfgs = train_policies(args.out, args.steps, args.batch, args.data_steps)
    trained = {}
    for objective, cfg in cfgs.items():
        policy = load_policy(Path(cfg["out"]) / "policy", kind="chunk_diffusion")
        trained[objective] = (policy, train_ms_per_step(cfg["policy"], policy.obs_dim, policy.action_dim, args.batch))
    data_path = dataset_path(cfg["data"])
    ds = read_d4rl(data_path)
    task = get_task("maze2d-umaze")
    ref, ref_source = reference_for(task, data_path)
    seed = int(cfg["sim"]["seed"])
    torch.set_num_threads(1)  # latency as on one core of the robot's computer

    env = task.make_env()
    expert = WaypointExpert(env.unwrapped.maze.maze_map)
    probe_obs, _ = env.reset(seed=0)
    env.close()
    summary, _ = evaluate(expert, task, args.episodes, seed, ref, progress=False)
    rows = [{"task": "maze2d-umaze", "method": "waypoint expert (data source)", "nfe_per_chunk": 0,
             "normalized_score": summary["normalized_score"], "normalized_score_std": summary["normalized_score_std"],
             "success_rate": summary["success_rate"], "latency_ms_per_action": summary["latency_ms_mean"],
             "chunk_latency_ms_p50": None, "train_steps": 0, "train_s_per_1k_steps": None}]
    for method, objective, sampler in (("ddpm-100", "ddpm", {"name": "ddpm"}),
                                       ("ddim-10", "ddpm", {"name": "ddim", "num_steps": 10}),
                                       ("flow-euler-10", "flow", {"name": "euler", "num_steps": 10})):
        policy, step_ms = trained[objective]
        spec = dict(sampler)
        policy.set_sampler(spec.pop("name"), **spec)
        summary, _ = evaluate(policy, task, args.episodes, seed, ref, progress=False)
        rows.append({
            "task": "maze2d-umaze", "method": method, "nfe_per_chunk": policy.last_nfe,
            "normalized_score": summary["normalized_score"], "normalized_score_std": summary["normalized_score_std"],
            "success_rate": summary["success_rate"], "latency_ms_per_action": summary["latency_ms_mean"],
            "chunk_latency_ms_p50": chunk_latency_ms(policy, probe_obs), "train_steps": args.steps,
            "train_s_per_1k_steps": step_ms,  # ms per step == s per 1k steps
        })
        print(rows[-1], flush=True)
    notes = (
        f"Budget: {args.steps} gradient steps per policy, batch {args.batch}, ConditionalUnet1D down_dims [32, 64, 128] "
        f"({sum(p.numel() for p in policy.parameters())} parameters), trained with 2 torch threads "
        "(`train_s_per_1k_steps` from the median of 35 timed optimizer steps per objective in this run); evaluation "
        f"{args.episodes} episodes per row on the same seeds, latency with 1 torch thread. Data: {len(ds)} transitions "
        f"of the maze2d recipe. Normalized score: 100·(R − min)/(max − min) with (min, max) = ({ref[0]:.2f}, {ref[1]:.2f}), "
        f"{ref_source} (random policy / waypoint expert over 100 episodes; D4RL's own umaze reference is 23.85 / 161.86, "
        "not comparable: different simulator). `normalized_score_std` is over episodes. "
        "`latency_ms_per_action` is amortized (a chunk is planned every 8 actions)."
    )
    write_results(NAME, "python benchmarks/chunk_policy.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"), rows, notes,
        reference={"min": ref[0], "max": ref[1], "source": ref_source})


if __name__ == "__main__":
    main()
