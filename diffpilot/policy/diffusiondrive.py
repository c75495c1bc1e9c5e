"""Truncated anchor diffusion planner (DiffusionDrive, Liao et al., CVPR 2025) as a registered driving kind.

A diffusion planner that starts from pure noise spends most of its steps
rediscovering the few shapes ego futures take. Here ``num_anchors`` k-means
centres of logged ego futures (a buffer, saved with the weights) stand in for
those shapes: training noises every anchor lightly (a step drawn from
``0 .. train_max_step - 1`` of a ``num_train_steps`` scaled-linear chain, on
normalized x, y) and teaches a cascade of decoder layers to turn each noisy
anchor into a plan (x0-prediction) and to score it; inference noises the
anchors to step ``trunc_step`` and runs ``sampler_steps`` DDIM steps, then
keeps the plan of the best-scored mode (no oracle).

Each decoder layer lets every mode's trajectory token cross-attend, in turn,
to the map (lane tokens, plus raster tokens when the encoder has a raster; the
query carries an encoding of the mode's current trajectory points, our
stand-in for sampling a BEV map at those points), to the agents and to the
ego tokens, then applies an FFN and a timestep scale/shift (FiLM). Its heads
give a score per mode and per-mode pose offsets; the next layer starts from
the refined poses. Losses, summed over layers: sigmoid focal loss on the
scores with the mode whose anchor is nearest the logged future as the
positive (``cls_weight``), and L1 on that mode's poses only (``reg_weight``).

Every token group gets one learned, always-valid null token before attention,
so a scene without agents or lanes gives no NaN. Only the past and present
are read (the encoder cuts agents' poses to ``past_steps + 1`` columns; ego
future columns are never read by ``plan``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffpilot.data.errors import DatasetError
from diffpilot.data.normalizer import Normalizer
from diffpilot.data.scenario import SampleSpec, SceneSample
from diffpilot.policy.base import OptimGroup, PolicyBase
from diffpilot.policy.export_spec import ExportSpec, poses_metadata, scene_export_sizes
from diffpilot.policy.generative import shard
from diffpilot.policy.generative import build_objective
from diffpilot.policy.kinds import register_policy
from diffpilot.policy.plan_guards import (GuardConfig, candidate_clearance, candidate_offroad, check_guards, clearest,
                                         guard_kept, reads_drivable)
from diffpilot.policy.networks.scene_encoder import SCENE_KEYS, SceneEncoder, batch_from_arrays

__all__ = ["DiffusionDriveConfig", "DiffusionDrivePlanner", "cluster_anchors", "load_anchors", "plot_anchors",
           "save_anchors", "sigmoid_focal_loss"]

ANCHORS_KEY = "anchors"
"""The array name inside an anchors ``.npz`` file."""
_FREQS = 4
"""Fourier frequencies per normalized coordinate in a trajectory's encoding."""


# --------------------------------------------------------------------------- anchors


def _complete_futures(arrays: Mapping[str, Any]) -> np.ndarray:
    """The logged futures ``(n, F, 3)`` whose every waypoint is valid (k-means needs whole trajectories)."""
    if "ego_future" not in arrays:
        raise DatasetError(f"arrays lack 'ego_future' (have {sorted(arrays)}); pass stack_samples(...) or "
                           "load_scene_samples(...) output")
    fut = np.asarray(arrays["ego_future"], dtype=np.float64)
    if fut.ndim != 3 or fut.shape[2] != 3:
        raise DatasetError(f"ego_future must be (B, F, 3), got {fut.shape}")
    valid = np.asarray(arrays.get("ego_future_valid", np.ones(fut.shape[:2], bool)), dtype=bool)
    if valid.shape != fut.shape[:2]:
        raise DatasetError(f"ego_future_valid must be {fut.shape[:2]} like ego_future, got {valid.shape}")
    fut = fut[valid.all(axis=1)]
    if not np.isfinite(fut).all():
        raise DatasetError("non-finite values in ego_future; clean the data set first")
    return fut


