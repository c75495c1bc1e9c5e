"""Choosing the warm-start time K′ from data, and how strongly a warm start contracts guess errors.

For held-out windows the tool plans the previous chunk with a full denoise,
then plans the next chunk twice: fully, and warm-started from the shifted
previous chunk at each candidate ``t_start``. The smallest ``t_start`` whose
warm result stays within ``tolerance`` of the full one is chosen (fewest
network evaluations that still agree with the full sampler).

The warm map W(guess) -> chunk is a fixed composition of network calls, so
its Lipschitz constant bounds how a guess error propagates:
||W(g1) - W(g2)|| <= L ||g1 - g2||. L < 1 means successive warm starts
contract errors in the guess. L is estimated by power iteration on W's
Jacobian (forward- and reverse-mode products), which gives a lower bound on
the true constant at the probed points, reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy
from diffpilot.policy.generative.warm_start import WarmStartConfig, WarmStarter


@dataclass(frozen=True)
class WarmStartReport:
    t_start: float | None  # the chosen K′ (None: no candidate met the tolerance)
    rows: list[dict[str, Any]]  # per candidate: t_start, nfe, gap_mean, gap_max, lipschitz


def jacobian_norm(fn, x: Tensor, iters: int = 15, generator: torch.Generator | None = None) -> float:
    """Largest singular value of d fn / d x at ``x`` (per batch element, max over the batch), by power iteration."""
    v = torch.randn(x.shape, generator=generator)
    v = v / v.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
    sigma = torch.zeros(x.shape[0])
    for _ in range(iters):
        _, jv = torch.func.jvp(fn, (x,), (v,))
        _, vjp = torch.func.vjp(fn, x)
        (jtjv,) = vjp(jv)
        sigma = jv.detach().flatten(1).norm(dim=1)
        v = jtjv / jtjv.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return float(sigma.max())


def tune_warm_start(
    policy: ChunkDiffusionPolicy,
    obs: Tensor,
    next_obs: Tensor,
    candidates: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7),
    tolerance: float = 0.05,
    renoise: bool = True,
    seed: int = 0,
    lipschitz_windows: int = 16,
) -> WarmStartReport:
    """Pick ``t_start`` on held-out observation histories ``obs`` and the histories ``next_obs`` one replan later.

    Gaps are mean/max absolute differences in normalized action units. The
    Lipschitz estimate uses the first ``lipschitz_windows`` windows: reverse
    mode through every warm step costs memory in proportion to the batch.
    """
    if obs.shape != next_obs.shape:
        raise ValueError(f"obs {tuple(obs.shape)} and next_obs {tuple(next_obs.shape)} must have the same shape")
    g = torch.Generator().manual_seed(seed)
    policy.eval()
    with torch.no_grad():
        noise_prev = torch.randn(policy.noise_shape(obs.shape[0]), generator=g)
        noise = torch.randn(policy.noise_shape(obs.shape[0]), generator=g)
        previous = policy.sample_normalized(policy.condition(obs), noise_prev).sample
        cond = policy.condition(next_obs)
        full = policy.sample_normalized(cond, noise).sample
    rows, chosen = [], None
    for t_start in sorted(candidates):
        warm = WarmStarter(policy.objective, policy.sampler, WarmStartConfig(t_start=t_start, renoise=renoise))
        with torch.no_grad():
            result = warm.sample(policy.net, previous, policy.exec_horizon, noise, cond)
        gap = (result.sample - full).abs()

        k = lipschitz_windows
        noise_k, cond_k = noise[:k], cond[:k]

        def warm_map(guess: Tensor) -> Tensor:
            return warm.sampler.sample(policy.net, noise_k, cond_k, x_start=warm.place(guess, noise_k), t_start=warm.t_start).sample

        lipschitz = jacobian_norm(warm_map, previous[:k], generator=torch.Generator().manual_seed(seed))
        rows.append({"t_start": warm.t_start, "nfe": result.nfe, "gap_mean": float(gap.mean()),
                     "gap_max": float(gap.max()), "lipschitz": lipschitz, "contracts": lipschitz < 1.0})
        if chosen is None and rows[-1]["gap_mean"] <= tolerance:
            chosen = warm.t_start
    return WarmStartReport(t_start=chosen, rows=rows)
