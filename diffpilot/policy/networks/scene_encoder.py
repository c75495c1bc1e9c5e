"""Scene encoder: stacked :class:`~diffpilot.data.scenario.SceneSample` tensors -> condition tokens.

Every driving planner that conditions a generative model on a scene uses this
module, so its interface is the contract between them:

* **Input**: a dict of tensors with a leading batch dimension ``B``, as made
  by :func:`batch_from_arrays` from ``stack_samples`` output: ``ego_status``
  (B, 3), ``command`` (B,) long, ``ego_past`` (B, P+1, 3), ``agents_pose``
  (B, K, W, 3), ``agents_valid`` (B, K, W), ``agents_size`` (B, K, 2),
  ``agents_category`` (B, K) long (-1 = padding), ``lanes`` (B, L, N, 3),
  ``lanes_valid`` (B, L) and, when the encoder was built with
  ``use_raster=True``, ``drivable`` (B, R, R). Agents' poses may hold the
  future too (``W = P+1+F``, as SceneSamples do); only the first ``P+1``
  columns (past and present) are read, so no future leaks into a plan.
* **Output** of ``forward``: tokens ``(B, S, d_model)`` and a key-padding
  mask ``(B, S)`` bool with True = ignore (the convention of
  :class:`~diffpilot.policy.networks.transformer.TransformerDenoiser`'s
  ``cond_mask``). Token groups, in order: ego status + command (1), ego
  history (1), agents (K), lanes (L), raster (``raster_tokens``, optional).
  ``group_slices(K, L)`` says where each group lies; ``forward_groups``
  returns them as separate ``(tokens, mask)`` sets, which is what a decoder
  that fuses modalities by sequential cross-attention consumes.
* Masked tokens are exactly zero, so padded agents / lanes have no effect on
  anything downstream (pooling, attention), whatever their stored values.
  Agents and lanes are sets: no position embedding distinguishes slot ``k``
  from slot ``k'``, so permuting them permutes their tokens and leaves
  :meth:`SceneEncoder.pooled` unchanged.

The module depends on torch and numpy only (networks sit below the data
layer); bad input raises ``ValueError`` naming the field. Positions are divided by fixed scales (metres, m/s) rather than fitted
normalizers so that a trained encoder reads any data set in the same units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from diffpilot.data.scenario import PAST_STEPS

__all__ = ["MODALITIES", "SCENE_KEYS", "ConditionFusion", "SceneEncoder", "batch_from_arrays"]

MODALITIES = ("ego_status", "ego_history", "agents", "lanes", "raster")
"""Token groups in output order; each gets a learned modality embedding."""

SCENE_KEYS = (
    "ego_status",
    "command",
    "ego_past",
    "agents_pose",
    "agents_valid",
    "agents_size",
    "agents_category",
    "lanes",
    "lanes_valid",
)
"""Keys the encoder reads (plus ``drivable`` with a raster)."""

NUM_COMMANDS = 4
"""Driving commands (keep_lane, left, right, stop: ``diffpilot.data.scenario.COMMANDS``)."""
NUM_CATEGORIES = 4
"""Agent classes (vehicle, pedestrian, bicycle, other: ``diffpilot.data.scenario.CATEGORIES``)."""
POS_SCALE_M = 20.0
SPEED_SCALE = 10.0


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, n_out))


def _pose_features(pose: Tensor) -> Tensor:
    """(..., 3) poses -> (..., 4) scaled x, y and cos/sin of yaw (no angle wrap-around)."""
    return torch.stack(
        [pose[..., 0] / POS_SCALE_M, pose[..., 1] / POS_SCALE_M, torch.cos(pose[..., 2]), torch.sin(pose[..., 2])], dim=-1
    )


def batch_from_arrays(
    arrays: Mapping[str, np.ndarray], index: np.ndarray | Sequence[int] | slice | None = None, *, raster: bool = False
) -> dict[str, Tensor]:
    """Rows ``index`` of stacked SceneSample arrays as the float32 / long / bool tensors the encoder reads."""
    keys = SCENE_KEYS + (("drivable",) if raster else ())
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"scene arrays lack {missing}; build them with diffpilot.data.scene_sample.stack_samples")
    sel = slice(None) if index is None else (index if isinstance(index, slice) else np.asarray(index, dtype=np.int64))
    out: dict[str, Tensor] = {}
    for k in keys:
        v = np.asarray(arrays[k])[sel]
        if k in ("command", "agents_category"):
            out[k] = torch.as_tensor(v.astype(np.int64))
        elif k in ("agents_valid", "lanes_valid"):
            out[k] = torch.as_tensor(v.astype(bool))
        else:
            v = v.astype(np.float32)
            if not np.isfinite(v).all():
                raise ValueError(f"non-finite values in scene field {k!r}; clean the data set first")
            out[k] = torch.as_tensor(v)
    return out


class SceneEncoder(nn.Module):
    """Scene -> one token group per modality, with a key-padding mask (see the module docstring).

    Args:
        d_model: token width.
        past_steps: P, the ego/agent history length the data was built with
            (inputs carry P+1 poses, the present last).
        hidden: width of the per-entity MLPs.
        use_raster: encode the drivable-area raster into ``raster_tokens``
            tokens with a small strided CNN.
        raster_tokens: a square number (1, 4, 9, ...), the CNN's pooled grid.
    """

    def __init__(
        self,
        d_model: int = 64,
        past_steps: int = PAST_STEPS,
        hidden: int = 64,
        use_raster: bool = False,
        raster_tokens: int = 4,
    ) -> None:
        super().__init__()
        if d_model < 1 or past_steps < 0 or hidden < 1:
            raise ValueError(f"need d_model >= 1, past_steps >= 0, hidden >= 1; got {d_model}, {past_steps}, {hidden}")
        side = int(round(raster_tokens**0.5))
        if use_raster and (side < 1 or side * side != raster_tokens):
            raise ValueError(f"raster_tokens must be a square number (1, 4, 9, ...), got {raster_tokens}")
        self.d_model, self.past_steps, self.hidden = d_model, past_steps, hidden
        self.use_raster, self.raster_tokens = use_raster, raster_tokens if use_raster else 0
        H = past_steps + 1
        self.ego_status_mlp = _mlp(3 + NUM_COMMANDS, hidden, d_model)
        self.ego_history_mlp = _mlp(4 * H, hidden, d_model)
        # per agent: its pose history with validity flags, its size and one-hot class
        self.agent_mlp = _mlp(5 * H + 2 + NUM_CATEGORIES, hidden, d_model)
        # per lane: a PointNet (shared point MLP, max-pool) that also sees each point's position along the lane
        self.lane_point_mlp = _mlp(5, hidden, hidden)
        self.lane_out = nn.Sequential(nn.GELU(), nn.Linear(hidden, d_model))
        if use_raster:
            self.raster_cnn = nn.Sequential(
                nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.GELU(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(16, d_model, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(side),
            )
            self.raster_pos = nn.Parameter(torch.randn(1, raster_tokens, d_model) * 0.02)
        self.modality = nn.Embedding(len(MODALITIES), d_model)
        self.out_norm = nn.LayerNorm(d_model)

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict:
        return {
            "d_model": self.d_model,
            "past_steps": self.past_steps,
            "hidden": self.hidden,
            "use_raster": self.use_raster,
            "raster_tokens": self.raster_tokens if self.use_raster else 4,
        }

    def group_slices(self, num_agents: int, num_lanes: int) -> dict[str, slice]:
        """Where each modality's tokens lie along the token axis of ``forward``'s output."""
        sizes = [1, 1, num_agents, num_lanes, self.raster_tokens]
        out, start = {}, 0
        for name, n in zip(MODALITIES, sizes):
            if n:
                out[name] = slice(start, start + n)
                start += n
        return out

    # ------------------------------------------------------------------ checks
    def _check(self, batch: Mapping[str, Tensor]) -> None:
        keys = SCENE_KEYS + (("drivable",) if self.use_raster else ())
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"scene batch lacks {missing}; build it with batch_from_arrays(arrays, index)")
        B = batch["ego_status"].shape[0]
        H = self.past_steps + 1
        if tuple(batch["ego_past"].shape[1:]) != (H, 3):
            raise ValueError(
                f"ego_past is {tuple(batch['ego_past'].shape)}, this encoder was built with past_steps={self.past_steps} "
                f"and needs (B, {H}, 3); rebuild the samples or the encoder"
            )
        ap = batch["agents_pose"]
        if ap.dim() != 4 or ap.shape[0] != B or ap.shape[2] < H or ap.shape[3] != 3:
            raise ValueError(f"agents_pose must be (B={B}, K, W>={H}, 3), got {tuple(ap.shape)}")
        if batch["lanes"].dim() != 4 or batch["lanes"].shape[0] != B or batch["lanes"].shape[-1] != 3:
            raise ValueError(f"lanes must be (B={B}, L, N, 3), got {tuple(batch['lanes'].shape)}")

    # ------------------------------------------------------------------ groups
    def forward_groups(self, batch: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Per modality, ``(tokens (B, n, d_model), mask (B, n) bool, True = ignore)``; masked tokens are zero."""
        self._check(batch)
        H = self.past_steps + 1
        dtype = self.modality.weight.dtype
        status = batch["ego_status"].to(dtype)
        B = status.shape[0]
        cmd = torch.nn.functional.one_hot(batch["command"].long().clamp(0, NUM_COMMANDS - 1), NUM_COMMANDS).to(dtype)
        feats = torch.cat([status / torch.tensor([SPEED_SCALE, 4.0, 1.0], dtype=dtype), cmd], dim=-1)
        groups: dict[str, tuple[Tensor, Tensor]] = {}
        none = torch.zeros(B, 1, dtype=torch.bool)
        groups["ego_status"] = (self.ego_status_mlp(feats)[:, None], none)
        past = _pose_features(batch["ego_past"].to(dtype)).reshape(B, -1)
        groups["ego_history"] = (self.ego_history_mlp(past)[:, None], none.clone())

        pose = batch["agents_pose"][:, :, :H].to(dtype)
        valid = batch["agents_valid"][:, :, :H].bool()
        K = pose.shape[1]
        pf = _pose_features(pose) * valid[..., None]
        cat = batch["agents_category"].long()
        present = valid[:, :, -1] & (cat >= 0)
        onehot = torch.nn.functional.one_hot(cat.clamp(0, NUM_CATEGORIES - 1), NUM_CATEGORIES).to(dtype)
        a_in = torch.cat([pf.reshape(B, K, -1), valid.to(dtype), batch["agents_size"].to(dtype) / 5.0, onehot], dim=-1)
        a_in = a_in * present[..., None]  # padded slots see zeros, whatever they store
        groups["agents"] = (self.agent_mlp(a_in) * present[..., None], ~present)

        lanes = batch["lanes"].to(dtype)
        lv = batch["lanes_valid"].bool()
        L, N = lanes.shape[1], lanes.shape[2]
        along = torch.linspace(-1.0, 1.0, N, dtype=dtype).expand(B, L, N)
        p_in = torch.cat([_pose_features(lanes), along[..., None]], dim=-1) * lv[:, :, None, None]
        lane_tok = self.lane_out(self.lane_point_mlp(p_in).amax(dim=2))
        groups["lanes"] = (lane_tok * lv[..., None], ~lv)

        if self.use_raster:
            r = batch["drivable"].to(dtype)[:, None]
            grid = self.raster_cnn(r).flatten(2).transpose(1, 2) + self.raster_pos
            groups["raster"] = (grid, torch.zeros(B, grid.shape[1], dtype=torch.bool))

        out = {}
        for i, name in enumerate(MODALITIES):
            if name not in groups:
                continue
            tok, mask = groups[name]
            tok = self.out_norm(tok + self.modality.weight[i])
            out[name] = (tok * (~mask)[..., None].to(dtype), mask)
        return out

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """All groups concatenated: tokens ``(B, S, d_model)`` and mask ``(B, S)`` (True = ignore)."""
        groups = self.forward_groups(batch)
        return torch.cat([g[0] for g in groups.values()], dim=1), torch.cat([g[1] for g in groups.values()], dim=1)

    @staticmethod
    def pooled(tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean over the unmasked tokens, ``(B, d_model)`` (a global scene vector for FiLM / MLP heads)."""
        if mask is None:
            return tokens.mean(dim=1)
        keep = (~mask).to(tokens.dtype)[..., None]
        return (tokens * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


class ConditionFusion(nn.Module):
    """Condition tokens ``(B, S, d_model)`` (scene tokens plus any extra ones) -> one vector ``(B, n_queries * d_model)``.

    ``n_queries`` learned query tokens join the condition tokens in a small transformer encoder and
    their outputs are concatenated. The fusion runs once per scene, so a denoiser that reads the
    vector (an MLP with FiLM) costs per *sample* only its own few layers instead of a cross-attention
    over every scene token: drawing many plans per scene gets cheap, while the vector still depends on
    which agents and lanes matter given the other conditions (e.g. the rule parameters).
    """

    def __init__(self, d_model: int = 64, n_queries: int = 2, n_layers: int = 2, n_heads: int = 4) -> None:
        super().__init__()
        if n_queries < 1 or n_layers < 1 or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"need n_queries, n_layers, n_heads >= 1 and d_model divisible by n_heads; got "
                             f"{n_queries}, {n_layers}, {n_heads}, d_model={d_model}")
        self.d_model, self.n_queries = d_model, n_queries
        self.queries = nn.Parameter(torch.randn(1, n_queries, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    @property
    def out_dim(self) -> int:
        return self.n_queries * self.d_model

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.d_model:
            raise ValueError(f"tokens must be (B, S, {self.d_model}), got {tuple(tokens.shape)}")
        B = tokens.shape[0]
        q = self.queries.expand(B, -1, -1).to(tokens.dtype)
        keep_q = torch.zeros(B, self.n_queries, dtype=torch.bool)
        m = None if mask is None else torch.cat([keep_q, mask.bool()], dim=1)
        h = self.encoder(torch.cat([q, tokens], dim=1), src_key_padding_mask=m)
        return self.norm(h[:, : self.n_queries]).flatten(1)
