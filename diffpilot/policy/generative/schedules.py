"""Discrete noise schedules for DDPM-style diffusion.

Each schedule returns the per-step ``betas`` of a ``T``-step chain. They are
computed in float64 (products over hundreds of steps lose precision in
float32) and returned as float32 tensors together with ``alphas_cumprod``
(``prod_{i<=k} (1 - beta_i)``), which is all the samplers need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_BETA = 0.999  # a beta of 1 would erase the signal in a single step


@dataclass(frozen=True)
class NoiseSchedule:
    """Betas of a discrete chain and their cumulative signal fraction."""

    betas: Tensor
    alphas_cumprod: Tensor

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02, scale_with_steps: bool = True) -> Tensor:
    """Betas rising linearly from ``beta_start`` to ``beta_end`` (DDPM: 1e-4..0.02 at T=1000).

    With ``scale_with_steps`` both ends are multiplied by ``1000 / T`` so a
    shorter chain still ends near pure noise (unscaled, T=100 keeps ~37 % of the
    signal variance at the last step); betas are capped at 0.999 so very short
    chains (T=5) stay valid.
    """
    _check_steps(num_steps)
    scale = 1000.0 / num_steps if scale_with_steps else 1.0
    betas = torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)
    return betas.clamp(max=MAX_BETA)


def cosine_betas(num_steps: int, offset: float = 0.008) -> Tensor:
    """Squared-cosine schedule (``squaredcos_cap_v2``) of Nichol & Dhariwal.

    ``alpha_bar(s) = cos((s + offset) / (1 + offset) * pi / 2) ** 2`` and
    ``beta_k = 1 - alpha_bar((k + 1) / T) / alpha_bar(k / T)``, capped at 0.999
    because the ratio tends to 0 at the last step.
    """
    _check_steps(num_steps)
    s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    alpha_bar = torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=MAX_BETA)


def vp_betas(num_steps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> Tensor:
    """Discretized variance-preserving SDE schedule (Song et al.), used by Diffusion-QL at T=5.

    The continuous rate ``beta(s) = beta_min + s (beta_max - beta_min)`` is
    integrated over each step ``[(k) / T, (k + 1) / T]``:
    ``1 - beta_k = exp(-beta_min / T - (beta_max - beta_min) (2k + 1) / (2 T^2))``.
    Unlike the linear schedule it is well defined for very few steps.
    """
    _check_steps(num_steps)
    k = torch.arange(num_steps, dtype=torch.float64)
    log_alpha = -beta_min / num_steps - 0.5 * (beta_max - beta_min) * (2 * k + 1) / num_steps**2
    return (1.0 - torch.exp(log_alpha)).clamp(max=MAX_BETA)


def scaled_linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas whose square roots rise linearly from ``sqrt(beta_start)`` to ``sqrt(beta_end)`` ("scaled_linear").

    Early steps add less noise than the linear schedule, which is what a
    truncated chain that only ever uses its first few dozen steps wants.
    """
    _check_steps(num_steps)
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    return betas.clamp(max=MAX_BETA)


SCHEDULES = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "squaredcos_cap_v2": cosine_betas,
    "cosine": cosine_betas,
    "vp": vp_betas,
}


def make_schedule(name: str, num_steps: int, **kwargs: float) -> NoiseSchedule:
    """Builds a named schedule; ``kwargs`` go to the beta function (e.g. ``beta_end``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    betas = SCHEDULES[name](num_steps, **kwargs)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return NoiseSchedule(betas=betas.float(), alphas_cumprod=alphas_cumprod.float())


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
