"""MLP denoisers for flat samples (single actions, 2-D toys, short chunks).

:class:`MLPDenoiser` is a residual stack of FiLM-conditioned blocks;
:class:`ConcatMLP` is the plain MLP of Diffusion-QL on the concatenated
``[x, time embedding, cond]``, about a third of the residual stack's work
per evaluation at the same width and depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffpilot.policy.networks.embeddings import FiLM, TimeEmbedding


def _mish_exp(x: Tensor) -> Tensor:
    """``x tanh(softplus(x))`` as ``x n / (n + 2)`` with ``n = e^x (e^x + 2)``: one exp instead of exp, log1p and tanh.

    On CPU this is about 1.6x faster than ``aten::mish`` at the same float32
    accuracy (above x = 20, ``n / (n + 2)`` is 1 to machine precision).
    """
    e = torch.exp(x.clamp(max=20.0))
    n = e * (e + 2.0)
    return x * n / (n + 2.0)


class _MishFunction(torch.autograd.Function):
    """Mish with its derivative as one fused kernel in both reverse and forward mode."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return _mish_exp(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return torch.ops.aten.mish_backward(grad, x)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return torch.ops.aten.mish_backward(tangent, x)  # mish'(x) * tangent, elementwise


class Mish(nn.Module):
    """``x tanh(softplus(x))``, numerically ``nn.Mish``, but cheap under ``torch.func.jvp``.

    Forward-mode AD decomposes the built-in mish into a chain of elementwise
    ops; MeanFlow's JVP target runs through every activation, and that chain
    made it about twice as slow. In training the derivative is one fused
    kernel instead and the value comes from a one-exp formula (the activation
    was a fifth of an offline-RL step); in eval (sampling, export) this is
    plain ``F.mish``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return _MishFunction.apply(x) if self.training else F.mish(x)


ACTIVATIONS = {"mish": Mish, "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def _checked_activation(x_dim: int, cond_dim: int, hidden: int, depth: int, time_dim: int, activation: str) -> type[nn.Module]:
    """The activation class of an MLP denoiser, after refusing sizes or a name it cannot be built with."""
    if x_dim < 1 or cond_dim < 0 or hidden < 1 or depth < 1:
        raise ValueError(
            f"need x_dim >= 1, cond_dim >= 0, hidden >= 1, depth >= 1; got x_dim={x_dim}, "
            f"cond_dim={cond_dim}, hidden={hidden}, depth={depth}"
        )
    if time_dim < 2 or time_dim % 2:
        raise ValueError(f"time_dim must be an even integer >= 2, got {time_dim}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def _checked_inputs(
    net: MLPDenoiser | ConcatMLP, x: Tensor, t: Tensor, cond: Tensor | None, r: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(t, r, cond)`` of an MLP denoiser's call: scalar times broadcast to the batch, the condition flattened
    to ``(B, cond_dim)`` (None when the network is unconditional), or a clear error for a wrong shape or type."""
    name = type(net).__name__
    if x.dim() != 2 or x.shape[-1] != net.x_dim:
        raise ValueError(f"x must have shape (B, {net.x_dim}), got {tuple(x.shape)}")
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if r is not None and r.dim() == 0:
        r = r.expand(x.shape[0])
    if cond is not None and not isinstance(cond, Tensor):
        raise ValueError(
            f"{name} takes a condition tensor, got {type(cond).__name__}; "
            "structured (TokenSets) conditions need the transformer denoiser"
        )
    if not net.cond_dim:
        if cond is not None:
            raise ValueError(f"this {name} was built with cond_dim=0 but got a cond; rebuild it with cond_dim set")
        return t, r, None
    if cond is None:
        raise ValueError(f"this {name} was built with cond_dim={net.cond_dim}; pass cond of shape (B, {net.cond_dim})")
    cond = cond.flatten(1)  # (B, N, C) condition tokens are concatenated
    if cond.shape[-1] != net.cond_dim:
        raise ValueError(f"cond must flatten to (B, {net.cond_dim}), got {tuple(cond.shape)}")
    return t, r, cond