def cluster_anchors(arrays: Mapping[str, Any], k: int = 20, seed: int = 0, restarts: int = 4) -> np.ndarray:
    """``k`` anchor trajectories ``(k, F, 3)``: k-means on the x, y of complete logged ego futures.

    Each anchor's heading is the circular mean of its members' headings.
    The best of ``restarts`` k-means++ runs (least within-cluster squared
    distance) is kept; anchors are sorted by final x, then y, so a given data
    set and seed always give the same order.
    """
    from scipy.cluster.vq import ClusterError, kmeans2

    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    fut = _complete_futures(arrays)
    n, steps = fut.shape[0], fut.shape[1]
    points = fut[:, :, :2].reshape(n, -1)
    distinct = len(np.unique(np.round(points, 6), axis=0)) if n else 0
    if distinct < k:
        raise DatasetError(f"only {distinct} distinct complete ego futures to cluster into k={k} anchors; "
                           f"lower k (k<={max(distinct, 1)}) or use more scenes")
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(max(1, int(restarts))):
        try:
            centres, labels = kmeans2(points, int(k), iter=50, minit="++", missing="raise", seed=rng)
        except ClusterError:
            continue
        cost = float(((points - centres[labels]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = (centres, labels), cost
    if best is None:
        raise DatasetError(f"k-means left a cluster empty in every restart for k={k}; lower k or use more scenes")
    centres, labels = best
    anchors = np.zeros((int(k), steps, 3))
    anchors[:, :, :2] = centres.reshape(int(k), steps, 2)
    for j in range(int(k)):
        h = fut[labels == j, :, 2]
        anchors[j, :, 2] = np.arctan2(np.sin(h).mean(0), np.cos(h).mean(0))
    order = np.lexsort((anchors[:, -1, 1], anchors[:, -1, 0]))
    return anchors[order]


def save_anchors(path: str | os.PathLike[str], anchors: np.ndarray) -> Path:
    """Write ``anchors`` ``(k, F, 3)`` to an ``.npz`` (a temporary file renamed into place)."""
    path = Path(path)
    anchors = np.asarray(anchors, dtype=np.float64)
    if anchors.ndim != 3 or anchors.shape[2] != 3 or not np.isfinite(anchors).all():
        raise ValueError(f"anchors must be finite (k, F, 3), got shape {anchors.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{ANCHORS_KEY: anchors})
    tmp.replace(path)
    return path


def load_anchors(path: str | os.PathLike[str]) -> np.ndarray:
    """Anchors ``(k, F, 3)`` from a file written by ``diffpilot driving anchors`` (no pickles are read)."""
    path = Path(path).expanduser()
    fix = "write one with `diffpilot driving anchors k=20 out=DIR` and pass anchors=DIR/anchors.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no anchors file at {path}; {fix}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if ANCHORS_KEY not in f.files:
                raise DatasetError(f"{path} has no {ANCHORS_KEY!r} array (has {f.files}); {fix}")
            anchors = np.asarray(f[ANCHORS_KEY], dtype=np.float64)
    except (OSError, ValueError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"{path} is not a readable anchors .npz ({str(err).splitlines()[0]}); {fix}") from None
    if anchors.ndim != 3 or anchors.shape[2] != 3 or len(anchors) < 1:
        raise DatasetError(f"{path} holds anchors of shape {anchors.shape}, expected (k, F, 3); {fix}")
    if not np.isfinite(anchors).all():
        raise DatasetError(f"{path} holds non-finite anchors; {fix}")
    return anchors


def plot_anchors(anchors: np.ndarray, path: str | os.PathLike[str], futures: np.ndarray | None = None) -> Path:
    """A bird's-eye PNG of the anchors (x forward, up), over a sample of logged futures when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 6), dpi=110)
    if futures is not None and len(futures):
        pick = np.random.default_rng(0).permutation(len(futures))[:500]
        for f in futures[pick]:
            ax.plot(-f[:, 1], f[:, 0], color="0.85", lw=0.6, zorder=1)
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(anchors), 1)))
    for j, a in enumerate(anchors):
        ax.plot(-np.r_[0.0, a[:, 1]], np.r_[0.0, a[:, 0]], "-o", ms=2.5, lw=1.4, color=colors[j], zorder=2)
    ax.set_xlabel("left  <-  lateral (m)  ->  right")
    ax.set_ylabel("forward (m)")
    ax.set_title(f"{len(anchors)} k-means anchors of logged ego futures")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- network parts


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Mean sigmoid focal loss (Lin et al.): easy negatives (most modes) weigh little next to the one positive."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1.0 - p) * (1.0 - targets)
    a_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    return (a_t * ce * (1.0 - p_t) ** gamma).mean()


def _wrap(angle: Tensor) -> Tensor:
    """Angles to (-pi, pi] without control flow (exports as plain ops)."""
    return torch.atan2(torch.sin(angle), torch.cos(angle))


def _trajectory_features(xy_norm: Tensor, heading: Tensor) -> Tensor:
    """``(..., F, 2)`` normalized positions + ``(..., F)`` headings -> ``(..., F * (4 * _FREQS + 4))`` features."""
    freqs = (2.0 ** torch.arange(_FREQS, dtype=xy_norm.dtype)) * math.pi
    ang = xy_norm[..., None] * freqs  # (..., F, 2, FREQS)
    feats = torch.cat([ang.sin().flatten(-2), ang.cos().flatten(-2), xy_norm,
                       torch.stack([heading.cos(), heading.sin()], dim=-1)], dim=-1)
    return feats.flatten(-2)


def _timestep_embedding(k: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``(B, dim)`` of diffusion steps ``k`` ``(B,)`` (float)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=k.dtype) / max(half, 1))
    args = k[:, None] * freqs
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


class _CrossAttention(nn.Module):
    """Residual cross-attention from mode tokens to one token set; a learned null token keeps every row finite."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.null = nn.Parameter(torch.randn(1, 1, d) * 0.02)

    def forward(self, x: Tensor, query: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        B = tokens.shape[0]
        kv = torch.cat([self.null.expand(B, -1, -1).to(tokens.dtype), tokens], dim=1)
        m = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)
        out = self.attn(self.norm(query), kv, kv, key_padding_mask=m, need_weights=False)[0]
        return x + out


class _DecoderLayer(nn.Module):
    """Map -> agents -> ego cross-attention, FFN, timestep FiLM; heads for a score and pose offsets per mode."""

    def __init__(self, d: int, heads: int, ffn: int, traj_in: int, horizon: int) -> None:
        super().__init__()
        self.horizon = horizon
        self.points = nn.Sequential(nn.Linear(traj_in, d), nn.GELU(), nn.Linear(d, d))
        self.map_attn = _CrossAttention(d, heads)
        self.agent_attn = _CrossAttention(d, heads)
        self.ego_attn = _CrossAttention(d, heads)
        self.ffn = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        nn.init.zeros_(self.film[1].weight)
        nn.init.zeros_(self.film[1].bias)
        self.cls_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.reg_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 3 * horizon))
        with torch.no_grad():  # start near "keep the reference trajectory"
            self.reg_head[-1].weight.mul_(0.1)
            self.reg_head[-1].bias.zero_()

    def forward(self, feat: Tensor, traj: Tensor, temb: Tensor,
                scene: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        B, M = feat.shape[:2]
        pos = self.points(traj)
        feat = self.map_attn(feat, feat + pos, *scene["map"])
        feat = self.agent_attn(feat, feat + pos, *scene["agents"])
        feat = self.ego_attn(feat, feat + pos, *scene["ego"])
        feat = feat + self.ffn(feat)
        scale, shift = self.film(temb)[:, None].chunk(2, dim=-1)
        feat = feat * (1.0 + scale) + shift
        logits = self.cls_head(feat)[..., 0]
        delta = self.reg_head(feat).reshape(B, M, self.horizon, 3)
        return feat, logits, delta


# --------------------------------------------------------------------------- the planner


@dataclass
class DiffusionDriveConfig(GuardConfig):
    """``conf/policy/diffusiondrive_planner.yaml``; the guards (hold, clearance) of :class:`GuardConfig`."""

    future_steps: int = SampleSpec.future_steps
    past_steps: int = SampleSpec.past_steps
    num_anchors: int = 20
    anchors: str | None = None  # an anchors .npz from `diffpilot driving anchors`; None: k-means on the training rows
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    ffn: int = 256
    encoder_hidden: int = 128
    use_raster: bool = False
    raster_tokens: int = 4
    num_train_steps: int = 1000
    train_max_step: int = 50
    trunc_step: int = 8
    sampler_steps: int = 2
    cls_weight: float = 10.0
    reg_weight: float = 8.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    seed: int = 0


@register_policy("diffusiondrive_planner")
class DiffusionDrivePlanner(PolicyBase):
    """Scene -> ``num_anchors`` denoised candidate plans with scores -> the best-scored plan ``(F, 3)``."""

    Config = DiffusionDriveConfig
    EXPORTABLE = True
    TINY: ClassVar[dict[str, Any]] = {"num_anchors": 4, "d_model": 16, "heads": 2, "layers": 2, "ffn": 32,
                                      "encoder_hidden": 16}

    def __init__(self, **options: Any) -> None:
        super().__init__()
        cfg = DiffusionDriveConfig(**options)
        self._check(cfg)
        self.cfg = cfg
        self.config = dict(vars(cfg))
        self.F, self.M = int(cfg.future_steps), int(cfg.num_anchors)
        self.ddpm = build_objective("ddpm", num_train_steps=int(cfg.num_train_steps), schedule="scaled_linear",
                                    prediction="sample")
        n, top = int(cfg.sampler_steps), int(cfg.trunc_step)
        self.steps = [int(round(top * (n - i) / n)) for i in range(n)]  # e.g. [8, 4]: noise level of each call
        self._abar = [float(a) for a in self.ddpm.alphas_cumprod.double()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))
            d = int(cfg.d_model)
            traj_in = self.F * (4 * _FREQS + 4)
            self.encoder = SceneEncoder(d_model=d, past_steps=int(cfg.past_steps), hidden=int(cfg.encoder_hidden),
                                        use_raster=bool(cfg.use_raster), raster_tokens=int(cfg.raster_tokens))
            self.traj_in = nn.Sequential(nn.Linear(traj_in, d), nn.GELU(), nn.Linear(d, d))
            self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
            self.decoder = nn.ModuleList(
                _DecoderLayer(d, int(cfg.heads), int(cfg.ffn), traj_in, self.F) for _ in range(int(cfg.layers)))
        self.traj_norm = Normalizer(2, "limits")
        self.register_buffer("anchors", torch.zeros(self.M, self.F, 3))
        self._rng = torch.Generator().manual_seed(int(cfg.seed))
        self.eval()

    @staticmethod
    def _check(cfg: DiffusionDriveConfig) -> None:
        problems = []
        if cfg.future_steps < 1 or cfg.past_steps < 0:
            problems.append(f"future_steps >= 1 and past_steps >= 0 (got {cfg.future_steps}, {cfg.past_steps})")
        if cfg.num_anchors < 1:
            problems.append(f"num_anchors >= 1 (got {cfg.num_anchors})")
        if cfg.d_model < 1 or cfg.heads < 1 or cfg.d_model % cfg.heads:
            problems.append(f"d_model divisible by heads (got d_model={cfg.d_model}, heads={cfg.heads})")
        if cfg.layers < 1 or cfg.ffn < 1 or cfg.encoder_hidden < 1:
            problems.append(f"layers, ffn, encoder_hidden >= 1 (got {cfg.layers}, {cfg.ffn}, {cfg.encoder_hidden})")
        if not 1 <= cfg.train_max_step <= cfg.num_train_steps:
            problems.append(f"1 <= train_max_step <= num_train_steps (got {cfg.train_max_step}, {cfg.num_train_steps})")
        if not 0 <= cfg.trunc_step < cfg.num_train_steps:
            problems.append(f"0 <= trunc_step < num_train_steps (got {cfg.trunc_step})")
        if not 1 <= cfg.sampler_steps <= max(cfg.trunc_step, 1):
            problems.append(f"1 <= sampler_steps <= max(trunc_step, 1) (got {cfg.sampler_steps}, trunc_step={cfg.trunc_step})")
        if cfg.cls_weight < 0 or cfg.reg_weight < 0:
            problems.append(f"cls_weight, reg_weight >= 0 (got {cfg.cls_weight}, {cfg.reg_weight})")
        if problems:
            raise ValueError("diffusiondrive_planner needs " + "; ".join(problems))
        check_guards(cfg)

    @classmethod
    def from_options(cls, options: dict[str, Any], obs_dim: int | None = None,
                     action_dim: int | None = None) -> "DiffusionDrivePlanner":
        """Its sizes come from the scene-sample spec in ``options``, not from a gym task."""
        return cls(**options)

    # ------------------------------------------------------------------ data
    def _scene_keys(self) -> tuple[str, ...]:
        return SCENE_KEYS + (("drivable",) if reads_drivable(self.cfg) else ())

    def scene_batch(self, arrays: Mapping[str, Any]) -> dict[str, Tensor]:
        """The encoder's tensors from stacked SceneSample arrays; agents cut to the past and present."""
        missing = [k for k in self._scene_keys() if k not in arrays]
        if missing:
            hint = " (this planner reads the drivable-area raster: use_raster or drivable_check)" if "drivable" in missing else ""
            raise DatasetError(f"scene arrays lack {missing}{hint}; pass stack_samples(...) or load_scene_samples(...) output")
        H = self.cfg.past_steps + 1
        past = np.asarray(arrays["ego_past"])
        if past.ndim != 3 or past.shape[1:] != (H, 3):
            raise DatasetError(f"ego_past has shape {past.shape[1:]} per sample, this planner was trained with "
                               f"past_steps={self.cfg.past_steps} and needs ({H}, 3); rebuild the samples with "
                               f"past_steps={self.cfg.past_steps}")
        pose = np.asarray(arrays["agents_pose"])
        if pose.ndim != 4 or pose.shape[2] < H:
            raise DatasetError(f"agents_pose must be (B, K, W >= {H}, 3), got {pose.shape}")
        cut = {k: np.asarray(v) for k, v in arrays.items() if k in self._scene_keys()}
        cut["agents_pose"] = pose[:, :, :H]
        cut["agents_valid"] = np.asarray(arrays["agents_valid"])[:, :, :H]
        try:
            return batch_from_arrays(cut, raster=reads_drivable(self.cfg))
        except ValueError as err:
            raise DatasetError(str(err)) from None

    def training_rows(self, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Scene tensors (past and present only) plus ``ego_future`` and ``ego_future_valid`` rows."""
        scene = self.scene_batch(arrays)
        if "ego_future" not in arrays:
            raise DatasetError(f"arrays lack 'ego_future' (have {sorted(arrays)}); pass stack_samples(...) output")
        fut = np.asarray(arrays["ego_future"], dtype=np.float64)
        if fut.ndim != 3 or fut.shape[1:] != (self.F, 3):
            raise DatasetError(f"ego_future has shape {fut.shape[1:]} per sample, this planner predicts ({self.F}, 3); "
                               f"build it with future_steps={fut.shape[1] if fut.ndim == 3 else '?'} or match the data")
        valid = np.asarray(arrays.get("ego_future_valid", np.ones(fut.shape[:2], bool)), dtype=bool)
        if valid.shape != fut.shape[:2]:
            raise DatasetError(f"ego_future_valid must be {fut.shape[:2]}, got {valid.shape}")
        fut = np.where(valid[..., None], fut, 0.0)
        if not np.isfinite(fut).all():
            raise DatasetError("non-finite values in ego_future; clean the data set first")
        if len(fut) != scene["ego_status"].shape[0]:
            raise DatasetError(f"{scene['ego_status'].shape[0]} scene rows but {len(fut)} ego_future rows")
        rows = {k: v.numpy() for k, v in scene.items()
                if k != "drivable" or self.cfg.use_raster}  # the drivable check reads the raster at plan time only
        rows["ego_future"] = fut.astype(np.float32)
        rows["ego_future_valid"] = valid.astype(np.float32)
        return rows

    def fit_to_batch(self, rows: Mapping[str, np.ndarray | Tensor]) -> None:
        """Set the anchors (the ``anchors`` file, else k-means on the rows) and fit the x, y normalizer.

        The normalizer maps the range of every valid logged waypoint and every
        anchor to [-1, 1], the space the anchors are noised in.
        """
        fut = np.asarray(rows["ego_future"], dtype=np.float64)
        valid = np.asarray(rows["ego_future_valid"]).astype(bool)
        if self.cfg.anchors:
            anchors = load_anchors(self.cfg.anchors)
            if anchors.shape != (self.M, self.F, 3):
                raise DatasetError(f"{self.cfg.anchors} holds anchors of shape {anchors.shape}, this planner needs "
                                   f"({self.M}, {self.F}, 3); set num_anchors={anchors.shape[0]} (and future_steps="
                                   f"{anchors.shape[1]}) or rewrite the file with k={self.M}")
        else:
            anchors = cluster_anchors({"ego_future": fut, "ego_future_valid": valid}, k=self.M, seed=self.cfg.seed)
        self.anchors.copy_(torch.as_tensor(anchors, dtype=torch.float32))
        points = np.concatenate([fut[valid][:, :2], anchors[..., :2].reshape(-1, 2)], axis=0)
        self.traj_norm.load_state_dict(Normalizer.fit(points, "limits").state_dict())

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        from diffpilot.data.scene_sample import example_scene_arrays

        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        n = max(batch_size, 2 * self.M)
        arrays = example_scene_arrays(n, seed=seed, spec=SampleSpec(past_steps=self.cfg.past_steps, future_steps=self.F))
        rng = np.random.default_rng(seed)  # bend some futures so the anchors differ in y too
        bend = rng.uniform(-0.08, 0.08, size=(n, 1))
        x = arrays["ego_future"][..., 0]
        arrays["ego_future"][..., 1] = bend * x**2 / 10.0
        arrays["ego_future"][..., 2] = np.arctan(2 * bend * x / 10.0)
        rows = self.training_rows(arrays)
        return {k: torch.from_numpy(v[:batch_size]) for k, v in rows.items()}

    # ------------------------------------------------------------------ network
    def _encode(self, batch: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Token sets for the three cross-attentions: map (lanes [+ raster]), agents, ego (status + history)."""
        g = self.encoder.forward_groups({k: batch[k] for k in SCENE_KEYS + (("drivable",) if self.cfg.use_raster else ())})
        map_names = ["lanes"] + (["raster"] if "raster" in g else [])
        return {
            "map": (torch.cat([g[n][0] for n in map_names], 1), torch.cat([g[n][1] for n in map_names], 1)),
            "agents": g["agents"],
            "ego": (torch.cat([g["ego_status"][0], g["ego_history"][0]], 1),
                    torch.cat([g["ego_status"][1], g["ego_history"][1]], 1)),
        }

    def _decode(self, scene: Mapping[str, tuple[Tensor, Tensor]], ref_xy: Tensor, ref_h: Tensor,
                k: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Every layer's ``(x, y (B, M, F, 2), heading (B, M, F), score logits (B, M))`` from noisy references."""
        temb = self.time_mlp(_timestep_embedding(k.to(ref_xy.dtype), self.cfg.d_model))
        feat = self.traj_in(_trajectory_features(self.traj_norm.normalize(ref_xy), ref_h))
        outs = []
        for layer in self.decoder:
            xy_n = self.traj_norm.normalize(ref_xy)
            feat, logits, delta = layer(feat, _trajectory_features(xy_n, ref_h), temb, scene)
            xy = self.traj_norm.unnormalize(xy_n + delta[..., :2])
            h = ref_h + delta[..., 2]
            outs.append((xy, h, logits))
            ref_xy, ref_h = xy.detach(), h.detach()
        return outs

    def _anchor_start(self, B: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """Normalized anchor x, y ``(B, M, F, 2)`` and anchor headings ``(B, M, F)``."""
        a = self.anchors.to(like.dtype)
        return (self.traj_norm.normalize(a[..., :2]).expand(B, -1, -1, -1),
                a[..., 2].expand(B, -1, -1))

    def nearest_anchor(self, future: Tensor, valid: Tensor) -> Tensor:
        """Index ``(B,)`` of the anchor nearest each logged future (mean x, y distance over its valid waypoints)."""
        d = torch.linalg.vector_norm(self.anchors[None, :, :, :2].to(future.dtype) - future[:, None, :, :2], dim=-1)
        w = valid[:, None, :].to(d.dtype)
        return ((d * w).sum(-1) / w.sum(-1).clamp_min(1.0)).argmin(dim=1)

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Focal score loss + L1 on the positive mode's poses, summed over the decoder layers."""
        gen = generator if generator is not None else torch.Generator().manual_seed(self.cfg.seed)
        gt = batch["ego_future"].float()
        valid = batch["ego_future_valid"].float()
        B = gt.shape[0]
        scene = self._encode(batch)
        target = self.nearest_anchor(gt, valid)
        k = shard.randint(0, self.cfg.train_max_step, (B,), generator=gen)
        noise = shard.randn((B, self.M, self.F, 2), generator=gen)
        x0, ref_h = self._anchor_start(B, gt)
        x_k = self.ddpm.add_noise(x0, noise, k)
        outs = self._decode(scene, self.traj_norm.unnormalize(x_k.clamp(-1.0, 1.0)), ref_h, k.float())
        onehot = F.one_hot(target, self.M).to(gt.dtype)
        rows = torch.arange(B)
        n_valid = shard.shard_mean(valid.sum()).clamp_min(1.0)
        loss = gt.new_zeros(())
        metrics: dict[str, float] = {}
        for i, (xy, h, logits) in enumerate(outs):
            cls = sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma)
            err_xy = (xy[rows, target] - gt[..., :2]).abs().sum(-1)
            err_h = _wrap(h[rows, target] - gt[..., 2]).abs()
            reg = ((err_xy + err_h) * valid).sum() / (3.0 * n_valid)
            loss = loss + self.cfg.cls_weight * cls + self.cfg.reg_weight * reg
            if i == len(outs) - 1:
                pick = logits.argmax(dim=1)
                l2 = torch.linalg.vector_norm(xy[rows, pick] - gt[..., :2], dim=-1)
                metrics.update(cls=float(cls.detach()), reg=float(reg.detach()),
                               plan_l2=float(((l2 * valid).sum() / n_valid).detach()),
                               top1=float((pick == target).float().mean()))
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def optim_groups(self) -> dict[str, OptimGroup]:
        return {"net": OptimGroup([p for p in self.parameters() if p.requires_grad])}

    # ------------------------------------------------------------------ inference
    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        """One truncation noise per anchor and waypoint on x, y: ``(B, num_anchors, F, 2)``."""
        return (batch_size, self.M, self.F, 2)

    def candidates(self, batch: Mapping[str, Tensor], noise: Tensor) -> tuple[Tensor, Tensor]:
        """Every mode's plan ``(B, M, F, 3)`` and score logits ``(B, M)`` after the truncated DDIM steps."""
        B = batch["ego_status"].shape[0]
        if tuple(noise.shape) != self.noise_shape(B):
            raise ValueError(f"noise must have shape {self.noise_shape(B)} (batch, anchors, steps, 2), got {tuple(noise.shape)}")
        dtype = self.anchors.dtype
        scene = self._encode(batch)
        noise = noise.to(dtype)
        x0, ref_h = self._anchor_start(B, noise)
        x = self.ddpm.add_noise(x0, noise, self.cfg.trunc_step)
        xy = h = logits = None
        for i, k in enumerate(self.steps):
            ref_xy = self.traj_norm.unnormalize(x.clamp(-1.0, 1.0))
            xy, h, logits = self._decode(scene, ref_xy, ref_h, noise.new_full((B,), float(k)))[-1]
            ref_h = h
            if i + 1 < len(self.steps):  # DDIM (eta 0) from step k to the next one, with the predicted clean sample
                x0_hat, eps = self.ddpm.split_prediction(self.traj_norm.normalize(xy), x, self._abar[k])
                a_next = self._abar[self.steps[i + 1]]
                x = math.sqrt(a_next) * x0_hat + math.sqrt(1.0 - a_next) * eps
        return torch.cat([xy, _wrap(h)[..., None]], dim=-1), logits

    def select(self, batch: Mapping[str, Tensor], noise: Tensor) -> Tensor:
        """The best-scored mode's plan ``(B, F, 3)`` among the clearest, through the guards (``predict`` and the
        export share it)."""
        poses, logits = self.candidates(batch, noise)
        clear = candidate_clearance(self.cfg, batch, poses)
        ok = clearest(clear, candidate_offroad(self.cfg, batch, poses))
        idx = (logits if ok is None else torch.where(ok, logits, torch.full_like(logits, -1e9))).argmax(dim=1)
        return guard_kept(self.cfg, poses, idx, clear, batch["ego_status"][:, 0])

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """Plans ``(B, F, 3)`` (x, y, heading in the ego frame) for scene tensors; extra keys are ignored."""
        B = batch["ego_status"].shape[0]
        if noise is None:
            noise = torch.randn(self.noise_shape(B), generator=self._rng)
        return self.select(batch, noise)

    @torch.no_grad()
    def plan_batch(self, arrays: Mapping[str, Any], noise: Tensor | None = None) -> np.ndarray:
        """Batched plans ``(B, F, 3)`` from stacked SceneSample arrays (their past and present only)."""
        return self.predict(self.scene_batch(arrays), noise).double().numpy()

    def plan(self, sample: SceneSample) -> np.ndarray:
        """Ego-frame poses ``(F, 3)`` at DT spacing from what the car knows now."""
        arrays = {k: np.asarray(getattr(sample, k))[None] for k in self._scene_keys() if k != "command"}
        arrays["command"] = np.asarray([sample.command])
        return self.plan_batch(arrays)[0]

    def reset(self, seed: int | None = None) -> None:
        """Reseed the truncation noise (``None``: the configured seed)."""
        self._rng = torch.Generator().manual_seed(int(self.cfg.seed if seed is None else seed))

    # ------------------------------------------------------------------ export
    def export_spec(self, sampler: dict[str, Any] | None = None, *, num_agents: int | None = None,
                    num_lanes: int | None = None, lane_points: int | None = None,
                    raster_size: int | None = None) -> ExportSpec:
        """Encoder, truncated DDIM over every anchor and the argmax-score choice as one graph (form ``poses``).

        Inputs: the scene tensors (agents cut to the past and present, padded
        to ``num_agents`` / ``num_lanes`` of ``lane_points``; ``drivable`` with
        a raster) and ``noise`` ``(B, num_anchors, F, 2)``; output ``poses``
        ``(B, F, 3)``. The sampler is part of the method (``trunc_step``,
        ``sampler_steps``), so ``sampler=`` is refused.
        """
        from diffpilot.policy.stl_flow import _random_scene

        if sampler:
            raise ValueError(f"sampler= does not apply to a {self.KIND!r} planner (truncated DDIM from its anchors: "
                             "set policy.trunc_step / policy.sampler_steps at training); drop it")
        K, L, N, R = scene_export_sizes(num_agents, num_lanes, lane_points, raster_size, reads_drivable(self.cfg))
        H = self.cfg.past_steps + 1

        def feeds(b: int, g: torch.Generator) -> dict[str, Tensor]:
            out = _random_scene(b, g, H, K, L, N, R)
            out["noise"] = torch.randn(b, self.M, self.F, 2, generator=g)
            return out

        meta = poses_metadata(self.KIND, (self.M, self.F, 2), self.F, self.cfg.past_steps, (K, L, N, R),
                              {"name": "truncated_ddim", "trunc_step": self.cfg.trunc_step,
                               "num_steps": len(self.steps), "steps": self.steps},
                              selection="argmax_score", network=json.dumps(self.config, sort_keys=True))
        return ExportSpec(graph=_PlanGraph(self), feeds=feeds, outputs=("poses",), metadata=meta, nfe=len(self.steps))


class _PlanGraph(nn.Module):
    """Scene tensors + truncation noise -> the selected plan ``(B, F, 3)``: ``predict`` as one graph."""

    def __init__(self, planner: DiffusionDrivePlanner) -> None:
        super().__init__()
        self.planner = planner

    def forward(self, *, ego_status: Tensor, command: Tensor, ego_past: Tensor, agents_pose: Tensor,
                agents_valid: Tensor, agents_size: Tensor, agents_category: Tensor, lanes: Tensor, lanes_valid: Tensor,
                drivable: Tensor | None = None, noise: Tensor) -> Tensor:
        batch = {"ego_status": ego_status, "command": command, "ego_past": ego_past, "agents_pose": agents_pose,
                 "agents_valid": agents_valid, "agents_size": agents_size, "agents_category": agents_category,
                 "lanes": lanes, "lanes_valid": lanes_valid}
        if drivable is not None:
            batch["drivable"] = drivable
        return self.planner.select(batch, noise)
