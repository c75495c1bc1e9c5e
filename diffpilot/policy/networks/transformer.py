"""A transformer denoiser over action chunks that cross-attends to condition tokens.

One token per chunk step (with a learned position embedding) goes through
pre-norm layers of self-attention, cross-attention to the condition tokens and
an MLP. Condition tokens can be a set of variable size (agents in a driving
scene), so cross-attention takes a key-padding mask.

Time enters through adaptive LayerNorm: every sub-layer's normalization gets a
scale and shift computed from the time embedding. The map a denoiser must
compute changes a lot with the noise level, and this gives time a direct path
into every layer instead of one token the attention may or may not read; DiT
(Peebles & Xie, 2023) found adaptive normalization better than an in-context
time token. The modulation is zero-initialized, so a fresh network is a plain
pre-norm transformer and gradients reach every weight from the first step.

Attention is written with matmul and softmax so it exports to plain ONNX ops.
``DecoderLayer`` holds one cross-attention block per condition token set and
applies them in order, which is the sequential multi-modal fusion TransDiffuser
uses; ``TransformerDenoiser`` itself uses a single set: a structured condition
(:class:`~diffpilot.policy.generative.conditions.TokenSets`) is concatenated
into it, each set's mask becoming part of the key-padding mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffpilot.policy.generative.conditions import TokenSets

from .embeddings import TimeEmbedding

TokenSet = tuple[Tensor, Tensor | None]
"""Condition tokens ``(B, N, d_model)`` and their optional ignore-mask ``(B, N)``."""


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with an optional key-padding mask.

    Masked keys get zero weight. A query whose keys are all masked (a scene with
    no agents) gets an all-zero attention output rather than the NaN a softmax
    over only ``-inf`` would give; the padded tokens' values must be finite.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, h: Tensor) -> Tensor:
        batch, length, _ = h.shape
        return h.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, context: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        q = self._split_heads(self.q_proj(query))
        k, v = (self._split_heads(part) for part in self.kv_proj(context).chunk(2, dim=-1))
        logits = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if key_padding_mask is None:
            weights = logits.softmax(dim=-1)
        else:
            ignore = key_padding_mask[:, None, None, :]
            logits = logits.masked_fill(ignore, torch.finfo(logits.dtype).min)
            # Fill (not add) keeps the logits finite; the product zeroes every weight
            # of a fully masked row, whose softmax would otherwise be uniform.
            weights = logits.softmax(dim=-1) * (~ignore).to(logits.dtype)
        out = torch.matmul(self.dropout(weights), v)
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))


class AdaptiveLayerNorm(nn.Module):
    """LayerNorm whose scale and shift come from an embedding (zero-initialized)."""

    def __init__(self, d_model: int, emb_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.Mish(), nn.Linear(emb_dim, 2 * d_model))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.modulation(emb)[:, None, :].chunk(2, dim=-1)
        return self.norm(h) * (1 + scale) + shift


class SelfAttentionBlock(nn.Module):
    """Pre-norm residual self-attention among the action tokens."""

    def __init__(self, d_model: int, n_heads: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = AdaptiveLayerNorm(d_model, emb_dim)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        normed = self.norm(h, emb)
        return h + self.dropout(self.attn(normed, normed))


class CrossAttentionBlock(nn.Module):
    """Pre-norm residual cross-attention from action tokens to one condition token set."""

    def __init__(self, d_model: int, n_heads: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = AdaptiveLayerNorm(d_model, emb_dim)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return h + self.dropout(self.attn(self.norm(h, emb), tokens, mask))


class FeedForwardBlock(nn.Module):
    """Pre-norm residual MLP with a 4x hidden width."""

    def __init__(self, d_model: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = AdaptiveLayerNorm(d_model, emb_dim)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.mlp(self.norm(h, emb))


class DecoderLayer(nn.Module):
    """Self-attention, then cross-attention to each condition token set in turn, then an MLP.

    ``n_token_sets`` cross-attention blocks are built; ``forward`` takes exactly
    that many token sets, in the same order (e.g. ego, agents, lanes).
    """

    def __init__(
        self, d_model: int, n_heads: int, emb_dim: int, n_token_sets: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.self_attn = SelfAttentionBlock(d_model, n_heads, emb_dim, dropout)
        self.cross_attn = nn.ModuleList(
            CrossAttentionBlock(d_model, n_heads, emb_dim, dropout) for _ in range(n_token_sets)
        )
        self.feed_forward = FeedForwardBlock(d_model, emb_dim, dropout)

    def forward(self, h: Tensor, emb: Tensor, token_sets: Sequence[TokenSet]) -> Tensor:
        if len(token_sets) != len(self.cross_attn):
            raise ValueError(f"layer expects {len(self.cross_attn)} condition token sets, got {len(token_sets)}")
        h = self.self_attn(h, emb)
        for block, (tokens, mask) in zip(self.cross_attn, token_sets):
            h = block(h, emb, tokens, mask)
        return self.feed_forward(h, emb)


class TransformerDenoiser(nn.Module):
    """Denoiser ``f(x, t, cond, r, cond_mask)`` for action chunks ``x`` ``(B, horizon, action_dim)``.

    Args:
        action_dim: features per chunk step.
        cond_dim: features per condition token; ``cond`` is ``(B, N, cond_dim)``
            tokens, ``(B, cond_dim)`` (one token) or a ``TokenSets`` of
            ``(B, N_i, cond_dim)`` sets with their masks, which is the same as
            passing the sets concatenated in order with the concatenated masks
            as ``cond_mask``. 0 means time-only (no cross-attention; ``cond``
            must be None).
        horizon: chunk length; fixes the learned position embedding.
        d_model, n_heads, n_layers, dropout: transformer size.
        time_dim: time embedding width (default ``d_model``).
        use_r: embed MeanFlow's second time ``r`` as well.
        n_cond_tokens: if given, condition tokens form an ordered sequence of
            exactly this length (e.g. an observation history) and get learned
            position embeddings; if None they are an unordered set of any size
            (e.g. agents), which attention treats permutation-invariantly.
            With ``TokenSets`` the count is that of all sets together.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        horizon: int,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 4,
        dropout: float = 0.0,
        time_dim: int | None = None,
        use_r: bool = False,
        n_cond_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if action_dim < 1 or cond_dim < 0 or horizon < 1 or n_layers < 1:
            raise ValueError(
                f"need action_dim, horizon, n_layers >= 1 and cond_dim >= 0, got action_dim={action_dim}, "
                f"cond_dim={cond_dim}, horizon={horizon}, n_layers={n_layers}"
            )
        if n_cond_tokens is not None and (cond_dim == 0 or n_cond_tokens < 1):
            raise ValueError(f"n_cond_tokens={n_cond_tokens} needs cond_dim >= 1 and a positive count")
        time_dim = d_model if time_dim is None else time_dim
        self.action_dim = action_dim
        self.cond_dim = cond_dim
        self.horizon = horizon
        self.use_r = use_r
        self.n_cond_tokens = n_cond_tokens

        self.time_embed = TimeEmbedding(time_dim, use_r=use_r)
        self.action_in = nn.Linear(action_dim, d_model)
        self.action_pos = nn.Parameter(torch.randn(1, horizon, d_model) * 0.02)
        if cond_dim:
            self.cond_in = nn.Linear(cond_dim, d_model)
            self.cond_norm = nn.LayerNorm(d_model)
            self.cond_pos = (
                nn.Parameter(torch.randn(1, n_cond_tokens, d_model) * 0.02) if n_cond_tokens is not None else None
            )
        n_token_sets = 1 if cond_dim else 0
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, time_dim, n_token_sets, dropout) for _ in range(n_layers)
        )
        self.out_norm = AdaptiveLayerNorm(d_model, time_dim)
        self.out_proj = nn.Linear(d_model, action_dim)
        # Small output layer: near-zero first predictions, gradients everywhere.
        with torch.no_grad():
            self.out_proj.weight.mul_(1e-2)
            self.out_proj.bias.zero_()

    def _check_inputs(
        self, x: Tensor, t: Tensor, cond: Tensor | None, r: Tensor | None, cond_mask: Tensor | None
    ) -> None:
        # Shape and dtype checks only, so export sees no data-dependent branches.
        if x.dim() != 3 or x.shape[1] != self.horizon or x.shape[2] != self.action_dim:
            raise ValueError(
                f"x must be (B, horizon={self.horizon}, action_dim={self.action_dim}), got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        if t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"t must be (B,) = ({batch},), got {tuple(t.shape)}")
        if r is not None:
            if not self.use_r:
                raise ValueError("r was given but the network was built with use_r=False")
            if r.dim() != 1 or r.shape[0] != batch:
                raise ValueError(f"r must be (B,) = ({batch},), got {tuple(r.shape)}")
        if self.cond_dim == 0:
            if cond is not None or cond_mask is not None:
                raise ValueError("network built with cond_dim=0 takes cond=None and cond_mask=None")
            return
        n_tokens = "N" if self.n_cond_tokens is None else str(self.n_cond_tokens)
        if (
            cond is None
            or cond.dim() not in (2, 3)
            or cond.shape[0] != batch
            or cond.shape[-1] != self.cond_dim
            or (self.n_cond_tokens is not None and cond.dim() == 3 and cond.shape[1] != self.n_cond_tokens)
        ):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(
                f"cond must be (B, {n_tokens}, cond_dim) = ({batch}, {n_tokens}, {self.cond_dim}) "
                f"or (B, cond_dim) = ({batch}, {self.cond_dim}), got {got}"
            )
        if self.n_cond_tokens not in (None, 1) and cond.dim() == 2:
            raise ValueError(
                f"cond must be (B, {self.n_cond_tokens}, {self.cond_dim}) tokens, got {tuple(cond.shape)}"
            )
        if cond_mask is not None:
            n = cond.shape[1] if cond.dim() == 3 else 1
            if cond_mask.dtype != torch.bool or tuple(cond_mask.shape) != (batch, n):
                raise ValueError(
                    f"cond_mask must be a bool (B, N) = ({batch}, {n}) tensor (True = ignore), "
                    f"got {cond_mask.dtype} {tuple(cond_mask.shape)}"
                )

    def encode_cond(self, cond: Tensor) -> Tensor:
        """Project condition features to normalized ``(B, N, d_model)`` tokens."""
        if cond.dim() == 2:
            cond = cond[:, None, :]
        tokens = self.cond_in(cond)
        if self.cond_pos is not None:
            tokens = tokens + self.cond_pos
        return self.cond_norm(tokens)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cond: Tensor | TokenSets | None = None,
        r: Tensor | None = None,
        cond_mask: Tensor | None = None,
    ) -> Tensor:
        """Return a tensor shaped like ``x``; ``cond_mask`` (B, N) bool marks tokens to ignore.

        A ``TokenSets`` condition carries its own masks (``cond_mask`` must be None).
        """
        if isinstance(cond, TokenSets):
            if cond_mask is not None:
                raise ValueError("cond_mask must be None when cond is a TokenSets (each set carries its mask)")
            cond, cond_mask = cond.concat()
        self._check_inputs(x, t, cond, r, cond_mask)
        emb = self.time_embed(t, r)
        token_sets: list[TokenSet] = [] if cond is None else [(self.encode_cond(cond), cond_mask)]
        h = self.action_in(x) + self.action_pos
        for layer in self.layers:
            h = layer(h, emb, token_sets)
        return self.out_proj(self.out_norm(h, emb))
