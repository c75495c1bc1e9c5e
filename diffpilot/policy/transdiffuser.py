"""TransDiffuser: an encoder-decoder diffusion planner that fuses the scene one modality at a time.

The encoder turns a :class:`~diffpilot.data.scenario.SceneSample` into one
token set per modality (ego status + command, ego history, agents, lanes,
stop lines and crosswalks, optionally a drivable-area raster through a small
CNN). The decoder denoises the plan, 8 waypoints ``(x, y, heading)`` as deltas
that sum to the trajectory, as one token per waypoint; each decoder layer runs
self-attention over the waypoints, then one cross-attention per modality in a
configurable order (``modality_order``), then a feed-forward block and a FiLM
of the diffusion time (``fusion: joint``: one cross-attention over all the
modalities' tokens instead, a cheaper decoder for a distilled one-step
student). A decorrelation loss on the batch-standardized fused representation
(the mean over waypoints of the last layer's tokens) pushes its features apart
against mode collapse; it is logged on its own.

Planning draws ``num_candidates`` plans per scene and keeps one without a
scorer (``selection``): ``score`` (a learned head that predicts each
candidate's PDM sub-scores, trained on candidates scored by the simulator on
training scenes: :func:`diffpilot.sim.driving.candidates.scored_candidates`),
``medoid`` (the candidate nearest all others), ``mode`` (the densest
candidate), or ``first``. With ``guidance`` the STL rule robustness of each
candidate (our rule set, default parameters, the command's lane mode) steers
the last sampler step through the sampler's step hook and refines the final
samples, as for the STL flow planner. The generative process is DDPM (epsilon or x0,
sampled with DDIM), flow matching (few Euler steps) or MeanFlow (one step);
``teacher`` distils a trained planner into a flow or MeanFlow one (each noise
paired with the teacher's plan of it); ``warm_start`` replans from the
previous plan shifted by the elapsed time.

``plan()`` reads only the past and the present: the encoder cuts agents'
poses to their past and present columns and nothing reads ``ego_future``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffpilot.data.errors import DatasetError
from diffpilot.data.normalizer import Normalizer
from diffpilot.data.scenario import DT, SampleSpec, SceneSample, wrap_angle
from diffpilot.policy.base import PolicyBase
from diffpilot.policy.checkpoint import CheckpointError
from diffpilot.policy.plan_guards import (GuardConfig, candidate_clearance, candidate_offroad, check_guards, clearest,
                                         guard_kept, moves, pick, reads_drivable)
from diffpilot.policy.replan import PlanMemory
from diffpilot.policy.export_spec import ExportSpec, poses_metadata, scene_export_sizes, stochastic_sampler
from diffpilot.policy.generative import shard
from diffpilot.policy.generative import Sampler, TokenSets, build_objective, build_sampler
from diffpilot.policy.generative.diffusion import DDPM
from diffpilot.policy.generative.meanflow import MeanFlow
from diffpilot.policy.generative.warm_start import WarmStartConfig, WarmStarter
from diffpilot.policy.kinds import register_policy
from diffpilot.policy.networks.embeddings import TimeEmbedding
from diffpilot.policy.networks.scene_encoder import SCENE_KEYS, SceneEncoder, batch_from_arrays

__all__ = ["MODALITY_ORDER", "SELECTIONS", "SUBSCORES", "TransDiffuser", "TransDiffuserConfig", "decorrelation_loss"]

MODALITY_ORDER = ("ego_status", "ego_history", "agents", "lanes", "map_elements", "raster")
"""Every modality the decoder can fuse; ``raster`` needs ``use_raster``."""
SELECTIONS = ("score", "medoid", "mode", "first")
FUSIONS = ("sequential", "joint")
JOINT = "joint"
"""The one cross-attention of a ``joint`` fusion layer (its key in the layer's modules and memory)."""
SUBSCORES = ("nc", "dac", "ttc", "ep", "comfort", "pdms")
"""What the score head predicts per candidate, in the order of the scored-candidate rows."""
MAP_KEYS = ("stop_lines", "stop_lines_valid", "zones", "zones_valid")
SAMPLERS_FOR = {"ddpm": ("ddim",), "flow": ("euler", "heun"), "meanflow": ("meanflow",)}
MEANFLOW_DEFAULTS = {"time_sampling": "uniform"}
"""One-step plans need training pairs near the jump (t, r) = (1, 0), which logit-normal times almost never draw:
on the 200-scene set, 2,500 steps, one-step minADE of 8 candidates 1.71 m logit-normal, 0.65 m uniform (DDPM 5 steps: 0.44 m)."""
POS_SCALE_M = 20.0
MODE_BANDWIDTH_M = 2.0
"""Kernel width (m) of the ``mode`` selection's density estimate."""


@dataclass
class TransDiffuserConfig(GuardConfig):
    """``conf/policy/transdiffuser.yaml``; the guards (hold, clearance) of :class:`GuardConfig`."""

    future_steps: int = SampleSpec.future_steps
    past_steps: int = SampleSpec.past_steps
    d_model: int = 64
    hidden: int = 64
    heads: int = 4
    layers: int = 2
    modality_order: list[str] = field(default_factory=lambda: ["ego_status", "ego_history", "agents", "lanes", "map_elements"])
    fusion: str = "sequential"  # sequential: one cross-attention per modality in order | joint: one over all their tokens
    use_raster: bool = False
    raster_tokens: int = 4
    objective: str = "ddpm"  # ddpm | flow | meanflow
    prediction: str = "sample"  # ddpm: sample (x0, robust at few steps) | epsilon
    num_train_steps: int = 100
    objective_options: dict[str, Any] = field(default_factory=dict)  # flow / meanflow: e.g. time_sampling, ratio_r_equals_t
    teacher: str = ""  # flow / meanflow: a trained TransDiffuser folder; its plan of each noise is the target (distillation)
    teacher_jump_weight: float = 1.0  # meanflow + teacher: the one-step jump from each noise regressed onto the teacher's plan
    teacher_init: bool = False  # with teacher: training starts from the teacher's weights wherever name and shape match
    sampler: str = "ddim"  # ddim (ddpm), euler/heun (flow), meanflow
    sampler_steps: int = 5
    num_candidates: int = 8
    selection: str = "score"
    decorrelation_weight: float = 0.02
    score_weight: float = 1.0
    warm_start: bool = False
    warm_start_t: float = 0.4
    warm_start_steps: int = 2
    guidance: bool = False  # STL robustness guidance of plan()/plan_batch through the sampler hook
    guidance_scale: float = 1.5
    guidance_refine: int = 3
    consistency: bool = True  # keep the clear candidate nearest the previous moving plan, shifted (torch and graph)
    clearance_horizon_s: float = 4.0  # the whole plan: a contact seen early is met by braking gently (the peer keeps 2 s)
    seed: int = 0


def decorrelation_loss(features: Tensor) -> Tensor:
    """Mean squared off-diagonal entry of the correlation matrix of ``features`` (B, D) over the batch."""
    if features.shape[0] < 2:
        return features.sum() * 0.0
    z = features - features.mean(dim=0, keepdim=True)
    z = z / (z.pow(2).mean(dim=0, keepdim=True).add(1e-6).sqrt())
    corr = z.T @ z / features.shape[0]
    d = corr.shape[0]
    off = corr - torch.diag(torch.diagonal(corr))
    return off.pow(2).sum() / max(d * (d - 1), 1)


def poses_from_deltas(deltas: Tensor) -> Tensor:
    """Waypoint deltas ``(..., F, 3)`` -> ego-frame poses (cumulative sums; the heading is not wrapped)."""
    return torch.cumsum(deltas, dim=-2)


def deltas_from_poses(poses: np.ndarray) -> np.ndarray:
    """Ego-frame poses ``(..., F, 3)`` -> deltas from the origin and each previous waypoint (heading wrapped)."""
    poses = np.asarray(poses, dtype=np.float64)
    prev = np.concatenate([np.zeros_like(poses[..., :1, :]), poses[..., :-1, :]], axis=-2)
    d = poses - prev
    d[..., 2] = wrap_angle(d[..., 2])
    return d


def _pose_features(poses: Tensor) -> Tensor:
    return torch.stack([poses[..., 0] / POS_SCALE_M, poses[..., 1] / POS_SCALE_M,
                        torch.cos(poses[..., 2]), torch.sin(poses[..., 2])], dim=-1)


class MapElementEncoder(nn.Module):
    """Stop lines ``(B, S, 2)`` and crosswalk polygons ``(B, Z, V, 2)`` -> one token each, masked where invalid."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.stop_mlp = nn.Sequential(nn.Linear(2, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.zone_point = nn.Sequential(nn.Linear(2, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.zone_out = nn.Sequential(nn.GELU(), nn.Linear(hidden, d_model))
        self.kind = nn.Parameter(torch.zeros(2, d_model))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        dtype = self.kind.dtype
        sv = batch["stop_lines_valid"].bool()
        zv = batch["zones_valid"].bool()
        stops = self.stop_mlp(batch["stop_lines"].to(dtype) / POS_SCALE_M * sv[..., None]) + self.kind[0]
        zp = batch["zones"].to(dtype) / POS_SCALE_M * zv[..., None, None]
        zones = self.zone_out(self.zone_point(zp).amax(dim=2)) + self.kind[1]
        tokens = self.norm(torch.cat([stops, zones], dim=1))
        valid = torch.cat([sv, zv], dim=1)
        return tokens * valid[..., None].to(dtype), ~valid


class Attention(nn.Module):
    """Multi-head attention written out (masked softmax), so forward-mode AD (MeanFlow's jvp) runs through it."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dk = heads, d_model // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def memory(self, ctx: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Keys and values ``(B, heads, m, dk)`` of ``ctx`` (B, m, d) and the additive mask ``(B, 1, 1, m)``.

        They depend on the scene only, so a sampler's steps can share them (:meth:`TransDiffuserNet.denoiser`).
        """
        B, m, _ = ctx.shape
        k = self.k(ctx).reshape(B, m, self.heads, self.dk).transpose(1, 2)
        v = self.v(ctx).reshape(B, m, self.heads, self.dk).transpose(1, 2)
        bias = None if mask is None else (mask.to(ctx.dtype) * -1e9)[:, None, None, :]
        return k, v, bias

    def attend(self, x: Tensor, memory: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
        """``x`` (B, n, d) attends to the keys and values of :meth:`memory`."""
        k, v, bias = memory
        B, n, _ = x.shape
        q = self.q(x).reshape(B, n, self.heads, self.dk).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / self.dk**0.5
        if bias is not None:
            scores = scores + bias
        out = torch.softmax(scores, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(B, n, -1))

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x`` (B, n, d) attends to ``ctx`` (B, m, d); ``mask`` (B, m) True = ignore."""
        return self.attend(x, self.memory(ctx, mask))


class FusionLayer(nn.Module):
    """Self-attention over waypoints, one cross-attention per modality in order, FFN, then a FiLM of the time.

    ``joint``: one cross-attention over every modality's tokens at once instead (fewer graph ops per
    step, for a cheap one-step student).
    """

    def __init__(self, d_model: int, heads: int, order: Sequence[str], joint: bool = False) -> None:
        super().__init__()
        self.order = tuple(order)
        self.joint = joint
        self.keys = (JOINT,) if joint else self.order
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, heads)
        self.cross_norm = nn.ModuleDict({m: nn.LayerNorm(d_model) for m in self.keys})
        self.cross = nn.ModuleDict({m: Attention(d_model, heads) for m in self.keys})
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.film = nn.Linear(d_model, 2 * d_model)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def memory(self, groups: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor, Tensor | None]]:
        """Each modality's cross-attention keys, values and mask bias (:meth:`Attention.memory`); ``joint``: those
        of all the modalities' tokens together."""
        if self.joint:
            tokens = torch.cat([groups[m][0] for m in self.order], dim=1)
            mask = torch.cat([groups[m][1] for m in self.order], dim=1)
            return {JOINT: self.cross[JOINT].memory(tokens, mask)}
        return {m: self.cross[m].memory(*groups[m]) for m in self.order}

    def forward(self, h: Tensor, temb: Tensor, memory: Mapping[str, tuple[Tensor, Tensor, Tensor | None]],
                candidates: int = 1) -> Tensor:
        """``h`` (B * candidates, F, d): ``candidates`` consecutive rows share one scene row of ``memory``."""
        q = self.self_norm(h)
        h = h + self.self_attn(q, q)
        n, d = h.shape[1:]
        for m in self.keys:  # a scene's candidates query its memory together: one (C * F)-query attention per scene
            x = self.cross_norm[m](h).reshape(-1, candidates * n, d)
            h = h + self.cross[m].attend(x, memory[m]).reshape(h.shape)
        h = h + self.ffn(self.ffn_norm(h))
        scale, shift = self.film(temb).chunk(2, dim=-1)
        return h * (1.0 + scale[:, None]) + shift[:, None]


