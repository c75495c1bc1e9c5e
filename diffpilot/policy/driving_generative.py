"""Baselines for the STL-conditioned flow planner, on the same data, conditioning and interface.

* :class:`ParamDDPMPlanner`: the pSTL policy's generator, a DDPM over the
  same control sequences conditioned on scene, mode and rule parameters
  (trained on augmented rows or on the logs alone: a data choice, see
  :func:`~diffpilot.policy.stl_flow.data_from_logs`). Sampled with DDIM
  (few steps) or full ancestral DDPM.
* CTG-style guidance (Zhong et al., controllable traffic generation) for it:
  at *every* denoising step the predicted clean sample is moved up the
  gradient of the smooth rule robustness of its decoded trajectory (several
  inner gradient steps), which is what makes CTG slow: the rule gradient is
  paid once per step of a long chain.
* :class:`ConditionalVAEPlanner`: a conditional VAE (encoder ``q(z | x, c)``,
  decoder ``p(x | z, c)``, Gaussian prior), the classic one-pass generative
  baseline.

All of them are :class:`~diffpilot.policy.stl_flow.ParamConditionedPlanner`
subclasses, so ``fit``, ``sample``, ``plan`` and ``save``/``load`` behave as
for :class:`~diffpilot.policy.stl_flow.STLFlowPlanner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffpilot.data.scenario import FUTURE_STEPS
from diffpilot.policy.export_spec import stochastic_sampler
from diffpilot.policy.generative import shard
from diffpilot.policy.generative import Sampler, build_objective, build_sampler
from diffpilot.policy.kinds import register_policy
from diffpilot.policy.stl_flow import (
    DEFAULT_RULES,
    ConditionNet,
    GuidanceConfig,
    GuidanceHook,
    ParamConditionedPlanner,
    PlannerConfig,
    _Bound,
)

__all__ = ["CTGGuidance", "ConditionalVAEPlanner", "ParamDDPMPlanner"]


@dataclass
class CTGGuidance(GuidanceConfig):
    """Guidance at every denoising step with ``inner`` gradient steps each (CTG); no final refinement by default.

    CTG's own update: fixed-length steps along the robustness gradient on the predicted clean sample.
    """

    scale: float = 0.25
    step_rule: str = "normalized"
    steps: Sequence[int] | None = None
    inner: int = 2
    refine: int = 0


@dataclass
class ParamDDPMConfig(PlannerConfig):
    """``conf/policy/param_ddpm_planner.yaml``."""

    num_train_steps: int = 100
    sampler: str = "ddim"  # ddim (sampler_steps) or ddpm (all steps)
    sampler_steps: int = 10


@register_policy("param_ddpm_planner")
class ParamDDPMPlanner(ParamConditionedPlanner):
    """Parameter-conditioned DDPM over controls; ``sampler`` is ``"ddim"`` (``sampler_steps``) or ``"ddpm"`` (all steps)."""

    Config = ParamDDPMConfig
    EXPORTABLE = True  # with DDIM (deterministic); ancestral DDPM is refused

    def __init__(self, rules: Sequence[str] = DEFAULT_RULES, horizon: int = FUTURE_STEPS, *, num_train_steps: int = 100,
                 sampler: str = "ddim", sampler_steps: int = 10, **kwargs: Any) -> None:
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        self.num_train_steps, self.sampler_name, self.sampler_steps = int(num_train_steps), sampler, int(sampler_steps)
        self.ddpm = build_objective("ddpm", num_train_steps=self.num_train_steps, prediction="epsilon", clip_sample=5.0)
        super().__init__(rules, horizon, **kwargs)

    def _extra_config(self) -> dict[str, Any]:
        return {"num_train_steps": self.num_train_steps, "sampler": self.sampler_name, "sampler_steps": self.sampler_steps}

    def _sampler(self) -> Sampler:
        return build_sampler(self.sampler_name, self.ddpm, self.sampler_steps)

    def _loss(self, x0: Tensor, cond: Tensor, mask: Tensor | None, gen: torch.Generator) -> Tensor:
        return self.ddpm.loss(_Bound(self.net, mask), x0, cond, generator=gen)

    def _export_sampler(self, sampler: dict[str, Any] | None) -> tuple[Sampler | None, dict[str, Any]]:
        cfg = dict(sampler) if sampler else {"name": self.sampler_name, "num_steps": self.sampler_steps}
        if "name" not in cfg:
            raise ValueError(f"sampler override needs a 'name' key, e.g. {{'name': 'ddim', 'num_steps': 10}}; got {cfg}")
        built = build_sampler(cfg["name"], self.ddpm, **{k: v for k, v in cfg.items() if k != "name"})
        if stochastic_sampler(built):
            raise ValueError(
                f"this planner samples with {type(built).__name__}, which draws fresh noise at every step "
                f"({built.num_steps} steps): no deterministic graph; export it with a deterministic sampler, "
                "sampler={'name': 'ddim', 'num_steps': 10}"
            )
        return built, cfg

    def _generate(self, cond: Tensor, mask: Tensor | None, noise: Tensor, guide: Any,
                  sampler: Sampler | None = None) -> tuple[Tensor, int, int]:
        model = _Bound(self.net, mask, self.cfg_scale)
        sampler = self._sampler() if sampler is None else sampler
        if guide is None:
            res = sampler.sample(model, noise, cond)
            return res.sample, res.nfe, 0
        # CTG: the predicted clean sample is guided at each chosen step, the noise estimate held fixed
        g = guide.config
        hook = GuidanceHook(guide, sampler.num_steps, g.steps, inner=getattr(g, "inner", 1))
        res = sampler.sample(model, noise, cond, hook=hook)
        x, k = guide.refine(res.sample)
        return x, res.nfe, hook.count + k


@dataclass
class ConditionalVAEConfig(PlannerConfig):
    """``conf/policy/conditional_vae_planner.yaml``."""

    latent_dim: int = 8
    beta: float = 0.05


@register_policy("conditional_vae_planner")
class ConditionalVAEPlanner(ParamConditionedPlanner):
    """Conditional VAE over controls; the condition is the pooled scene + parameter + mode vector.

    Sampling draws ``z`` from the first ``latent_dim`` entries of the noise,
    so a given noise tensor gives the same plans. Guidance, if asked for,
    only runs its ``refine`` gradient steps on the decoded sample.
    """

    Config = ConditionalVAEConfig
    EXPORTABLE = True  # the decoder: z from the noise, one pass

    def __init__(self, rules: Sequence[str] = DEFAULT_RULES, horizon: int = FUTURE_STEPS, *, latent_dim: int = 8,
                 beta: float = 0.05, **kwargs: Any) -> None:
        if latent_dim < 1 or latent_dim > 2 * horizon:
            raise ValueError(f"latent_dim must be in [1, 2 * horizon = {2 * horizon}], got {latent_dim}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.latent_dim, self.beta = int(latent_dim), float(beta)
        super().__init__(rules, horizon, **kwargs)

    def _extra_config(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim, "beta": self.beta}

    def _build_net(self) -> ConditionNet:
        h = dict(self.hparams)
        d = h["d_model"]
        net = ConditionNet(len(self.param_names), self.horizon, out_dim=2 * self.horizon, **h)
        x_dim, c_dim, hid = 2 * self.horizon, 3 * d, 4 * d
        net.vae_enc = nn.Sequential(nn.Linear(x_dim + c_dim, hid), nn.Mish(), nn.Linear(hid, hid), nn.Mish(),
                                    nn.Linear(hid, 2 * self.latent_dim))
        net.vae_dec = nn.Sequential(nn.Linear(self.latent_dim + c_dim, hid), nn.Mish(), nn.Linear(hid, hid), nn.Mish(),
                                    nn.Linear(hid, x_dim))
        return net

    def _loss(self, x0: Tensor, cond: Tensor, mask: Tensor | None, gen: torch.Generator) -> Tensor:
        x = x0.flatten(1)
        mu, logvar = self.net.vae_enc(torch.cat([x, cond], dim=-1)).chunk(2, dim=-1)
        logvar = logvar.clamp(-8.0, 4.0)
        eps = shard.randn(mu.shape, generator=gen, dtype=mu.dtype)
        z = mu + (0.5 * logvar).exp() * eps
        recon = self.net.vae_dec(torch.cat([z, cond], dim=-1))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
        # both terms per control entry, so beta does not depend on the horizon
        return F.mse_loss(recon, x) + self.beta * kl / x.shape[1]

    def _generate(self, cond: Tensor, mask: Tensor | None, noise: Tensor, guide: Any,
                  sampler: Sampler | None = None) -> tuple[Tensor, int, int]:
        if self.cfg_scale != 1.0:  # no guidance on a one-pass decoder: the conditional half
            cond = cond.chunk(2, dim=-1)[0]
        z = noise.flatten(1)[:, : self.latent_dim]
        x = self.net.vae_dec(torch.cat([z, cond], dim=-1)).reshape(noise.shape)
        gsteps = 0
        if guide is not None:
            x, gsteps = guide.refine(x)
        return x, 1, gsteps
