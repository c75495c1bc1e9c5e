"""Flow matching on the straight path from data to noise, and its ODE samplers.

The path is ``x_t = (1 - t) x0 + t eps`` (``t = 1`` noise, ``t = 0`` data), so
the velocity ``dx_t/dt = eps - x0`` is constant along each pair; sampling
integrates ``dx/dt = v(x, t)`` backwards from ``t_start`` to 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffpilot.policy.generative import shard
from diffpilot.policy.generative.base import Denoiser, SampleResult, StepHook, StepInfo, call_hook
from diffpilot.policy.generative.conditions import Condition
from diffpilot.policy.generative.diffusion import resolve_start

TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_time(
    n: int,
    sampling: str,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draws ``n`` training times in (0, 1).

    Logit-normal (Esser et al., SD3) puts more weight on intermediate times,
    where the velocity is hardest to predict.
    """
    return shard.local_rows(draw_time(shard.global_rows(n), sampling, mean=mean, std=std, generator=generator, device=device))


def draw_time(
    n: int,
    sampling: str,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draws ``n`` times in (0, 1) for the whole batch, unsharded (:func:`sample_time` keeps this process's rows)."""
    if sampling == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if sampling == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"unknown time sampling {sampling!r}; choose one of {list(TIME_SAMPLINGS)}")


class FlowMatching:
    """Rectified-flow / flow-matching objective: regress ``v = eps - x0`` at ``x_t``."""

    def __init__(self, time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {time_sampling!r}; choose one of {list(TIME_SAMPLINGS)}")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {logit_std}")
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    @staticmethod
    def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Point ``(1 - t) x0 + t noise`` of the path, ``t`` of shape ``(B,)``."""
        t = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1.0 - t) * x0 + t * noise

    def loss(
        self,
        model: Denoiser,
        x0: Tensor,
        cond: Condition = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Velocity regression at a drawn time; ``noise`` pairs each ``x0`` with a given end point (a teacher's
        coupling, for distillation) instead of a fresh draw."""
        t = sample_time(
            x0.shape[0], self.time_sampling, mean=self.logit_mean, std=self.logit_std, generator=generator, device=x0.device
        ).to(x0.dtype)
        if noise is None:
            noise = shard.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        pred = model(self.interpolate(x0, noise, t), t, cond)
        return F.mse_loss(pred, noise - x0)


def uniform_grid(t_start: float, num_steps: int) -> list[float]:
    """``num_steps + 1`` equally spaced times from ``t_start`` down to 0."""
    return [t_start * (1.0 - i / num_steps) for i in range(num_steps + 1)]


def _check_num_steps(num_steps: int, who: str) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{who} num_steps must be a positive integer, got {num_steps!r}")


def velocity_step_info(
    index: int, num_steps: int, t: float, t_next: float, x: Tensor, v: Tensor, move: Callable[[Tensor], Tensor]
) -> StepInfo:
    """``StepInfo`` of a flow-sampler step from ``x`` at ``t`` whose update ``move(x_from)`` holds the velocity fixed.

    ``v`` is the velocity that defines the clean-sample estimate ``x - t v``.
    With the velocity held fixed the estimate moves with the sample, so a redo
    takes either a moved sample or a moved estimate (shifting the sample by as much).
    """
    x0_hat = x - t * v

    def redo(x_from: Tensor | None, new_x0: Tensor | None) -> Tensor:
        if x_from is not None and new_x0 is not None:
            raise ValueError(
                "a flow sampler step holds the velocity fixed, so its sample and clean estimate move together: "
                "redo with x_from or with x0_hat, not both"
            )
        if new_x0 is not None:
            return move(x + (new_x0 - x0_hat))
        return move(x if x_from is None else x_from)

    return StepInfo(index, num_steps, t, t_next, x, x0_hat, redo)


class EulerSampler:
    """Euler integration of the learned velocity field; ``num_steps`` NFE."""

    def __init__(self, num_steps: int = 10) -> None:
        _check_num_steps(num_steps, "EulerSampler")
        self.num_steps = num_steps

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
        """Integrates from ``x_start`` (or ``noise``) at ``t_start`` to 0; ``step_noise`` is unused (deterministic).

        ``hook`` is called after each Euler step (index ``i`` of the grid from ``t_start``).
        """
        x = resolve_start(noise, x_start, t_start, None, self.num_steps)
        grid = uniform_grid(t_start, self.num_steps)
        for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            if hook is None:
                x = x + (t_next - t) * model(x, x.new_full((x.shape[0],), t), cond)
                continue
            v = model(x, x.new_full((x.shape[0],), t), cond)
            dt = t_next - t

            def move(x_from: Tensor, v: Tensor = v, dt: float = dt) -> Tensor:
                return x_from + dt * v

            x = call_hook(hook, move(x), velocity_step_info(i, self.num_steps, t, t_next, x, v, move))
        return SampleResult(sample=x, nfe=self.num_steps)


class HeunSampler:
    """Heun's second-order method (explicit trapezoid): two NFE per step.

    With ``final_euler`` the last step to ``t = 0`` is a plain Euler step (as
    in Karras et al.), saving one evaluation: NFE ``2 N - 1`` instead of ``2 N``.
    """

    def __init__(self, num_steps: int = 5, final_euler: bool = False) -> None:
        _check_num_steps(num_steps, "HeunSampler")
        self.num_steps = num_steps
        self.final_euler = final_euler

    @property
    def nfe(self) -> int:
        return 2 * self.num_steps - (1 if self.final_euler else 0)

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
        """Integrates from ``x_start`` (or ``noise``) at ``t_start`` to 0; ``step_noise`` is unused (deterministic).

        ``hook`` is called after each full Heun step (both evaluations); its
        ``x0_hat`` comes from the step's first velocity, and ``redo`` holds both
        velocities fixed.
        """
        x = resolve_start(noise, x_start, t_start, None, self.num_steps)
        grid = uniform_grid(t_start, self.num_steps)
        nfe = 0
        for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            dt = t_next - t
            v = model(x, x.new_full((x.shape[0],), t), cond)
            nfe += 1
            # the update is x + coef * vel: an Euler step (last one with final_euler) or the trapezoid
            if self.final_euler and i == self.num_steps - 1:
                vel, coef = v, dt
            else:
                x_pred = x + dt * v
                v_next = model(x_pred, x.new_full((x.shape[0],), t_next), cond)
                nfe += 1
                vel, coef = v + v_next, dt * 0.5

            def move(x_from: Tensor, vel: Tensor = vel, coef: float = coef) -> Tensor:
                return x_from + coef * vel

            x_new = move(x)
            x = x_new if hook is None else call_hook(
                hook, x_new, velocity_step_info(i, self.num_steps, t, t_next, x, v, move)
            )
        return SampleResult(sample=x, nfe=nfe)
