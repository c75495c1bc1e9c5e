"""Real-time control on maze2d-umaze and pick-place: network evaluations per executed action,
closed-loop score, and act() latency at batch 1 for torch eager vs onnxruntime fp32 / int8, in one run.

Policies come from benchmarks/train_realtime_policies.py (same data and
budget per task; trained first if missing). Warm start = real-time
iteration: the previous chunk, shifted by the 8 executed actions, placed at
t_start = 0.3 and denoised by the last DDIM-10 steps (3 NFE per replan),
either re-noised to that level or as it is. On pick-place the gripper is a
binary action: "clip" weakens the guess's grip entries to +-1/10, "scale"
uses the policy trained with the grip at 1/10 of its range.

Run: python benchmarks/realtime.py [--episodes 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from results_io import write_results
from train_realtime_policies import VARIANTS, train_all

from diffpilot.export.onnx import ExportCheckError, export_policy, export_warm_start, quantize_dynamic_int8
from diffpilot.export.runtime import OnnxChunkPolicy
from diffpilot.jobs import dataset_path, evaluate, reference_for
from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy
from diffpilot.sim.tasks import get_task

NAME = "realtime"
DDIM10 = {"name": "ddim", "num_steps": 10}
RENOISED = {"t_start": 0.3, "renoise": True}
AS_IS = {"t_start": 0.3, "renoise": False}
Row = tuple[str, str, dict[str, Any], dict[str, Any] | None, str | None]  # method, variant, sampler, warm start, discrete mode

COMMON: list[Row] = [
    ("ddpm-100", "ddpm", {"name": "ddpm"}, None, None),
    ("ddim-10", "ddpm", DDIM10, None, None),
    ("ddim-2", "ddpm", {"name": "ddim", "num_steps": 2}, None, None),
    ("warm-start ddim (re-noised)", "ddpm", DDIM10, RENOISED, None),
    ("warm-start ddim (as-is)", "ddpm", DDIM10, AS_IS, None),
]
GRIPPER: list[Row] = [
    ("warm-start ddim (as-is, clip)", "ddpm", DDIM10, AS_IS, "clip"),
    ("warm-start ddim (re-noised, clip)", "ddpm", DDIM10, RENOISED, "clip"),
    ("warm-start ddim (as-is, scale)", "ddpm-scale", DDIM10, AS_IS, None),
    ("warm-start ddim (re-noised, scale)", "ddpm-scale", DDIM10, RENOISED, None),
    ("ddim-10 (scale)", "ddpm-scale", DDIM10, None, None),
]
ONE_STEP: list[Row] = [
    ("flow euler-10", "flow", {"name": "euler", "num_steps": 10}, None, None),
    ("flow 1-step", "flow", {"name": "euler", "num_steps": 1}, None, None),
]
EXPORTED = (  # method, variant, sampler, warm start: the policies timed in every runtime
    ("ddim-10", "ddpm", DDIM10, None),
    ("warm-start ddim (re-noised)", "ddpm", DDIM10, RENOISED),
    ("flow 1-step", "flow", {"name": "euler", "num_steps": 1}, None),
)


def load(policy_dir: Path, sampler: dict[str, Any], warm: dict[str, Any] | None, discrete_mode: str | None = None) -> ChunkDiffusionPolicy:
    policy = ChunkDiffusionPolicy.load(policy_dir)
    spec = dict(sampler)
    policy.set_sampler(spec.pop("name"), **spec)
    if discrete_mode is not None:
        policy.set_discrete_mode(discrete_mode)
    policy.set_warm_start(warm)
    return policy


def act_latency_ms(policy: Any, obs: np.ndarray, plans: int = 40) -> tuple[float, float, float]:
    """(p50, p99) of replanning act() calls and the mean over all act() calls, at batch 1, one episode stream."""
    rng = np.random.default_rng(0)
    policy.reset(seed=0)
    times = []
    for _ in range(plans * policy.exec_horizon):
        o = (obs + 0.01 * rng.standard_normal(obs.shape)).astype(np.float32)
        t0 = time.perf_counter()
        policy.act(o)
        times.append((time.perf_counter() - t0) * 1e3)
    times = np.asarray(times[2 * policy.exec_horizon:])  # the first (full) plan and one warm plan warm the caches
    plan = times[:: policy.exec_horizon]
    return float(np.percentile(plan, 50)), float(np.percentile(plan, 99)), float(times.mean())


def closed_loop_rows(task_name: str, dirs: dict[str, Path], cfg: dict, episodes: int) -> list[dict[str, Any]]:
    task = get_task(task_name)
    ref, _ = reference_for(task, dataset_path(cfg["data"]))
    plan = COMMON + (GRIPPER if task_name == "pick-place" else []) + ONE_STEP
    rows = []
    torch.set_num_threads(1)
    for method, variant, sampler, warm, mode in plan:
        policy = load(dirs[variant], sampler, warm, mode)
        summary, records = evaluate(policy, task, episodes, int(cfg["sim"]["seed"]), ref, progress=False)
        actions = sum(r.length for r in records)
        rows.append({"task": task_name, "method": method, "runtime": "torch", "precision": "fp32", "threads": 1,
                     "nfe_per_action": policy.total_nfe / actions, "success_rate": summary["success_rate"],
                     "normalized_score": summary["normalized_score"], "normalized_score_std": summary["normalized_score_std"]})
        print(rows[-1], flush=True)
    return rows


def latency_rows(task_name: str, dirs: dict[str, Path], cfg: dict, episodes: int, tmp: Path) -> tuple[list[dict], list[str]]:
    task = get_task(task_name)
    ref, _ = reference_for(task, dataset_path(cfg["data"]))
    env = task.make_env()
    probe_obs, _ = env.reset(seed=0)
    env.close()
    rows, failures = [], []
    for method, variant, sampler, warm in EXPORTED:
        torch_policy = load(dirs[variant], sampler, warm)
        stem = tmp / f"{task_name}-{method.replace(' ', '_').replace('(', '').replace(')', '')}"
        fp32 = (export_warm_start(torch_policy, stem.with_suffix(".onnx")) if warm
                else export_policy(torch_policy, stem.with_suffix(".onnx"), sampler))
        try:
            int8 = quantize_dynamic_int8(fp32, stem.with_suffix(".int8.onnx"))
        except ExportCheckError as err:
            int8 = None
            failures.append(f"int8 of {task_name} {method}: {str(err)[:160]}")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            candidates = [("torch", "fp32", torch_policy), ("onnxruntime", "fp32", OnnxChunkPolicy(fp32, threads=threads))]
            if int8 is not None:
                candidates.append(("onnxruntime", "int8", OnnxChunkPolicy(int8, threads=threads)))
            for runtime, precision, policy in candidates:
                policy.reset(seed=0)
                p50, p99, mean = act_latency_ms(policy, probe_obs)
                file = int8 if precision == "int8" else fp32
                row = {"task": task_name, "method": method, "runtime": runtime, "precision": precision, "threads": threads,
                       "nfe_per_action": policy.last_nfe / policy.exec_horizon,
                       "latency_ms_p50": p50, "latency_ms_p99": p99, "decision_hz": 1e3 / mean,
                       "model_kb": file.stat().st_size // 1024 if runtime != "torch" else None}
                if runtime == "onnxruntime" and threads == 1:
                    summary, _ = evaluate(policy, task, episodes, int(cfg["sim"]["seed"]), ref, progress=False)
                    row.update(normalized_score=summary["normalized_score"], success_rate=summary["success_rate"])
                rows.append(row)
                print(row, flush=True)
    return rows, failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default="runs/bench/realtime")
    ap.add_argument("--tasks", nargs="*", default=["maze2d-umaze", "pick-place"])
    args = ap.parse_args()
    unknown = sorted(set(args.tasks) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {sorted(VARIANTS)}")
    cfgs = train_all(args.out, args.steps, args.batch, only=[f"{t}/{v}" for t in args.tasks for v in VARIANTS[t]])
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for task_name in args.tasks:
        dirs = {variant: Path(cfg["out"]) / "policy" for variant, cfg in cfgs[task_name].items()}
        rows += closed_loop_rows(task_name, dirs, cfgs[task_name]["ddpm"], args.episodes)
    with tempfile.TemporaryDirectory() as tmp:
        for task_name in args.tasks:
            dirs = {variant: Path(cfg["out"]) / "policy" for variant, cfg in cfgs[task_name].items()}
            more, failed = latency_rows(task_name, dirs, cfgs[task_name]["ddpm"], args.episodes, Path(tmp))
            rows += more
            failures += failed
    notes = (
        f"Policies: benchmarks/train_realtime_policies.py ({args.steps} steps, batch {args.batch}, ConditionalUnet1D "
        "[32, 64, 128]; maze2d-umaze: 100k transitions of the D4RL maze2d recipe; pick-place: 300 scripted-expert "
        f"episodes). Closed loop: {args.episodes} episodes per row, same seeds, 1 thread. `nfe_per_action` = network "
        "evaluations spent / actions executed (a chunk of 16 is planned every 8 actions). Warm start: t_start 0.3 → the "
        "last 3 DDIM-10 steps per replan after the first full denoise of an episode. `success_rate`: maze2d = goal "
        "reached, pick-place = cube within 5 cm of the target at some step. Normalized score: the data set's local "
        "reference (random actions / data-generating expert). Latency: `latency_ms_p50/p99` of act() calls that plan a "
        "chunk (for warm start: the warm replans), `decision_hz` = 1 / mean act() time over all calls; batch 1. ONNX "
        "rows with a score ran closed loop through onnxruntime. int8 = dynamic quantization of MatMul/Gemm (the "
        "U-Net's convolutions stay fp32)."
    ) + "".join(f" Not measured: {f}." for f in failures)
    name = NAME if sorted(args.tasks) == sorted(VARIANTS) else "_".join([NAME, *args.tasks])  # a subset: its own file
    write_results(name, "python benchmarks/realtime.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items() if k != "out"),
        rows, notes)


if __name__ == "__main__":
    main()
