"""Action-chunk diffusion policy: denoise a chunk of future actions from an observation history.

The generative process is a config choice (DDPM, flow matching or MeanFlow
training; DDPM, DDIM, Euler, Heun or MeanFlow sampling), so one class covers
Diffusion Policy and its flow-based variants with the same closed-loop logic:
keep the last ``obs_horizon`` observations, predict ``action_horizon``
actions, execute ``exec_horizon`` of them, then replan.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffpilot.data.normalizer import Normalizer
from diffpilot.policy.base import OptimGroup, PolicyBase
from diffpilot.policy.export_spec import RUNTIME_CHUNK, ExportSpec, ExportSwitch, chunk_metadata, stochastic_sampler
from diffpilot.policy.generative import build_objective, build_sampler
from diffpilot.policy.generative.base import SampleResult
from diffpilot.policy.generative.warm_start import WarmStartConfig, WarmStarter
from diffpilot.policy.networks import build_network
from diffpilot.policy.kinds import register_policy

DEFAULT_NETWORK: dict[str, Any] = {"name": "unet1d", "down_dims": [64, 128, 256], "kernel_size": 5}
DEFAULT_OBJECTIVE: dict[str, Any] = {"name": "ddpm", "num_train_steps": 100, "schedule": "squaredcos_cap_v2", "prediction": "epsilon"}
DEFAULT_SAMPLER: dict[str, Any] = {"name": "ddim", "num_steps": 10}
DISCRETE_MODES = ("none", "scale", "clip")
EXPORT_FORMS = ("chunk", "warm_start")


@dataclass
class ChunkDiffusionConfig:
    """``conf/policy/chunk_*.yaml``: horizons, network, generative objective and sampler, warm start, binary dims."""

    obs_horizon: int = 2
    action_horizon: int = 16
    exec_horizon: int = 8
    network: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_NETWORK))
    objective: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OBJECTIVE))
    sampler: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SAMPLER))
    normalizer: str = "limits"
    warm_start: dict[str, Any] | None = None
    discrete_dims: list[int] = field(default_factory=list)
    discrete_mode: str = "none"
    discrete_factor: float = 10.0


@register_policy("chunk_diffusion")
class ChunkDiffusionPolicy(PolicyBase):
    """Diffusion/flow policy over action chunks, conditioned on a flattened observation history."""

    Config = ChunkDiffusionConfig
    EMA_PART = "net"
    EXPORTABLE = True
    TINY = {"action_horizon": 8, "exec_horizon": 4,
            "network": {"name": "unet1d", "down_dims": [8, 16], "kernel_size": 3, "n_groups": 4},
            "objective": {"name": "ddpm", "num_train_steps": 10}, "sampler": {"name": "ddim", "num_steps": 2}}

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        obs_horizon: int = 2,
        action_horizon: int = 16,
        exec_horizon: int = 8,
        network: dict[str, Any] | None = None,
        objective: dict[str, Any] | None = None,
        sampler: dict[str, Any] | None = None,
        normalizer: str = "limits",
        warm_start: dict[str, Any] | None = None,
        discrete_dims: list[int] | None = None,
        discrete_mode: str = "none",
        discrete_factor: float = 10.0,
    ) -> None:
        super().__init__()
        discrete_dims = sorted(int(d) for d in (discrete_dims or []))
        if any(not 0 <= d < action_dim for d in discrete_dims):
            raise ValueError(f"discrete_dims {discrete_dims} must index action dimensions 0..{action_dim - 1}")
        if discrete_mode not in DISCRETE_MODES:
            raise ValueError(f"discrete_mode must be one of {DISCRETE_MODES}, got {discrete_mode!r}")
        if discrete_mode != "none" and not discrete_dims:
            raise ValueError(f"discrete_mode={discrete_mode!r} needs discrete_dims (the indices of the binary actions)")
        if discrete_factor <= 1.0:
            raise ValueError(f"discrete_factor must be > 1, got {discrete_factor}")
        if not 1 <= exec_horizon <= action_horizon - obs_horizon + 1:
            raise ValueError(
                f"exec_horizon={exec_horizon} must be in [1, action_horizon - obs_horizon + 1] = "
                f"[1, {action_horizon - obs_horizon + 1}]: executed actions start at the newest observation"
            )
        network = dict(network or DEFAULT_NETWORK)
        objective = dict(objective or DEFAULT_OBJECTIVE)
        sampler = dict(sampler or DEFAULT_SAMPLER)
        self.config: dict[str, Any] = {
            "obs_dim": obs_dim,
            "action_dim": action_dim,
            "obs_horizon": obs_horizon,
            "action_horizon": action_horizon,
            "exec_horizon": exec_horizon,
            "network": network,
            "objective": objective,
            "sampler": sampler,
            "normalizer": normalizer,
            "warm_start": dict(warm_start) if warm_start else None,
            "discrete_dims": discrete_dims,
            "discrete_mode": discrete_mode,
            "discrete_factor": float(discrete_factor),
        }
        mask = torch.zeros(action_dim, dtype=torch.bool)
        mask[discrete_dims] = True
        scale = torch.ones(action_dim)
        if discrete_mode == "scale":
            scale[mask] = 1.0 / discrete_factor
        # Derived from the config, so not saved: (B, H, A) broadcasts over the last axis.
        self.register_buffer("_discrete_mask", mask, persistent=False)
        self.register_buffer("_model_scale", scale, persistent=False)
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.obs_horizon, self.action_horizon, self.exec_horizon = obs_horizon, action_horizon, exec_horizon
        self.obs_normalizer = Normalizer(obs_dim, normalizer)  # type: ignore[arg-type]
        self.action_normalizer = Normalizer(action_dim, "limits" if normalizer != "identity" else "identity")
        net_kwargs = {k: v for k, v in network.items() if k != "name"}
        if network["name"] == "transformer":
            net_kwargs.setdefault("horizon", action_horizon)
        self.net = build_network(
            network["name"], action_dim=action_dim, cond_dim=obs_dim * obs_horizon,
            use_r=objective["name"] == "meanflow", **net_kwargs,
        )
        self.objective = build_objective(objective["name"], **{k: v for k, v in objective.items() if k != "name"})
        self.sampler = build_sampler(sampler["name"], self.objective, **{k: v for k, v in sampler.items() if k != "name"})
        self.warm_starter: WarmStarter | None = None
        self.set_warm_start(warm_start)
        self._previous_chunk: Tensor | None = None
        self._generator = torch.Generator().manual_seed(0)
        self._obs_history: deque[np.ndarray] = deque(maxlen=obs_horizon)
        self._action_queue: deque[np.ndarray] = deque()
        self.last_nfe = 0
        self.total_nfe = 0  # network evaluations spent by act() since construction (for NFE per action)

    # ----------------------------------------------------------------- training
    def fit_normalizers(self, observations: np.ndarray, actions: np.ndarray) -> None:
        """Fit both normalizers on the training data (before training)."""
        mode = self.config["normalizer"]
        self.obs_normalizer.load_state_dict(Normalizer.fit(observations, mode).state_dict())
        self.action_normalizer.load_state_dict(Normalizer.fit(actions, self.action_normalizer.mode).state_dict())

    def condition(self, obs: Tensor) -> Tensor:
        """(B, To, obs_dim) raw observations -> (B, To*obs_dim) normalized condition vector."""
        if obs.dim() != 3 or obs.shape[1:] != (self.obs_horizon, self.obs_dim):
            raise ValueError(
                f"expected observations of shape (B, {self.obs_horizon}, {self.obs_dim}), got {tuple(obs.shape)}"
            )
        return self.obs_normalizer.normalize(obs).flatten(1)

    def compute_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Training loss on a batch ``{"obs": (B, To, obs_dim), "action": (B, H, act_dim)}``."""
        action = batch["action"]
        if action.shape[1:] != (self.action_horizon, self.action_dim):
            raise ValueError(
                f"expected action chunks of shape (B, {self.action_horizon}, {self.action_dim}), got {tuple(action.shape)}"
            )
        loss = self.objective.loss(self.net, self.to_model_space(action), self.condition(batch["obs"]), generator=generator)
        return loss, {"loss": float(loss.detach())}

    def optim_groups(self) -> dict[str, OptimGroup]:
        return {"net": OptimGroup(list(self.net.parameters()))}

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        obs = torch.randn((batch_size, self.obs_horizon, self.obs_dim), generator=generator)
        action = torch.rand((batch_size, self.action_horizon, self.action_dim), generator=generator) * 2 - 1
        return {"obs": obs, "action": action}

    # ------------------------------------------------------ discrete actions
    # Binary dimensions (a gripper's open/close) live at +-1 after the limits
    # normalizer. "scale" trains on them divided by ``discrete_factor`` so
    # their values are small next to the noise and a warm-start guess does
    # not lock them; "clip" trains as usual and weakens the guess's binary
    # entries to +-1/factor before warm-starting. Both snap the output back to +-1.
    def to_model_space(self, action: Tensor) -> Tensor:
        """Actions in environment units -> the space the generative model is trained in."""
        return self.action_normalizer.normalize(action) * self._model_scale

    def to_actions(self, sample: Tensor) -> Tensor:
        """A model-space sample -> actions in environment units, binary dimensions snapped to their two values."""
        normalized = sample / self._model_scale
        if self.config["discrete_dims"]:
            snapped = torch.where(normalized > 0, torch.ones_like(normalized), -torch.ones_like(normalized))
            normalized = torch.where(self._discrete_mask, snapped, normalized)
        return self.action_normalizer.unnormalize(normalized)

    def set_discrete_mode(self, mode: str) -> None:
        """Switch between "none" and "clip" after training (both train the same way); "scale" must be trained."""
        current = self.config["discrete_mode"]
        if mode not in ("none", "clip") or current == "scale":
            raise ValueError(
                f"discrete_mode can switch between 'none' and 'clip' only (this policy: {current!r}, asked {mode!r}); "
                "'scale' changes the training data, so train a policy with discrete_mode=scale"
            )
        if not self.config["discrete_dims"]:
            raise ValueError("this policy has no discrete_dims; retrain with discrete_dims set")
        self.config["discrete_mode"] = mode
        self._previous_chunk = None

    def warm_guess(self, previous: Tensor) -> Tensor:
        """The previous chunk as a warm-start guess; "clip" weakens its binary entries to +-1/factor."""
        if self.config["discrete_mode"] != "clip":
            return previous
        weak = torch.where(previous > 0, torch.ones_like(previous), -torch.ones_like(previous)) / self.config["discrete_factor"]
        return torch.where(self._discrete_mask, weak, previous)

    # ---------------------------------------------------------------- inference
    def set_sampler(self, name: str, **kwargs: Any) -> None:
        """Switch the inference sampler (e.g. DDPM-100 vs DDIM-10) on the same trained network."""
        self.sampler = build_sampler(name, self.objective, **kwargs)
        self.config["sampler"] = {"name": name, **kwargs}
        self.set_warm_start(self.config["warm_start"])

    def set_warm_start(self, warm_start: dict[str, Any] | None) -> None:
        """Enable (a dict of ``WarmStartConfig`` fields) or disable (None) warm-started replanning in ``act``."""
        self.config["warm_start"] = dict(warm_start) if warm_start else None
        self.warm_starter = WarmStarter(self.objective, self.sampler, WarmStartConfig(**warm_start)) if warm_start else None
        self._previous_chunk = None

    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.action_horizon, self.action_dim)

    @torch.no_grad()
    def sample_normalized(
        self, cond: Tensor, noise: Tensor, x_start: Tensor | None = None, t_start: float = 1.0
    ) -> SampleResult:
        """Sample a normalized chunk; the warm-start path passes ``x_start``/``t_start``."""
        return self.sampler.sample(self.net, noise, cond, x_start=x_start, t_start=t_start)

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """Action chunks (B, H, act_dim) in environment units for ``batch["obs"]``."""
        obs = batch["obs"]
        cond = self.condition(obs)
        if noise is None:
            noise = torch.randn(self.noise_shape(obs.shape[0]), generator=self._generator).to(cond)
        result = self.sample_normalized(cond, noise)
        self.last_nfe = result.nfe
        return self.to_actions(result.sample)

    @torch.no_grad()
    def _plan(self, history: Tensor) -> Tensor:
        """One replan: a full denoise, or a warm start from the previous chunk when enabled."""
        cond = self.condition(history)
        noise = torch.randn(self.noise_shape(1), generator=self._generator).to(cond)
        if self.warm_starter is not None and self._previous_chunk is not None:
            result = self.warm_starter.sample(self.net, self.warm_guess(self._previous_chunk), self.exec_horizon, noise, cond)
        else:
            result = self.sample_normalized(cond, noise)
        self.last_nfe = result.nfe
        self.total_nfe += result.nfe
        if self.warm_starter is not None:
            self._previous_chunk = result.sample
        return self.to_actions(result.sample)

    def reset(self, seed: int | None = None) -> None:
        self._obs_history.clear()
        self._action_queue.clear()
        self._previous_chunk = None
        if seed is not None:
            self._generator.manual_seed(seed)

    @torch.no_grad()
    def act(self, observation: np.ndarray) -> np.ndarray:
        obs = np.asarray(observation, dtype=np.float32)
        if obs.shape != (self.obs_dim,):
            raise ValueError(f"act() expects an observation of shape ({self.obs_dim},), got {obs.shape}")
        if not np.isfinite(obs).all():
            raise ValueError(f"act() got a non-finite observation: {obs}")
        if not self._obs_history:
            self._obs_history.extend([obs] * self.obs_horizon)
        else:
            self._obs_history.append(obs)
        if not self._action_queue:
            device = self.obs_normalizer.scale.device
            history = torch.from_numpy(np.stack(self._obs_history))[None].to(device)
            chunk = self._plan(history)[0].cpu().numpy()
            start = self.obs_horizon - 1
            self._action_queue.extend(chunk[start : start + self.exec_horizon])
        return self._action_queue.popleft()

    # ------------------------------------------------------------------- export
    def export_spec(self, sampler: dict[str, Any] | None = None, *, form: str | None = None,
                    warm_start: dict[str, Any] | None = None) -> ExportSpec:
        """The whole inference path (form ``chunk``) or the warm-started one (form ``warm_start``).

        ``form`` defaults to ``warm_start`` when the policy has a warm start
        configured. ``chunk``: raw observations and noise in, actions in
        environment units out; the normalizers and the unrolled sampler
        (``sampler`` overrides the policy's own, e.g. ``{"name": "ddim",
        "num_steps": 10}``) are inside. A stochastic sampler gets a
        ``step_noise`` input (K, B, H, A). ``warm_start``: inputs obs, noise,
        previous (the last plan's model-space chunk) and the bool ``warm``; one
        ``If`` runs the full denoise (warm false) or shifts ``previous`` and
        denoises from ``t_start`` (warm true); outputs ``actions`` and ``chunk``.
        It needs a deterministic sampler; ``warm_start`` (``WarmStartConfig``
        fields) defaults to the policy's own.
        """
        form = form or ("warm_start" if self.config["warm_start"] else "chunk")
        if form not in EXPORT_FORMS:
            raise ValueError(f"form must be one of {EXPORT_FORMS}, got {form!r}")
        sampler_cfg = dict(sampler) if sampler else dict(self.config["sampler"])
        if "name" not in sampler_cfg:
            raise ValueError(
                f"sampler override needs a 'name' key, e.g. {{'name': 'ddim', 'num_steps': 10}}; got {sampler_cfg}"
            )
        built = build_sampler(sampler_cfg["name"], self.objective, **{k: v for k, v in sampler_cfg.items() if k != "name"})
        if form == "warm_start":
            return self._warm_export_spec(built, sampler_cfg, warm_start)
        stochastic = stochastic_sampler(built)
        k_steps = built.num_steps if stochastic else 0
        h, a = self.action_horizon, self.action_dim

        def feeds(b: int, g: torch.Generator) -> dict[str, Tensor]:
            out = {"obs": self._example_obs(b, g), "noise": torch.randn(b, h, a, generator=g)}
            if stochastic:
                out["step_noise"] = torch.randn(k_steps, b, h, a, generator=g)
            return out

        with torch.no_grad():
            probe = feeds(1, torch.Generator().manual_seed(0))
            nfe = built.sample(self.net, probe["noise"], self.condition(probe["obs"]), step_noise=probe.get("step_noise")).nfe
        meta = self._export_metadata() | {
            "form": "one_step" if nfe == 1 else "multi_step",
            "sampler": json.dumps(sampler_cfg, sort_keys=True),
            "t_start": "1.0",
            "step_noise_steps": str(k_steps),
        }
        return ExportSpec(ChunkSamplerGraph(self, built), feeds, ("actions",), meta, nfe,
                          batch_axes={"step_noise": 1} if stochastic else {})

    def _warm_export_spec(self, sampler: Any, sampler_cfg: dict[str, Any], warm_start: dict[str, Any] | None) -> ExportSpec:
        ws_cfg = dict(warm_start) if warm_start is not None else self.config["warm_start"]
        if not ws_cfg:
            raise ValueError("the policy has no warm_start config; pass warm_start={'t_start': 0.3, 'renoise': True}")
        if stochastic_sampler(sampler):
            raise ValueError(
                f"warm-start export needs a deterministic sampler, the policy uses {type(sampler).__name__}; "
                "call policy.set_sampler('ddim', num_steps=10) first (or pass sampler={'name': 'ddim', 'num_steps': 10})"
            )
        warm = WarmStarter(self.objective, sampler, WarmStartConfig(**ws_cfg))
        h, a = self.action_horizon, self.action_dim

        def feeds(b: int, g: torch.Generator) -> dict[str, Tensor]:
            obs = self._example_obs(b, g)
            noise = torch.randn(b, h, a, generator=g)
            with torch.no_grad():  # a realistic previous chunk: the policy's own plan for nearby observations
                previous = sampler.sample(self.net, torch.randn(b, h, a, generator=g), self.condition(obs)).sample
            return {"obs": obs, "noise": noise, "previous": previous}

        with torch.no_grad():
            probe = feeds(1, torch.Generator().manual_seed(0))
            cold_nfe = sampler.sample(self.net, probe["noise"], self.condition(probe["obs"])).nfe
        meta = self._export_metadata() | {
            "form": "warm_start",
            "sampler": json.dumps(sampler_cfg, sort_keys=True),
            "warm_nfe": str(warm.nfe),
            "t_start": repr(float(warm.t_start)),
            "warm_start": json.dumps(ws_cfg, sort_keys=True),
            "step_noise_steps": "0",
        }
        cold, warm_graph = ColdChunkGraph(self, sampler), WarmChunkGraph(self, warm)
        switch = ExportSwitch("warm", on=warm_graph, off=cold, off_inputs=("obs", "noise"), on_nfe=warm.nfe)
        return ExportSpec(WarmSwitchGraph(cold, warm_graph), feeds, ("actions", "chunk"), meta, cold_nfe, switch=switch)

    def _export_metadata(self) -> dict[str, str]:
        cfg = self.config
        return {"kind": RUNTIME_CHUNK, **chunk_metadata(self.KIND, cfg, self.obs_horizon, self.action_horizon,
                                                        self.exec_horizon)}

    def _example_obs(self, b: int, g: torch.Generator) -> Tensor:
        """Observations whose normalized values are standard normal, i.e. near the range the normalizer maps data to."""
        z = torch.randn(b, self.obs_horizon, self.obs_dim, generator=g)
        return (z - self.obs_normalizer.offset) / self.obs_normalizer.scale


