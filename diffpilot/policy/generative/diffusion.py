"""Discrete-time diffusion (DDPM) training objective and its samplers.

A step ``k`` in ``{0, ..., T-1}`` has ``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps``
and is shown to the network as ``t = (k + 1) / T`` (see ``base``). The samplers
precompute their per-step coefficients as Python floats over a fixed step
list, so a sampling loop contains no control flow on tensor values and can be
traced for export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffpilot.policy.generative import shard
from diffpilot.policy.generative.base import Denoiser, SampleResult, StepHook, StepInfo, call_hook
from diffpilot.policy.generative.conditions import Condition
from diffpilot.policy.generative.schedules import make_schedule

PREDICTIONS = ("epsilon", "sample", "v_prediction")
_TIME_EPS = 1e-9  # float slack when comparing a step time with t_start


class DDPM:
    """DDPM objective (Ho et al.) with epsilon, sample or v prediction.

    ``clip_sample`` (e.g. 1.0 for data normalized to [-1, 1]) clamps the
    predicted clean sample during sampling; it is the usual guard against
    early, inaccurate predictions pushing the chain out of the data range.
    """

    def __init__(
        self,
        num_train_steps: int = 100,
        schedule: str = "squaredcos_cap_v2",
        prediction: str = "epsilon",
        clip_sample: float | None = None,
        schedule_kwargs: dict | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; choose one of {list(PREDICTIONS)}")
        if clip_sample is not None and clip_sample <= 0:
            raise ValueError(f"clip_sample must be positive or None, got {clip_sample}")
        sched = make_schedule(schedule, num_train_steps, **(schedule_kwargs or {}))
        self.num_train_steps = num_train_steps
        self.schedule = schedule
        self.prediction = prediction
        self.clip_sample = clip_sample
        self.betas = sched.betas
        self.alphas_cumprod = sched.alphas_cumprod
        # Python floats in float64 for the samplers' coefficients.
        self._abar = [float(a) for a in torch.cumprod(1.0 - sched.betas.double(), 0)]

    def time_of(self, k: Tensor | int) -> Tensor | float:
        """Continuous time ``(k + 1) / T`` that the network sees for step ``k``."""
        if isinstance(k, Tensor):
            return (k.float() + 1.0) / self.num_train_steps
        return (k + 1) / self.num_train_steps

    def add_noise(self, x0: Tensor, noise: Tensor, k: Tensor | int) -> Tensor:
        """Forward-diffuses ``x0`` to step ``k`` (an int or a ``(B,)`` long tensor)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
        abar = self._abar_at(k, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def target(self, x0: Tensor, noise: Tensor, k: Tensor | int) -> Tensor:
        """What the network is trained to output at step ``k``."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        abar = self._abar_at(k, x0)
        return abar.sqrt() * noise - (1.0 - abar).sqrt() * x0

    def loss(
        self,
        model: Denoiser,
        x0: Tensor,
        cond: Condition = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Mean squared error of the prediction at a uniformly drawn step; ``noise`` fixes the draw."""
        b = x0.shape[0]
        k = shard.randint(0, self.num_train_steps, (b,), generator=generator, device=x0.device)
        if noise is None:
            noise = shard.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_k = self.add_noise(x0, noise, k)
        pred = model(x_k, self.time_of(k).to(x0.dtype), cond)
        return F.mse_loss(pred, self.target(x0, noise, k))

    def split_prediction(self, out: Tensor, x: Tensor, abar: float) -> tuple[Tensor, Tensor]:
        """Turns a network output at signal level ``abar`` into (clean sample, noise) estimates."""
        sa, sn = math.sqrt(abar), math.sqrt(1.0 - abar)
        if self.prediction == "epsilon":
            eps = out
            x0 = (x - sn * eps) / sa
        elif self.prediction == "sample":
            x0 = out
            eps = (x - sa * x0) / sn
        else:
            x0 = sa * x - sn * out
            eps = sn * x + sa * out
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
            eps = (x - sa * x0) / sn  # keep the pair consistent with the clipped sample
        return x0, eps

    def _abar_at(self, k: Tensor | int, like: Tensor) -> Tensor:
        abar = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        if not isinstance(k, Tensor):
            if not 0 <= k < self.num_train_steps:
                raise ValueError(f"step k={k} is outside [0, {self.num_train_steps - 1}]")
            return abar[k]
        return abar[k.long()].reshape(-1, *([1] * (like.dim() - 1)))


def resolve_start(
    noise: Tensor, x_start: Tensor | None, t_start: float, step_noise: Tensor | None, num_steps: int
) -> Tensor:
    """Validates the common sampler inputs and returns the starting sample.

    The integration starts from ``x_start`` when given, else from ``noise``.
    """
    if not isinstance(noise, Tensor):
        raise ValueError(f"noise must be a tensor, got {type(noise).__name__}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    if x_start is not None and x_start.shape != noise.shape:
        raise ValueError(f"x_start shape {tuple(x_start.shape)} must equal noise shape {tuple(noise.shape)}")
    if step_noise is not None and tuple(step_noise.shape) != (num_steps, *noise.shape):
        raise ValueError(
            f"step_noise must have shape (num_steps, *noise.shape) = {(num_steps, *noise.shape)}, "
            f"got {tuple(step_noise.shape)}"
        )
    return noise if x_start is None else x_start


def _batch_time(x: Tensor, t: float) -> Tensor:
    return x.new_full((x.shape[0],), t)


def _require_ddpm(objective: object, sampler: str) -> None:
    if not isinstance(objective, DDPM):
        raise ValueError(f"{sampler} needs a DDPM objective, got {type(objective).__name__}")


@dataclass(frozen=True)
class _Step:
    k: int  # training step whose network output is used
    abar: float  # signal level at this step
    abar_prev: float  # signal level after the update (1.0 after the last step)


class _DiscreteSampler:
    """Shared loop of DDPM-family samplers over a fixed descending step list."""

    def __init__(self, ddpm: DDPM, steps: list[int]) -> None:
        self.ddpm = ddpm
        abar = ddpm._abar
        prev = steps[1:] + [-1]
        self._steps = [_Step(k, abar[k], abar[p] if p >= 0 else 1.0) for k, p in zip(steps, prev)]

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    @property
    def timesteps(self) -> list[float]:
        """Network times of the steps, in the order they run (1 → 0)."""
        return [self.ddpm.time_of(s.k) for s in self._steps]

    def sample(
        self,
        model: Denoiser,
        noise: Tensor,
        cond: Condition = None,
        *,
        x_start: Tensor | None = None,
        t_start: float = 1.0,
        step_noise: Tensor | None = None,
        hook: StepHook | None = None,
    ) -> SampleResult:
        """Denoises from ``x_start`` (or ``noise``), running only the steps with time <= ``t_start``.

        For a warm start ``x_start`` should be at the noise level of the first
        step run; pick ``t_start`` from ``timesteps`` to make that exact.
        ``step_noise[i]`` is the fresh noise of the ``i``-th step of the full
        list, so a warm start reuses the same draws as a full run. ``hook``
        is called after each update (``StepInfo.index`` = ``i``); a stochastic
        step draws its noise before the hook, so ``StepInfo.redo`` reuses it.
        """
        x = resolve_start(noise, x_start, t_start, step_noise, self.num_steps)
        nfe = 0
        for i, step in enumerate(self._steps):
            if self.ddpm.time_of(step.k) > t_start + _TIME_EPS:
                continue
            out = model(x, _batch_time(x, self.ddpm.time_of(step.k)), cond)
            nfe += 1
            x0, eps = self.ddpm.split_prediction(out, x, step.abar)
            z = None if step_noise is None else step_noise[i]
            if hook is None:
                x = self._update(x, x0, eps, step, z)
                continue
            if z is None and self._noise_scale(step) > 0.0:
                z = torch.randn_like(x)  # drawn here (where _update would draw it) so a redo reuses it
            x = call_hook(hook, self._update(x, x0, eps, step, z), self._step_info(i, step, x, x0, eps, z))
        return SampleResult(sample=x, nfe=nfe)

    def _step_info(self, i: int, step: _Step, x: Tensor, x0: Tensor, eps: Tensor, z: Tensor | None) -> StepInfo:
        t_to = self.ddpm.time_of(self._steps[i + 1].k) if i + 1 < len(self._steps) else 0.0

        def redo(x_from: Tensor | None, x0_hat: Tensor | None) -> Tensor:
            return self._update(x if x_from is None else x_from, x0 if x0_hat is None else x0_hat, eps, step, z)

        return StepInfo(i, len(self._steps), self.ddpm.time_of(step.k), t_to, x, x0, redo)

    def _noise_scale(self, step: _Step) -> float:
        """Standard deviation of the fresh noise the update of ``step`` adds (0 = deterministic)."""
        raise NotImplementedError

    def _update(self, x: Tensor, x0: Tensor, eps: Tensor, step: _Step, z: Tensor | None) -> Tensor:
        raise NotImplementedError


class DDPMSampler(_DiscreteSampler):
    """Ancestral sampling over all ``T`` training steps, posterior variance ``beta~_k``."""

    def __init__(self, ddpm: DDPM) -> None:
        _require_ddpm(ddpm, "DDPMSampler")
        super().__init__(ddpm, list(range(ddpm.num_train_steps - 1, -1, -1)))

    def _noise_scale(self, step: _Step) -> float:
        var = (1.0 - step.abar / step.abar_prev) * (1.0 - step.abar_prev) / (1.0 - step.abar)
        return math.sqrt(var) if var > 0.0 else 0.0

    def _update(self, x: Tensor, x0: Tensor, eps: Tensor, step: _Step, z: Tensor | None) -> Tensor:
        alpha = step.abar / step.abar_prev
        beta = 1.0 - alpha
        denom = 1.0 - step.abar
        mean = (math.sqrt(step.abar_prev) * beta / denom) * x0 + (math.sqrt(alpha) * (1.0 - step.abar_prev) / denom) * x
        std = self._noise_scale(step)
        if std <= 0.0:  # last step: the posterior is a point mass
            return mean
        if z is None:
            z = torch.randn_like(x)
        return mean + std * z


class DDIMSampler(_DiscreteSampler):
    """DDIM (Song et al.) over ``num_steps <= T`` steps; ``eta=0`` is deterministic.

    Steps are "trailing" spaced, ``k_i = round(T - i T / S) - 1``, so the first
    step always starts from pure noise (step ``T - 1``), which matters at 1-10 steps.
    """

    def __init__(self, ddpm: DDPM, num_steps: int = 10, eta: float = 0.0) -> None:
        _require_ddpm(ddpm, "DDIMSampler")
        big_t = ddpm.num_train_steps
        if not isinstance(num_steps, int) or not 1 <= num_steps <= big_t:
            raise ValueError(f"DDIM num_steps must be an integer in [1, {big_t}] (the training steps), got {num_steps!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta
        steps = [int(round(big_t - i * big_t / num_steps)) - 1 for i in range(num_steps)]
        super().__init__(ddpm, steps)

    def _noise_scale(self, step: _Step) -> float:
        a, ap = step.abar, step.abar_prev
        return self.eta * math.sqrt((1.0 - ap) / (1.0 - a)) * math.sqrt(1.0 - a / ap)

    def _update(self, x: Tensor, x0: Tensor, eps: Tensor, step: _Step, z: Tensor | None) -> Tensor:
        a, ap = step.abar, step.abar_prev
        sigma = self._noise_scale(step)
        x_prev = math.sqrt(ap) * x0 + math.sqrt(max(1.0 - ap - sigma**2, 0.0)) * eps
        if sigma <= 0.0:
            return x_prev
        if z is None:
            z = torch.randn_like(x)
        return x_prev + sigma * z
