"""One training batch split over several processes: the draws and reductions a loss needs to stay exact.

Under data-parallel training (torchrun, see :mod:`diffpilot.train.distributed`)
each process computes the loss on its shard of a global batch. Three things
make that equal to one process computing it on the whole batch:

- every per-sample random draw (noise, timesteps) is drawn for the *global*
  batch from the generator every process shares, and each process keeps its
  rows (:func:`randn`, :func:`rand`, :func:`randint`, :func:`local_rows`), so
  the generators stay in step and each sample gets the noise it would get in
  one process;
- a batch statistic that only scales the loss (e.g. ``E|Q|``, a mask count)
  is averaged over the shards (:func:`shard_mean`);
- the gradients are averaged over the shards before clipping and the
  optimizer step (:func:`sync_gradients`, called by the policy's one
  gradient-step helper).

Outside a :func:`batch_shard` block (one process, the default) every helper
is the plain torch call, so single-process results are unchanged. This module
knows nothing about process groups: whoever opens the block passes the
averaging function (an all-reduce).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BatchShard", "batch_shard", "current", "global_rows", "local_rows", "rand", "randint", "randn",
    "shard_mean", "sync_gradients",
]


@dataclass(frozen=True)
class BatchShard:
    """This process holds rows ``[rank * b, (rank + 1) * b)`` of every global batch of ``world * b`` rows."""

    rank: int
    world: int
    average: Callable[[Tensor], None]  # in place: the tensor becomes its mean over the shards


_ACTIVE: ContextVar[BatchShard | None] = ContextVar("diffpilot_batch_shard", default=None)


@contextlib.contextmanager
def batch_shard(rank: int, world: int, average: Callable[[Tensor], None]) -> Iterator[BatchShard]:
    """Within the block, the batches the loss sees are shard ``rank`` of ``world`` equal shards."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    token = _ACTIVE.set(BatchShard(int(rank), int(world), average))
    try:
        yield _ACTIVE.get()  # type: ignore[misc]
    finally:
        _ACTIVE.reset(token)


def current() -> BatchShard | None:
    """The active shard, or None in a single-process run."""
    shard = _ACTIVE.get()
    return shard if shard is not None and shard.world > 1 else None


def global_rows(n: int) -> int:
    """The global batch size for a local batch of ``n`` rows."""
    shard = current()
    return n if shard is None else n * shard.world


def local_rows(x: Tensor, dim: int = 0) -> Tensor:
    """This process's rows of a tensor that holds the global batch along ``dim``."""
    shard = current()
    if shard is None:
        return x
    n = x.shape[dim] // shard.world
    return x.narrow(dim, shard.rank * n, n)


def _global_shape(shape: Sequence[int], batch_dim: int) -> list[int]:
    out = [int(s) for s in shape]
    out[batch_dim] = global_rows(out[batch_dim])
    return out


def randn(shape: Sequence[int] | int, *, generator: torch.Generator | None = None, batch_dim: int = 0, **kwargs) -> Tensor:
    """``torch.randn`` of a per-sample draw whose ``batch_dim`` is the local batch."""
    shape = [shape] if isinstance(shape, int) else shape
    return local_rows(torch.randn(_global_shape(shape, batch_dim), generator=generator, **kwargs), batch_dim)


def rand(shape: Sequence[int] | int, *, generator: torch.Generator | None = None, batch_dim: int = 0, **kwargs) -> Tensor:
    """``torch.rand`` of a per-sample draw whose ``batch_dim`` is the local batch."""
    shape = [shape] if isinstance(shape, int) else shape
    return local_rows(torch.rand(_global_shape(shape, batch_dim), generator=generator, **kwargs), batch_dim)


def randint(low: int, high: int, shape: Sequence[int] | int, *, generator: torch.Generator | None = None,
            batch_dim: int = 0, **kwargs) -> Tensor:
    """``torch.randint`` of a per-sample draw whose ``batch_dim`` is the local batch."""
    shape = [shape] if isinstance(shape, int) else shape
    return local_rows(torch.randint(low, high, _global_shape(shape, batch_dim), generator=generator, **kwargs), batch_dim)


def shard_mean(x: Tensor) -> Tensor:
    """A detached batch statistic averaged over the shards (equal shards: the global batch's value)."""
    shard = current()
    x = x.detach()
    if shard is None:
        return x
    out = x.clone()
    shard.average(out)
    return out


def sync_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the shards, in one flat reduction (no-op in one process).

    Every process runs the same code on the same generator state, so the same
    parameters hold a gradient everywhere; those without one are left alone.
    """
    shard = current()
    if shard is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    shard.average(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
