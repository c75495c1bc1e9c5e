"""Denoiser networks ``f(x, t, cond, r)`` and the time/condition embeddings they share."""

from __future__ import annotations

from typing import Any

from torch import nn

from .embeddings import FiLM, SinusoidalEmbedding, TimeEmbedding
from .mlp import ConcatMLP, MLPDenoiser
from .transformer import TransformerDenoiser
from .unet1d import ConditionalUnet1D

__all__ = [
    "NETWORKS",
    "ConcatMLP",
    "ConditionalUnet1D",
    "FiLM",
    "MLPDenoiser",
    "SinusoidalEmbedding",
    "TimeEmbedding",
    "TransformerDenoiser",
    "build_network",
]

NETWORKS: dict[str, type[nn.Module]] = {
    "mlp": MLPDenoiser,
    "unet1d": ConditionalUnet1D,
    "transformer": TransformerDenoiser,
}
"""Config names of the denoiser networks, as used by ``build_network``."""


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build a denoiser from its config name, e.g. ``build_network("unet1d", action_dim=2, cond_dim=20)``."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; valid names: {', '.join(sorted(NETWORKS))}")
    return NETWORKS[name](**kwargs)
