"""Closed-loop evaluation of a Policy in any gymnasium environment.

The runner only needs ``reset``/``act`` from the policy and the standard
gymnasium step API from the environment, so the same code evaluates torch
policies, onnxruntime policies and scripted baselines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from diffpilot.data.d4rl import normalized_score
from diffpilot.policy.base import Policy


@dataclass
class EpisodeRecord:
    """What one closed-loop episode did and what it cost."""

    episode: int
    seed: int
    episode_return: float
    length: int
    success: bool
    normalized_score: float | None
    latency_ms_p50: float
    latency_ms_p99: float
    latency_ms_max: float
    latency_ms_mean: float
    observations: np.ndarray | None = field(default=None, repr=False)
    extras: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """JSON-ready fields (no arrays)."""
        out = asdict(self)
        out.pop("observations")
        return out


def run_episodes(
    make_env: Callable[[], gym.Env],
    policy: Policy,
    episodes: int,
    *,
    seed: int = 0,
    ref_scores: tuple[float, float] | None = None,
    keep_observations: bool = True,
    progress: bool = True,
    workers: int = 1,
    ray_address: str | None = None,
) -> list[EpisodeRecord]:
    """Run ``episodes`` episodes; episode ``i`` seeds both env and policy with ``seed + i``.

    ``workers > 1`` or ``ray_address`` runs the episodes as Ray tasks (each
    with its own environment and a copy of the policy,
    :func:`diffpilot.parallel.ordered_map`); the records are the same as in one
    process, in episode order, except for the measured latencies.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if workers != 1 or ray_address:
        from diffpilot.parallel import ordered_map

        jobs = [(make_env, policy, i, seed + i, ref_scores, keep_observations) for i in range(episodes)]
        return ordered_map(_episode_task, jobs, workers=workers, ray_address=ray_address, progress=progress,
                           desc="eval", unit="episode")
    env = make_env()
    try:
        return [_episode(env, policy, i, seed + i, ref_scores, keep_observations)
                for i in tqdm(range(episodes), desc="eval", disable=not progress, dynamic_ncols=True)]
    finally:
        env.close()


def _episode_task(args: tuple) -> EpisodeRecord:
    """One episode in a fresh environment (a Ray task of :func:`run_episodes`)."""
    make_env, policy, i, ep_seed, ref_scores, keep_observations = args
    env = make_env()
    try:
        return _episode(env, policy, i, ep_seed, ref_scores, keep_observations)
    finally:
        env.close()


def _episode(env: gym.Env, policy: Policy, i: int, ep_seed: int, ref_scores: tuple[float, float] | None,
             keep_observations: bool) -> EpisodeRecord:
    obs, info = env.reset(seed=ep_seed)
    policy.reset(seed=ep_seed)
    total, steps, success = 0.0, 0, False
    latencies, observations = [], [obs]
    done = False
    while not done:
        t0 = time.perf_counter()
        action = policy.act(obs)
        latencies.append((time.perf_counter() - t0) * 1e3)
        obs, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
        steps += 1
        success = success or bool(info.get("success", False))
        done = terminated or truncated
        if keep_observations:
            observations.append(obs)
    lat = np.asarray(latencies)
    return EpisodeRecord(
        episode=i,
        seed=ep_seed,
        episode_return=total,
        length=steps,
        success=success,
        normalized_score=normalized_score(total, *ref_scores) if ref_scores else None,
        latency_ms_p50=float(np.percentile(lat, 50)),
        latency_ms_p99=float(np.percentile(lat, 99)),
        latency_ms_max=float(lat.max()),
        latency_ms_mean=float(lat.mean()),
        observations=np.asarray(observations) if keep_observations else None,
    )


def summarize(records: list[EpisodeRecord]) -> dict[str, float]:
    """Means (and std of return/score) over episodes."""
    rets = np.array([r.episode_return for r in records])
    out = {
        "episodes": len(records),
        "return_mean": float(rets.mean()),
        "return_std": float(rets.std()),
        "success_rate": float(np.mean([r.success for r in records])),
        "latency_ms_p50": float(np.median([r.latency_ms_p50 for r in records])),
        "latency_ms_p99": float(np.max([r.latency_ms_p99 for r in records])),
        "latency_ms_mean": float(np.mean([r.latency_ms_mean for r in records])),
    }
    scores = [r.normalized_score for r in records if r.normalized_score is not None]
    if scores:
        out["normalized_score"] = float(np.mean(scores))
        out["normalized_score_std"] = float(np.std(scores))
    return out
