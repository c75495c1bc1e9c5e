"""Contracts shared by every generative process and sampler.

Time convention, used by all processes: continuous ``t`` in [0, 1], where
``t = 1`` is pure noise and ``t = 0`` is data. Networks always receive ``t``
(and MeanFlow's ``r``) as float tensors of shape ``(B,)`` in that range; a
discrete DDPM step ``k`` in ``{0, ..., T-1}`` is presented as ``t = (k + 1) / T``.
Keeping one convention lets a warm start name its start time the same way for
diffusion and flow samplers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class Denoiser(Protocol):
    """A network ``f(x, t, cond, r) -> Tensor`` with the shape of ``x``.

    ``cond`` is ``(B, C)`` (a global condition vector) or ``(B, N, C)``
    (condition tokens); ``r`` is only used by MeanFlow (average velocity from
    ``r`` to ``t``) and is ``None`` otherwise.
    """

    def __call__(
        self, x: Tensor, t: Tensor, cond: Tensor | None = None, r: Tensor | None = None
    ) -> Tensor: ...


@dataclass(frozen=True)
class SampleResult:
    """A batch of samples and the number of network evaluations spent on it."""

    sample: Tensor
    nfe: int


class Sampler(Protocol):
    """Turns noise into samples given a condition.

    ``noise`` is always passed in (deterministic tests, ONNX export, warm
    start). ``x_start``/``t_start`` start the integration from a given sample
    at time ``t_start`` instead of from ``noise`` at ``t = 1``. Stochastic
    samplers take their per-step noise from ``step_noise`` (shape
    ``(num_steps, *noise.shape)``) when given, else from the global RNG.
    """

    def sample(
        self,
        model: Denoiser,
        noise: Tensor,
        cond: Tensor | None = None,
        *,
        x_start: Tensor | None = None,
        t_start: float = 1.0,
        step_noise: Tensor | None = None,
    ) -> SampleResult: ...


class Objective(Protocol):
    """A training loss for a denoiser on clean samples ``x0``."""

    def loss(
        self,
        model: Denoiser,
        x0: Tensor,
        cond: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor: ...