class TransDiffuserNet(nn.Module):
    """Encoder, decoder (the denoiser) and score head; all learnable weights of the planner."""

    def __init__(self, cfg: TransDiffuserConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.order = tuple(cfg.modality_order)
        self.encoder = SceneEncoder(d, cfg.past_steps, cfg.hidden, cfg.use_raster, cfg.raster_tokens)
        self.map_encoder = MapElementEncoder(d, cfg.hidden) if "map_elements" in self.order else None
        # one always-valid learned token per modality, so a fully padded group still has a key to attend to
        self.null = nn.ParameterDict({m: nn.Parameter(torch.randn(1, 1, d) * 0.02) for m in self.order})
        self.in_proj = nn.Linear(3, d)
        self.pos = nn.Parameter(torch.randn(1, cfg.future_steps, d) * 0.02)
        self.time = TimeEmbedding(d, use_r=cfg.objective == "meanflow")
        self.layers = nn.ModuleList(FusionLayer(d, cfg.heads, self.order, cfg.fusion == "joint") for _ in range(cfg.layers))
        self.out_norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.score_head = nn.Sequential(nn.Linear(d + 4 * cfg.future_steps, 2 * d), nn.GELU(),
                                        nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, len(SUBSCORES)))

    def encode(self, batch: Mapping[str, Tensor]) -> TokenSets:
        """The scene as one masked token set per modality in fusion order, each with its null token first."""
        groups = dict(self.encoder.forward_groups(batch))
        if self.map_encoder is not None:
            groups["map_elements"] = self.map_encoder(batch)
        out = {}
        for m in self.order:
            tokens, mask = groups[m]
            B = tokens.shape[0]
            out[m] = (torch.cat([self.null[m].expand(B, 1, -1), tokens], dim=1),
                      torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=mask.device), mask], dim=1))
        return TokenSets(out)

    @staticmethod
    def context(cond: TokenSets) -> Tensor:
        """One scene vector ``(B, d)``: the mean of every unmasked token (null tokens included)."""
        tokens = torch.cat([t for t, _ in cond.values()], dim=1)
        keep = torch.cat([~m for _, m in cond.values()], dim=1).to(tokens.dtype)
        return (tokens * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)

    def memory(self, cond: TokenSets) -> list[dict[str, tuple[Tensor, Tensor, Tensor | None]]]:
        """Every layer's cross-attention keys and values of the scene ``cond`` (:meth:`FusionLayer.memory`)."""
        groups = dict(cond.items())
        return [layer.memory(groups) for layer in self.layers]

    def decode(self, x: Tensor, t: Tensor, cond: TokenSets, r: Tensor | None = None,
               memory: list[dict[str, tuple[Tensor, Tensor, Tensor | None]]] | None = None,
               candidates: int = 1) -> tuple[Tensor, Tensor]:
        """The denoiser output and the fused representation ``(B, d)`` (last layer's tokens, mean over waypoints).

        ``memory`` (from :meth:`memory` of the same ``cond``) skips projecting the scene tokens again. With
        ``candidates`` > 1, ``x`` holds that many consecutive rows per row of ``cond``: the scene's tokens are
        projected once per scene rather than once per candidate, which is the same attention.
        """
        h = self.in_proj(x) + self.pos
        temb = self.time(t, r)
        memory = self.memory(cond) if memory is None else memory
        for layer, mem in zip(self.layers, memory):
            h = layer(h, temb, mem, candidates)
        return self.out(self.out_norm(h)), h.mean(dim=1)

    def forward(self, x: Tensor, t: Tensor, cond: TokenSets, r: Tensor | None = None) -> Tensor:
        return self.decode(x, t, cond, r)[0]

    def denoiser(self, cond: TokenSets, candidates: int = 1) -> "_SceneDenoiser":
        """This decoder as a sampler's denoiser for the one scene batch ``cond``: the scene's keys and values are
        projected once, not at every sampler step (18 % fewer exported graph nodes at 10 DDIM steps), and once per
        scene for its ``candidates`` samples (the sampler's rows: ``candidates`` consecutive ones per scene)."""
        return _SceneDenoiser(self, cond, candidates)

    def scores(self, context: Tensor, poses: Tensor) -> Tensor:
        """Sub-score logits ``(B, C, 6)`` for candidates ``poses`` (B, C, F, 3) in scenes ``context`` (B, d)."""
        B, C = poses.shape[:2]
        feats = torch.cat([context[:, None].expand(B, C, -1), _pose_features(poses).flatten(2)], dim=-1)
        return self.score_head(feats)