class ResidualFiLMBlock(nn.Module):
    """``h + W2 act(FiLM(W1 norm(h), c))``: the block starts as the identity (FiLM is zero-initialized)."""

    def __init__(self, hidden: int, cond_dim: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.film = FiLM(cond_dim, hidden)
        self.act = activation()
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        return h + self.fc2(self.act(self.film(self.fc1(self.norm(h)), c)))


class MLPDenoiser(nn.Module):
    """Denoiser ``f(x, t, cond, r)`` for ``x`` of shape ``(B, x_dim)``.

    Every block is FiLM-modulated by ``[time embedding || cond]``; with
    ``use_r`` the time embedding also sees MeanFlow's ``t - r``. The output
    layer is zero-initialized, so an untrained network predicts 0 (zero noise,
    zero velocity) rather than a random field, which keeps the first updates
    small and training stable. ``forward`` branches only on ``is None``
    checks, so it traces and exports with a fixed graph.
    """

    def __init__(
        self,
        x_dim: int,
        cond_dim: int = 0,
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 64,
        use_r: bool = False,
        activation: str = "mish",
    ) -> None:
        super().__init__()
        act = _checked_activation(x_dim, cond_dim, hidden, depth, time_dim, activation)
        self.x_dim, self.cond_dim, self.use_r = x_dim, cond_dim, use_r
        self.time_emb = TimeEmbedding(time_dim, use_r=use_r)
        self.inp = nn.Linear(x_dim, hidden)
        self.blocks = nn.ModuleList(ResidualFiLMBlock(hidden, time_dim + cond_dim, act) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), act(), nn.Linear(hidden, x_dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        t, r, cond = _checked_inputs(self, x, t, cond, r)
        c = self.time_emb(t, r)
        if cond is not None:
            c = torch.cat([c, cond.to(c.dtype)], dim=-1)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)


class ConcatMLP(nn.Module):
    """Denoiser ``f(x, t, cond, r)``: ``depth`` x (Linear ``hidden``, activation) on ``[x, emb(t[, t - r]), cond]``.

    The Diffusion-QL actor (3 x 256 Mish, a 16-wide time embedding): every
    input enters once, at the first layer. Offline-RL actors evaluate their
    network 2-11 times per gradient step (sampler chain, TD target), so the
    plain stack's lower cost is most of the step. Same interface and input
    checks as :class:`MLPDenoiser`; ``cond_dim`` 0 means unconditional.
    """

    def __init__(
        self,
        x_dim: int,
        cond_dim: int = 0,
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 16,
        use_r: bool = False,
        activation: str = "mish",
    ) -> None:
        super().__init__()
        act = _checked_activation(x_dim, cond_dim, hidden, depth, time_dim, activation)
        self.x_dim, self.cond_dim, self.use_r = x_dim, cond_dim, use_r
        self.time_emb = TimeEmbedding(time_dim, use_r=use_r)
        layers: list[nn.Module] = []
        width = x_dim + time_dim + cond_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        layers.append(nn.Linear(width, x_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        t, r, cond = _checked_inputs(self, x, t, cond, r)
        parts = [x, self.time_emb(t, r).to(x.dtype)] + ([] if cond is None else [cond.to(x.dtype)])
        return self.net(torch.cat(parts, dim=-1))

    def jvp_detached(
        self, x: Tensor, t: Tensor, cond: Tensor | None, r: Tensor | None, dx: Tensor, dt: Tensor, dr: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``(f, df)``: the output (differentiable) and its derivative along ``(dx, dt, dr)`` (not differentiable).

        The same numbers as ``torch.func.jvp`` for MeanFlow's stop-gradient
        target, at about half its cost here: the tangent runs layer by layer
        next to the forward pass under ``no_grad``, reusing each layer's
        pre-activation, instead of through forward-mode AD's generic rules.
        """
        t, r, cond = _checked_inputs(self, x, t, cond, r)
        dt = dt.expand(x.shape[0]) if dt.dim() == 0 else dt
        dr = dr.expand(x.shape[0]) if dr is not None and dr.dim() == 0 else dr
        emb, d_emb = _time_embedding_jvp(self.time_emb, t, r, dt, dr)
        parts, tangents = [x, emb.to(x.dtype)], [dx, d_emb.to(x.dtype)]
        if cond is not None:  # the condition is held fixed: zero tangent
            parts.append(cond.to(x.dtype))
            tangents.append(torch.zeros_like(parts[-1]))
        return _sequential_jvp(self.net, torch.cat(parts, dim=-1), torch.cat(tangents, dim=-1))


def _activation_jvp(act: nn.Module, h: Tensor, dh: Tensor) -> Tensor:
    """The tangent of an elementwise activation at pre-activation ``h`` (no graph)."""
    if isinstance(act, (Mish, nn.Mish)):
        return torch.ops.aten.mish_backward(dh, h)
    return torch.func.jvp(act, (h,), (dh,))[1]


def _sequential_jvp(seq: nn.Sequential, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    """``(seq(x), d seq(x) [dx])`` for a stack of ``nn.Linear`` and elementwise activations; the tangent has no graph."""
    h, dh = x, dx.detach()
    for layer in seq:
        with torch.no_grad():
            dh = F.linear(dh, layer.weight) if isinstance(layer, nn.Linear) else _activation_jvp(layer, h.detach(), dh)
        h = layer(h)
    return h, dh


def _time_embedding_jvp(emb: TimeEmbedding, t: Tensor, r: Tensor | None, dt: Tensor, dr: Tensor | None) -> tuple[Tensor, Tensor]:
    """``TimeEmbedding`` and its tangent along ``(dt, dr)``: d sin(a) = cos(a) da, d cos(a) = -sin(a) da."""

    def sinusoid(s: Tensor, ds: Tensor) -> tuple[Tensor, Tensor]:
        feats = emb.sin(s)  # [sin a, cos a] with a = s * scale * freqs
        sin, cos = feats.chunk(2, dim=-1)
        da = (ds.float() * emb.sin.scale)[:, None] * emb.sin.freqs[None, :]
        return feats, torch.cat([cos * da, -sin * da], dim=-1)

    feats, d_feats = sinusoid(t, dt)
    if emb.use_r:
        if r is None:
            r, dr = t, dt
        gap, d_gap = sinusoid(t - r, dt - (torch.zeros_like(dt) if dr is None else dr))
        feats, d_feats = torch.cat([feats, gap], dim=-1), torch.cat([d_feats, d_gap], dim=-1)
    return _sequential_jvp(emb.mlp, feats, d_feats)
