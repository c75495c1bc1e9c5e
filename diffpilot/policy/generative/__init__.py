"""Generative processes (DDPM, flow matching, MeanFlow), their samplers, and factories for configs.

Every sampler's ``sample(model, noise, cond, *, x_start, t_start, step_noise, hook)``
takes a structured condition (:class:`TokenSets`) as readily as a tensor and
calls ``hook(x, StepInfo) -> x`` after each step (see :mod:`.base`).
"""

from __future__ import annotations

from typing import Any

from diffpilot.policy.generative.base import Denoiser, Objective, Sampler, SampleResult, StepHook, StepInfo
from diffpilot.policy.generative.conditions import (
    Condition,
    TokenSets,
    cond_batch_size,
    cond_index,
    cond_repeat_interleave,
    cond_to,
)
from diffpilot.policy.generative.diffusion import DDIMSampler, DDPM, DDPMSampler
from diffpilot.policy.generative.flow import EulerSampler, FlowMatching, HeunSampler
from diffpilot.policy.generative.meanflow import MeanFlow, MeanFlowSampler
from diffpilot.policy.generative.metrics import energy_distance, mmd_rbf
from diffpilot.policy.generative.schedules import NoiseSchedule, make_schedule

__all__ = [
    "Condition",
    "DDIMSampler",
    "DDPM",
    "DDPMSampler",
    "Denoiser",
    "EulerSampler",
    "FlowMatching",
    "HeunSampler",
    "MeanFlow",
    "MeanFlowSampler",
    "NoiseSchedule",
    "Objective",
    "SampleResult",
    "Sampler",
    "StepHook",
    "StepInfo",
    "TokenSets",
    "build_objective",
    "build_sampler",
    "cond_batch_size",
    "cond_index",
    "cond_repeat_interleave",
    "cond_to",
    "energy_distance",
    "make_schedule",
    "mmd_rbf",
]

OBJECTIVES = {"ddpm": DDPM, "flow": FlowMatching, "meanflow": MeanFlow}
# sampler name -> (objective class it needs, constructor taking (objective, num_steps, **kwargs))
SAMPLERS = {
    "ddpm": (DDPM, lambda obj, n, **kw: DDPMSampler(obj, **kw)),
    "ddim": (DDPM, lambda obj, n, **kw: DDIMSampler(obj, 10 if n is None else n, **kw)),
    "euler": (FlowMatching, lambda obj, n, **kw: EulerSampler(10 if n is None else n, **kw)),
    "heun": (FlowMatching, lambda obj, n, **kw: HeunSampler(5 if n is None else n, **kw)),
    "meanflow": (MeanFlow, lambda obj, n, **kw: MeanFlowSampler(1 if n is None else n, **kw)),
}


def build_objective(name: str, **kwargs: Any) -> DDPM | FlowMatching | MeanFlow:
    """Objective by config name: ``"ddpm"``, ``"flow"`` or ``"meanflow"``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for objective {name!r}: {err}") from None


def build_sampler(name: str, objective: Any, num_steps: int | None = None, **kwargs: Any) -> Sampler:
    """Sampler by config name, checked against the objective it must fit.

    ``ddpm``/``ddim`` need a DDPM objective, ``euler``/``heun`` a flow-matching
    one, ``meanflow`` a MeanFlow one. ``num_steps`` is ignored by ``ddpm``
    (always all training steps); ``None`` picks a default (ddim 10, euler 10,
    heun 5, meanflow 1).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    needs, make = SAMPLERS[name]
    if not isinstance(objective, needs):
        fitting = sorted(n for n, (cls, _) in SAMPLERS.items() if isinstance(objective, cls))
        raise ValueError(
            f"sampler {name!r} needs a {needs.__name__} objective, got {type(objective).__name__}; "
            f"samplers that fit it: {fitting}"
        )
    try:
        return make(objective, num_steps, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for sampler {name!r}: {err}") from None