class _SceneDenoiser:
    """:meth:`TransDiffuserNet.decode` with the cross-attention memory of one ``cond`` computed once; ``x`` has
    ``candidates`` rows per scene row of ``cond``."""

    def __init__(self, net: TransDiffuserNet, cond: TokenSets, candidates: int = 1) -> None:
        self.net, self.cond, self.memory, self.candidates = net, cond, net.memory(cond), int(candidates)

    def __call__(self, x: Tensor, t: Tensor, cond: TokenSets, r: Tensor | None = None) -> Tensor:
        if cond is not self.cond:
            raise ValueError("this denoiser holds the memory of another condition; build it with net.denoiser(cond)")
        return self.net.decode(x, t, cond, r, memory=self.memory, candidates=self.candidates)[0]


class _FusedCapture:
    """The decoder as a denoiser that keeps the fused representation of its last call (for the decorrelation loss)."""

    def __init__(self, net: TransDiffuserNet) -> None:
        self.net, self.fused = net, None

    def __call__(self, x: Tensor, t: Tensor, cond: TokenSets, r: Tensor | None = None) -> Tensor:
        out, self.fused = self.net.decode(x, t, cond, r)
        return out


def pdms_from_subscores(p: Tensor) -> Tensor:
    """PDMS = NC·DAC·(5·TTC + 5·EP + 2·C)/12 from sub-score probabilities ``(..., 6)``."""
    return p[..., 0] * p[..., 1] * (5 * p[..., 2] + 5 * p[..., 3] + 2 * p[..., 4]) / 12.0


def select_candidates(poses: Tensor, how: str, scores: Tensor | None = None, admissible: Tensor | None = None) -> Tensor:
    """Index ``(B,)`` of the kept candidate in ``poses`` (B, C, F, 3) by ``how`` (see SELECTIONS).

    ``admissible`` (B, C) bool, when given, restricts the choice to those candidates (a row with none: all).
    """
    B, C = poses.shape[:2]
    # Inadmissible candidates are pushed out of reach of the argmax / argmin below (export-friendly, no branching).
    out = torch.zeros(B, C, dtype=poses.dtype, device=poses.device) if admissible is None else \
        torch.where(admissible, torch.zeros((), dtype=poses.dtype), torch.full((), 1e9, dtype=poses.dtype))
    if how == "first" or C == 1:
        return torch.argmin(out, dim=1)
    if how == "score":
        if scores is None:
            raise ValueError("selection 'score' needs the score head's output")
        return torch.argmax(scores.to(poses.dtype) - out, dim=1)
    flat = poses[..., :2].flatten(2)
    d2 = (flat[:, :, None] - flat[:, None]).pow(2).sum(-1) / poses.shape[2]  # mean squared waypoint distance
    if how == "medoid":
        return torch.argmin(d2.clamp_min(0).sqrt().sum(-1) + out, dim=1)
    if how == "mode":
        return torch.argmax(torch.exp(-d2 / (2 * MODE_BANDWIDTH_M**2)).sum(-1) - out, dim=1)
    raise ValueError(f"unknown selection {how!r}; choose one of {list(SELECTIONS)}")


