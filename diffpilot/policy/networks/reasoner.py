"""A small causal transformer that reads an observation prefix and writes reasoning text.

The sequence is ``[prefix | text]``: the prefix is a set of embeddings the
caller builds (image tokens, a proprio token, the instruction's word
embeddings, a separator), some of them padding (``prefix_mask`` true); the
text is the reasoning's token ids. Every position attends causally to the
ones before it, padding never. ``forward`` runs the whole sequence (teacher
forcing, and re-reading a kept reasoning under a new observation);
``prefill`` + ``step`` decode greedily with a key/value cache, one token per
step, so generating ``T`` tokens costs ``T`` single-token passes instead of
``T`` full ones. Attention is plain matmul + softmax, so both paths export to
ONNX; the cache is a pair of tensors ``(layers, B, heads, L, head_dim)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CausalReasoner"]


class _CausalBlock(nn.Module):
    """Pre-norm self-attention + GELU MLP that can also return/extend its keys and values."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def _heads(self, h: Tensor) -> Tensor:
        b, n, _ = h.shape
        return h.reshape(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, h: Tensor, ignore: Tensor, past_k: Tensor | None = None,
                past_v: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``h`` (B, N, d); ``ignore`` (B, 1 or N, L_total) true where a query must not look; returns (h, k, v)."""
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        logits = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        logits = logits.masked_fill(ignore[:, None], torch.finfo(logits.dtype).min)
        out = torch.matmul(self.drop(logits.softmax(dim=-1)), v)
        b, _, n, _ = out.shape
        h = h + self.drop(self.proj(out.transpose(1, 2).reshape(b, n, -1)))
        h = h + self.drop(self.mlp(self.norm2(h)))
        return h, k, v


class CausalReasoner(nn.Module):
    """Token embeddings, learned positions, causal blocks, a final norm and a tied output head."""

    def __init__(self, vocab_size: int, d_model: int = 128, n_layers: int = 3, n_heads: int = 4,
                 max_len: int = 96, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.max_len = d_model, max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_CausalBlock(d_model, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits from final hidden states (the output head shares the embedding)."""
        return F.linear(hidden, self.embed.weight)

    def forward(self, prefix: Tensor, prefix_ignore: Tensor, text: Tensor, text_ignore: Tensor) -> Tensor:
        """Final hidden states (B, P+T, d) of ``[prefix | embed(text)]`` under a causal + padding mask."""
        h = torch.cat([prefix, self.embed(text)], dim=1)
        n = h.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence of {n} tokens exceeds the reasoner's max_len={self.max_len}")
        h = h + self.position.weight[:n]
        pad = torch.cat([prefix_ignore, text_ignore], dim=1)  # (B, N)
        future = torch.ones(n, n, dtype=torch.bool, device=h.device).triu(1)
        ignore = future[None] | pad[:, None, :]
        for block in self.blocks:
            h, _, _ = block(h, ignore)
        return self.norm(h)

    def prefill(self, prefix: Tensor, prefix_ignore: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the prefix once: (its final hidden states, cached keys, cached values)."""
        n = prefix.shape[1]
        h = prefix + self.position.weight[:n]
        future = torch.ones(n, n, dtype=torch.bool, device=h.device).triu(1)
        ignore = future[None] | prefix_ignore[:, None, :]
        keys, values = [], []
        for block in self.blocks:
            h, k, v = block(h, ignore)
            keys.append(k)
            values.append(v)
        return self.norm(h), torch.stack(keys), torch.stack(values)

    def step(self, token: Tensor, position: Tensor, past_k: Tensor, past_v: Tensor,
             past_ignore: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One token (B,) at ``position`` (a 0-d long) on top of the cache.

        ``past_ignore`` (B, L) marks cached positions to skip (prefix padding).
        Returns (next-token logits (B, V), its hidden state (B, d), keys, values).
        """
        h = self.embed(token)[:, None] + self.position(position.reshape(1))[None]
        ignore = torch.cat([past_ignore, torch.zeros_like(past_ignore[:, :1])], dim=1)[:, None, :]
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            h, k, v = block(h, ignore, past_k[i], past_v[i])
            keys.append(k)
            values.append(v)
        hidden = self.norm(h)[:, 0]
        return self.logits(hidden), hidden, torch.stack(keys), torch.stack(values)
