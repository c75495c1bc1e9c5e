"""Time embeddings and FiLM, shared by every denoiser network."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal features of a continuous time ``t`` in [0, 1].

    ``t`` is scaled by ``scale`` (default 1000) so that the frequencies resolve
    the step spacing of a 100-1000 step diffusion schedule as well as the
    continuous times of flow models.
    """

    def __init__(self, dim: int, scale: float = 1000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"SinusoidalEmbedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale

    def forward(self, t: Tensor) -> Tensor:
        args = (t.float() * self.scale)[:, None] * self.freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """Embeds ``t`` (and optionally MeanFlow's ``r``, as ``t - r``) into ``dim`` features."""

    def __init__(self, dim: int, use_r: bool = False) -> None:
        super().__init__()
        self.use_r = use_r
        n_in = 2 if use_r else 1
        self.sin = SinusoidalEmbedding(dim)
        self.mlp = nn.Sequential(nn.Linear(n_in * dim, dim * 2), nn.Mish(), nn.Linear(dim * 2, dim))

    def forward(self, t: Tensor, r: Tensor | None = None) -> Tensor:
        feats = self.sin(t)
        if self.use_r:
            if r is None:
                r = t  # instantaneous velocity: u(z, t, t) = v(z, t)
            feats = torch.cat([feats, self.sin(t - r)], dim=-1)
        return self.mlp(feats)


class FiLM(nn.Module):
    """Feature-wise affine modulation ``h * (1 + scale) + shift`` from a condition.

    The projection is zero-initialized so a fresh block is the identity map,
    which keeps deep conditioned stacks stable at the start of training.
    """

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * channels))
        nn.init.zeros_(self.proj[1].weight)
        nn.init.zeros_(self.proj[1].bias)

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.proj(cond).chunk(2, dim=-1)
        # h is (B, C) or (B, C, L) (channels first, as in Conv1d).
        if h.dim() == 3:
            scale, shift = scale[:, :, None], shift[:, :, None]
        return h * (1 + scale) + shift
