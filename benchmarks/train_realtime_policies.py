"""Train (or resume, or reuse) the chunk policies the real-time benchmark compares, same budget each.

maze2d-umaze: DDPM and flow (benchmarks/chunk_policy.py). pick-place: DDPM
with the gripper snapped, DDPM with the gripper trained "scaled", and flow. Each policy lands in <out>/<task>/<variant>/policy.

Run: python benchmarks/train_realtime_policies.py [--steps 4000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffpilot.cli import load_config
from diffpilot.jobs import train_job

COMMON = ["policy.network.down_dims=[32,64,128]", "progress=false"]
MAZE = ["data=maze2d-umaze", "sim=maze2d-umaze", "data.num_steps=100000"]
PICK = ["data=pick-place", "sim=pick-place"]
GRIPPER = ["+policy.discrete_dims=[3]", "+policy.discrete_factor=10.0"]
VARIANTS: dict[str, dict[str, list[str]]] = {
    "maze2d-umaze": {
        "ddpm": ["policy=chunk_diffusion", *MAZE],
        "flow": ["policy=chunk_flow", *MAZE],
    },
    "pick-place": {
        "ddpm": ["policy=chunk_diffusion", *PICK, *GRIPPER, "+policy.discrete_mode=none"],
        "ddpm-scale": ["policy=chunk_diffusion", *PICK, *GRIPPER, "+policy.discrete_mode=scale"],
        "flow": ["policy=chunk_flow", *PICK, *GRIPPER, "+policy.discrete_mode=none"],
    },
}


def train_all(out: str, steps: int, batch: int, only: list[str] | None = None) -> dict[str, dict[str, dict]]:
    """Resolved configs per task and variant; trains what is missing or unfinished."""
    cfgs: dict[str, dict[str, dict]] = {}
    for task, variants in VARIANTS.items():
        for variant, overrides in variants.items():
            cfg = load_config("train", [*overrides, *COMMON, f"out={out}/{task}/{variant}",
                                        f"train.steps={steps}", f"train.batch_size={batch}"])
            cfgs.setdefault(task, {})[variant] = cfg
            if only and f"{task}/{variant}" not in only:
                continue
            torch.set_num_threads(2)
            print(f"training {task}/{variant}", flush=True)
            train_job(cfg)
    return cfgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default="runs/bench/realtime")
    ap.add_argument("--only", nargs="*", help="task/variant names to train, e.g. pick-place/ddpm")
    args = ap.parse_args()
    train_all(args.out, args.steps, args.batch, args.only)
    print("policies in", Path(args.out).resolve())


if __name__ == "__main__":
    main()