def keep_course(cands: Tensor, idx: Tensor, previous: Tensor, covered: Tensor, hold_below_m: float,
                admissible: Tensor | None = None) -> Tensor:
    """Plan consistency: the index ``(B,)`` of the admissible candidate nearest ``previous`` (B, F, 3) over its
    ``covered`` (B, F) waypoints (mean xy distance), where the selection's choice ``idx`` moves; else ``idx``.

    Replanning picks anew among the candidates at every step, so a manoeuvre
    (a lane change) can restart at every replan and never complete; this
    keeps the one in progress. A stop wins (a choice held as standstill
    stays), and a row with nothing covered (no previous plan, or a previous
    standstill) binds nothing, so the car can pull away.
    """
    w = covered.to(cands.dtype)
    d = ((cands[..., :2] - previous[:, None, :, :2]).norm(dim=-1) * w[:, None]).sum(-1) / w.sum(-1, keepdim=True).clamp_min(1.0)
    if admissible is not None:
        d = torch.where(admissible, d, torch.full_like(d, 1e9))
    use = covered.any(dim=-1) & moves(pick(cands, idx), hold_below_m)
    return torch.where(use, torch.argmin(d, dim=1), idx)


def candidate_diversity(poses: Tensor) -> Tensor:
    """Mean pairwise distance (m, mean over waypoints) between the candidates ``(B, C, F, 3)`` of each scene."""
    B, C = poses.shape[:2]
    if C < 2:
        return torch.zeros(B, dtype=poses.dtype)
    dist = (poses[:, :, None, :, :2] - poses[:, None, :, :, :2]).norm(dim=-1).mean(-1)
    return dist.sum((1, 2)) / (C * (C - 1))


class _PoseDecoder:
    """What :class:`~diffpilot.policy.stl_flow.RobustnessGuide` needs of a planner, for normalized plan deltas:
    the rule set, the horizon and a differentiable decoding to states ``(x, y, theta, v)``."""

    def __init__(self, planner: "TransDiffuser") -> None:
        from diffpilot.policy.stl_flow import DEFAULT_RULES
        from diffpilot.stl.rules import RuleSet

        self.planner, self.horizon, self.rules = planner, planner.F, RuleSet(list(DEFAULT_RULES))

    def decode(self, x_norm: Tensor, v0: Tensor) -> Tensor:
        p = self.planner
        deltas = p.norm.unnormalize(x_norm.reshape(x_norm.shape[0], -1)).reshape(-1, p.F, 3)
        poses = poses_from_deltas(deltas)
        speed = (deltas[..., 0].pow(2) + deltas[..., 1].pow(2) + 1e-6).sqrt() / DT
        return torch.cat([poses, speed[..., None]], dim=-1)


