"""K′ (warm-start t_start) chosen from held-out maze2d windows, with the warm map's Lipschitz estimate.

Uses benchmarks/chunk_policy.py's DDPM-trained policy (DDIM-10 sampler) and
256 windows of its data set: the observation history at row i and the one a
replan later (i + 8). Gaps are in normalized action units.

Run: python benchmarks/warm_start_tuning.py
"""

from __future__ import annotations

import numpy as np
import torch

from chunk_policy import train_policies
from results_io import write_results

from diffpilot.data.d4rl import read_d4rl
from diffpilot.data.windows import ChunkWindows
from diffpilot.jobs import dataset_path
from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy
from diffpilot.policy.warm_start_tuning import tune_warm_start
from diffpilot.sim.tasks import get_task

NAME = "warm_start_tuning"
TOLERANCE = 0.05


def main() -> None:
    cfg = train_policies("runs/bench/chunk_policy", 4000, 128, 100_000)["ddpm"]
    torch.set_num_threads(2)
    policy = ChunkDiffusionPolicy.load(f"{cfg['out']}/policy")
    policy.set_sampler("ddim", num_steps=10)
    ds = read_d4rl(dataset_path(cfg["data"]))
    obs = get_task("maze2d-umaze").observations(ds)
    windows = ChunkWindows(obs, ds.actions, ds.episode_slices(), policy.obs_horizon, policy.action_horizon)
    rng = np.random.default_rng(0)
    rows_now = rng.integers(0, len(windows) - policy.exec_horizon, size=256)
    now = torch.from_numpy(windows.batch(rows_now)["obs"])
    later = torch.from_numpy(windows.batch(rows_now + policy.exec_horizon)["obs"])
    rows = []
    for renoise in (True, False):
        report = tune_warm_start(policy, now, later, candidates=(0.1, 0.2, 0.3, 0.5, 0.7, 0.9), tolerance=TOLERANCE, renoise=renoise)
        for r in report.rows:
            rows.append({"task": "maze2d-umaze", "method": f"warm ddim-10 ({'re-noised' if renoise else 'as-is'})",
                         **r, "chosen": r["t_start"] == report.t_start})
    notes = (f"Chosen = smallest t_start with gap_mean <= {TOLERANCE} against a full DDIM-10 denoise of the next window. "
             "`lipschitz` is a power-iteration estimate (a lower bound) of the warm map's Lipschitz constant "
             "w.r.t. the guess: < 1 means errors in the guess shrink.")
    write_results(NAME, "python benchmarks/warm_start_tuning.py", rows, notes)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
