"""Real-time-iteration warm start for chunk policies (RTI-DP, Duan et al. 2025).

Consecutive action chunks overlap: after executing ``shift`` actions, the rest
of the previous chunk is a good guess of the next one. The guess is shifted,
padded by repeating its last action, placed at an intermediate time
``t_start`` (K′) and denoised from there, so each replan costs a few network
evaluations instead of a full denoise.

Two ways to place the guess at ``t_start``: ``renoise=True`` forward-diffuses
it to that noise level first (what the sampler expects to see there);
``renoise=False`` uses it as it is, as the published code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffpilot.policy.generative import build_sampler
from diffpilot.policy.generative.base import Denoiser, Sampler, SampleResult, StepHook
from diffpilot.policy.generative.conditions import Condition
from diffpilot.policy.generative.diffusion import DDPM, DDIMSampler, DDPMSampler
from diffpilot.policy.generative.flow import FlowMatching, HeunSampler
from diffpilot.policy.generative.meanflow import MeanFlow, MeanFlowSampler


def shift_chunk(chunk: Tensor, shift: int) -> Tensor:
    """Drop the first ``shift`` steps of ``chunk`` (B, H, A) and repeat its last step to keep length H."""
    horizon = chunk.shape[1]
    if not 0 <= shift < horizon:
        raise ValueError(f"shift must be in [0, {horizon - 1}] for a chunk of {horizon} steps, got {shift}")
    if shift == 0:
        return chunk
    tail = chunk[:, -1:].expand(-1, shift, -1)
    return torch.cat([chunk[:, shift:], tail], dim=1)


@dataclass(frozen=True)
class WarmStartConfig:
    """``t_start`` is K′ as a time in (0, 1); ``num_steps`` is used by flow samplers only."""

    t_start: float = 0.3
    renoise: bool = True
    num_steps: int = 3

    def __post_init__(self) -> None:
        if not 0.0 < self.t_start < 1.0:
            raise ValueError(f"warm start t_start must be in (0, 1) (1 is a full denoise), got {self.t_start}")
        if self.num_steps < 1:
            raise ValueError(f"warm start num_steps must be >= 1, got {self.num_steps}")


class WarmStarter:
    """Denoises a shifted previous chunk from ``t_start`` with the policy's own sampler family.

    For DDPM-trained models the warm steps are the policy sampler's own steps
    at or below ``t_start`` (DDIM or DDPM); ``t_start`` snaps down to the
    nearest of those step times so the guess sits exactly at a noise level the
    sampler knows. Flow and MeanFlow models integrate ``num_steps`` steps from
    ``t_start`` with a sampler of the policy's kind (Heun, MeanFlow, else Euler),
    built by :func:`~diffpilot.policy.generative.build_sampler`, so the
    objective must fit it as for the policy's own sampler.
    """

    def __init__(self, objective: Any, sampler: Sampler, config: WarmStartConfig) -> None:
        self.objective, self.config = objective, config
        if isinstance(sampler, (DDIMSampler, DDPMSampler)):
            times = [t for t in sampler.timesteps if t <= config.t_start + 1e-9]
            if not times:
                raise ValueError(
                    f"warm start t_start={config.t_start} is below every step time of the sampler "
                    f"(smallest {min(sampler.timesteps):.3f}); raise t_start"
                )
            self.t_start = times[0]
            self.sampler: Sampler = sampler
            self.nfe = len(times)
        elif isinstance(objective, (FlowMatching, MeanFlow)):
            self.t_start = config.t_start
            if isinstance(sampler, HeunSampler):
                name = "heun"
            elif isinstance(objective, MeanFlow) and isinstance(sampler, MeanFlowSampler):
                name = "meanflow"
            else:
                name = "euler"
            self.sampler = build_sampler(name, objective, config.num_steps)
            self.nfe = 2 * config.num_steps if name == "heun" else config.num_steps
        else:
            raise ValueError(f"no warm start for a {type(objective).__name__} objective with {type(sampler).__name__}")

    def place(self, guess: Tensor, noise: Tensor) -> Tensor:
        """The guess at time ``t_start``: forward-diffused with ``noise`` when ``renoise``, else as it is."""
        if not self.config.renoise:
            return guess
        if isinstance(self.objective, DDPM):
            k = int(round(self.t_start * self.objective.num_train_steps)) - 1
            return self.objective.add_noise(guess, noise, k)
        return FlowMatching.interpolate(guess, noise, guess.new_full((guess.shape[0],), self.t_start))

    def sample(
        self,
        model: Denoiser,
        previous: Tensor,
        shift: int,
        noise: Tensor,
        cond: Condition,
        *,
        hook: StepHook | None = None,
    ) -> SampleResult:
        """Next chunk from the previous (normalized) chunk after ``shift`` executed actions.

        ``hook`` is called after each warm step, as in a full sampler run
        (DDPM/DDIM steps keep their index in the full step list).
        """
        x_start = self.place(shift_chunk(previous, shift), noise)
        return self.sampler.sample(model, noise, cond, x_start=x_start, t_start=self.t_start, hook=hook)
