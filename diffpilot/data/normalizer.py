"""Per-dimension affine normalizers, fitted on data and saved inside the model.

A normalizer is an ``nn.Module`` holding two buffers, so it travels with the
policy's safetensors weights and into an exported ONNX graph without any
extra file format.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

NormalizerMode = Literal["limits", "gaussian", "identity"]
MODES: tuple[str, ...] = ("limits", "gaussian", "identity")


class Normalizer(nn.Module):
    """``normalize(x) = x * scale + offset``, elementwise over the last axis.

    ``limits`` maps each dimension's [min, max] to [-1, 1] (what diffusion
    models expect of actions); ``gaussian`` standardizes to zero mean and
    unit std. Constant dimensions map to 0 instead of dividing by zero.
    """

    def __init__(self, dim: int, mode: NormalizerMode = "limits") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown normalizer mode {mode!r}; choose one of {MODES}")
        self.mode = mode
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("offset", torch.zeros(dim))

    @classmethod
    def fit(cls, data: np.ndarray | Tensor, mode: NormalizerMode = "limits", eps: float = 1e-6) -> "Normalizer":
        """Fit on ``data`` of shape (..., dim); NaN or inf is refused."""
        x = torch.as_tensor(np.asarray(data), dtype=torch.float64).reshape(-1, np.shape(data)[-1])
        if x.shape[0] == 0:
            raise ValueError("cannot fit a normalizer on an empty array")
        if not torch.isfinite(x).all():
            row = int((~torch.isfinite(x)).any(dim=1).nonzero()[0])
            raise ValueError(f"cannot fit a normalizer: non-finite value in row {row}; clean the data first")
        norm = cls(x.shape[1], mode)
        if mode == "limits":
            lo, hi = x.min(0).values, x.max(0).values
            span = hi - lo
            const = span < eps
            scale = torch.where(const, torch.ones_like(span), 2.0 / span.clamp_min(eps))
            offset = torch.where(const, -lo, -1.0 - lo * scale)
        elif mode == "gaussian":
            mean, std = x.mean(0), x.std(0, unbiased=False)
            const = std < eps
            scale = torch.where(const, torch.ones_like(std), 1.0 / std.clamp_min(eps))
            offset = -mean * scale
        else:
            scale, offset = torch.ones(x.shape[1], dtype=x.dtype), torch.zeros(x.shape[1], dtype=x.dtype)
        norm.scale.copy_(scale.float())
        norm.offset.copy_(offset.float())
        return norm

    @property
    def dim(self) -> int:
        return int(self.scale.shape[0])

    def normalize(self, x: Tensor) -> Tensor:
        return x * self.scale + self.offset

    def unnormalize(self, y: Tensor) -> Tensor:
        return (y - self.offset) / self.scale

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode}"
