"""A 1-D temporal U-Net that denoises action chunks.

The structure is the one Diffusion Policy (Chi et al., RSS 2023) uses for its
CNN variant: residual blocks of Conv1d + GroupNorm + Mish along the chunk's
time axis, each FiLM-modulated by the diffusion time and a global observation
vector, strided-conv downsampling, transposed-conv upsampling and skip
connections. Convolutions over the chunk's time axis give the smooth,
temporally consistent actions that made that policy work; the defaults are the
paper's layout at a quarter of its width so it trains on a CPU.

Parameter counts (``action_dim=2``, ``cond_dim=20``, ``kernel_size=5``):

==========================  =========  ==========
``down_dims``               time_dim   parameters
==========================  =========  ==========
(64, 128, 256) (default)    128        4,545,154
(256, 512, 1024)            256        67,200,770
==========================  =========  ==========

The horizon ``H`` must be divisible by ``2 ** (len(down_dims) - 1)``: every
level but the deepest halves the length and the decoder doubles it back, so an
odd length at any level would not line up with its skip connection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .embeddings import FiLM, TimeEmbedding


class _ConvNormMish(nn.Module):
    """Length-preserving Conv1d, GroupNorm, Mish."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(n_groups, out_channels)
        self.act = nn.Mish()

    def forward(self, h: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(h)))


