"""Small synthetic distributions with known structure, for testing generative models.

A mixture of well-separated, narrow Gaussians is the standard stress test:
a sampler that blurs modes or drops some of them scores visibly worse on a
two-sample distance than one that places mass on every mode.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mixture_centers(num_modes: int = 8, radius: float = 1.5) -> Tensor:
    """``(num_modes, 2)`` mode centers evenly spaced on a circle."""
    if num_modes < 1:
        raise ValueError(f"num_modes must be >= 1, got {num_modes}")
    angle = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    return (radius * torch.stack([angle.cos(), angle.sin()], dim=-1)).float()


def sample_gaussian_mixture(
    n: int,
    generator: torch.Generator | None = None,
    *,
    num_modes: int = 8,
    radius: float = 1.5,
    std: float = 0.1,
    modes: Tensor | None = None,
) -> Tensor:
    """``n`` points from an equal-weight 2-D mixture of ``num_modes`` Gaussians on a circle.

    The defaults give roughly unit variance per coordinate, the scale
    diffusion schedules assume. ``modes`` (``(n,)`` long) fixes which mode each
    point comes from instead of drawing it.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    centers = mixture_centers(num_modes, radius)
    if modes is None:
        modes = torch.randint(0, num_modes, (n,), generator=generator)
    elif modes.shape != (n,) or modes.min() < 0 or modes.max() >= num_modes:
        raise ValueError(f"modes must be a ({n},) tensor of ints in [0, {num_modes - 1}]")
    return centers[modes] + std * torch.randn(n, 2, generator=generator)


def sample_conditional_gaussian_mixture(
    n: int,
    generator: torch.Generator | None = None,
    *,
    num_modes: int = 8,
    num_groups: int = 2,
    radius: float = 1.5,
    std: float = 0.1,
    group: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Points whose one-hot condition picks a subset of the modes.

    Group ``g`` owns the modes ``m`` with ``m % num_groups == g`` (for 8 modes
    and 2 groups: alternating modes), so an unconditioned model puts half its
    mass on the wrong modes. Returns ``(x, cond)`` with ``cond`` of shape
    ``(n, num_groups)``; ``group`` (``(n,)`` long) fixes the groups.
    """
    if num_groups < 1 or num_modes % num_groups:
        raise ValueError(f"num_groups must divide num_modes={num_modes}, got {num_groups}")
    if group is None:
        group = torch.randint(0, num_groups, (n,), generator=generator)
    elif group.shape != (n,) or group.min() < 0 or group.max() >= num_groups:
        raise ValueError(f"group must be a ({n},) tensor of ints in [0, {num_groups - 1}]")
    per_group = num_modes // num_groups
    modes = group + num_groups * torch.randint(0, per_group, (n,), generator=generator)
    x = sample_gaussian_mixture(n, generator, num_modes=num_modes, radius=radius, std=std, modes=modes)
    return x, torch.nn.functional.one_hot(group, num_groups).float()


def mixture_posterior_mean(
    x: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    *,
    num_modes: int = 8,
    radius: float = 1.5,
    std: float = 0.1,
) -> Tensor:
    """Exact ``E[x0 | alpha x0 + sigma eps = x]`` for the (unconditional) mixture.

    Gives the ideal denoiser of the toy in closed form (any prediction type
    follows from it), so samplers can be checked apart from training error.
    ``alpha`` and ``sigma`` are ``(B,)`` tensors; ``x`` is ``(B, 2)``.
    """
    mu = mixture_centers(num_modes, radius).to(x)
    a, s = alpha.to(x)[:, None, None], sigma.to(x)[:, None, None]
    var = a**2 * std**2 + s**2  # variance of each noisy mode
    diff = x[:, None, :] - a * mu[None]
    resp = torch.softmax(-(diff**2).sum(-1, keepdim=True) / (2 * var), dim=1)
    mode_means = mu[None] + (a * std**2 / var) * diff
    return (resp * mode_means).sum(dim=1)
