"""Real-time control on maze2d-umaze: network evaluations per executed action, closed-loop score,
and act() latency at batch 1 for torch eager vs onnxruntime fp32 / int8, in one run.

Uses the two chunk policies of benchmarks/chunk_policy.py (DDPM-trained and
flow-trained, same data and budget); trains them first if they are missing.
Warm start = real-time iteration: the previous chunk, shifted by the 8
executed actions, placed at t_start = 0.3 and denoised by the last DDIM-10
steps (3 NFE per replan), either re-noised to that level or as it is.

Run: python benchmarks/realtime.py [--episodes 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from chunk_policy import train_policies
from results_io import write_results

from diffpilot.export.onnx import ExportCheckError, export_policy, quantize_dynamic_int8
from diffpilot.export.runtime import OnnxChunkPolicy
from diffpilot.jobs import dataset_path, evaluate, reference_for
from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy
from diffpilot.sim.tasks import get_task

NAME = "realtime"
TASK = "maze2d-umaze"
WARM = {"t_start": 0.3}
CLOSED_LOOP = (  # method, objective, sampler, warm start
    ("ddpm-100", "ddpm", {"name": "ddpm"}, None),
    ("ddim-10", "ddpm", {"name": "ddim", "num_steps": 10}, None),
    ("ddim-2", "ddpm", {"name": "ddim", "num_steps": 2}, None),
    ("warm-start ddim (re-noised)", "ddpm", {"name": "ddim", "num_steps": 10}, {**WARM, "renoise": True}),
    ("warm-start ddim (as-is)", "ddpm", {"name": "ddim", "num_steps": 10}, {**WARM, "renoise": False}),
    ("flow euler-10", "flow", {"name": "euler", "num_steps": 10}, None),
    ("flow 1-step", "flow", {"name": "euler", "num_steps": 1}, None),
)


def act_latency_ms(policy, obs: np.ndarray, plans: int = 40) -> tuple[float, float, float]:
    """(p50, p99) of replanning act() calls and the mean over all act() calls, at batch 1."""
    rng = np.random.default_rng(0)
    policy.reset(seed=0)
    times = []
    for _ in range(plans * policy.exec_horizon):
        o = (obs + 0.01 * rng.standard_normal(obs.shape)).astype(np.float32)
        t0 = time.perf_counter()
        policy.act(o)
        times.append((time.perf_counter() - t0) * 1e3)
    times = np.asarray(times[policy.exec_horizon:])  # first plan warms caches
    plan = times[:: policy.exec_horizon]
    return float(np.percentile(plan, 50)), float(np.percentile(plan, 99)), float(times.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--data-steps", type=int, default=100_000)
    ap.add_argument("--out", default="runs/bench/chunk_policy")
    args = ap.parse_args()
    cfgs = train_policies(args.out, args.steps, args.batch, args.data_steps)
    dirs = {objective: Path(cfg["out"]) / "policy" for objective, cfg in cfgs.items()}
    cfg = cfgs["ddpm"]
    task = get_task(TASK)
    ref, ref_source = reference_for(task, dataset_path(cfg["data"]))
    seed = int(cfg["sim"]["seed"])
    env = task.make_env()
    probe_obs, _ = env.reset(seed=0)
    env.close()

    torch.set_num_threads(1)
    rows = []
    for method, objective, sampler, warm in CLOSED_LOOP:
        policy = ChunkDiffusionPolicy.load(dirs[objective])
        spec = dict(sampler)
        policy.set_sampler(spec.pop("name"), **spec)
        policy.set_warm_start(warm)
        summary, records = evaluate(policy, task, args.episodes, seed, ref, progress=False)
        actions = sum(r.length for r in records)
        rows.append({"task": TASK, "method": method, "runtime": "torch", "precision": "fp32", "threads": 1,
                     "nfe_per_action": policy.total_nfe / actions,
                     "normalized_score": summary["normalized_score"], "normalized_score_std": summary["normalized_score_std"],
                     "success_rate": summary["success_rate"]})
        print(rows[-1], flush=True)

    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        exported = {
            "ddim-10": (dirs["ddpm"], {"name": "ddim", "num_steps": 10}),
            "flow 1-step": (dirs["flow"], {"name": "euler", "num_steps": 1}),
        }
        for method, (policy_dir, sampler) in exported.items():
            torch_policy = ChunkDiffusionPolicy.load(policy_dir)
            spec = dict(sampler)
            torch_policy.set_sampler(spec.pop("name"), **spec)
            fp32 = export_policy(torch_policy, Path(tmp) / f"{method.replace(' ', '_')}.onnx", sampler)
            try:
                int8 = quantize_dynamic_int8(fp32, fp32.with_suffix(".int8.onnx"))
            except ExportCheckError as err:
                int8 = None
                failures.append(f"int8 of {method}: {err}")
            for threads in (1, 2):
                torch.set_num_threads(threads)
                candidates = [("torch", "fp32", torch_policy), ("onnxruntime", "fp32", OnnxChunkPolicy(fp32, threads=threads))]
                if int8 is not None:
                    candidates.append(("onnxruntime", "int8", OnnxChunkPolicy(int8, threads=threads)))
                for runtime, precision, policy in candidates:
                    p50, p99, mean = act_latency_ms(policy, probe_obs)
                    row = {"task": TASK, "method": method, "runtime": runtime, "precision": precision, "threads": threads,
                           "nfe_per_action": policy.nfe / policy.exec_horizon if runtime != "torch" else torch_policy.last_nfe / torch_policy.exec_horizon,
                           "latency_ms_p50": p50, "latency_ms_p99": p99, "decision_hz": 1e3 / mean,
                           "model_kb": (int8 if precision == "int8" else fp32).stat().st_size // 1024 if runtime != "torch" else None}
                    if precision == "int8" and threads == 1:
                        summary, _ = evaluate(policy, task, args.episodes, seed, ref, progress=False)
                        row.update(normalized_score=summary["normalized_score"], success_rate=summary["success_rate"])
                    rows.append(row)
                    print(row, flush=True)
    notes = (
        f"Policies: benchmarks/chunk_policy.py's ({args.steps} steps, batch {args.batch}, ConditionalUnet1D [32, 64, 128]). "
        f"Closed loop: {args.episodes} episodes per row, same seeds, torch 1 thread. `nfe_per_action` = network evaluations "
        "spent over the episodes / actions executed (a chunk of 16 is planned every 8 actions). Warm start: t_start 0.3 → the "
        "last 3 DDIM-10 steps. Latency: `latency_ms_p50/p99` of act() calls that plan a chunk, `decision_hz` = 1 / mean act() "
        "time over all calls; batch 1 on a synthetic stream of 320 observations. int8 = onnxruntime dynamic quantization of "
        "MatMul/Gemm (the U-Net's convolutions stay fp32). Normalized score: "
        f"({ref[0]:.2f}, {ref[1]:.2f}) = {ref_source}."
    ) + "".join(f" Not measured: {f}" for f in failures)
    write_results(NAME, "python benchmarks/realtime.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"), rows, notes)


if __name__ == "__main__":
    main()