# ------------------------------------------------------------------ export graphs
class ChunkSamplerGraph(nn.Module):
    """obs (B, To, obs_dim) + noise (B, H, A) [+ step_noise (K, B, H, A)] -> actions (B, H, A)."""

    def __init__(self, policy: ChunkDiffusionPolicy, sampler: Any) -> None:
        super().__init__()
        self.policy = policy
        self.sampler = sampler

    def forward(self, obs: Tensor, noise: Tensor, step_noise: Tensor | None = None) -> Tensor:
        cond = self.policy.condition(obs)
        sample = self.sampler.sample(self.policy.net, noise, cond, step_noise=step_noise).sample
        return self.policy.to_actions(sample)


class ColdChunkGraph(nn.Module):
    """obs + noise -> (actions, model-space chunk): the first plan of an episode."""

    def __init__(self, policy: ChunkDiffusionPolicy, sampler: Any) -> None:
        super().__init__()
        self.policy, self.sampler = policy, sampler

    def forward(self, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        chunk = self.sampler.sample(self.policy.net, noise, self.policy.condition(obs)).sample
        return self.policy.to_actions(chunk), chunk


class WarmChunkGraph(nn.Module):
    """obs + noise + previous chunk -> (actions, chunk): shift, place at t_start, denoise the rest."""

    def __init__(self, policy: ChunkDiffusionPolicy, warm: WarmStarter) -> None:
        super().__init__()
        self.policy, self.warm = policy, warm

    def forward(self, obs: Tensor, noise: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
        guess = self.policy.warm_guess(previous)
        chunk = self.warm.sample(self.policy.net, guess, self.policy.exec_horizon, noise, self.policy.condition(obs)).sample
        return self.policy.to_actions(chunk), chunk


class WarmSwitchGraph(nn.Module):
    """Eager reference for the exported ``If``: the warm branch when ``warm`` is true, else the cold one."""

    def __init__(self, cold: ColdChunkGraph, warm: WarmChunkGraph) -> None:
        super().__init__()
        self.cold, self.warm = cold, warm

    def forward(self, obs: Tensor, noise: Tensor, previous: Tensor, warm: Tensor) -> tuple[Tensor, Tensor]:
        return self.warm(obs, noise, previous) if bool(warm) else self.cold(obs, noise)
