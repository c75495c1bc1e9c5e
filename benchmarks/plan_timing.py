"""Plan latency of several exported planners, timed so that machine load falls on all of them alike."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any


def interleaved_plan_ms(runtimes: Mapping[str, Any], samples: Sequence[Any], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each ``runtime.plan(sample)``: ``rounds`` passes over ``samples``, every runtime once per round
    in turn (a warm-up plan first), so a slow spell of the machine is shared rather than landing on one planner."""
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, rt in runtimes.items():
            rt.plan(samples[0])
            for s in samples:
                t0 = time.perf_counter()
                rt.plan(s)
                times[name].append(1e3 * (time.perf_counter() - t0))
    return times
