"""A fixed-rate control loop: act at ``hz`` against a simulator and count missed deadlines.

Like the runtime it drives, this module never imports torch, so the same
loop measures latency on the robot's computer. Each tick the policy gets
the newest observation and must return its action before the next tick;
an action that arrives late is still applied (the controller holds no
spare), and the tick is counted as a deadline miss.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np


@dataclass(frozen=True)
class LoopStats:
    """Latency of ``act()`` per tick and how many ticks missed their deadline."""

    hz: float
    ticks: int
    deadline_misses: int
    latency_ms_p50: float
    latency_ms_p99: float
    latency_ms_max: float
    achieved_hz: float
    episode_returns: list[float]

    @property
    def miss_rate(self) -> float:
        return self.deadline_misses / max(self.ticks, 1)

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "miss_rate": self.miss_rate}


def run_fixed_rate(
    make_env: Callable[[], gym.Env], policy: Any, *, hz: float, episodes: int = 1, seed: int = 0
) -> tuple[LoopStats, np.ndarray]:
    """Run ``episodes`` episodes at ``hz``; returns the stats and every tick's ``act()`` latency in ms."""
    if hz <= 0:
        raise ValueError(f"hz must be positive, got {hz}")
    period = 1.0 / hz
    env = make_env()
    latencies, returns, misses = [], [], 0
    start = time.perf_counter()
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            policy.reset(seed=seed + ep)
            total, done = 0.0, False
            next_tick = time.perf_counter()
            while not done:
                t0 = time.perf_counter()
                action = policy.act(obs)
                latency = time.perf_counter() - t0
                latencies.append(latency * 1e3)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = terminated or truncated
                next_tick += period
                slack = next_tick - time.perf_counter()
                if latency > period or slack < 0:
                    misses += 1
                    next_tick = time.perf_counter()  # re-anchor instead of bursting to catch up
                else:
                    time.sleep(slack)
            returns.append(total)
    finally:
        env.close()
    lat = np.asarray(latencies)
    elapsed = time.perf_counter() - start
    stats = LoopStats(
        hz=hz, ticks=len(lat), deadline_misses=misses,
        latency_ms_p50=float(np.percentile(lat, 50)), latency_ms_p99=float(np.percentile(lat, 99)),
        latency_ms_max=float(lat.max()), achieved_hz=len(lat) / elapsed, episode_returns=returns,
    )
    return stats, lat
