"""Twin Q critics with EMA targets, and the actor-critic policy base that DQL and OFQL share.

The critic is two independent MLPs ``Q1, Q2(s, a)``; the TD target bootstraps
from the minimum of the two target networks (clipped double Q), which keeps
the overestimation that a policy maximizing Q would exploit in check. The
target networks follow the online ones by an exponential moving average
(``tau``). With ``max_q_backup`` (AntMaze-style sparse tasks) the next action
is the best of several samples of the actor, scored by that minimum.

:class:`ActorCriticPolicy` adds this critic to a :class:`SingleStepPolicy`:
per step one TD update of the critic, then one actor update on
``BC + eta * (-Q(s, a_pi) / E|Q|)`` where ``a_pi`` is sampled through the
actor's own sampler with gradients. Normalizing by the detached ``E|Q|``
makes ``eta`` independent of the reward scale of the task. Acting draws
``samples`` candidate actions and picks one by Q (softmax or argmax).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffpilot.policy.base import OptimGroup
from diffpilot.policy.bc import BASE_DEFAULTS, SingleStepPolicy
from diffpilot.policy.generative.base import SampleResult
from diffpilot.policy.generative import shard
from diffpilot.policy.networks.mlp import ACTIVATIONS

__all__ = ["CRITIC_DEFAULTS", "ActorCriticPolicy", "QNetwork", "TwinCritic", "soft_update"]


class QNetwork(nn.Module):
    """``Q(s, a)``: an MLP on the concatenated (normalized) observation and action."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256, depth: int = 3, activation: str = "mish") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if hidden < 1 or depth < 1:
            raise ValueError(f"need hidden >= 1 and depth >= 1, got {hidden} and {depth}")
        layers: list[nn.Module] = []
        width = obs_dim + action_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)


