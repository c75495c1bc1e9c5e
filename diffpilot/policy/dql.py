"""Diffusion Q-Learning (Wang et al. 2023): a 5-step DDPM actor steered by a twin critic.

The actor is the generative core's DDPM (variance-preserving schedule, five
steps, epsilon-prediction, clean-sample clipping to the data range) on a
3 x 256 Mish MLP over ``(a_t, t, s)``. Its loss is
``BC + eta * (-Q(s, a_pi) / E|Q|)`` where ``a_pi`` is drawn through the whole
five-step ancestral chain with gradients, so the Q term shapes every
denoising step. An EMA of the actor (0.995, from step 1000, every 5 steps)
acts and supplies the critic's next actions; acting samples 50 candidates
and draws one with probability ``softmax(Q)``.
"""

from __future__ import annotations

from typing import Any

from diffpilot.policy.bc import config_dataclass
from diffpilot.policy.critic import CRITIC_DEFAULTS, ActorCriticPolicy
from diffpilot.policy.kinds import register_policy

__all__ = ["DQLPolicy"]

DQL_DEFAULTS: dict[str, Any] = {
    **CRITIC_DEFAULTS,
    "objective": {"name": "ddpm", "num_train_steps": 5, "schedule": "vp", "prediction": "epsilon", "clip_sample": 1.0},
    "sampler": {"name": "ddpm"},
    "action_selection": {"samples": 50, "mode": "softmax"},
}


@register_policy("dql")
class DQLPolicy(ActorCriticPolicy):
    """Diffusion-QL: DDPM-5 actor, twin critic, Q-softmax action selection over 50 samples."""

    DEFAULTS = DQL_DEFAULTS
    Config = config_dataclass("DQLConfig", DQL_DEFAULTS)