class _FiLMResidualBlock(nn.Module):
    """Two conv layers with FiLM between them, plus a (1x1-projected) residual.

    FiLM sits after the first conv so the condition shapes what the second
    conv sees; the zero-initialized FiLM makes a fresh block condition-blind
    and lets training grow the conditioning from there.
    """

    def __init__(
        self, in_channels: int, out_channels: int, film_dim: int, kernel_size: int, n_groups: int
    ) -> None:
        super().__init__()
        self.conv1 = _ConvNormMish(in_channels, out_channels, kernel_size, n_groups)
        self.film = FiLM(film_dim, out_channels)
        self.conv2 = _ConvNormMish(out_channels, out_channels, kernel_size, n_groups)
        self.residual = (
            nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        out = self.conv2(self.film(self.conv1(h), c))
        return out + self.residual(h)


class ConditionalUnet1D(nn.Module):
    """Denoiser ``f(x, t, cond, r)`` for action chunks ``x`` of shape ``(B, H, action_dim)``.

    Args:
        action_dim: features per chunk step.
        cond_dim: size of the global condition vector ``cond`` ``(B, cond_dim)``;
            0 makes the network time-conditioned only (``cond`` must be None).
        down_dims: channels per resolution level, shallow to deep.
        kernel_size: odd temporal kernel size of every conv block.
        n_groups: GroupNorm groups; must divide every entry of ``down_dims``.
        time_dim: width of the time embedding.
        use_r: embed MeanFlow's second time ``r`` as well.
        horizon: if given, the only chunk length accepted, checked here once.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        down_dims: Sequence[int] = (64, 128, 256),
        kernel_size: int = 5,
        n_groups: int = 8,
        time_dim: int = 128,
        use_r: bool = False,
        horizon: int | None = None,
    ) -> None:
        super().__init__()
        down_dims = tuple(int(d) for d in down_dims)
        if action_dim < 1 or cond_dim < 0:
            raise ValueError(f"need action_dim >= 1 and cond_dim >= 0, got {action_dim} and {cond_dim}")
        if not down_dims:
            raise ValueError("down_dims must name at least one level, e.g. (64, 128, 256)")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to preserve the chunk length, got {kernel_size}")
        bad = [d for d in down_dims if d % n_groups]
        if bad:
            raise ValueError(f"n_groups={n_groups} must divide every down_dims entry; {bad} are not divisible")
        self.action_dim = action_dim
        self.cond_dim = cond_dim
        self.use_r = use_r
        self.horizon_multiple = 2 ** (len(down_dims) - 1)
        if horizon is not None and horizon % self.horizon_multiple:
            raise ValueError(
                f"horizon {horizon} is not divisible by 2**(len(down_dims)-1) = {self.horizon_multiple} "
                f"for down_dims={down_dims}; pick a multiple of {self.horizon_multiple} or fewer levels"
            )
        self.horizon = horizon

        film_dim = time_dim + cond_dim
        self.time_embed = TimeEmbedding(time_dim, use_r=use_r)

        def block(cin: int, cout: int) -> _FiLMResidualBlock:
            return _FiLMResidualBlock(cin, cout, film_dim, kernel_size, n_groups)

        in_dims = (action_dim, *down_dims[:-1])
        self.down_blocks = nn.ModuleList(
            nn.ModuleList([block(cin, cout), block(cout, cout)]) for cin, cout in zip(in_dims, down_dims)
        )
        self.downsamples = nn.ModuleList(nn.Conv1d(d, d, 3, stride=2, padding=1) for d in down_dims[:-1])
        deepest = down_dims[-1]
        self.mid_blocks = nn.ModuleList([block(deepest, deepest), block(deepest, deepest)])
        # Decoder levels run deep to shallow; level i upsamples from down_dims[i + 1]
        # and merges the encoder's skip at down_dims[i].
        shallow_to_deep = list(zip(down_dims[:-1], down_dims[1:]))
        self.upsamples = nn.ModuleList(
            nn.ConvTranspose1d(deep, deep, 4, stride=2, padding=1) for _, deep in reversed(shallow_to_deep)
        )
        self.up_blocks = nn.ModuleList(
            nn.ModuleList([block(deep + skip, skip), block(skip, skip)]) for skip, deep in reversed(shallow_to_deep)
        )
        self.head = nn.Sequential(
            _ConvNormMish(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], action_dim, 1),
        )
        # A small (not zero) output layer: the first prediction is near zero, so the
        # loss starts near the target's variance, while gradients still reach
        # every layer from the first step.
        with torch.no_grad():
            self.head[-1].weight.mul_(1e-2)
            self.head[-1].bias.zero_()

    def _check_inputs(self, x: Tensor, t: Tensor, cond: Tensor | None, r: Tensor | None) -> None:
        # Shape checks only (never tensor values), so tracing and export see no
        # data-dependent branches.
        if x.dim() != 3 or x.shape[-1] != self.action_dim:
            raise ValueError(f"x must be (B, H, action_dim={self.action_dim}), got {tuple(x.shape)}")
        batch, length = x.shape[0], x.shape[1]
        if self.horizon is not None and length != self.horizon:
            raise ValueError(f"x must be (B, H={self.horizon}, {self.action_dim}), got {tuple(x.shape)}")
        if length % self.horizon_multiple:
            raise ValueError(
                f"chunk length H={length} of x {tuple(x.shape)} must be divisible by "
                f"{self.horizon_multiple} (2**(len(down_dims)-1))"
            )
        if t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"t must be (B,) = ({batch},), got {tuple(t.shape)}")
        if cond is not None and not isinstance(cond, Tensor):
            raise ValueError(
                f"ConditionalUnet1D takes a condition vector, got {type(cond).__name__}; "
                "structured (TokenSets) conditions need the transformer denoiser"
            )
        if self.cond_dim == 0:
            if cond is not None:
                raise ValueError(f"network built with cond_dim=0 takes cond=None, got {tuple(cond.shape)}")
        elif cond is None or cond.dim() != 2 or cond.shape[0] != batch or cond.shape[1] != self.cond_dim:
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"cond must be (B, cond_dim) = ({batch}, {self.cond_dim}), got {got}")
        if r is not None:
            if not self.use_r:
                raise ValueError("r was given but the network was built with use_r=False")
            if r.dim() != 1 or r.shape[0] != batch:
                raise ValueError(f"r must be (B,) = ({batch},), got {tuple(r.shape)}")

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        """Return a tensor shaped like ``x`` (noise, velocity or sample, per the objective)."""
        self._check_inputs(x, t, cond, r)
        c = self.time_embed(t, r)
        if cond is not None:
            c = torch.cat([c, cond], dim=-1)

        h = x.transpose(1, 2)  # (B, action_dim, H): Conv1d is channels-first
        skips = []
        for level, (first, second) in enumerate(self.down_blocks):
            h = second(first(h, c), c)
            if level < len(self.downsamples):
                skips.append(h)
                h = self.downsamples[level](h)
        for mid in self.mid_blocks:
            h = mid(h, c)
        for upsample, (first, second) in zip(self.upsamples, self.up_blocks):
            h = torch.cat([upsample(h), skips.pop()], dim=1)
            h = second(first(h, c), c)
        return self.head(h).transpose(1, 2)
