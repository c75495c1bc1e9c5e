"""Single-step generative policies for offline RL, and the behaviour-cloning references.

A single-step policy maps one observation to one action by sampling a
generative model of the data's actions (DDPM, flow matching or MeanFlow from
``policy.generative``) conditioned on the normalized observation.
:class:`SingleStepPolicy` holds what every such policy needs: the
normalizers, the actor network and its EMA copy (used for acting), the
sampler, ``act``/``predict``/``save``/``load``. The offline-RL policies
(:mod:`diffpilot.policy.dql`, :mod:`diffpilot.policy.ofql`) add a critic on
top; the two BC policies here train on the imitation loss alone, as the
references that show what the critic adds.

Actions live in a normalized space where the data's per-dimension range is
[-1, 1]; sampled actions are clamped to it, so a policy never leaves the
range the data covers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffpilot.data.normalizer import Normalizer
from diffpilot.policy.base import OptimGroup, PolicyBase
from diffpilot.policy.export_spec import RUNTIME_CHUNK, ExportSpec, chunk_metadata
from diffpilot.policy.generative import build_objective, build_sampler
from diffpilot.policy.generative.base import SampleResult
from diffpilot.policy.generative import shard
from diffpilot.policy.networks import ConcatMLP, MLPDenoiser
from diffpilot.policy.kinds import register_policy

__all__ = ["DiffusionBCPolicy", "FlowBCPolicy", "SingleStepPolicy", "config_dataclass", "merge_options"]

BASE_DEFAULTS: dict[str, Any] = {
    # arch "plain": the Diffusion-QL actor, a 3 x 256 Mish MLP on (a_t, emb(t), s) with a 16-wide time
    # embedding; "residual": the FiLM-conditioned residual stack (MLPDenoiser, about 3x the work per
    # evaluation). time_scale None keeps the sinusoidal scale (1000, suited to discrete diffusion steps).
    "network": {"arch": "plain", "hidden": 256, "depth": 3, "time_dim": 16, "activation": "mish", "time_scale": None},
    "objective": {"name": "ddpm", "num_train_steps": 5, "schedule": "vp", "prediction": "epsilon", "clip_sample": 1.0},
    "sampler": {"name": "ddpm"},
    "obs_normalizer": "gaussian",
    "actor_lr": 3e-4,
    "actor_grad_clip": 0.0,  # 0: no clipping
    "ema": {"decay": 0.995, "start": 1000, "every": 5},
    "action_selection": {"samples": 1, "mode": "first"},
}
SELECTION_MODES = ("first", "softmax", "argmax")
ACTOR_ARCHS = {"plain": ConcatMLP, "residual": MLPDenoiser}
OWN_LR = {
    "lr": "policy.actor_lr (and policy.critic.lr)",
    "grad_clip": "policy.actor_grad_clip (and policy.critic.grad_clip)",
    "ema_decay": "policy.ema.decay",
    "weight_decay": "nothing: these policies train with Adam without weight decay",
    "warmup_steps": "nothing: these policies train at a constant learning rate",
    "schedule": "nothing: these policies train at a constant learning rate",
}


def config_dataclass(name: str, defaults: dict[str, Any]) -> type:
    """A dataclass with one field per option of ``defaults`` (each default deep-copied per instance)."""
    return dataclasses.make_dataclass(
        name,
        [(k, Any, dataclasses.field(default_factory=lambda v=v: copy.deepcopy(v))) for k, v in defaults.items()],
    )


def merge_options(defaults: dict[str, Any], options: dict[str, Any], kind: str) -> dict[str, Any]:
    """``defaults`` updated by ``options``; nested dicts merge one level deep.

    An unknown key is refused by name, so a typo in a YAML config fails at
    construction instead of being silently ignored.
    """
    out = copy.deepcopy(defaults)
    for key, value in options.items():
        if key not in out:
            raise ValueError(f"unknown option {key!r} for policy {kind!r}; valid options: {sorted(out)}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            bad = sorted(set(value) - set(out[key]))
            # objective/sampler keys depend on the chosen name: only the fixed-shape groups are checked
            if bad and key not in ("objective", "sampler"):
                raise ValueError(f"unknown key(s) {bad} in option {key!r} of policy {kind!r}; valid keys: {sorted(out[key])}")
            out[key] = value if key in ("objective", "sampler") and "name" in value else {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


class SingleStepPolicy(PolicyBase):
    """An observation-conditioned generative model of single actions, trained by BC."""

    KIND = "single_step"
    DEFAULTS: dict[str, Any] = BASE_DEFAULTS
    OWN_TRAIN_KEYS = OWN_LR
    TINY = {"network": {"hidden": 16, "depth": 1}, "ema": {"start": 2, "every": 1}}

    def __init__(self, obs_dim: int, action_dim: int, **options: Any) -> None:
        super().__init__()
        if int(obs_dim) < 1 or int(action_dim) < 1:
            raise ValueError(f"need obs_dim >= 1 and action_dim >= 1, got {obs_dim} and {action_dim}")
        cfg = merge_options(self.DEFAULTS, options, self.KIND)
        sel = cfg["action_selection"]
        if sel["mode"] not in SELECTION_MODES or int(sel["samples"]) < 1:
            raise ValueError(
                f"action_selection needs mode in {SELECTION_MODES} and samples >= 1, got {sel}"
            )
        self.config: dict[str, Any] = {"obs_dim": int(obs_dim), "action_dim": int(action_dim), **cfg}
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.obs_normalizer = Normalizer(self.obs_dim, cfg["obs_normalizer"])
        self.action_normalizer = Normalizer(self.action_dim, "limits")
        obj = dict(cfg["objective"])
        self.objective = build_objective(obj.pop("name"), **obj)
        smp = dict(cfg["sampler"])
        self.sampler = build_sampler(smp.pop("name"), self.objective, **smp)
        self.actor = self._build_actor(cfg["network"], use_r=cfg["objective"]["name"] == "meanflow")
        self.actor_ema = copy.deepcopy(self.actor).requires_grad_(False)
        self._generator = torch.Generator().manual_seed(0)
        self.last_nfe = 0
        self.total_nfe = 0  # network evaluations spent by act() (NFE per decision = total_nfe / decisions)
        self.decisions = 0

    def _build_actor(self, net: dict[str, Any], use_r: bool) -> ConcatMLP | MLPDenoiser:
        if net["arch"] not in ACTOR_ARCHS:
            raise ValueError(f"unknown network.arch {net['arch']!r}; choose one of {sorted(ACTOR_ARCHS)}")
        actor = ACTOR_ARCHS[net["arch"]](
            self.action_dim, self.obs_dim, hidden=int(net["hidden"]), depth=int(net["depth"]),
            time_dim=int(net["time_dim"]), use_r=use_r, activation=net["activation"],
        )
        if net.get("time_scale") is not None:
            # The scale is a plain attribute of the sinusoidal features (not a weight): set it on every build.
            actor.time_emb.sin.scale = float(net["time_scale"])
        return actor

    # ------------------------------------------------------------------ data
    def fit_normalizers(self, observations: np.ndarray, actions: np.ndarray) -> None:
        """Fit the observation and action normalizers on the training data."""
        self.obs_normalizer.load_state_dict(Normalizer.fit(observations, self.config["obs_normalizer"]).state_dict())
        self.action_normalizer.load_state_dict(Normalizer.fit(actions, "limits").state_dict())

    def normalize_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Raw ``obs``/``action``/``next_obs`` -> normalized; other keys pass through."""
        out = dict(batch)
        out["obs"] = self.obs_normalizer.normalize(batch["obs"])
        if "next_obs" in batch:
            out["next_obs"] = self.obs_normalizer.normalize(batch["next_obs"])
        if "action" in batch:
            out["action"] = self.action_normalizer.normalize(batch["action"])
        return out

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Random transitions ``obs, action, reward, next_obs, done`` (the offline-RL batch)."""
        b = batch_size
        return {
            "obs": torch.randn((b, self.obs_dim), generator=generator),
            "action": torch.rand((b, self.action_dim), generator=generator) * 2 - 1,
            "reward": torch.randn((b,), generator=generator),
            "next_obs": torch.randn((b, self.obs_dim), generator=generator),
            "done": (torch.rand((b,), generator=generator) < 0.1).float(),
        }

    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.action_dim)

    # -------------------------------------------------------------- sampling
    def step_noise_shape(self, batch_size: int) -> tuple[int, ...] | None:
        """Shape of the per-step noise a stochastic sampler needs, or None for deterministic samplers."""
        if self.config["sampler"]["name"] == "ddpm":
            return (self.objective.num_train_steps, batch_size, self.action_dim)
        return None

    def sample(
        self, model: nn.Module, cond: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> SampleResult:
        """Normalized actions for normalized observations ``cond``, clamped to the data range.

        Gradients flow through the sampler (the Q term of DQL/OFQL needs them);
        wrap the call in ``torch.no_grad`` when they are not wanted. All noise
        comes from ``generator``, so training is reproducible and resumable.
        """
        b = cond.shape[0]
        if noise is None:
            noise = shard.randn((b, self.action_dim), generator=generator).to(cond)
        shape = self.step_noise_shape(b)
        step_noise = None if shape is None else shard.randn(shape, generator=generator, batch_dim=1).to(cond)
        result = self.sampler.sample(model, noise, cond, step_noise=step_noise)
        return SampleResult(sample=result.sample.clamp(-1.0, 1.0), nfe=result.nfe)

    @torch.no_grad()
    def select_actions(self, cond: Tensor, generator: torch.Generator | None = None) -> SampleResult:
        """One action per row of ``cond`` from the EMA actor (BC: the first sample)."""
        return self.sample(self.actor_ema, cond, generator)

    # -------------------------------------------------------------- training
    def bc_loss(self, obs: Tensor, action: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The generative (imitation) loss on normalized ``obs``/``action``."""
        return self.objective.loss(self.actor, action, obs, generator=generator)

    def optim_groups(self) -> dict[str, OptimGroup]:
        """The actor's optimizer: Adam at ``actor_lr``, constant, clipped at ``actor_grad_clip``."""
        return {"actor": OptimGroup(list(self.actor.parameters()), lr=float(self.config["actor_lr"]), weight_decay=0.0,
                                    grad_clip=float(self.config["actor_grad_clip"]), schedule="constant")}

    def compute_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """The imitation loss on a raw batch ``{"obs", "action"}``."""
        nb = self.normalize_batch(batch)
        loss = self.bc_loss(nb["obs"], nb["action"], generator)
        return loss, {"actor_bc_loss": float(loss.detach())}

    @torch.no_grad()
    def ema_step(self, step: int) -> None:
        """EMA of the actor: a plain copy before ``ema.start``, then a lerp every ``ema.every`` steps."""
        ema = self.config["ema"]
        if step < int(ema["start"]):
            for p_ema, p in zip(self.actor_ema.parameters(), self.actor.parameters()):
                p_ema.copy_(p)
        elif step % int(ema["every"]) == 0:
            ema_p = list(self.actor_ema.parameters())
            torch._foreach_lerp_(ema_p, [p.detach() for p in self.actor.parameters()], 1.0 - float(ema["decay"]))

    def train_step(
        self, batch: dict[str, Tensor], optimizers: dict[str, torch.optim.Optimizer], groups: dict[str, OptimGroup],
        step: int, generator: torch.Generator,
    ) -> dict[str, float]:
        """One BC step, then the actor's EMA."""
        metrics = super().train_step(batch, optimizers, groups, step, generator)
        self.ema_step(step)
        return metrics

    # ------------------------------------------------------------- interface
    def _check_obs(self, obs: Tensor) -> None:
        if obs.dim() != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"expected observations of shape (B, {self.obs_dim}), got {tuple(obs.shape)}")
        if not torch.isfinite(obs).all():
            raise ValueError("observations contain NaN or inf; check the environment or data set")

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """Actions (B, action_dim) in environment units for raw ``batch["obs"]`` (B, obs_dim).

        ``noise`` (B, action_dim) fixes the first candidate's initial noise;
        everything else random comes from the policy's generator (see ``reset``).
        """
        obs = batch["obs"]
        self._check_obs(obs)
        cond = self.obs_normalizer.normalize(obs.to(self.obs_normalizer.scale))
        if noise is not None:
            if tuple(noise.shape) != (obs.shape[0], self.action_dim):
                raise ValueError(f"noise must have shape {(obs.shape[0], self.action_dim)}, got {tuple(noise.shape)}")
            result = self.sample(self.actor_ema, cond, self._generator, noise=noise.to(cond))
        else:
            result = self.select_actions(cond, self._generator)
        self.last_nfe = result.nfe
        return self.action_normalizer.unnormalize(result.sample)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self._generator.manual_seed(int(seed))

    @torch.no_grad()
    def act(self, observation: np.ndarray) -> np.ndarray:
        obs = np.asarray(observation, dtype=np.float32)
        if obs.shape != (self.obs_dim,):
            raise ValueError(f"act() expects an observation of shape ({self.obs_dim},), got {obs.shape}")
        action = self.predict({"obs": torch.from_numpy(obs)[None]})[0]
        self.total_nfe += self.last_nfe
        self.decisions += 1
        return action.cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------------ export
    def export_spec(self, sampler: dict[str, Any] | None = None, **options: Any) -> ExportSpec:
        """The EMA actor with its normalizers and deterministic sampler, shaped as a chunk of one.

        Inputs obs (B, 1, obs_dim) and noise (B, 1, A), output actions (B, 1, A)
        in environment units (form ``one_step``/``multi_step``), so
        ``OnnxChunkPolicy`` runs it unchanged. Candidate selection by Q (DQL's
        softmax over 50 samples) needs the critic and stochastic samplers draw
        fresh noise at every step: both are refused with the reason.
        """
        if sampler:
            raise ValueError(f"sampler= does not apply to a {self.KIND!r} policy (its sampler is fixed at training); drop it")
        if options:
            raise ValueError(f"unknown export option(s) {sorted(options)} for a {self.KIND!r} policy")
        sel = self.config["action_selection"]
        if int(sel["samples"]) > 1 and sel["mode"] != "first":
            raise ValueError(
                f"this actor picks among {sel['samples']} candidates by Q ({sel['mode']}), which needs the critic; "
                "export it with action_selection samples=1 (the one-step actor alone)"
            )
        if self.step_noise_shape(1) is not None:
            raise ValueError("this actor's sampler draws fresh noise at every step (DDPM); export a deterministic one (OFQL, flow BC)")
        od, a = self.obs_dim, self.action_dim

        def feeds(b: int, g: torch.Generator) -> dict[str, Tensor]:
            z = torch.randn(b, 1, od, generator=g)
            return {"obs": self.obs_normalizer.unnormalize(z), "noise": torch.randn(b, 1, a, generator=g)}

        with torch.no_grad():
            probe = feeds(1, torch.Generator().manual_seed(0))
            nfe = self.sample(self.actor_ema, self.obs_normalizer.normalize(probe["obs"][:, 0]), noise=probe["noise"][:, 0]).nfe
        meta = {"kind": RUNTIME_CHUNK, **chunk_metadata(self.KIND, self.config, 1, 1, 1)} | {
            "form": "one_step" if nfe == 1 else "multi_step",
            "sampler": json.dumps(self.config["sampler"], sort_keys=True),
            "t_start": "1.0",
            "step_noise_steps": "0",
        }
        return ExportSpec(ActorGraph(self), feeds, ("actions",), meta, nfe)


