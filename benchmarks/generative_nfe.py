"""Sample quality vs network evaluations (NFE) on the 2-D Gaussian mixture.

DDPM (ancestral and DDIM), flow matching (Euler and Heun) and MeanFlow are
trained with the same network, batch, optimizer and number of steps, then
sampled from the same noise; quality is the energy distance (and RBF MMD) to
fresh target samples. The "data" row is two independent target draws: the
estimator's floor at this sample size.

Run: python benchmarks/generative_nfe.py  (a few minutes on 2 CPU cores)
"""

from __future__ import annotations

import time

import torch

from results_io import write_results

from diffpilot.data.toy import sample_gaussian_mixture
from diffpilot.sim.report import markdown_table
from diffpilot.policy.generative import build_objective, build_sampler, energy_distance, mmd_rbf
from diffpilot.policy.networks.mlp import MLPDenoiser

NAME = "generative_nfe"
TASK = "gaussian_mixture_2d"
TRAIN_STEPS = 1500
BATCH = 256
LR = 2e-3
N_EVAL = 2000
NET = dict(x_dim=2, hidden=128, depth=3, time_dim=32)


def train(objective, use_r: bool) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(0)
    model = MLPDenoiser(**NET, use_r=use_r)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, TRAIN_STEPS)
    start = time.perf_counter()
    for _ in range(TRAIN_STEPS):
        loss = objective.loss(model, sample_gaussian_mixture(BATCH, gen), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval(), time.perf_counter() - start


def evaluate(method: str, sampler, model, noise: torch.Tensor, target: torch.Tensor, train_s: float) -> dict:
    torch.manual_seed(2)  # ancestral DDPM draws its per-step noise from the global RNG
    with torch.no_grad():
        start = time.perf_counter()
        result = sampler.sample(model, noise)
        sample_s = time.perf_counter() - start
    return {
        "task": TASK,
        "method": method,
        "nfe": result.nfe,
        "energy_distance": round(float(energy_distance(result.sample, target)), 5),
        "mmd": round(float(mmd_rbf(result.sample, target)), 6),
        "train_s": round(train_s, 1),
        "train_steps": TRAIN_STEPS,
        f"sample_ms_per_{N_EVAL}": round(1000 * sample_s, 1),
    }


def main() -> None:
    torch.set_num_threads(1)  # a 2-D toy MLP: threads only add sync overhead
    target = sample_gaussian_mixture(N_EVAL, torch.Generator().manual_seed(9))
    noise = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(3))
    reference = sample_gaussian_mixture(N_EVAL, torch.Generator().manual_seed(10))
    rows = [
        {
            "task": TASK,
            "method": "data",
            "nfe": 0,
            "energy_distance": round(float(energy_distance(reference, target)), 5),
            "mmd": round(float(mmd_rbf(reference, target)), 6),
            "train_s": 0.0,
            "train_steps": 0,
            f"sample_ms_per_{N_EVAL}": 0.0,
        }
    ]

    ddpm = build_objective(
        "ddpm", num_train_steps=100, schedule="squaredcos_cap_v2", prediction="epsilon", clip_sample=2.0
    )
    model, train_s = train(ddpm, use_r=False)
    rows.append(evaluate("ddpm", build_sampler("ddpm", ddpm), model, noise, target, train_s))
    for steps in (5, 10, 20, 50):
        rows.append(evaluate("ddim", build_sampler("ddim", ddpm, steps), model, noise, target, train_s))

    flow = build_objective("flow")
    model, train_s = train(flow, use_r=False)
    for steps in (1, 2, 5, 10, 20, 50):
        rows.append(evaluate("flow_euler", build_sampler("euler", flow, steps), model, noise, target, train_s))
    for steps in (1, 2, 5, 10):
        rows.append(evaluate("flow_heun", build_sampler("heun", flow, steps), model, noise, target, train_s))

    meanflow = build_objective("meanflow")
    model, train_s = train(meanflow, use_r=True)
    for steps in (1, 2, 4):
        rows.append(evaluate("meanflow", build_sampler("meanflow", meanflow, steps), model, noise, target, train_s))

    write_results(NAME, f"python benchmarks/{NAME}.py", rows)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
