"""Scaling out on one machine: training throughput with 1 and 2 CPU processes (torchrun semantics, gloo),
and data generation / closed-loop evaluation on 1 and 2 Ray workers, in one run.

Training: the one trainer, the same global batch split over the processes
(gradients averaged before every optimizer step), one torch thread per
process, per policy family: the DDPM chunk policy (ConditionalUnet1D), OFQL
and DQL (actor + twin critic, MeanFlow JVP / 5-step DDPM chain) and the
TransDiffuser driving planner. Samples/s = global batch x steps / training
seconds (rank 0's clock). Scaling efficiency = (2-process samples/s) /
(2 x 1-process samples/s).

Ray: maze2d in 4 seeded segments, driving scenes, maze2d episodes of a
small flow policy; 1 worker runs in-process, 2 workers are Ray tasks of a
running local Ray (its start-up is not counted). Outputs are the same
bytes either way (tests/test_ray_scale.py checks it).

Run: python benchmarks/scaling.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_results  # noqa: E402

from diffpilot.policy.registry import build_policy, policy_class  # noqa: E402
from diffpilot.train import TensorRows, Trainer, TrainerConfig, distributed  # noqa: E402

NAME = "scaling"
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chunk diffusion (DDPM, UNet 64-128)": ("chunk_diffusion", {"network": {"name": "unet1d", "down_dims": [64, 128], "kernel_size": 5}}),
    "OFQL (MeanFlow JVP + twin critic, 3x256)": ("ofql", {}),
    "DQL (DDPM-5 chain + twin critic, 3x256)": ("dql", {}),
    "TransDiffuser planner (d 64, 2 layers)": ("transdiffuser", {"d_model": 64, "hidden": 64, "heads": 4, "layers": 2}),
}
GLOBAL_BATCH = 64
OBS, ACT = 11, 3


def _train_job(kind: str, options: dict[str, Any], steps: int, result: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy = build_policy({"name": kind, **options}, OBS, ACT)
    data = policy.example_batch(512, torch.Generator().manual_seed(0))
    policy.fit_to_batch(data)
    own = policy_class(kind).OWN_TRAIN_KEYS
    cfg = TrainerConfig(steps=steps, batch_size=GLOBAL_BATCH, seed=0, progress=False, log_every=steps, ckpt_every=steps,
                        **({} if own else {"warmup_steps": 1}))
    trainer = Trainer(policy, TensorRows(data), cfg, None)
    trainer.run()
    if distributed.is_main():
        Path(result).write_text(json.dumps({"train_s": trainer.train_s, "steps": trainer.step,
                                            "params": sum(p.numel() for p in policy.parameters())}))


def training_rows(steps: int) -> list[dict[str, Any]]:
    rows = []
    for family, (kind, options) in FAMILIES.items():
        rates = {}
        for procs in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                result = str(Path(tmp) / "r.json")
                distributed.launch(_train_job, procs, kind, options, steps, result)
                r = json.loads(Path(result).read_text())
            rates[procs] = GLOBAL_BATCH * r["steps"] / r["train_s"]
            rows.append({"task": "training", "method": family, "workers": procs, "global_batch": GLOBAL_BATCH,
                         "per_process_batch": GLOBAL_BATCH // procs, "params": r["params"],
                         "samples_per_s": round(rates[procs], 1),
                         "scaling_efficiency": round(rates[procs] / (procs * rates[1]), 2)})
            print(rows[-1], flush=True)
    return rows


def ray_rows(maze_steps: int, scenes: int, episodes: int) -> list[dict[str, Any]]:
    import ray

    from diffpilot.data.maze2d import generate_maze2d
    from diffpilot.data.traffic.generate import simulate_scenes
    from diffpilot.sim.runner import run_episodes
    from diffpilot.sim.tasks import get_task

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    torch.manual_seed(0)
    policy = build_policy({"name": "flow_bc"}, 6, 2).eval()
    task = get_task("maze2d-umaze")
    jobs = {
        "data: maze2d-umaze, 4 segments": (maze_steps, "transitions",
                                           lambda w: generate_maze2d("umaze", maze_steps, episode_len=maze_steps // 4, segments=4,
                                                                     reference_episodes=0, progress=False, workers=w)),
        "data: driving scenes (traffic simulation)": (scenes, "scenes",
                                                      lambda w: simulate_scenes(scenes, seed=0, progress=False, workers=w)),
        "eval: maze2d-umaze episodes, flow BC 3x256": (episodes, "episodes",
                                                      lambda w: run_episodes(task.make_env, policy, episodes, seed=0,
                                                                             progress=False, workers=w)),
    }
    rows = []
    try:
        for name, (count, unit, fn) in jobs.items():
            wall = {}
            for w in (1, 2):
                t0 = time.perf_counter()
                fn(w)
                wall[w] = time.perf_counter() - t0
                rows.append({"task": name, "method": "in-process" if w == 1 else "Ray tasks", "workers": w,
                             "items": f"{count} {unit}", "wall_s": round(wall[w], 2),
                             "speedup": round(wall[1] / wall[w], 2), "scaling_efficiency": round(wall[1] / (w * wall[w]), 2)})
                print(rows[-1], flush=True)
    finally:
        ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps per run (after which samples/s is read)")
    ap.add_argument("--maze-steps", type=int, default=8000)
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--episodes", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()[0]
    rows = training_rows(args.steps) + ray_rows(args.maze_steps, args.scenes, args.episodes)
    load = f"1-minute load average {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end of the run. "
    notes = (
        "No GPU on this machine: training ran on CPU with gloo, one torch thread per process (NCCL on GPUs is the same "
        "code path, not measured here). The machine has 2 cores and was shared with other work during the run, so "
        "timings are possibly contended; compare rows of one run only. " + load + "Training samples/s use rank 0's training "
        "clock (data loading + step + gradient all-reduce); Ray rows are wall seconds of the whole job with Ray "
        "already running. Outputs are identical for 1 and 2 workers (tests/test_distributed.py, tests/test_ray_scale.py)."
    )
    write_results(NAME, f"python benchmarks/scaling.py --steps {args.steps} --maze-steps {args.maze_steps} "
                        f"--scenes {args.scenes} --episodes {args.episodes}", rows, notes, gpu="none")


if __name__ == "__main__":
    main()
