"""STL-conditioned flow planner: few-step rectified flow (or MeanFlow) over unicycle controls.

The planner generates a control sequence ``(omega, a) x T`` (yaw rate,
acceleration) for the unicycle ``(x, y, theta, v)`` at :data:`DT`, rolled out
from the ego's current speed. Controls rather than waypoints because every
decoded plan is then kinematically feasible, the speed profile (what speed
and comfort rules constrain) is an explicit, smooth function of the sample,
and the rollout is a differentiable cumulative sum, so robustness gradients
reach the sample cheaply. Generation is conditioned on

* the scene: tokens from :class:`~diffpilot.policy.networks.scene_encoder.SceneEncoder`,
* the driving mode (keep_lane / left / right, :data:`~diffpilot.stl.metrics.MODES`),
* the rule parameter vector (normalized), e.g. ``vmax``: a user can ask for a
  cautious (low ``vmax``, large ``dsafe``) or an aggressive plan.

Parameters and mode become two extra condition tokens. With ``network="fusion"`` (the
default) a small transformer fuses them with the scene tokens once per scene into one vector,
and a FiLM MLP (:class:`ControlDenoiser`) whose condition projection is also made per scene
denoises the samples, so the per-sample cost is a few small matrix products; ``"transformer"``
cross-attends every sample to every token, ``"mlp"`` mean-pools the scene. The speed bounds
enter as offsets from the ego's current speed (``relative_speed``), and a share of training
rows can drop the parameters (``param_dropout``), which enables classifier-free guidance on
them (``cfg_scale``). Training pairs come from augmented data (trajectory optimization under
commanded, i.e. sampled, parameters: :func:`data_from_augmented`) and from the logs, with
parameters relabelled in hindsight: the tightest parameters a trajectory satisfies plus
margins (:func:`data_from_logs`). Hindsight labels alone tie the parameters to the scene;
commanded ones are what makes a single parameter move the plan.

Sampling: Euler with 1-4 steps (flow) or one MeanFlow step. Optional robustness guidance
(:class:`GuidanceConfig`, :class:`RobustnessGuide`) takes a few gradient steps of the smooth
robustness on the final controls (and optionally on the predicted clean sample at chosen
sampler steps) through the differentiable rollout; only samples still short of the target
robustness are updated, and each keeps its most robust iterate. NFE stays that of the plain
sampler.

ONNX: ``export_spec`` describes ``predict`` without guidance (scene tensors, rule-parameter
features, mode and noise in, states out; :class:`PlannerGraph`) for every planner here whose
sampler is deterministic; guidance needs autograd and stays in torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffpilot.data.errors import DatasetError
from diffpilot.data.normalizer import Normalizer
from diffpilot.data.scenario import (
    COMMANDS,
    FUTURE_STEPS,
    PAST_STEPS,
    SampleSpec,
    SceneSample,
    mode_from_command,
    wrap_angle,
)
from diffpilot.data.scene_sample import stack_samples
from diffpilot.planning.dynamics import DEFAULT_LIMITS, controls_from_poses, rollout
from diffpilot.policy.base import OptimGroup, PolicyBase
from diffpilot.policy.export_spec import RUNTIME_PLANNER, ExportSpec, scene_export_sizes
from diffpilot.policy.generative import shard
from diffpilot.policy.generative import Sampler, StepInfo, build_objective, build_sampler
from diffpilot.policy.kinds import register_policy
from diffpilot.policy.networks.embeddings import TimeEmbedding
from diffpilot.policy.networks.mlp import MLPDenoiser
from diffpilot.policy.networks.scene_encoder import SCENE_KEYS as ENCODER_KEYS
from diffpilot.policy.networks.scene_encoder import ConditionFusion, SceneEncoder, batch_from_arrays
from diffpilot.policy.networks.transformer import TransformerDenoiser
from diffpilot.stl.calibration import calibrate
from diffpilot.stl.metrics import MODE_COMMAND, MODES, applicable_rules, mode_robustness, preferred_plan, rule_robustness
from diffpilot.stl.rules import RuleSet
from diffpilot.stl.signals import SCENE_KEYS, driving_signals, scene_from_arrays

__all__ = [
    "DEFAULT_MARGINS",
    "DEFAULT_RULES",
    "NETWORKS",
    "ConditionNet",
    "ControlDenoiser",
    "GuidanceConfig",
    "ParamConditionedPlanner",
    "PlannerConfig",
    "PlannerData",
    "PlannerGraph",
    "PlannerRows",
    "RobustnessGuide",
    "SampleOutput",
    "STLFlowPlanner",
    "data_from_augmented",
    "data_from_logs",
    "hindsight_params",
    "mode_from_command",
]

NETWORKS = ("fusion", "transformer", "mlp")
"""Denoiser layouts: fused condition vector + FiLM MLP, cross-attention transformer, mean-pooled scene + FiLM MLP."""
DEFAULT_RULES = ("speed_limit", "lane_keeping", "heading", "safe_distance", "lane_change")
"""The pSTL rule set: speed, lane offset, heading error, gap to others, lane change."""
DEFAULT_MARGINS = {"vmin": 1.0, "vmax": 1.0, "dmin": 0.5, "dmax": 0.5, "theta_max": 0.1, "dsafe": 1.0, "w_target": 0.5}
"""Loosening added to hindsight-calibrated parameters (units of each parameter)."""


# --------------------------------------------------------------------------- data


@dataclass
class PlannerData:
    """Training rows for a parameter-conditioned planner.

    ``arrays`` are stacked SceneSamples (``W`` windows); row ``i`` is the
    control sequence ``controls[i]`` ``(T, 2)`` driven in window
    ``window[i]`` under mode ``modes[i]``, satisfying parameters
    ``params[name][i]``. Augmented data has many rows per window.
    """

    arrays: dict[str, np.ndarray]
    window: np.ndarray
    controls: np.ndarray
    params: dict[str, np.ndarray]
    modes: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        M = len(self.window)
        if self.controls.ndim != 3 or self.controls.shape[0] != M or self.controls.shape[2] != 2:
            raise DatasetError(f"controls must be (rows={M}, T, 2), got {self.controls.shape}")
        if len(self.modes) != M or any(len(np.asarray(v)) != M for v in self.params.values()):
            raise DatasetError(f"modes and every parameter need one value per row ({M})")
        W = len(self.arrays["command"])
        if M and (self.window.min() < 0 or self.window.max() >= W):
            raise DatasetError(f"window indices must lie in [0, {W}) (the stacked samples)")

    def __len__(self) -> int:
        return len(self.window)


def _smooth_noise(rng: np.random.Generator, n: int, T: int, scale: float) -> np.ndarray:
    """Random smooth profiles ``(n, T)``: a constant plus a ramp plus one slow sinusoid."""
    t = np.linspace(0.0, 1.0, T)
    c = rng.normal(0, 1, (n, 1))
    ramp = rng.normal(0, 1, (n, 1)) * t
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    return scale * (0.5 * c + 0.5 * ramp + 0.4 * np.sin(np.pi * t + phase))


def data_from_logs(
    arrays: Mapping[str, np.ndarray],
    rules: Sequence[str] | RuleSet = DEFAULT_RULES,
    margins: Mapping[str, float] | None = None,
    *,
    perturb: int = 0,
    accel_scale: float = 1.5,
    yaw_rate_scale: float = 0.06,
    seed: int = 0,
) -> PlannerData:
    """Rows from the logged futures (controls by finite differences), parameters by hindsight calibration.

    With ``perturb > 0`` each window also gets ``perturb`` rows whose logged
    controls carry smooth random offsets, relabelled with the parameters
    they satisfy: a cheap stand-in for optimizer-augmented data that
    decouples the parameters from the scene, which is what makes the
    planner respond to them. Windows with an incomplete future are skipped.
    """
    rs = rules if isinstance(rules, RuleSet) else RuleSet(list(rules))
    margins = dict(DEFAULT_MARGINS if margins is None else margins)
    margins = {k: v for k, v in margins.items() if k in rs.defaults()}
    arrays = dict(arrays)
    complete = np.asarray(arrays["ego_future_valid"], dtype=bool).all(axis=1)
    win = np.flatnonzero(complete)
    if not len(win):
        raise DatasetError("no window has a complete logged future; use longer scenes or fewer future steps")
    v0 = np.asarray(arrays["ego_status"], dtype=np.float64)[win, 0]
    base = controls_from_poses(np.asarray(arrays["ego_future"])[win], v0)
    rng = np.random.default_rng(seed)
    rows_w, rows_c = [win], [base]
    for _ in range(perturb):
        c = base.copy()
        c[..., 1] += _smooth_noise(rng, len(win), c.shape[1], accel_scale)
        c[..., 0] += _smooth_noise(rng, len(win), c.shape[1], yaw_rate_scale)
        rows_w.append(win)
        rows_c.append(c)
    window = np.concatenate(rows_w)
    controls = np.concatenate(rows_c)
    modes = mode_from_command(np.asarray(arrays["command"])[window])
    params = hindsight_params(arrays, window, controls, modes, rs, margins)
    finite = np.all([np.isfinite(v) for v in params.values()], axis=0)
    keep = np.flatnonzero(finite)
    return PlannerData(
        arrays=arrays, window=window[keep], controls=controls[keep],
        params={k: v[keep] for k, v in params.items()}, modes=modes[keep],
    )


def data_from_augmented(arrays: Mapping[str, np.ndarray], augmented: Mapping[str, np.ndarray]) -> PlannerData:
    """Rows from :func:`diffpilot.planning.augment.read_augmented` output over the same stacked ``arrays``.

    Uses its ``controls`` (applied, so they roll out to its ``trajectories``),
    ``params`` by ``param_names``, ``mode`` (an index into its ``modes``
    names) and ``window`` (a row of ``arrays``).
    """
    need = ("controls", "params", "param_names", "mode", "modes", "window")
    missing = [k for k in need if k not in augmented]
    if missing:
        raise DatasetError(f"augmented data lack {missing}; read it with diffpilot.planning.augment.read_augmented")
    names = [str(n) for n in np.asarray(augmented["modes"]).reshape(-1)]
    unknown = sorted(set(names) - set(MODES))
    if unknown:
        raise DatasetError(f"augmented data use mode(s) {unknown}; this planner knows {list(MODES)}")
    mode_ids = np.array([MODES.index(n) for n in names], dtype=np.int64)[np.asarray(augmented["mode"], dtype=np.int64)]
    P = np.asarray(augmented["params"], dtype=np.float64)
    pnames = [str(n) for n in np.asarray(augmented["param_names"]).reshape(-1)]
    if P.ndim != 2 or P.shape[1] != len(pnames):
        raise DatasetError(f"augmented params are {P.shape}, expected (rows, {len(pnames)}) for {pnames}")
    return PlannerData(
        arrays=dict(arrays), window=np.asarray(augmented["window"], dtype=np.int64),
        controls=np.asarray(augmented["controls"], dtype=np.float64),
        params={n: P[:, i] for i, n in enumerate(pnames)}, modes=mode_ids,
    )


def hindsight_params(
    arrays: Mapping[str, np.ndarray],
    window: np.ndarray,
    controls: np.ndarray,
    modes: np.ndarray,
    rules: RuleSet,
    margins: Mapping[str, float],
) -> dict[str, np.ndarray]:
    """The tightest parameters (plus margins) that each row's rolled-out trajectory satisfies in its window."""
    sub = {k: np.asarray(arrays[k])[window] for k in SCENE_KEYS if k in arrays and k != "command"}
    sub["command"] = np.array([MODE_COMMAND[int(m)] for m in modes], dtype=np.int64)
    sub["ego_future_valid"] = np.ones((len(window), controls.shape[1]), dtype=bool)
    v0 = torch.as_tensor(sub["ego_status"][:, 0], dtype=torch.float64)
    _, traj = rollout(torch.as_tensor(controls, dtype=torch.float64), v0, clip=False)
    sig = driving_signals(traj[:, None], scene_from_arrays(sub))
    return calibrate(sub, rules, margins, signals=sig)