class ActorGraph(nn.Module):
    """A single-step actor as a chunk of one: obs (B, 1, obs_dim) + noise (B, 1, A) -> actions (B, 1, A)."""

    def __init__(self, policy: SingleStepPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, obs: Tensor, noise: Tensor) -> Tensor:
        p = self.policy
        cond = p.obs_normalizer.normalize(obs[:, 0])
        action = p.sample(p.actor_ema, cond, noise=noise[:, 0]).sample
        return p.action_normalizer.unnormalize(action)[:, None]


@register_policy("diffusion_bc")
class DiffusionBCPolicy(SingleStepPolicy):
    """Diffusion BC: the DQL actor (DDPM, 5 VP steps, epsilon-prediction) without a critic."""

    DEFAULTS = BASE_DEFAULTS
    Config = config_dataclass("DiffusionBCConfig", DEFAULTS)
    EXPORTABLE = False  # ancestral DDPM draws fresh noise at every step: no deterministic graph


@register_policy("flow_bc")
class FlowBCPolicy(SingleStepPolicy):
    """Flow-matching BC: straight-path velocity regression, a few Euler steps at inference."""

    DEFAULTS = {
        **BASE_DEFAULTS,
        "objective": {"name": "flow"},
        "sampler": {"name": "euler", "num_steps": 5},
    }
    Config = config_dataclass("FlowBCConfig", DEFAULTS)
    EXPORTABLE = True
