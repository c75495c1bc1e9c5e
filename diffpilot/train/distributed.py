"""Data-parallel training under torchrun: the process group, rank helpers and rank-0 gating.

``torchrun --nproc_per_node=N -m diffpilot.cli train ...`` starts N copies of
the command; each finds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT`` in its environment, and :func:`setup` joins
them in one process group (gloo on CPU, NCCL on GPU, one GPU per local rank).
Without those variables (a plain ``diffpilot train``) nothing is started and
every helper answers for a single process.

The model is not wrapped in ``DistributedDataParallel``: every process holds
the same weights, draws the same global batch indices and per-sample noise
from the same seeded generators and keeps its shard
(:mod:`diffpilot.policy.generative.shard`); gradients are averaged explicitly
before every optimizer step (:meth:`PolicyBase.optimizer_step`), which also
covers losses computed under ``torch.func.jvp`` (MeanFlow, OFQL) that DDP's
autograd hooks would miss. Rank 0 alone writes checkpoints, logs, plots and
evaluations.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diffpilot.policy.generative import shard

__all__ = ["Dist", "barrier", "is_main", "rank", "rank_zero_first", "setup", "world_size"]

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run: its rank, the world size and the device it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def average_(self, x: Tensor) -> None:
        """In place: ``x`` becomes its mean over the processes."""
        if self.active:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x.div_(self.world)

    def shard(self) -> contextlib.AbstractContextManager:
        """The block in which the loss sees this process's shard of each global batch."""
        if not self.active:
            return contextlib.nullcontext()
        return shard.batch_shard(self.rank, self.world, self.average_)

    def local_batch(self, global_batch: int) -> int:
        """Rows per process of a global batch; refused when it does not split evenly."""
        if global_batch % self.world:
            raise ValueError(
                f"train.batch_size={global_batch} (the global batch) does not split over {self.world} processes; "
                f"pick a multiple of {self.world}"
            )
        return global_batch // self.world

    def broadcast_module(self, module: nn.Module) -> None:
        """Every process takes rank 0's parameters and buffers."""
        if self.active:
            with torch.no_grad():
                for t in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(t.data, src=0)

    def check_in_sync(self, module: nn.Module, what: str) -> None:
        """Refuse weights that differ between processes (an optimizer stepped without averaging)."""
        if not self.active:
            return
        with torch.no_grad():
            s = torch.stack([p.detach().double().sum() for p in module.parameters()] or [torch.zeros((), dtype=torch.float64)])
            lo, hi = s.clone().to(self.device), s.clone().to(self.device)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.allclose(lo, hi, rtol=1e-9, atol=1e-12):
            raise RuntimeError(
                f"{what}: the weights differ between processes; every optimizer step must go through "
                "PolicyBase.optimizer_step (or gradient_step) so gradients are averaged"
            )

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


_CURRENT = Dist()


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def setup(device: str | torch.device = "cpu") -> Dist:
    """Join the torchrun process group when launched by torchrun (idempotent); else a single process.

    ``device`` "cuda" trains each process on GPU ``LOCAL_RANK`` with NCCL; a
    CPU device uses gloo.
    """
    global _CURRENT
    device = torch.device(device)
    world = _env_world()
    if world <= 1:
        _CURRENT = Dist(device=device)
        return _CURRENT
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {missing} are not set; start data-parallel runs with torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(minutes=30))
        atexit.register(shutdown)  # leave the group cleanly when the command ends
    elif dist.get_world_size() != world:
        raise RuntimeError(f"a process group of {dist.get_world_size()} is running, WORLD_SIZE says {world}")
    _CURRENT = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device)
    return _CURRENT


def current() -> Dist:
    """The last :func:`setup`'s answer (a single process before any)."""
    return _CURRENT


def rank() -> int:
    return _CURRENT.rank


def world_size() -> int:
    return _CURRENT.world


def is_main() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return _CURRENT.main


def barrier() -> None:
    _CURRENT.barrier()


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generates a cached data set), the others after it (and find the cache)."""
    if _CURRENT.active and not _CURRENT.main:
        _CURRENT.barrier()
    yield
    if _CURRENT.active and _CURRENT.main:
        _CURRENT.barrier()


def shutdown() -> None:
    """Leave the process group (end of a torchrun command)."""
    global _CURRENT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Dist(device=_CURRENT.device)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(local_rank: int, fn, nprocs: int, port: int, args: tuple) -> None:  # type: ignore[no-untyped-def]
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(nprocs),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        fn(*args)
    finally:
        shutdown()


def launch(fn, nprocs: int, *args) -> None:  # type: ignore[no-untyped-def]
    """Run ``fn(*args)`` in ``nprocs`` local processes joined as torchrun would (1: in this process).

    For tests and benchmarks on one machine; ``fn`` must be importable (spawn).
    Use torchrun for real runs, on one machine or many.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    if nprocs == 1:
        fn(*args)
        return
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(fn, nprocs, _free_port(), args), nprocs=nprocs, start_method="spawn")
