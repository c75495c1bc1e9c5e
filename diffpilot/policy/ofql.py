"""One-Step Flow Q-Learning (Nguyen & Yoo 2025): a MeanFlow actor that acts in one network evaluation.

The actor models the average velocity ``u(a_t, r, t; s)`` of the straight
path ``a_t = (1 - t) a + t eps``; its imitation loss is the generative core's
MeanFlow loss, regressing ``u`` onto the stop-gradient target
``v - (t - r)(v . d_a u + d_t u)`` obtained by one ``torch.func.jvp`` with
tangent ``(v, 0, 1)``, with ``(r, t)`` logit-normal(-0.4, 1.0) and half of
the batch at ``r = t`` (plain flow matching). An action is one jump from
noise, ``a = eps - u(eps, 0, 1; s)``: the core's one-step MeanFlow sampler,
one NFE. The actor loss is ``BC - alpha Q(s, a_pi)`` with
``alpha = eta / E|Q|`` (detached); the critic is the same twin critic as DQL.

Time embedding: the MLP's sinusoidal features default to ``t * 1000``
(sized for discrete diffusion steps). Under the JVP the tangent ``dt = 1`` is
multiplied by that scale, so the highest-frequency features change by up to
1000 per unit time and ``d_t u``, hence the BC target, is dominated by them
and noisy. OFQL therefore builds the actor with ``time_scale`` 1.0 (the
features vary smoothly on [0, 1], which is all a one-step model needs);
set ``network.time_scale`` to change it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from diffpilot.policy.bc import config_dataclass
from diffpilot.policy.critic import CRITIC_DEFAULTS, ActorCriticPolicy
from diffpilot.policy.generative.meanflow import MeanFlow
from diffpilot.policy.kinds import register_policy

__all__ = ["OFQLPolicy"]

OFQL_DEFAULTS: dict[str, Any] = {
    **CRITIC_DEFAULTS,
    "network": {**CRITIC_DEFAULTS["network"], "time_scale": 1.0},
    # adaptive_p 0: the plain squared error ||u - sg(u_tgt)||^2 of OFQL (MeanFlow's image models use p = 1).
    "objective": {"name": "meanflow", "logit_mean": -0.4, "logit_std": 1.0, "ratio_r_equals_t": 0.5, "adaptive_p": 0.0},
    "sampler": {"name": "meanflow", "num_steps": 1},
    "action_selection": {"samples": 1, "mode": "first"},
}


@register_policy("ofql")
class OFQLPolicy(ActorCriticPolicy):
    """OFQL: MeanFlow actor (one-step action), twin critic, BC - alpha Q actor loss."""

    DEFAULTS = OFQL_DEFAULTS
    Config = config_dataclass("OFQLConfig", OFQL_DEFAULTS)
    EXPORTABLE = True  # the one-step actor (action_selection samples 1)

    def meanflow_target(self, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``(u, u_tgt)`` of the online actor at ``(z, r, t)`` for velocity ``v`` (the JVP target)."""
        assert isinstance(self.objective, MeanFlow)
        return self.objective.target(self.actor, z, r, t, v, cond)