@register_policy("transdiffuser")
class TransDiffuser(PolicyBase):
    """Scene -> ``num_candidates`` sampled plans -> one kept plan ``(F, 3)`` (see the module docstring)."""

    Config = TransDiffuserConfig
    EMA_PART = "net"
    EXPORTABLE = True
    TINY: ClassVar[dict[str, Any]] = {"d_model": 16, "hidden": 16, "heads": 2, "layers": 1, "num_candidates": 3,
                                      "sampler_steps": 3, "num_train_steps": 20}

    def __init__(self, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(TransDiffuserConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown TransDiffuser option(s) {unknown}; valid: {sorted(TransDiffuserConfig.__dataclass_fields__)}")
        cfg = TransDiffuserConfig(**options)
        cfg.modality_order = [str(m) for m in cfg.modality_order]
        self._check(cfg)
        self.cfg = cfg
        self.config = {k: getattr(cfg, k) for k in TransDiffuserConfig.__dataclass_fields__}
        self.config["modality_order"] = list(cfg.modality_order)
        self.F = int(cfg.future_steps)
        self.objective = self._objective(cfg)
        self.sampler: Sampler = build_sampler(cfg.sampler, self.objective, cfg.sampler_steps)
        self.norm = Normalizer(3 * self.F, "gaussian")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))
            self.net = TransDiffuserNet(cfg)
        self._gen = torch.Generator().manual_seed(int(cfg.seed))
        self._memory = PlanMemory(self.F)  # the last kept plan (warm start, consistency)
        self._teacher: list[TransDiffuser] = []  # loaded on first use; a list, so it is no submodule (not saved, not trained)
        self.last_candidates: np.ndarray | None = None
        self.last_nfe = 0
        self.eval()

    @staticmethod
    def _check(cfg: TransDiffuserConfig) -> None:
        bad = [m for m in cfg.modality_order if m not in MODALITY_ORDER]
        if bad or not cfg.modality_order or len(set(cfg.modality_order)) != len(cfg.modality_order):
            raise ValueError(f"modality_order must list distinct modalities from {list(MODALITY_ORDER)}, got {cfg.modality_order}")
        if cfg.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {list(FUSIONS)}, got {cfg.fusion!r}")
        if "raster" in cfg.modality_order and not cfg.use_raster:
            raise ValueError("modality_order names 'raster' but use_raster is false; set use_raster=true or drop it")
        if cfg.objective not in SAMPLERS_FOR:
            raise ValueError(f"objective must be one of {list(SAMPLERS_FOR)}, got {cfg.objective!r}")
        if cfg.objective == "ddpm" and cfg.objective_options:
            raise ValueError("objective_options are for flow / meanflow; ddpm reads prediction and num_train_steps")
        if cfg.teacher_init and not cfg.teacher:
            raise ValueError("teacher_init starts a student from its teacher's weights; set teacher=<folder> or drop it")
        if cfg.teacher and cfg.objective == "ddpm":
            raise ValueError("teacher distils a trained planner into a flow / meanflow one; set objective=meanflow "
                             "(or flow) or drop teacher")
        if cfg.sampler not in SAMPLERS_FOR[cfg.objective]:
            raise ValueError(f"sampler {cfg.sampler!r} does not fit objective {cfg.objective!r}; use one of {SAMPLERS_FOR[cfg.objective]}")
        if cfg.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {cfg.selection!r}")
        if cfg.d_model % cfg.heads or cfg.d_model % 2:
            raise ValueError(f"d_model ({cfg.d_model}) must be even and divisible by heads ({cfg.heads})")
        ints = {"future_steps": 1, "past_steps": 0, "layers": 1, "num_candidates": 1, "sampler_steps": 1,
                "num_train_steps": 2, "hidden": 1, "warm_start_steps": 1}
        low = {k: getattr(cfg, k) for k, lo in ints.items() if int(getattr(cfg, k)) < lo}
        if low:
            raise ValueError(f"these options are too small: {low} (minimums {ints})")
        if cfg.decorrelation_weight < 0 or cfg.score_weight < 0 or cfg.teacher_jump_weight < 0:
            raise ValueError("decorrelation_weight, score_weight and teacher_jump_weight must be >= 0")
        if cfg.guidance_scale <= 0 or cfg.guidance_refine < 0:
            raise ValueError(f"guidance_scale must be > 0 and guidance_refine >= 0, got {cfg.guidance_scale}, {cfg.guidance_refine}")
        if not 0.0 < cfg.warm_start_t < 1.0:
            raise ValueError(f"warm_start_t must be in (0, 1), got {cfg.warm_start_t}")
        check_guards(cfg)

    @staticmethod
    def _objective(cfg: TransDiffuserConfig) -> Any:
        if cfg.objective == "ddpm":
            return build_objective("ddpm", num_train_steps=int(cfg.num_train_steps), prediction=cfg.prediction,
                                   clip_sample=5.0)
        defaults = MEANFLOW_DEFAULTS if cfg.objective == "meanflow" else {}
        return build_objective(cfg.objective, **{**defaults, **cfg.objective_options})

    @classmethod
    def from_options(cls, options: dict[str, Any], obs_dim: int | None = None, action_dim: int | None = None) -> "TransDiffuser":
        """Sizes come from the scene-sample spec in ``options``, not from a gym task."""
        return cls(**options)

    @property
    def spec(self) -> SampleSpec:
        return SampleSpec(past_steps=self.cfg.past_steps, future_steps=self.F)

    # ------------------------------------------------------------------ data
    def _scene_keys(self) -> tuple[str, ...]:
        return SCENE_KEYS + (("drivable",) if reads_drivable(self.cfg) else ()) + (MAP_KEYS if self.net.map_encoder else ())

    def scene_batch(self, arrays: Mapping[str, np.ndarray], index: Any = None) -> dict[str, Tensor]:
        """Rows of stacked SceneSample arrays as the encoder's tensors, checked; agents cut to past + present."""
        H = self.cfg.past_steps + 1
        if "ego_past" in arrays and np.asarray(arrays["ego_past"]).shape[1:] != (H, 3):
            raise DatasetError(
                f"ego_past has shape {np.asarray(arrays['ego_past']).shape[1:]} per sample; this planner was trained "
                f"with past_steps={self.cfg.past_steps}, i.e. ({H}, 3); build the samples with that history"
            )
        try:
            out = batch_from_arrays(arrays, index, raster=reads_drivable(self.cfg))
        except ValueError as err:
            raise DatasetError(str(err)) from None
        out["agents_pose"] = out["agents_pose"][:, :, :H].contiguous()
        out["agents_valid"] = out["agents_valid"][:, :, :H].contiguous()
        if self.net.map_encoder is not None:
            sel = slice(None) if index is None else index
            n = len(out["command"])
            for k in MAP_KEYS:
                if k not in arrays:
                    raise DatasetError(f"scene arrays lack {k!r}; rebuild them with stack_samples (map elements)")
            stops = np.asarray(arrays["stop_lines"])[sel].astype(np.float32)
            zones = np.asarray(arrays["zones"])[sel].astype(np.float32)
            if not (np.isfinite(stops).all() and np.isfinite(zones).all()):
                raise DatasetError("non-finite values in scene field 'stop_lines' or 'zones'; clean the data set first")
            out["stop_lines"] = torch.as_tensor(stops).reshape(n, -1, 2)
            out["stop_lines_valid"] = torch.as_tensor(np.asarray(arrays["stop_lines_valid"])[sel].astype(bool)).reshape(n, -1)
            out["zones"] = torch.as_tensor(zones).reshape(n, zones.shape[-3], zones.shape[-2], 2)
            out["zones_valid"] = torch.as_tensor(np.asarray(arrays["zones_valid"])[sel].astype(bool)).reshape(n, -1)
        return out

    @property
    def wants_scored_candidates(self) -> bool:
        """Whether training needs simulator-scored candidates (the learned selection head)."""
        return self.cfg.selection == "score" and self.cfg.score_weight > 0

    def training_rows(self, arrays: Mapping[str, np.ndarray], candidates: Mapping[str, np.ndarray] | None = None,
                      augmented: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The trainer's rows: scene tensors and plan deltas of every window with a complete logged future.

        ``candidates`` (``{"candidates": (W, C, F, 3), "scores": (W, C, 6)}`` aligned with ``arrays``,
        optionally ``"valid"`` (W,) for windows that were scored) adds the score head's targets. ``augmented`` (:func:`diffpilot.planning.augment.read_augmented`
        output over the same arrays) adds one row per optimized trajectory, on its window's scene.
        """
        if "ego_future" not in arrays:
            raise DatasetError(f"arrays lack 'ego_future' (have {sorted(arrays)}); pass stack_samples(...) output")
        fut = np.asarray(arrays["ego_future"], dtype=np.float64)
        if fut.shape[1:] != (self.F, 3):
            raise DatasetError(f"ego_future has shape {fut.shape[1:]} per sample, this planner predicts ({self.F}, 3); "
                               f"construct it with future_steps={fut.shape[1]}")
        valid = np.asarray(arrays.get("ego_future_valid", np.ones(fut.shape[:2], bool)), dtype=bool).all(axis=1)
        keep = np.flatnonzero(valid & np.isfinite(fut).all(axis=(1, 2)))
        if not len(keep):
            raise DatasetError("no window has a complete logged future; use longer scenes or fewer future steps")
        targets = fut[keep]
        if augmented is not None:
            window, traj = self._augmented_rows(augmented, len(fut))
            keep = np.concatenate([keep, window])
            targets = np.concatenate([targets, traj])
        rows = {k: v.numpy() for k, v in self.scene_batch(arrays, keep).items()
                if k != "drivable" or self.cfg.use_raster}  # the drivable check reads the raster at plan time only
        rows["deltas"] = deltas_from_poses(targets).reshape(len(keep), -1).astype(np.float32)
        if candidates is not None:
            cand, scores = np.asarray(candidates["candidates"]), np.asarray(candidates["scores"])
            W = len(fut)
            if cand.ndim != 4 or cand.shape[0] != W or cand.shape[2:] != (self.F, 3) or scores.shape != (*cand.shape[:2], len(SUBSCORES)):
                raise DatasetError(f"scored candidates must be (W={W}, C, {self.F}, 3) with scores (W, C, {len(SUBSCORES)}), "
                                   f"got {cand.shape} and {scores.shape}")
            rows["cand_poses"] = cand[keep].astype(np.float32)
            rows["cand_scores"] = np.clip(scores[keep], 0.0, 1.0).astype(np.float32)
            rows["cand_valid"] = np.asarray(candidates.get("valid", np.ones(W, bool)), dtype=np.float32)[keep]
        return rows

    def _augmented_rows(self, augmented: Mapping[str, np.ndarray], num_windows: int) -> tuple[np.ndarray, np.ndarray]:
        """``(window index, ego-frame poses (n, F, 3))`` of every augmented trajectory, checked against the arrays."""
        missing = [k for k in ("window", "trajectories") if k not in augmented]
        if missing:
            raise DatasetError(f"augmented data lacks {missing}; pass diffpilot.planning.augment.read_augmented(<dir>)")
        window = np.asarray(augmented["window"], dtype=np.int64).reshape(-1)
        traj = np.asarray(augmented["trajectories"], dtype=np.float64)
        if traj.ndim != 3 or traj.shape[0] != len(window) or traj.shape[1] < self.F or traj.shape[2] < 3:
            raise DatasetError(f"augmented trajectories must be (n={len(window)}, T>={self.F}, >=3), got {traj.shape}; "
                               f"augment with horizon={self.F}")
        if len(window) and (window.min() < 0 or window.max() >= num_windows):
            raise DatasetError(f"augmented windows index up to {window.max()}, but the scene arrays have {num_windows} "
                               "windows: augment the same root, split and sample spec the planner trains on")
        traj = traj[:, : self.F, :3]
        ok = np.isfinite(traj).all(axis=(1, 2))
        return window[ok], traj[ok]

    def fit_to_batch(self, rows: Mapping[str, np.ndarray | Tensor]) -> None:
        """Fit the plan normalizer on the training deltas."""
        self.norm.load_state_dict(Normalizer.fit(np.asarray(rows["deltas"], dtype=np.float64), "gaussian").state_dict())

    # ------------------------------------------------------------------ training
    def load_teacher(self) -> "TransDiffuser | None":
        """The frozen planner of ``teacher``, checked (kind, plan size); None without one.

        The trainer calls it before any data work, so a wrong path fails first.
        """
        if not self.cfg.teacher:
            return None
        if not self._teacher:
            try:
                teacher = type(self).load(Path(self.cfg.teacher).expanduser())
            except CheckpointError as e:
                raise CheckpointError(f"teacher: {e}") from None
            if teacher.F != self.F:
                raise CheckpointError(f"teacher {self.cfg.teacher} plans {teacher.F} waypoints, this planner {self.F}; "
                                      "distil from a planner with the same future_steps")
            self._teacher.append(teacher.eval().requires_grad_(False))
        return self._teacher[0]

    @torch.no_grad()
    def start_from_teacher(self) -> list[str]:
        """With ``teacher_init``, copy the teacher's weights into every parameter and buffer of the same name and
        shape (its encoders, embeddings and score head; its first decoder layers where the fusion matches), so the
        student starts from a trained scene encoding. Returns the names copied; the trainer calls it once, before
        a resumed checkpoint would overwrite them."""
        teacher = self.load_teacher()
        if teacher is None or not self.cfg.teacher_init:
            return []
        own = self.net.state_dict()
        theirs = {k: v for k, v in teacher.net.state_dict().items() if k in own and own[k].shape == v.shape}
        self.net.load_state_dict(theirs, strict=False)
        return sorted(theirs)

    @torch.no_grad()
    def _teacher_plans(self, teacher: "TransDiffuser", batch: Mapping[str, Tensor], noise: Tensor) -> Tensor:
        """The teacher's sample of each row's ``noise`` (B, F, 3), in this planner's normalized deltas."""
        teacher.to(noise.device)  # not a submodule: it follows the batch, not ``self.to``
        cond = teacher.net.encode(batch)
        x = teacher.sampler.sample(teacher.net.denoiser(cond), noise, cond).sample
        deltas = teacher.norm.unnormalize(x.reshape(len(x), -1))
        return self.norm.normalize(deltas).reshape(-1, self.F, 3)

    def compute_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Denoising loss + ``decorrelation_weight`` x decorrelation (+ ``score_weight`` x score-head BCE).

        With a ``teacher`` the generative loss is taken on the teacher's coupling: each drawn noise is paired
        with the teacher's plan of it, not with the logged plan. For MeanFlow, ``teacher_jump_weight`` adds the
        jump the one-step sampler makes, from ``t = 1`` to ``r = 0``, regressed straight onto that plan: on a
        deterministic coupling it is the exact average velocity, and uniform ``(r, t)`` draws come near it rarely.
        """
        cond = self.net.encode(batch)
        x0 = self.norm.normalize(batch["deltas"]).reshape(-1, self.F, 3)
        target, noise = x0, None
        teacher = self.load_teacher()
        if teacher is not None:
            noise = shard.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            target = self._teacher_plans(teacher, batch, noise)
        if isinstance(self.objective, MeanFlow):  # the loss runs the network under jvp: take the features of a plain pass
            gen_loss = self.objective.loss(self.net, target, cond, generator=generator, noise=noise)
            t = shard.rand(x0.shape[0], generator=generator)
            fused = self.net.decode(x0 + t[:, None, None] * shard.randn(x0.shape, generator=generator), t, cond)[1]
        else:
            capture = _FusedCapture(self.net)
            gen_loss = self.objective.loss(capture, target, cond, generator=generator, noise=noise)
            fused = capture.fused
        decor = decorrelation_loss(fused)
        loss = gen_loss + self.cfg.decorrelation_weight * decor
        metrics = {"denoise": float(gen_loss.detach()), "decorrelation": float(decor.detach())}
        if noise is not None and isinstance(self.objective, MeanFlow) and self.cfg.teacher_jump_weight > 0:
            ones = noise.new_ones(noise.shape[0])
            jump = F.mse_loss(noise - self.net(noise, ones, cond, torch.zeros_like(ones)), target)
            loss = loss + self.cfg.teacher_jump_weight * jump
            metrics["teacher_jump"] = float(jump.detach())
        if "cand_poses" in batch and self.cfg.score_weight > 0:
            logits = self.net.scores(self.net.context(cond), batch["cand_poses"])
            per_row = F.binary_cross_entropy_with_logits(logits, batch["cand_scores"], reduction="none").mean((1, 2))
            w = batch["cand_valid"] if "cand_valid" in batch else torch.ones_like(per_row)
            score_loss = (per_row * w).sum() / shard.shard_mean(w.sum()).clamp_min(1.0)
            loss = loss + self.cfg.score_weight * score_loss
            metrics["score_bce"] = float(score_loss.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        from diffpilot.data.scene_sample import example_scene_arrays

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        arrays = example_scene_arrays(batch_size, seed=seed, spec=self.spec)
        arrays["ego_future_valid"] = np.ones_like(arrays["ego_future_valid"])
        C = 3
        rng = np.random.default_rng(seed)
        cand = np.asarray(arrays["ego_future"])[:, None] + rng.normal(0, 1.0, (batch_size, C, self.F, 3)) * [1, 1, 0.1]
        scores = rng.uniform(0, 1, (batch_size, C, len(SUBSCORES)))
        rows = self.training_rows(arrays, {"candidates": cand, "scores": scores})
        return {k: torch.as_tensor(v) for k, v in rows.items()}

    # ------------------------------------------------------------------ sampling
    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.cfg.num_candidates, self.F, 3)

    def _guide(self, arrays: Mapping[str, np.ndarray], C: int) -> Any:
        """The STL robustness guide of one planning call (default rule parameters, the command's mode)."""
        from diffpilot.data.scenario import mode_from_command
        from diffpilot.policy.stl_flow import GuidanceConfig, RobustnessGuide

        decoder = _PoseDecoder(self)
        modes = mode_from_command(np.asarray(arrays["command"]))
        cfg = GuidanceConfig(scale=self.cfg.guidance_scale, refine=self.cfg.guidance_refine, steps=(-1,))
        return RobustnessGuide(decoder, arrays, np.arange(len(modes)), decoder.rules.defaults(), modes, C, cfg)

    def _candidates(self, cond: TokenSets, noise: Tensor, previous: Tensor | None = None,
                    guide: Any = None, sampler: Sampler | None = None) -> tuple[Tensor, int]:
        """Candidate poses ``(B, C, F, 3)`` from noise ``(B, C, F, 3)``; ``previous`` (B, F, 3) poses warm-start them;
        ``guide`` steers the last sampler step and refines the final samples (no extra network evaluations)."""
        from diffpilot.policy.stl_flow import GuidanceHook

        B, C = noise.shape[:2]
        sampler = self.sampler if sampler is None else sampler
        flat = noise.reshape(B * C, self.F, 3).to(self.norm.scale.dtype)
        hook = None
        if guide is not None:
            hook = GuidanceHook(guide, sampler.num_steps, guide.config.steps,
                                move_sample=not isinstance(self.objective, DDPM))
        denoiser = self.net.denoiser(cond, C)  # the sampler's rows: C per scene
        if previous is None:
            res = sampler.sample(denoiser, flat, cond, hook=hook)
        else:
            guess = self.norm.normalize(self._deltas_t(previous).reshape(B, -1)).reshape(B, 1, self.F, 3)
            guess = guess.expand(B, C, self.F, 3).reshape(B * C, self.F, 3)
            starter = WarmStarter(self.objective, sampler,
                                  WarmStartConfig(self.cfg.warm_start_t, True, self.cfg.warm_start_steps))
            res = starter.sample(denoiser, guess, 0, flat, cond, hook=hook)
        sample = res.sample
        if guide is not None:
            sample = guide.refine(sample)[0]
        deltas = self.norm.unnormalize(sample.reshape(B * C, -1)).reshape(B, C, self.F, 3)
        return poses_from_deltas(deltas), res.nfe

    @staticmethod
    def _deltas_t(poses: Tensor) -> Tensor:
        prev = torch.cat([torch.zeros_like(poses[:, :1]), poses[:, :-1]], dim=1)
        d = poses - prev
        return torch.cat([d[..., :2], torch.atan2(torch.sin(d[..., 2:]), torch.cos(d[..., 2:]))], dim=-1)

    def plan_candidates(self, batch: Mapping[str, Tensor], noise: Tensor, previous: Tensor | None = None,
                        guide: Any = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """``(candidates (B, C, F, 3), kept index (B,), predicted PDMS (B, C) or None, clearance half-steps (B, C) or
        None, the candidates the guards allow (B, C) or None)`` for a scene batch."""
        self._check_batch(batch, noise)
        cond = self.net.encode(batch)
        cands, nfe = self._candidates(cond, noise, previous, guide)
        self.last_nfe = nfe
        pdms = None
        if self.cfg.selection == "score":
            pdms = pdms_from_subscores(torch.sigmoid(self.net.scores(self.net.context(cond), cands)))
        clear = candidate_clearance(self.cfg, batch, cands)
        ok = clearest(clear, candidate_offroad(self.cfg, batch, cands))
        return cands, select_candidates(cands, self.cfg.selection, pdms, ok), pdms, clear, ok

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """The kept plan ``(B, F, 3)`` (ego-frame poses, heading unwrapped) for a scene batch; ``noise`` fixes the draw."""
        B = batch["ego_status"].shape[0]
        if noise is None:
            noise = torch.randn(self.noise_shape(B), generator=self._gen)
        cands, idx, _, clear, _ = self.plan_candidates(batch, noise)
        return self.kept(cands, idx, clear, batch["ego_status"][:, 0])

    def kept(self, cands: Tensor, idx: Tensor, clear: Tensor | None = None, speed: Tensor | None = None) -> Tensor:
        """The plans ``(B, F, 3)`` kept from ``cands`` at ``idx``, through the guards (:func:`guard_kept`; ``speed``:
        the car's speed now, for ``accel_limit``)."""
        return guard_kept(self.cfg, cands, idx, clear, speed)

    def _check_batch(self, batch: Mapping[str, Tensor], noise: Tensor) -> None:
        missing = [k for k in self._scene_keys() if k not in batch]
        if missing:
            raise DatasetError(f"scene batch lacks {missing}; build it with TransDiffuser.scene_batch(arrays)")
        for k, v in batch.items():
            if torch.is_floating_point(v) and not torch.isfinite(v).all():
                raise DatasetError(f"non-finite values in scene field {k!r}; clean the input first")
        B = batch["ego_status"].shape[0]
        if tuple(noise.shape) != self.noise_shape(B):
            raise ValueError(f"noise must have shape {self.noise_shape(B)} (batch, candidates, steps, 3), got {tuple(noise.shape)}")

    # ------------------------------------------------------------------ acting
    def reset(self, seed: int | None = None) -> None:
        """Forget the previous plan (warm start); ``seed`` reseeds the candidate noise."""
        self._memory.clear()
        if seed is not None:
            self._gen.manual_seed(int(seed))

    @torch.no_grad()
    def plan_batch(self, arrays: Mapping[str, np.ndarray], noise: Tensor | None = None) -> np.ndarray:
        """Kept plans ``(B, F, 3)`` (heading wrapped) for stacked SceneSample arrays; no warm start."""
        batch = self.scene_batch(arrays)
        B = len(batch["command"])
        noise = torch.randn(self.noise_shape(B), generator=self._gen) if noise is None else noise
        guide = self._guide(arrays, self.cfg.num_candidates) if self.cfg.guidance else None
        cands, idx, _, clear, _ = self.plan_candidates(batch, noise, guide=guide)
        self.last_candidates = cands.double().numpy()
        out = self.kept(cands, idx, clear, batch["ego_status"][:, 0]).double().numpy()
        out[..., 2] = wrap_angle(out[..., 2])
        return out

    @torch.no_grad()
    def plan(self, sample: SceneSample, noise: Tensor | np.ndarray | None = None) -> np.ndarray:
        """Ego-frame poses ``(F, 3)`` from what the car knows now, and (warm start, consistency) the last plan;
        ``noise`` (1, C, F, 3) fixes the draw (as the runtime's ``plan``)."""
        from diffpilot.data.scene_sample import stack_samples

        arrays = stack_samples([sample])
        batch = self.scene_batch(arrays)
        noise = torch.randn(self.noise_shape(1), generator=self._gen) if noise is None else \
            torch.as_tensor(np.asarray(noise, dtype=np.float32)).reshape(self.noise_shape(1))
        origin = np.asarray(sample.ego_pose_global, dtype=np.float64)
        remembered = self.cfg.warm_start or self.cfg.consistency
        last = self._memory.shifted(origin, float(sample.frame)) if remembered else None
        shifted = None if last is None else torch.as_tensor(last[0][None], dtype=torch.float32)
        guide = self._guide(arrays, self.cfg.num_candidates) if self.cfg.guidance else None
        cands, idx, _, clear, ok = self.plan_candidates(batch, noise, shifted if self.cfg.warm_start else None, guide)
        if self.cfg.consistency and last is not None:
            covered = torch.as_tensor(last[1][None] & self._memory.moving)
            idx = keep_course(cands, idx, shifted, covered, float(self.cfg.hold_below_m), ok)
        self.last_candidates = cands[0].double().numpy()
        out = self.kept(cands, idx, clear, batch["ego_status"][:, 0])[0].double().numpy()
        out[:, 2] = wrap_angle(out[:, 2])
        if remembered:
            self._memory.remember(out, origin, float(sample.frame))
        return out

    # ------------------------------------------------------------------ export
    def export_spec(self, sampler: dict[str, Any] | None = None, *, num_agents: int | None = None,
                    num_lanes: int | None = None, lane_points: int | None = None,
                    raster_size: int | None = None) -> ExportSpec:
        """Encoder, sampler over all candidates and selection as one graph (form ``poses``): scene + noise -> plan.

        Inputs: the scene tensors (agents cut to the past and present), the map
        elements when the planner fuses them, and ``noise`` (B, C, F, 3);
        output ``poses`` (B, F, 3). With ``consistency`` the graph also reads the last plan
        shifted into the current frame, ``previous`` (B, F, 3), and the waypoints it covers,
        ``previous_covered`` (B, F) bool (all False: none); the runtime keeps them. Warm start
        stays in torch. ``sampler`` ({'name': ..., 'num_steps': ...}) overrides the sampler.
        """
        from diffpilot.policy.stl_flow import _random_scene

        spec = SampleSpec()
        K, L, N, R = scene_export_sizes(num_agents, num_lanes, lane_points, raster_size, reads_drivable(self.cfg))
        built = self.sampler
        if sampler:
            cfg = dict(sampler)
            if "name" not in cfg:
                raise ValueError(f"sampler override needs a 'name' key, e.g. {{'name': 'ddim', 'num_steps': 5}}; got {cfg}")
            built = build_sampler(cfg.pop("name"), self.objective, **cfg)
        if stochastic_sampler(built):
            raise ValueError("this sampler draws fresh noise at every step: no deterministic graph; "
                             "export with sampler={'name': 'ddim', 'num_steps': 10}")
        H, C, maps = self.cfg.past_steps + 1, self.cfg.num_candidates, self.net.map_encoder is not None
        S, Z, V = spec.num_stop_lines, spec.num_zones, spec.zone_vertices

        def feeds(b: int, g: torch.Generator) -> dict[str, Tensor]:
            out = _random_scene(b, g, H, K, L, N, R)
            if maps:
                out["stop_lines"] = torch.randn(b, S, 2, generator=g) * 20.0
                out["stop_lines_valid"] = torch.rand(b, S, generator=g) < 0.5
                out["zones"] = torch.randn(b, Z, 1, 2, generator=g) * 20.0 + torch.randn(b, Z, V, 2, generator=g) * 2.0
                out["zones_valid"] = torch.rand(b, Z, generator=g) < 0.5
            if self.cfg.consistency:
                out["previous"] = torch.randn(b, self.F, 3, generator=g) * 10.0
                out["previous_covered"] = torch.arange(self.F)[None] < torch.randint(0, self.F, (b, 1), generator=g)
            out["noise"] = torch.randn(b, C, self.F, 3, generator=g)
            return out

        graph = _PosesGraph(self, built)
        with torch.no_grad():
            probe = feeds(1, torch.Generator().manual_seed(0))
            graph(**probe)  # sets graph.nfe
        meta = poses_metadata(self.KIND, (C, self.F, 3), self.F, self.cfg.past_steps, (K, L, N, R),
                              {"name": type(built).__name__, "num_steps": built.num_steps},
                              map_elements="true" if maps else "false", num_stop_lines=str(S), num_zones=str(Z),
                              zone_vertices=str(V), selection=self.cfg.selection,
                              consistency="true" if self.cfg.consistency else "false")
        return ExportSpec(graph=graph, feeds=feeds, outputs=("poses",), metadata=meta, nfe=graph.nfe)


class _PosesGraph(nn.Module):
    """Scene tensors (+ map elements) + noise -> the kept plan ``(B, F, 3)``: ``predict`` as one graph."""

    def __init__(self, planner: TransDiffuser, sampler: Sampler) -> None:
        super().__init__()
        self.planner, self.sampler, self.nfe = planner, sampler, 0

    def forward(self, *, ego_status: Tensor, command: Tensor, ego_past: Tensor, agents_pose: Tensor,
                agents_valid: Tensor, agents_size: Tensor, agents_category: Tensor, lanes: Tensor, lanes_valid: Tensor,
                drivable: Tensor | None = None, stop_lines: Tensor | None = None, stop_lines_valid: Tensor | None = None,
                zones: Tensor | None = None, zones_valid: Tensor | None = None, previous: Tensor | None = None,
                previous_covered: Tensor | None = None, noise: Tensor) -> Tensor:
        inputs = {"ego_status": ego_status, "command": command, "ego_past": ego_past, "agents_pose": agents_pose,
                  "agents_valid": agents_valid, "agents_size": agents_size, "agents_category": agents_category,
                  "lanes": lanes, "lanes_valid": lanes_valid}
        extra = {"drivable": drivable, "stop_lines": stop_lines, "stop_lines_valid": stop_lines_valid, "zones": zones,
                 "zones_valid": zones_valid}
        inputs.update({k: v for k, v in extra.items() if v is not None})
        p = self.planner
        cond = p.net.encode(inputs)
        cands, self.nfe = p._candidates(cond, noise, sampler=self.sampler)
        pdms = None
        if p.cfg.selection == "score":
            pdms = pdms_from_subscores(torch.sigmoid(p.net.scores(p.net.context(cond), cands)))
        clear = candidate_clearance(p.cfg, inputs, cands)
        ok = clearest(clear, candidate_offroad(p.cfg, inputs, cands))
        idx = select_candidates(cands, p.cfg.selection, pdms, ok)
        if previous is not None and previous_covered is not None:
            idx = keep_course(cands, idx, previous, previous_covered, float(p.cfg.hold_below_m), ok)
        return p.kept(cands, idx, clear, ego_status[:, 0])
