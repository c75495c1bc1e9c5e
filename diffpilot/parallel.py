"""Embarrassingly parallel jobs on Ray: one session helper and one ordered map for every job that needs it.

Data generation (maze2d segments, locomotion rollouts, driving scenes),
closed-loop evaluation (gym episodes, driving scenes) and trajectory
augmentation split their work into items whose results depend only on the
item (each carries its own seed), run them with :func:`ordered_map`, and merge
the results in item order, so the output is the same for 1 or N workers.
``workers=1`` without an address runs in this process (no Ray); ``workers=N``
starts a local Ray with N CPUs; ``ray_address`` joins a running cluster
(``ray start --head`` on one machine, ``ray start --address=<head>:6379`` on
the others, then ``ray_address=auto`` or ``ray://<head>:10001``).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

__all__ = ["ordered_map", "ray_session"]

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def ray_session(workers: int = 1, ray_address: str | None = None) -> Iterator[bool]:
    """Start Ray for the duration of the block when it is needed; yields whether Ray is in use.

    ``workers > 1`` starts a local Ray with that many CPUs; ``ray_address``
    joins a running cluster (``"auto"`` or ``"ray://host:10001"``). A Ray
    that is already running is reused and left running; one started here is
    shut down at the end. ``workers == 1`` without an address uses no Ray.
    """
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    workers = int(workers)
    if workers == 1 and not ray_address:
        yield False
        return
    import ray

    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False,
                                  "configure_logging": True}
        if ray_address:
            ray.init(address=ray_address, **kwargs)
        else:
            ray.init(num_cpus=workers, **kwargs)
        started = True
    try:
        yield True
    finally:
        if started:
            ray.shutdown()


def ordered_map(
    fn: Callable[[T], R], items: Sequence[T], *, workers: int = 1, ray_address: str | None = None,
    progress: bool = False, desc: str = "", unit: str = "item",
) -> list[R]:
    """``[fn(item) for item in items]``, as Ray tasks (one CPU each) when ``workers > 1`` or on a cluster.

    Results come back in item order whatever order the tasks finish in;
    ``fn`` must be importable by the workers (a module-level function of the package).
    """
    from tqdm.auto import tqdm

    items = list(items)
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress)
    try:
        with ray_session(workers, ray_address) as use_ray:
            if not use_ray or len(items) == 0:
                out = []
                for item in items:
                    out.append(fn(item))
                    bar.update(1)
                return out
            import ray

            remote = ray.remote(num_cpus=1)(_apply)
            fn_ref = ray.put(fn)
            pending = {remote.remote(fn_ref, item): i for i, item in enumerate(items)}
            results: list[Any] = [None] * len(items)
            waiting = list(pending)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for ref in done:
                    results[pending[ref]] = ray.get(ref)
                    bar.update(1)
            return results
    finally:
        bar.close()


def _apply(fn: Callable[[T], R], item: T) -> R:
    return fn(item)