class TwinCritic(nn.Module):
    """Two independent Q networks; ``q_min`` is the pessimistic estimate used for targets and selection."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256, depth: int = 3, activation: str = "mish") -> None:
        super().__init__()
        self.q1 = QNetwork(obs_dim, action_dim, hidden, depth, activation)
        self.q2 = QNetwork(obs_dim, action_dim, hidden, depth, activation)

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        return self.q1(obs, action), self.q2(obs, action)

    def q_min(self, obs: Tensor, action: Tensor) -> Tensor:
        q1, q2 = self(obs, action)
        return torch.minimum(q1, q2)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """``target <- (1 - tau) target + tau source`` for every parameter (Polyak averaging)."""
    torch._foreach_lerp_(list(target.parameters()), [p.detach() for p in source.parameters()], tau)


CRITIC_DEFAULTS: dict[str, Any] = {
    **BASE_DEFAULTS,
    "critic": {
        "hidden": 256, "depth": 3, "activation": "mish", "lr": 3e-4, "discount": 0.99, "tau": 0.005,
        "grad_clip": 1.0, "max_q_backup": False, "backup_samples": 10,
    },
    "eta": 1.0,  # weight of the normalized Q term in the actor loss
    "reward_scale": 1.0,  # r' = reward_scale * r + reward_bias (e.g. AntMaze: r - 1)
    "reward_bias": 0.0,
}


class ActorCriticPolicy(SingleStepPolicy):
    """A single-step generative actor trained by BC plus a Q-maximizing term, with a twin critic."""

    KIND = "actor_critic"
    DEFAULTS = CRITIC_DEFAULTS
    TINY = {"network": {"hidden": 16, "depth": 1}, "critic": {"hidden": 16, "depth": 1}, "ema": {"start": 2, "every": 1}}

    def __init__(self, obs_dim: int, action_dim: int, **options: Any) -> None:
        super().__init__(obs_dim, action_dim, **options)
        c = self.config["critic"]
        if not 0.0 < float(c["tau"]) <= 1.0 or not 0.0 <= float(c["discount"]) < 1.0:
            raise ValueError(f"critic needs tau in (0, 1] and discount in [0, 1), got tau={c['tau']}, discount={c['discount']}")
        if int(c["backup_samples"]) < 1:
            raise ValueError(f"critic.backup_samples must be >= 1, got {c['backup_samples']}")
        self.critic = TwinCritic(self.obs_dim, self.action_dim, int(c["hidden"]), int(c["depth"]), c["activation"])
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

    def optim_groups(self) -> dict[str, OptimGroup]:
        groups = super().optim_groups()
        c = self.config["critic"]
        groups["critic"] = OptimGroup(list(self.critic.parameters()), lr=float(c["lr"]), weight_decay=0.0,
                                      grad_clip=float(c["grad_clip"]), schedule="constant")
        return groups

    def compute_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Critic TD loss + actor loss on a raw batch (``train_step`` steps them one after the other)."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        nb = self.normalize_batch(batch)
        c_loss, td = self.critic_loss(nb, gen)
        a_loss, metrics = self.actor_loss(nb["obs"], nb["action"], gen)
        return c_loss + a_loss, {"critic_td_loss": float(td), **metrics}

    # ------------------------------------------------------------------ critic
    @torch.no_grad()
    def td_target(self, reward: Tensor, next_obs: Tensor, done: Tensor, generator: torch.Generator) -> Tensor:
        """``r' + gamma (1 - done) Q'(s', a')`` with ``a'`` from the EMA actor (normalized inputs).

        Plain backup: one ``a'``, ``Q' = min(Q1', Q2')``. Max-Q backup: ``K``
        samples of ``a'`` per ``s'``, ``Q' = max_k min(Q1', Q2')(s', a'_k)``.
        """
        c = self.config["critic"]
        k = int(c["backup_samples"]) if c["max_q_backup"] else 1
        b = next_obs.shape[0]
        rep = next_obs.repeat_interleave(k, dim=0)
        next_action = self.sample(self.actor_ema, rep, generator).sample
        q_next = self.critic_target.q_min(rep, next_action).view(b, k).max(dim=1).values
        r = float(self.config["reward_scale"]) * reward + float(self.config["reward_bias"])
        return r + float(c["discount"]) * (1.0 - done.to(r.dtype)) * q_next

    def critic_loss(self, nb: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Sum of both twins' squared TD errors; also returns the mean TD error of the twins."""
        target = self.td_target(nb["reward"], nb["next_obs"], nb["done"], generator)
        q1, q2 = self.critic(nb["obs"], nb["action"])
        loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        return loss, 0.5 * loss.detach()

    # ------------------------------------------------------------------- actor
    def policy_action(self, obs: Tensor, generator: torch.Generator) -> Tensor:
        """``a_pi`` from the online actor, differentiable w.r.t. its weights."""
        return self.sample(self.actor, obs, generator).sample

    def actor_loss(self, obs: Tensor, action: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """``BC + eta * (-Q(s, a_pi) / E|Q|.detach())``, Q from one twin picked at random.

        Dividing by the other twin's detached mean magnitude turns ``eta`` into
        a scale-free trade-off (OFQL writes the same as ``BC - alpha Q`` with
        ``alpha = eta / E|Q|``).
        """
        bc = self.bc_loss(obs, action, generator)
        a_pi = self.policy_action(obs, generator)
        # The critic is a fixed function here: its weights get no gradient (the critic step owns them),
        # which also spares the backward pass their weight gradients.
        frozen = {name: p.detach() for name, p in self.critic.named_parameters()}
        q1, q2 = torch.func.functional_call(self.critic, frozen, (obs, a_pi))
        if bool(torch.rand((), generator=generator) < 0.5):
            q_sel, q_other = q1, q2
        else:
            q_sel, q_other = q2, q1
        q_term = -q_sel.mean() / shard.shard_mean(q_other.abs().mean()).clamp_min(1e-8)
        loss = bc + float(self.config["eta"]) * q_term
        metrics = {
            "actor_bc_loss": float(bc.detach()),
            "actor_q_loss": float(q_term.detach()),
            "q_mean": float(torch.minimum(q1, q2).detach().mean()),
        }
        return loss, metrics

    def train_step(
        self, batch: dict[str, Tensor], optimizers: dict[str, torch.optim.Optimizer], groups: dict[str, OptimGroup],
        step: int, generator: torch.Generator,
    ) -> dict[str, float]:
        """Critic TD step, then actor step, then target and EMA updates; returns the step's metrics."""
        nb = self.normalize_batch(batch)
        c_loss, td = self.critic_loss(nb, generator)
        self.gradient_step(optimizers["critic"], c_loss, groups["critic"])
        a_loss, metrics = self.actor_loss(nb["obs"], nb["action"], generator)
        self.gradient_step(optimizers["actor"], a_loss, groups["actor"])
        soft_update(self.critic_target, self.critic, float(self.config["critic"]["tau"]))
        self.ema_step(step)
        return {"critic_td_loss": float(td), **metrics}

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def select_actions(self, cond: Tensor, generator: torch.Generator | None = None) -> SampleResult:
        """``samples`` candidates per observation from the EMA actor, one picked by the target critic's Q.

        ``softmax`` draws a candidate with probability ``softmax(Q)`` (Diffusion-QL),
        ``argmax`` takes the best, ``first`` ignores Q. The candidates are
        sampled as one batch: the NFE is the sampler's, not times ``samples``.
        """
        sel = self.config["action_selection"]
        k, mode = int(sel["samples"]), sel["mode"]
        if k == 1 or mode == "first":
            return self.sample(self.actor_ema, cond, generator)
        b = cond.shape[0]
        rep = cond.repeat_interleave(k, dim=0)
        result = self.sample(self.actor_ema, rep, generator)
        cand = result.sample.view(b, k, self.action_dim)
        q = self.critic_target.q_min(rep, result.sample).view(b, k)
        if mode == "argmax":
            idx = q.argmax(dim=1)
        else:
            idx = torch.multinomial(torch.softmax(q, dim=1), 1, generator=generator).squeeze(1)
        return SampleResult(sample=cand[torch.arange(b), idx], nfe=result.nfe)