# --------------------------------------------------------------------------- networks


class ControlDenoiser(nn.Module):
    """FiLM MLP over a flattened control sequence whose condition projection is made once per scene.

    FiLM's affine map of ``[condition, time]`` splits into a condition part (:meth:`project`,
    run on the scene rows before they are repeated for the samples) and a time part (per
    sample, small), so drawing many plans of one scene costs per sample only the MLP itself.
    The output layer starts at zero (an untrained net predicts zero velocity / noise).
    """

    def __init__(self, x_dim: int, cond_dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 32,
                 use_r: bool = False) -> None:
        super().__init__()
        if x_dim < 1 or cond_dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"need x_dim, cond_dim, hidden, depth >= 1; got {x_dim}, {cond_dim}, {hidden}, {depth}")
        self.x_dim, self.hidden, self.depth = x_dim, hidden, depth
        self.time_emb = TimeEmbedding(time_dim, use_r=use_r)
        self.cond_proj = nn.Linear(cond_dim, 2 * hidden * depth)
        self.time_proj = nn.Linear(time_dim, 2 * hidden * depth)
        for lin in (self.cond_proj, self.time_proj):  # every block starts as the identity modulation
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.inp = nn.Linear(x_dim, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(depth))
        self.lin1 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.lin2 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, x_dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def project(self, cond: Tensor) -> Tensor:
        """Scene-level condition ``(B, cond_dim)`` -> its FiLM part ``(B, 2 * hidden * depth)``."""
        return self.cond_proj(cond)

    def forward(self, x: Tensor, t: Tensor, film: Tensor, r: Tensor | None = None) -> Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        f = film + self.time_proj(self.time_emb(t, r))
        h = self.inp(x)
        for k, (norm, l1, l2) in enumerate(zip(self.norms, self.lin1, self.lin2)):
            scale, shift = f[:, 2 * k * self.hidden:(2 * k + 2) * self.hidden].chunk(2, dim=-1)
            h = h + l2(nn.functional.silu(l1(norm(h)) * (1 + scale) + shift))
        return self.out(h)


