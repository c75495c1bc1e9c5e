"""MeanFlow (Geng et al. 2025): learn the average velocity so one step can sample.

On the flow-matching path ``z_t = (1 - t) x0 + t eps`` with instantaneous
velocity ``v = eps - x0``, the average velocity over ``[r, t]`` is
``u(z_t, r, t) = (z_t - z_r) / (t - r)``. Differentiating ``(t - r) u`` in ``t``
gives the identity ``u = v - (t - r) d/dt u``, where the total derivative along
the path is the Jacobian-vector product of ``u`` with tangent ``(v, 0, 1)``
for ``(z, r, t)``. The network is regressed onto that (stop-gradient) target.

The network is called as ``model(z, t, cond, r)``. It must be usable under
``torch.func.jvp``: no in-place updates of its inputs, no data-dependent
Python branching, and dropout off (or deterministic) during the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffpilot.policy.generative import shard
from diffpilot.policy.generative.base import Denoiser, SampleResult, StepHook, call_hook
from diffpilot.policy.generative.conditions import Condition
from diffpilot.policy.generative.diffusion import resolve_start
from diffpilot.policy.generative.flow import TIME_SAMPLINGS, FlowMatching, draw_time, uniform_grid, velocity_step_info


class MeanFlow:
    """MeanFlow objective with adaptive loss weighting.

    ``(r, t)`` are two draws (logit-normal, or uniform with ``time_sampling``)
    sorted so ``r <= t``; a share
    ``ratio_r_equals_t`` of the batch has ``r = t``, where the target reduces
    to plain flow matching (the paper finds 25 % of ``r != t`` best on images;
    OFQL uses half). The per-sample loss ``||Delta||^2`` is weighted by
    ``1 / (||Delta||^2 + c)^p`` (detached), a robust loss that keeps a few
    large JVP targets from dominating.

    Logit-normal draws rarely reach the ends of ``[0, 1]``: a pair near
    ``(r, t) = (0, 1)``, the one-step jump, is about 1 in 3,000 at the paper's
    ``(-0.4, 1.0)``. Uniform draws see it about 60 times as often.
    """

    def __init__(
        self,
        time_sampling: str = "logit_normal",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
        ratio_r_equals_t: float = 0.5,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-2,
    ) -> None:
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {time_sampling!r}; choose one of {list(TIME_SAMPLINGS)}")
        if not 0.0 <= ratio_r_equals_t <= 1.0:
            raise ValueError(f"ratio_r_equals_t must be in [0, 1], got {ratio_r_equals_t}")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {logit_std}")
        if adaptive_p < 0 or adaptive_c <= 0:
            raise ValueError(f"need adaptive_p >= 0 and adaptive_c > 0, got p={adaptive_p}, c={adaptive_c}")
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.ratio_r_equals_t = ratio_r_equals_t
        self.adaptive_p = adaptive_p
        self.adaptive_c = adaptive_c

    def sample_times(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draws ``(r, t)`` of shape ``(n,)`` with ``r <= t``; the first share of rows has ``r = t``.

        Under a sharded batch (:mod:`.shard`) the draw is made for the global
        batch, whose first share has ``r = t``, and this process keeps its rows.
        """
        local, n = n, shard.global_rows(n)
        a, b = (draw_time(n, self.time_sampling, mean=self.logit_mean, std=self.logit_std, generator=generator, device=device)
                for _ in range(2))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        n_equal = int(round(self.ratio_r_equals_t * n))
        r = torch.where(torch.arange(n, device=r.device) < n_equal, t, r)
        if local != n:
            r, t = shard.local_rows(r), shard.local_rows(t)
        return r, t

    def target(self, model: Denoiser, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        """Returns ``(u, u_tgt)``: the network's average velocity and its detached target.

        One forward-mode pass gives both ``u`` and ``du/dt`` along ``(v, 0, 1)``;
        ``cond`` is closed over, so it is held fixed. A network with a
        ``jvp_detached(z, t, cond, r, dz, dt, dr)`` method (the plain MLP)
        computes the pair itself, cheaper than generic forward-mode AD.
        """
        if hasattr(model, "jvp_detached"):
            u, dudt = model.jvp_detached(z, t, cond, r, v, torch.ones_like(t), torch.zeros_like(r))
        else:
            u, dudt = torch.func.jvp(
                lambda z_, r_, t_: model(z_, t_, cond, r_),
                (z, r, t),
                (v, torch.zeros_like(r), torch.ones_like(t)),
            )
        u_tgt = v - _per_sample_time(t - r, z) * dudt
        return u, u_tgt.detach()

    def loss(
        self,
        model: Denoiser,
        x0: Tensor,
        cond: Condition = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Adaptively weighted average-velocity regression; ``noise`` pairs each ``x0`` with a given end point.

        With a teacher's coupling (``x0`` the teacher's sample of ``noise``) the path from each noise ends at
        one plan, so the one-step jump has a single answer to learn instead of the average over the data.
        """
        r, t = self.sample_times(x0.shape[0], generator=generator, device=x0.device)
        r, t = r.to(x0.dtype), t.to(x0.dtype)
        if noise is None:
            noise = shard.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        z = FlowMatching.interpolate(x0, noise, t)
        u, u_tgt = self.target(model, z, r, t, noise - x0, cond)
        sq = (u - u_tgt).pow(2).flatten(1).sum(dim=1)
        if self.adaptive_p > 0:
            weight = (sq.detach() + self.adaptive_c).pow(-self.adaptive_p)
            return (weight * sq).mean()
        return sq.mean()


def _per_sample_time(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))


class MeanFlowSampler:
    """Jumps ``z_r = z_t - (t - r) u(z_t, r, t)`` on a uniform grid; ``num_steps`` NFE (1 by default)."""

    def __init__(self, num_steps: int = 1) -> None:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"MeanFlowSampler num_steps must be a positive integer, got {num_steps!r}")
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
        """Maps ``x_start`` (or ``noise``) at ``t_start`` to ``t = 0``; ``step_noise`` is unused (deterministic).

        ``hook`` is called after each jump; its ``x0_hat`` is ``z - t u``, the
        step's average velocity extrapolated to ``t = 0`` (exact for the last jump).
        """
        z = resolve_start(noise, x_start, t_start, None, self.num_steps)
        grid = uniform_grid(t_start, self.num_steps)
        b = z.shape[0]
        for i, (t, r) in enumerate(zip(grid[:-1], grid[1:])):
            if hook is None:
                z = z - (t - r) * model(z, z.new_full((b,), t), cond, z.new_full((b,), r))
                continue
            u = model(z, z.new_full((b,), t), cond, z.new_full((b,), r))
            span = t - r

            def move(z_from: Tensor, u: Tensor = u, span: float = span) -> Tensor:
                return z_from - span * u

            z = call_hook(hook, move(z), velocity_step_info(i, self.num_steps, t, r, z, u, move))
        return SampleResult(sample=z, nfe=self.num_steps)
