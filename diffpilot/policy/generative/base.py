"""Contracts shared by every generative process and sampler.

Time convention, used by all processes: continuous ``t`` in [0, 1], where
``t = 1`` is pure noise and ``t = 0`` is data. Networks always receive ``t``
(and MeanFlow's ``r``) as float tensors of shape ``(B,)`` in that range; a
discrete DDPM step ``k`` in ``{0, ..., T-1}`` is presented as ``t = (k + 1) / T``.
Keeping one convention lets a warm start name its start time the same way for
diffusion and flow samplers.

Two things belong to the sampler interface rather than to each policy:

* structured conditions (:mod:`~diffpilot.policy.generative.conditions`):
  ``cond`` may be a tensor or a :class:`~diffpilot.policy.generative.conditions.TokenSets`;
  samplers and objectives pass it to the network untouched;
* a per-step hook (:class:`StepHook`), called after every update with a
  :class:`StepInfo`, which may change the sample (guidance, projection,
  logging). Without a hook a sampler runs exactly the loop it ran before
  hooks existed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from diffpilot.policy.generative.conditions import Condition


class Denoiser(Protocol):
    """A network ``f(x, t, cond, r) -> Tensor`` with the shape of ``x``.

    ``cond`` is ``(B, C)`` (a global condition vector), ``(B, N, C)``
    (condition tokens) or :class:`~diffpilot.policy.generative.conditions.TokenSets`
    (several masked token sets, for networks that take them); ``r`` is only
    used by MeanFlow (average velocity from ``r`` to ``t``) and is ``None`` otherwise.
    """

    def __call__(self, x: Tensor, t: Tensor, cond: Condition = None, r: Tensor | None = None) -> Tensor: ...


@dataclass(frozen=True)
class SampleResult:
    """A batch of samples and the number of network evaluations spent on it."""

    sample: Tensor
    nfe: int


@dataclass(frozen=True, eq=False)
class StepInfo:
    """One finished sampler step, as a :class:`StepHook` sees it.

    Attributes:
        index: the step's position in the sampler's step list, 0 being the
            step that starts nearest ``t = 1``. DDPM/DDIM number their full
            list, so the steps a warm start runs keep the numbers they have in
            a full run; flow samplers number the steps of their grid from
            ``t_start``.
        num_steps: the length of that list.
        t_from, t_to: the step integrated from ``t_from`` down to ``t_to``
            (``t_to = 0`` after the last step).
        x_from: the sample at ``t_from`` that the network saw.
        x0_hat: the step's estimate of the clean sample at ``t = 0``: the
            (clipped) predicted sample for DDPM/DDIM, ``x_from - t_from * v``
            for flow samplers (``v`` the velocity of the step's first
            evaluation; for MeanFlow the average velocity over the step).
    """

    index: int
    num_steps: int
    t_from: float
    t_to: float
    x_from: Tensor
    x0_hat: Tensor
    _redo: Callable[[Tensor | None, Tensor | None], Tensor] = field(repr=False)

    def redo(self, *, x_from: Tensor | None = None, x0_hat: Tensor | None = None) -> Tensor:
        """The step's update run again from a moved sample and/or clean-sample estimate, without the network.

        What the network returned (and any step noise drawn) is held fixed, so
        this costs no evaluation. DDPM/DDIM hold the noise estimate: ``x0_hat``
        replaces the predicted clean sample in the update (guidance on the
        prediction, as in CTG), ``x_from`` replaces the current sample where
        the update reads it (the DDPM posterior mean; the DDIM update does not).
        Flow samplers (Euler, Heun, MeanFlow) hold the velocity: then the clean
        estimate moves with the sample, so pass either ``x_from`` or ``x0_hat``
        (which moves the sample by ``x0_hat - self.x0_hat``), not both.
        """
        return self._redo(x_from, x0_hat)


class StepHook(Protocol):
    """Called by a sampler after each update step: ``hook(x, step) -> x``.

    ``x`` is the sample at ``step.t_to``; the returned tensor (same shape)
    replaces it and is where the next step starts. Returning ``x`` itself
    leaves the run exactly as without a hook. A guidance hook typically
    returns ``step.redo(x0_hat=...)`` (moved prediction) or
    ``step.redo(x_from=...)`` (moved sample), or adds a correction to ``x``.
    The hook adds no network evaluations to the reported NFE; one that runs
    the network itself must count that on its own.
    """

    def __call__(self, x: Tensor, step: StepInfo) -> Tensor: ...


def call_hook(hook: StepHook, x: Tensor, step: StepInfo) -> Tensor:
    """Runs ``hook`` and checks that it returned a tensor shaped like ``x``."""
    out = hook(x, step)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"a step hook must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    return out


class Sampler(Protocol):
    """Turns noise into samples given a condition.

    ``noise`` is always passed in (deterministic tests, ONNX export, warm
    start). ``x_start``/``t_start`` start the integration from a given sample
    at time ``t_start`` instead of from ``noise`` at ``t = 1``. Stochastic
    samplers take their per-step noise from ``step_noise`` (shape
    ``(num_steps, *noise.shape)``) when given, else from the global RNG.
    ``hook`` is called after every update step (see :class:`StepHook`).
    """

    num_steps: int

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
    ) -> SampleResult: ...


class Objective(Protocol):
    """A training loss for a denoiser on clean samples ``x0``; ``cond`` goes to the network unchanged.

    ``noise`` (shaped like ``x0``) replaces the loss's own noise draw: a given coupling of noise and sample.
    """

    def loss(
        self,
        model: Denoiser,
        x0: Tensor,
        cond: Condition = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor: ...