class ConditionNet(nn.Module):
    """Scene encoder + parameter / mode embeddings + denoiser, with the control and parameter normalizers.

    ``condition`` returns what the denoiser reads: scene tokens followed by a
    parameter token and a mode token (transformer), their pooled concatenation
    (mlp), or, for fusion, the FiLM projection of the fused scene / parameter /
    mode vector (one row per scene; the sampler repeats it per sample).
    """

    def __init__(
        self,
        n_params: int,
        horizon: int,
        *,
        network: str = "transformer",
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        past_steps: int = PAST_STEPS,
        use_raster: bool = False,
        use_r: bool = False,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        if network not in NETWORKS:
            raise ValueError(f"unknown network {network!r}; choose one of {NETWORKS}")
        self.network, self.horizon, self.n_params = network, horizon, n_params
        self.encoder = SceneEncoder(d_model, past_steps=past_steps, hidden=d_model, use_raster=use_raster)
        self.param_in = nn.Sequential(nn.Linear(n_params, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.mode_emb = nn.Embedding(len(MODES), d_model)
        self.control_norm = Normalizer(2, "gaussian")
        self.param_norm = Normalizer(n_params, "gaussian")
        if out_dim is not None:  # a plain conditional head (the VAE builds its own)
            self.denoiser = None
        elif network == "transformer":
            self.denoiser = TransformerDenoiser(
                action_dim=2, cond_dim=d_model, horizon=horizon, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                use_r=use_r,
            )
        elif network == "fusion":
            self.fusion = ConditionFusion(d_model, n_queries=2, n_layers=n_layers, n_heads=n_heads)
            self.denoiser = ControlDenoiser(2 * horizon, self.fusion.out_dim + 2 * d_model, hidden=2 * d_model,
                                            depth=n_layers + 1, use_r=use_r)
        else:
            self.denoiser = MLPDenoiser(2 * horizon, cond_dim=3 * d_model, hidden=4 * d_model, depth=n_layers + 1, use_r=use_r)
        # the learned "no parameters" embedding (parameter dropout in training, unconditional branch of CFG)
        self.null_param = nn.Parameter(torch.zeros(d_model))

    def condition(self, scene: Mapping[str, Tensor], params_norm: Tensor, modes: Tensor,
                  drop_params: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``drop_params`` (B,) bool replaces those rows' parameter embedding by the learned null embedding."""
        tokens, mask = self.encoder(scene)
        p = self.param_in(params_norm)
        if drop_params is not None:
            p = torch.where(drop_params[:, None], self.null_param.expand_as(p), p)
        p = p[:, None]
        m = self.mode_emb(modes.long())[:, None]
        if self.network == "fusion" and self.denoiser is not None:
            extra = torch.zeros(mask.shape[0], 2, dtype=torch.bool)
            fused = self.fusion(torch.cat([tokens, p, m], dim=1), torch.cat([mask, extra], dim=1))
            return self.denoiser.project(torch.cat([fused, p[:, 0], m[:, 0]], dim=-1)), None
        if self.network == "mlp" or self.denoiser is None:
            pooled = SceneEncoder.pooled(tokens, mask)
            return torch.cat([pooled, p[:, 0], m[:, 0]], dim=-1), None
        extra = torch.zeros(mask.shape[0], 2, dtype=torch.bool)
        return torch.cat([tokens, p, m], dim=1), torch.cat([mask, extra], dim=1)

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor, r: Tensor | None, mask: Tensor | None) -> Tensor:
        """The denoiser on ``x`` ``(B, T, 2)`` whatever the network's own layout."""
        if self.network == "transformer":
            return self.denoiser(x, t, cond, r, mask)
        return self.denoiser(x.flatten(1), t, cond, r).reshape(x.shape)


class _Bound(nn.Module):
    """The denoiser with its condition mask bound, in the ``f(x, t, cond, r)`` form the samplers call.

    With ``cfg_scale`` != 1 the condition holds the conditional and the unconditional condition
    (see ``sample``) and the output is ``u + w (c - u)`` (classifier-free guidance on the parameters).
    """

    def __init__(self, net: ConditionNet, mask: Tensor | None, cfg_scale: float = 1.0) -> None:
        super().__init__()
        self.net, self.mask, self.cfg_scale = net, mask, float(cfg_scale)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        if self.cfg_scale == 1.0 or cond is None:
            return self.net.velocity(x, t, cond, r, self.mask)
        if self.mask is None:
            c, u = cond.chunk(2, dim=-1)
        else:
            c, u = cond[:, 0], cond[:, 1]
        out_c = self.net.velocity(x, t, c, r, self.mask)
        out_u = self.net.velocity(x, t, u, r, self.mask)
        return out_u + self.cfg_scale * (out_c - out_u)


@dataclass
class GuidanceConfig:
    """Robustness guidance in normalized control space.

    ``refine`` updates of the final sample (the default: the decoded rollout is differentiable,
    so a few steps on the finished controls fix most violations for the cost of a few robustness
    gradients instead of one per network evaluation), plus, at the sampler steps listed in
    ``steps`` (None = every step), one update of the predicted clean sample. The objective is
    ``relu(target - soft-min robustness)`` over the applicable rules, each rule's robustness
    divided by :data:`~diffpilot.planning.gradient.RULE_SCALES` so metres, m/s and radians weigh
    alike; ``smooth`` is the log-sum-exp temperature in those units. ``step_rule="polyak"`` moves
    a sample by ``scale`` times the step that would close its gap to ``target`` if the objective
    were linear (large violations get large steps, small ones small); ``"normalized"`` moves it
    a fixed RMS length ``scale`` along the gradient. Entries are clipped at ``clip``. Samples
    already ``target`` robust are left alone, which keeps the diversity; with ``keep_best`` each
    sample ends at its most robust refinement iterate (exact robustness).
    """

    scale: float = 1.5
    steps: Sequence[int] | None = ()
    refine: int = 3
    smooth: float = 0.1
    target: float = 0.1
    clip: float = 1.0
    keep_best: bool = True
    step_rule: str = "polyak"

    def __post_init__(self) -> None:
        if self.scale <= 0 or self.smooth <= 0 or self.clip <= 0 or self.refine < 0:
            raise ValueError(f"guidance needs scale, smooth, clip > 0 and refine >= 0, got {self}")
        if self.step_rule not in ("normalized", "polyak"):
            raise ValueError(f"step_rule must be 'normalized' or 'polyak', got {self.step_rule!r}")


class RobustnessGuide:
    """The guidance objective of one sampling call: scenes, parameters and modes bound once.

    Built once per :meth:`ParamConditionedPlanner.sample` call (scenes with
    :func:`~diffpilot.planning.gradient.window_scene`, one row per sample, agents that cannot
    come near pruned). Each step evaluates only the samples that are not yet ``target``
    robust, so its cost falls as the samples get repaired.
    """

    def __init__(self, planner: "ParamConditionedPlanner", arrays: Mapping[str, np.ndarray], index: np.ndarray,
                 params: Mapping[str, Any], modes: np.ndarray, n: int, config: GuidanceConfig) -> None:
        # imported here: the planning package pulls in the convex solvers, which sampling without guidance never needs
        from diffpilot.planning.gradient import normalized_rule_robustness, prune_agents, rule_signals, take_scene, window_scene

        self._robust, self._rule_signals, self._take = normalized_rule_robustness, rule_signals, take_scene
        self.planner, self.config, self.n = planner, config, int(n)
        W, T = len(index), planner.horizon
        dsafe = float(np.max(np.asarray(params.get("dsafe", 0.0), dtype=np.float64)))
        scene = prune_agents(window_scene(arrays, index, modes, dtype=torch.float32), T, clearance=10.0 + max(dsafe, 0.0))
        rows = torch.arange(W).repeat_interleave(self.n)
        self.scene = take_scene(scene, rows)  # one scene per sample: any subset of samples can be evaluated
        self.v0 = self.scene.speed0
        self.params: dict[str, Tensor | float] = {}
        for k, v in params.items():
            a = np.asarray(v, dtype=np.float64).reshape(-1)
            self.params[k] = float(a[0]) if a.size == 1 else \
                torch.as_tensor(a, dtype=torch.float32).repeat_interleave(self.n).reshape(-1, 1)
        names = planner.rules.names
        self.needed = frozenset().union(*[r.signals(T) for r in planner.rules.rules])
        act = torch.tensor([[r in applicable_rules(names, int(m)) for r in names] for m in modes])
        self.active = act.repeat_interleave(self.n, dim=0)[:, None]  # (W*n, 1, R)

    def _signals(self, x: Tensor, rows: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Tensor | float]]:
        """Rule signals of normalized controls ``x`` ``(S, T, 2)`` of sample ``rows`` (all if None), and their parameters."""
        if rows is None:
            scene, v0, p = self.scene, self.v0, self.params
        else:
            scene, v0 = self._take(self.scene, rows), self.v0[rows]
            p = {k: (v[rows] if isinstance(v, Tensor) else v) for k, v in self.params.items()}
        states = self.planner.decode(x, v0)[:, None]
        return self._rule_signals(states, scene, self.needed), p

    def _rho(self, x: Tensor, rows: Tensor | None, smooth: float | None) -> Tensor:
        """Scaled per-rule robustness ``(S, 1, R)`` of normalized controls ``x`` ``(S, T, 2)`` of sample ``rows``."""
        sig, p = self._signals(x, rows)
        return self._robust(self.planner.rules, sig, p, smooth)

    def _min(self, rho: Tensor, rows: Tensor | None) -> Tensor:
        act = self.active if rows is None else self.active[rows]
        return torch.where(act, rho, torch.full_like(rho, 1e3)).amin(dim=-1).reshape(-1)

    def exact(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """Smallest scaled exact robustness over the applicable rules, one per sample."""
        with torch.no_grad():
            return self._min(self._rho(x, rows, None), rows)

    def step(self, x: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One guidance update of samples ``x`` (``rows`` of the batch; all if None).

        Returns the updated samples and the exact robustness of the *given* ones (from the
        same signals, so checking costs no second evaluation). Samples already ``target``
        robust under the smooth objective get a zero gradient.
        """
        g = self.config
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            sig, p = self._signals(x, rows)
            rho = self._robust(self.planner.rules, sig, p, g.smooth)
            act = self.active if rows is None else self.active[rows]
            masked = torch.where(act, -rho / g.smooth, torch.full_like(rho, -1e4))
            soft = -g.smooth * torch.logsumexp(masked, dim=-1)
            (gx,) = torch.autograd.grad(-torch.relu(g.target - soft).sum(), x)
        with torch.no_grad():
            exact = self._min(self._robust(self.planner.rules, {k: v.detach() for k, v in sig.items()}, p, None), rows)
        if g.step_rule == "polyak":  # the step that would close the gap if the objective were linear
            gap = torch.relu(g.target - soft.detach()).reshape(-1, 1, 1)
            sq = gx.pow(2).sum(dim=(1, 2), keepdim=True)
            delta = g.scale * gap * gx / sq.clamp_min(1e-12)
        else:  # a fixed RMS length along the gradient
            rms = gx.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
            delta = g.scale * gx / rms.clamp_min(1e-12)
        return (x + delta.clamp(-g.clip, g.clip)).detach(), exact

    def direction(self, x: Tensor) -> Tensor:
        """The guidance update of every sample of ``x`` as a displacement (used on predicted clean samples)."""
        return self.step(x)[0] - x

    def refine(self, x: Tensor, steps: int | None = None) -> tuple[Tensor, int]:
        """Up to ``steps`` (default ``config.refine``) guidance updates of the final samples; returns them and the count run.

        After each update only the samples whose exact robustness is still below ``target`` go on;
        with ``keep_best`` each sample ends at its most robust iterate.
        """
        g = self.config
        steps = g.refine if steps is None else int(steps)
        if steps <= 0:
            return x, 0
        x = x.clone()
        best = torch.full((x.shape[0],), -float("inf"))
        best_x = x.clone()
        rows = torch.arange(x.shape[0])
        done = 0
        for k in range(steps + 1):
            if k < steps:
                new, score = self.step(x[rows], rows)
                done += 1
            else:
                score = self.exact(x[rows], rows)
            better = score > best[rows] if g.keep_best else torch.ones_like(score, dtype=torch.bool)
            best[rows] = torch.where(better, score, best[rows])
            best_x[rows] = torch.where(better[:, None, None], x[rows], best_x[rows])
            go = score < g.target
            if k == steps or not bool(go.any()):
                break
            x[rows[go]] = new[go]
            rows = rows[go]
        return best_x, done


class GuidanceHook:
    """Sampler step hook: guidance updates of the step's predicted clean sample at chosen steps.

    At the steps in ``steps`` (indices into the sampler's step list, negative
    ones from the end; None = every step) it runs ``inner`` updates
    ``x0 <- x0 + guide.direction(x0)`` of ``StepInfo.x0_hat`` and has the
    sampler redo the step from the result, without another network evaluation:

    * ``move_sample=False`` (DDPM/DDIM, CTG): the noise estimate is held fixed
      and the guided prediction replaces the predicted clean sample;
    * ``move_sample=True`` (flow samplers): the velocity is held fixed, so
      ``x0_hat = x - t v`` moves with the sample and the step restarts from the
      sample moved by the same displacements.

    ``count`` is the number of guidance updates run so far.
    """

    def __init__(self, guide: RobustnessGuide, num_steps: int, steps: Sequence[int] | None, inner: int = 1,
                 move_sample: bool = False) -> None:
        if inner < 1:
            raise ValueError(f"inner guidance updates must be >= 1, got {inner}")
        self.guide, self.inner, self.move_sample = guide, int(inner), move_sample
        self.use = None if steps is None else {int(s) % num_steps for s in steps}
        self.count = 0

    def __call__(self, x: Tensor, step: StepInfo) -> Tensor:
        if self.use is not None and step.index not in self.use:
            return x
        x_from, x0 = step.x_from, step.x0_hat
        for _ in range(self.inner):
            d = self.guide.direction(x0)
            x0 = x0 + d
            if self.move_sample:
                x_from = x_from + d
            self.count += 1
        return step.redo(x_from=x_from) if self.move_sample else step.redo(x0_hat=x0)


@dataclass
class SampleOutput:
    """Sampled plans: states ``(W, N, T, 4)`` (x, y, theta, v), controls ``(W, N, T, 2)``, network evaluations."""

    states: np.ndarray
    controls: np.ndarray
    nfe: int
    guide_steps: int = 0

    @property
    def poses(self) -> np.ndarray:
        return self.states[..., :3]


# --------------------------------------------------------------------------- planner base


@dataclass
class PlannerConfig:
    """The options every parameter-conditioned planner shares (``conf/policy/<kind>.yaml``)."""

    rules: list[str] = field(default_factory=lambda: list(DEFAULT_RULES))
    horizon: int = FUTURE_STEPS
    network: str = "fusion"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    past_steps: int = PAST_STEPS
    use_raster: bool = False
    lr: float = 2e-3
    param_dropout: float = 0.0
    cfg_scale: float = 1.0
    relative_speed: bool = True
    num_samples: int = 16
    seed: int = 0
    plan_params: dict[str, float] | None = None  # the rule parameters plan() conditions on (None: the rules' defaults)


class PlannerRows:
    """The trainer's view of :class:`PlannerData`: row ``i`` gathers its window's scene tensors,
    the raw controls, the raw parameter features and the mode."""

    def __init__(self, planner: "ParamConditionedPlanner", data: PlannerData) -> None:
        if data.controls.shape[1] != planner.horizon:
            raise DatasetError(f"controls have {data.controls.shape[1]} steps, this planner plans {planner.horizon}")
        self.scene = batch_from_arrays(data.arrays, raster=planner.hparams["use_raster"])
        self.window = torch.as_tensor(data.window, dtype=torch.long)
        self.controls = torch.as_tensor(data.controls, dtype=torch.float32)
        self.params = planner._param_features(data.params, np.asarray(data.arrays["ego_status"])[data.window, 0])
        self.modes = torch.as_tensor(data.modes, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.window)

    def batch(self, rows: np.ndarray) -> dict[str, Tensor]:
        idx = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        out = {k: v[self.window[idx]] for k, v in self.scene.items()}
        out.update(controls=self.controls[idx], params=self.params[idx], modes=self.modes[idx])
        return out


class ParamConditionedPlanner(PolicyBase):
    """Shared machinery of the parameter-conditioned planners: data, conditioning, rules, Planner protocol.

    Subclasses define ``_loss(x0, cond, mask, gen)`` and
    ``_generate(cond, mask, noise, guide, sampler=None)`` in normalized control space. They
    train through the one trainer (AdamW, weight decay 1e-4, cosine decay to
    a tenth of ``lr``, gradient clip 1), on :class:`PlannerRows`.
    """

    KIND = "param_conditioned_planner"
    Config = PlannerConfig
    USE_R = False
    OWN_TRAIN_KEYS = {
        "lr": "policy.lr", "weight_decay": "nothing (fixed at 1e-4)", "warmup_steps": "nothing (no warmup)",
        "schedule": "nothing (cosine to a tenth of policy.lr)", "grad_clip": "nothing (fixed at 1.0)",
        "ema_decay": "nothing (no EMA)",
    }
    TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "num_samples": 2}

    def __init__(
        self,
        rules: Sequence[str] = DEFAULT_RULES,
        horizon: int = FUTURE_STEPS,
        *,
        network: str = "fusion",
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        past_steps: int = PAST_STEPS,
        use_raster: bool = False,
        lr: float = 2e-3,
        param_dropout: float = 0.0,
        cfg_scale: float = 1.0,
        relative_speed: bool = True,
        num_samples: int = 16,
        seed: int = 0,
        plan_params: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.rules = RuleSet(list(rules))
        self.rule_names = list(rules)
        self.param_names = sorted(self.rules.defaults())
        self.horizon = int(horizon)
        self.hparams = dict(network=network, d_model=d_model, n_layers=n_layers, n_heads=n_heads, past_steps=past_steps,
                            use_raster=use_raster)
        self.lr, self.num_samples, self.seed = float(lr), int(num_samples), int(seed)
        if not 0.0 <= param_dropout < 1.0 or cfg_scale < 0:
            raise ValueError(f"need 0 <= param_dropout < 1 and cfg_scale >= 0, got {param_dropout}, {cfg_scale}")
        if cfg_scale != 1.0 and param_dropout == 0.0:
            raise ValueError("cfg_scale != 1 needs a planner trained with param_dropout > 0 (its unconditional branch)")
        self.param_dropout, self.cfg_scale = float(param_dropout), float(cfg_scale)
        self.relative_speed = bool(relative_speed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = self._build_net()
        self.eval()
        self.plan_params: dict[str, float] = dict(self.rules.defaults())
        if plan_params:
            self.set_rule_params(**plan_params)
        self.plan_mode: int | None = None
        self.guidance: GuidanceConfig | None = None
        self._rng = torch.Generator().manual_seed(seed)

    @classmethod
    def from_options(cls, options: dict[str, Any], obs_dim: int | None = None, action_dim: int | None = None) -> "ParamConditionedPlanner":
        """Sizes come from the rules and the horizon in ``options``, not from a gym task."""
        return cls(**options)

    # -- construction / config
    def _build_net(self) -> ConditionNet:
        return ConditionNet(len(self.param_names), self.horizon, use_r=self.USE_R, **self.hparams)

    def _extra_config(self) -> dict[str, Any]:
        return {}

    @property
    def config(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "rules": self.rule_names, "horizon": self.horizon, **self.hparams, "lr": self.lr,
            "num_samples": self.num_samples, "seed": self.seed, "param_dropout": self.param_dropout,
            "cfg_scale": self.cfg_scale, "relative_speed": self.relative_speed, **self._extra_config(),
            "plan_params": {k: float(v) for k, v in self.plan_params.items()},
        }

    # -- user-facing parameters
    def set_rule_params(self, **values: float) -> None:
        """Set the rule parameters ``plan`` conditions on (e.g. ``vmax=5.0`` for a cautious plan)."""
        unknown = sorted(set(values) - set(self.param_names))
        if unknown:
            raise ValueError(f"unknown rule parameter(s) {unknown}; this planner's parameters: {self.param_names}")
        for k, v in values.items():
            if not np.isfinite(float(v)):
                raise ValueError(f"rule parameter {k} must be finite, got {v!r}")
            self.plan_params[k] = float(v)

    def set_mode(self, mode: int | str | None) -> None:
        """Fix the driving mode of ``plan`` (``keep_lane``/``left``/``right``), or None to follow the sample's command."""
        if mode is None or isinstance(mode, (int, np.integer)) and 0 <= int(mode) < len(MODES):
            self.plan_mode = None if mode is None else int(mode)
        elif isinstance(mode, str) and mode in MODES:
            self.plan_mode = MODES.index(mode)
        else:
            raise ValueError(f"mode must be one of {MODES} (or its index) or None, got {mode!r}")

    # -- tensors
    def _param_features(self, params: Mapping[str, np.ndarray | float], speed0: np.ndarray) -> Tensor:
        """The network's parameter input ``(n, P)``: with ``relative_speed`` the speed bounds become
        offsets from the ego's current speed ``speed0`` ``(n,)``.

        A bound binds through its distance to the current speed (vmax 12 asks a car at 14 m/s to
        brake and a car at 8 m/s for nothing), so offsets mean the same in every scene and one
        parameter's effect is learned across scenes instead of per speed regime.
        """
        P = self._param_matrix(params, len(speed0))
        if self.relative_speed:
            v = torch.as_tensor(np.asarray(speed0, dtype=np.float64), dtype=P.dtype)
            for k in ("vmin", "vmax"):
                if k in self.param_names:
                    P[:, self.param_names.index(k)] -= v
        return P

    def _param_matrix(self, params: Mapping[str, np.ndarray | float], n: int) -> Tensor:
        """``(n, P)`` parameter rows in ``param_names`` order; each value is one per row or one for all."""
        missing = [k for k in self.param_names if k not in params]
        if missing:
            raise DatasetError(f"rule parameters {missing} are missing; this planner needs {self.param_names}")
        cols = []
        for k in self.param_names:
            v = np.asarray(params[k], dtype=np.float64).reshape(-1)
            if v.size not in (1, n):
                raise DatasetError(f"parameter {k!r} has {v.size} values for {n} rows; give one per row or one")
            cols.append(np.broadcast_to(v, (n,)))
        m = torch.as_tensor(np.stack(cols, axis=1), dtype=torch.float32)
        if not torch.isfinite(m).all():
            raise DatasetError("rule parameters contain NaN or inf; drop those rows")
        return m

    # -- training (the one trainer: diffpilot.train.fit / Trainer)
    def training_rows(self, data: PlannerData | Mapping[str, np.ndarray]) -> PlannerRows:
        """Training rows from :class:`PlannerData`, or from stacked SceneSamples (their logs, hindsight-labelled)."""
        if not isinstance(data, PlannerData):
            data = data_from_logs(dict(data), self.rules, seed=self.seed)
        return PlannerRows(self, data)

    def fit_to_batch(self, rows: PlannerRows | Mapping[str, Tensor]) -> None:
        """Fit the control and parameter normalizers on every training row."""
        controls = rows.controls if isinstance(rows, PlannerRows) else rows["controls"]
        params = rows.params if isinstance(rows, PlannerRows) else rows["params"]
        self.net.control_norm.load_state_dict(Normalizer.fit(np.asarray(controls).reshape(-1, 2), "gaussian").state_dict())
        self.net.param_norm.load_state_dict(Normalizer.fit(np.asarray(params), "gaussian").state_dict())

    def optim_groups(self) -> dict[str, OptimGroup]:
        return {"net": OptimGroup(list(self.net.parameters()), lr=self.lr, weight_decay=1e-4, grad_clip=1.0,
                                  schedule="cosine", warmup_steps=0, min_lr_ratio=0.1)}

    def compute_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """The generative loss of the controls given scene, parameters (dropped for ``param_dropout`` of rows) and mode."""
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        scene = {k: batch[k] for k in self._scene_keys()}
        n = batch["controls"].shape[0]
        drop = shard.rand(n, generator=gen) < self.param_dropout if self.param_dropout > 0 else None
        cond, mask = self.net.condition(scene, self.net.param_norm.normalize(batch["params"]), batch["modes"], drop)
        loss = self._loss(self.net.control_norm.normalize(batch["controls"]), cond, mask, gen)
        return loss, {"loss": float(loss.detach())}

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        from diffpilot.data.scene_sample import example_scene_arrays

        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        arrays = example_scene_arrays(max(4, batch_size // 4), seed=seed,
                                      spec=SampleSpec(past_steps=self.hparams["past_steps"], future_steps=self.horizon))
        rows = PlannerRows(self, data_from_logs(arrays, self.rules, perturb=3, seed=seed))
        return rows.batch(np.arange(len(rows))[:batch_size] if len(rows) >= batch_size else
                          np.resize(np.arange(len(rows)), batch_size))

    def _scene_keys(self) -> tuple[str, ...]:
        return ENCODER_KEYS + (("drivable",) if self.hparams["use_raster"] else ())

    def _loss(self, x0: Tensor, cond: Tensor, mask: Tensor | None, gen: torch.Generator) -> Tensor:
        raise NotImplementedError

    def _generate(self, cond: Tensor, mask: Tensor | None, noise: Tensor, guide: Any,
                  sampler: Sampler | None = None) -> tuple[Tensor, int, int]:
        """``(normalized controls, NFE, guidance steps)``; ``sampler`` overrides the kind's own (export)."""
        raise NotImplementedError

    # -- decoding and rules
    def decode(self, x_norm: Tensor, v0: Tensor) -> Tensor:
        """Normalized controls ``(B, T, 2)`` -> states ``(B, T, 4)`` from speeds ``v0`` ``(B,)``."""
        return rollout(self.net.control_norm.unnormalize(x_norm), v0, clip=False)[1]

    # -- sampling
    @torch.no_grad()
    def sample(
        self,
        arrays: Mapping[str, np.ndarray],
        index: np.ndarray | Sequence[int],
        params: Mapping[str, np.ndarray | float] | None = None,
        modes: np.ndarray | Sequence[int] | None = None,
        n: int | None = None,
        *,
        noise: Tensor | None = None,
        guidance: GuidanceConfig | None = None,
    ) -> SampleOutput:
        """``n`` plans for each window ``arrays[index]`` under ``params`` (per window or shared) and ``modes``.

        ``params`` default to the planner's ``plan_params``; ``modes`` to each
        window's command. ``noise`` ``(W*n, T, 2)`` makes the draw deterministic.
        """
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        W, n = len(idx), self.num_samples if n is None else int(n)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        params = dict(self.plan_params) if params is None else {**self.plan_params, **params}
        modes_np = mode_from_command(np.asarray(arrays["command"])[idx]) if modes is None else \
            np.broadcast_to(np.asarray(modes, dtype=np.int64).reshape(-1), (W,)).copy()
        scene = batch_from_arrays(arrays, idx, raster=self.hparams["use_raster"])
        P = self.net.param_norm.normalize(self._param_features(params, np.asarray(arrays["ego_status"])[idx, 0]))
        cond, mask = self.net.condition(scene, P, torch.as_tensor(modes_np))
        if self.cfg_scale != 1.0:  # classifier-free guidance on the parameters: [conditional, unconditional] stacked
            cond_u, _ = self.net.condition(scene, P, torch.as_tensor(modes_np), torch.ones(W, dtype=torch.bool))
            cond = torch.cat([cond, cond_u], dim=-1) if mask is None else torch.stack([cond, cond_u], dim=1)
        cond = cond.repeat_interleave(n, dim=0)
        mask = None if mask is None else mask.repeat_interleave(n, dim=0)
        shape = (W * n, self.horizon, 2)
        if noise is None:
            noise = torch.randn(shape, generator=self._rng)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must be (W*n, T, 2) = {shape}, got {tuple(noise.shape)}")
        guide = None
        if guidance is not None:
            used = {k: params[k] for k in self.param_names}
            guide = RobustnessGuide(self, arrays, idx, used, modes_np, n, guidance)
        x, nfe, gsteps = self._generate(cond, mask, noise, guide)
        v0 = torch.as_tensor(np.asarray(arrays["ego_status"])[idx, 0], dtype=torch.float32).repeat_interleave(n)
        states = self.decode(x, v0)
        ctrl = self.net.control_norm.unnormalize(x)
        return SampleOutput(
            states=states.double().numpy().reshape(W, n, self.horizon, 4),
            controls=ctrl.double().numpy().reshape(W, n, self.horizon, 2), nfe=nfe, guide_steps=gsteps,
        )

    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.horizon, 2)

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """One plan per row: states ``(B, T, 4)`` for scene tensors, raw ``params`` features and ``modes``.

        The batched core that ``plan`` and ``sample`` add candidates, selection and guidance to.
        """
        if noise is None:
            noise = torch.randn(self.noise_shape(batch["modes"].shape[0]), generator=self._rng)
        return self.unguided_states(batch, noise)[0]

    def unguided_states(self, batch: Mapping[str, Tensor], noise: Tensor,
                        sampler: Sampler | None = None) -> tuple[Tensor, int]:
        """``predict``'s computation (states ``(B, T, 4)``, NFE) without ``no_grad``: the graph the export traces.

        ``sampler`` overrides the kind's own sampler (``None``: the configured one).
        """
        scene = {k: batch[k] for k in self._scene_keys()}
        n = batch["modes"].shape[0]
        cond, mask = self.net.condition(scene, self.net.param_norm.normalize(batch["params"]), batch["modes"])
        if self.cfg_scale != 1.0:
            cond_u, _ = self.net.condition(scene, self.net.param_norm.normalize(batch["params"]), batch["modes"],
                                           torch.ones(n, dtype=torch.bool))
            cond = torch.cat([cond, cond_u], dim=-1) if mask is None else torch.stack([cond, cond_u], dim=1)
        x, nfe, _ = self._generate(cond, mask, noise, None, sampler)
        return self.decode(x, batch["ego_status"][:, 0]), nfe

    # -- export
    def export_spec(self, sampler: dict[str, Any] | None = None, *, num_agents: int | None = None,
                    num_lanes: int | None = None, lane_points: int | None = None,
                    raster_size: int | None = None) -> ExportSpec:
        """``predict`` without guidance as one graph (form ``states``), run by ``diffpilot.export.runtime.OnnxPlanner``.

        Inputs: the scene tensors the encoder reads (``SCENE_KEYS`` of
        :mod:`~diffpilot.policy.networks.scene_encoder`, agents' poses and
        validity cut to the ``past_steps + 1`` columns it reads, padded to
        ``num_agents`` agents and ``num_lanes`` lanes of ``lane_points`` points;
        ``drivable`` with a raster), the raw rule-parameter features ``params``
        (B, P) in ``param_names`` order (speed bounds as offsets from the ego's
        speed with ``relative_speed``), ``modes`` (B,) int64 and ``noise``
        (B, T, 2). Output: ``states`` (B, T, 4) = x, y, theta, v in the ego frame.
        Sizes default to :class:`~diffpilot.data.scenario.SampleSpec`'s.
        Robustness guidance needs autograd through the rules and stays in torch,
        as does ``plan``'s choice among ``num_samples`` draws by robustness: the
        graph is one unguided draw per row. ``sampler`` overrides the
        sampler (deterministic ones only).
        """
        K, L, N, R = scene_export_sizes(num_agents, num_lanes, lane_points, raster_size, self.hparams["use_raster"])
        built, sampler_cfg = self._export_sampler(sampler)
        H, T = self.hparams["past_steps"] + 1, self.horizon

        def feeds(b: int, g: torch.Generator) -> dict[str, Tensor]:
            out = _random_scene(b, g, H, K, L, N, R)
            out["params"] = self.net.param_norm.unnormalize(torch.randn(b, len(self.param_names), generator=g))
            out["modes"] = torch.randint(0, len(MODES), (b,), generator=g)
            out["noise"] = torch.randn(b, T, 2, generator=g)
            return out

        with torch.no_grad():
            probe = feeds(1, torch.Generator().manual_seed(0))
            nfe = self.unguided_states(probe, probe["noise"], built)[1]
        relative = [k for k in ("vmin", "vmax") if self.relative_speed and k in self.param_names]
        meta = {
            "kind": RUNTIME_PLANNER,
            "form": "states",
            "policy_kind": self.KIND,
            "rules": json.dumps(self.rule_names),
            "param_names": json.dumps(self.param_names),
            "plan_params": json.dumps({k: float(v) for k, v in self.plan_params.items()}, sort_keys=True),
            "relative_params": json.dumps(relative),
            "plan_mode": json.dumps(self.plan_mode),
            "modes": json.dumps(list(MODES)),
            "command_modes": json.dumps([int(m) for m in mode_from_command(np.arange(len(COMMANDS)))]),
            "horizon": str(T),
            "past_steps": str(self.hparams["past_steps"]),
            "num_agents": str(K),
            "num_lanes": str(L),
            "lane_points": str(N),
            "raster_size": str(R),
            "dt": repr(float(DEFAULT_LIMITS.dt)),
            "state_layout": "x,y,theta,v",
            "sampler": json.dumps(sampler_cfg, sort_keys=True),
            "network": json.dumps(self.hparams, sort_keys=True),
            "cfg_scale": repr(self.cfg_scale),
            "guidance": "none: robustness guidance needs autograd and stays in torch, as does plan()'s choice among "
                        "num_samples draws by rule robustness; this graph is one unguided draw per row",
        }
        return ExportSpec(PlannerGraph(self, built), feeds, ("states",), meta, nfe)

    def _export_sampler(self, sampler: dict[str, Any] | None) -> tuple[Sampler | None, dict[str, Any]]:
        """The sampler the export unrolls (None: the kind's own one-pass generation) and its config."""
        if sampler:
            raise ValueError(f"sampler= does not apply to a {self.KIND!r} planner (one decoder pass); drop it")
        return None, {"name": "decoder"}

    def satisfaction(
        self, states: np.ndarray, arrays: Mapping[str, np.ndarray], index: np.ndarray | Sequence[int],
        params: Mapping[str, np.ndarray | float], modes: np.ndarray | Sequence[int],
    ) -> np.ndarray:
        """Exact robustness ``(W, N)`` of the mode's rules for sampled states under ``params``."""
        rho = rule_robustness(torch.as_tensor(states), arrays, index, self.rules, params, modes)
        return mode_robustness(rho, modes).numpy()

    # -- Planner protocol
    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self._rng.manual_seed(int(seed))

    def plan(self, sample: SceneSample) -> np.ndarray:
        """Ego-frame poses ``(T, 3)`` at DT: of ``num_samples`` draws under ``plan_params``, the one
        :func:`~diffpilot.stl.metrics.preferred_plan` picks (the longest satisfying one)."""
        arrays = stack_samples([sample])
        modes = np.array([self.plan_mode]) if self.plan_mode is not None else mode_from_command(arrays["command"])
        out = self.sample(arrays, [0], None, modes, guidance=self.guidance)
        rho = self.satisfaction(out.states, arrays, [0], self.plan_params, modes)[0]
        best = preferred_plan(out.states[0], rho)
        poses = out.poses[0, best].copy()
        poses[:, 2] = wrap_angle(poses[:, 2])
        return poses


# --------------------------------------------------------------------------- the flow planner


@dataclass
class STLFlowConfig(PlannerConfig):
    """``conf/policy/stl_flow_planner.yaml``."""

    objective: str = "flow"  # flow (Euler, sampler_steps) or meanflow (one step)
    sampler_steps: int = 2


@register_policy("stl_flow_planner")
class STLFlowPlanner(ParamConditionedPlanner):
    """Rectified flow (``objective="flow"``, Euler 1-4 steps) or MeanFlow (one step) over controls.

    See the module docstring for the representation and the conditioning.
    """

    Config = STLFlowConfig
    EXPORTABLE = True  # predict without guidance: Euler or MeanFlow unrolled (PlannerGraph)

    def __init__(self, rules: Sequence[str] = DEFAULT_RULES, horizon: int = FUTURE_STEPS, *, objective: str = "flow",
                 sampler_steps: int = 2, **kwargs: Any) -> None:
        if objective not in ("flow", "meanflow"):
            raise ValueError(f"objective must be 'flow' or 'meanflow', got {objective!r}")
        if not isinstance(sampler_steps, int) or sampler_steps < 1:
            raise ValueError(f"sampler_steps must be a positive integer, got {sampler_steps!r}")
        self.objective_name, self.sampler_steps = objective, sampler_steps
        self.USE_R = objective == "meanflow"
        self.objective = build_objective("flow", time_sampling="logit_normal") if objective == "flow" \
            else build_objective("meanflow")
        super().__init__(rules, horizon, **kwargs)

    def _extra_config(self) -> dict[str, Any]:
        return {"objective": self.objective_name, "sampler_steps": self.sampler_steps}

    def _loss(self, x0: Tensor, cond: Tensor, mask: Tensor | None, gen: torch.Generator) -> Tensor:
        return self.objective.loss(_Bound(self.net, mask), x0, cond, generator=gen)

    def _sampler(self) -> Sampler:
        return build_sampler("meanflow" if self.objective_name == "meanflow" else "euler", self.objective, self.sampler_steps)

    def _export_sampler(self, sampler: dict[str, Any] | None) -> tuple[Sampler | None, dict[str, Any]]:
        if not sampler:
            name = "meanflow" if self.objective_name == "meanflow" else "euler"
            return self._sampler(), {"name": name, "num_steps": self.sampler_steps}
        cfg = dict(sampler)
        if "name" not in cfg:
            raise ValueError(f"sampler override needs a 'name' key, e.g. {{'name': 'euler', 'num_steps': 4}}; got {cfg}")
        return build_sampler(cfg["name"], self.objective, **{k: v for k, v in cfg.items() if k != "name"}), cfg

    def _generate(self, cond: Tensor, mask: Tensor | None, noise: Tensor, guide: Any,
                  sampler: Sampler | None = None) -> tuple[Tensor, int, int]:
        model = _Bound(self.net, mask, self.cfg_scale)
        sampler = self._sampler() if sampler is None else sampler
        if guide is None:
            res = sampler.sample(model, noise, cond)
            return res.sample, res.nfe, 0
        # x0_hat = x - t v; with v held fixed, d x0_hat / d x = I, so a guided prediction moves the sample directly
        hook = GuidanceHook(guide, sampler.num_steps, guide.config.steps, move_sample=True)
        res = sampler.sample(model, noise, cond, hook=hook)
        x, k = guide.refine(res.sample)
        return x, res.nfe, hook.count + k


# --------------------------------------------------------------------------- export


class PlannerGraph(nn.Module):
    """Scene tensors + raw parameter features + modes + noise -> states ``(B, T, 4)``: ``predict`` without guidance."""

    def __init__(self, planner: ParamConditionedPlanner, sampler: Sampler | None) -> None:
        super().__init__()
        self.planner, self.sampler = planner, sampler

    def forward(self, *, ego_status: Tensor, command: Tensor, ego_past: Tensor, agents_pose: Tensor,
                agents_valid: Tensor, agents_size: Tensor, agents_category: Tensor, lanes: Tensor, lanes_valid: Tensor,
                drivable: Tensor | None = None, params: Tensor, modes: Tensor, noise: Tensor) -> Tensor:
        batch = {"ego_status": ego_status, "command": command, "ego_past": ego_past, "agents_pose": agents_pose,
                 "agents_valid": agents_valid, "agents_size": agents_size, "agents_category": agents_category,
                 "lanes": lanes, "lanes_valid": lanes_valid, "params": params, "modes": modes}
        if drivable is not None:
            batch["drivable"] = drivable
        return self.planner.unguided_states(batch, noise, self.sampler)[0]


def _random_scene(b: int, g: torch.Generator, H: int, K: int, L: int, N: int, R: int) -> dict[str, Tensor]:
    """``b`` random scenes in the encoder's input format (metres, m/s), with partly padded agents and lanes.

    Not realistic traffic, but values in the ranges real samples have, so the
    export check exercises every mask and the whole range of the features.
    """
    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g)

    v = 15.0 * rand(b)
    steps = torch.arange(H, dtype=torch.float32) - (H - 1)
    ego_past = torch.stack([v[:, None] * 0.5 * steps + 0.3 * randn(b, H), 0.3 * randn(b, H), 0.05 * randn(b, H)], dim=-1)
    out = {
        "ego_status": torch.stack([v, randn(b), 0.1 * randn(b)], dim=-1),
        "command": torch.randint(0, len(COMMANDS), (b,), generator=g),
        "ego_past": ego_past,
        "agents_pose": randn(b, K, H, 3) * torch.tensor([20.0, 6.0, 0.5]),
        "agents_valid": rand(b, K, H) < 0.8,
        "agents_size": 1.0 + 4.0 * rand(b, K, 2),
        "agents_category": torch.randint(-1, 4, (b, K), generator=g),
        "lanes": randn(b, L, N, 3) * torch.tensor([25.0, 6.0, 0.3]),
        "lanes_valid": rand(b, L) < 0.7,
    }
    if R:
        out["drivable"] = (rand(b, R, R) < 0.6).float()
    return out
