"""Closed-loop evaluation of a language-instructed policy on Meta-World MT10.

Any policy with ``reset(seed)``, ``plan_chunk(observation) -> (H, A)``,
``last_reasoning`` and ``last_timing`` runs here: the torch
:class:`~diffpilot.policy.diffusion_vla.DiffusionVLAPolicy` and the
onnxruntime :class:`~diffpilot.export.runtime.OnnxVLAPolicy` alike. The
runner renders only the frames the policy looks at (one per replan),
executes ``exec_horizon`` actions of each chunk, and scores each episode by
Meta-World's success flag. Episode seeds come from the evaluation seed
(never the demonstrations' own), and each episode's instruction is drawn
from the phrasings passed in, so the same call with held-out phrasings
measures language generalization. Where the policy writes reasoning, the
generated sub-goal is compared with the expert annotation of that moment.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from diffpilot.data.mt10 import episode_seed
from diffpilot.data.mt10_reasoning import annotate, subgoal_of
from diffpilot.sim.mt10 import MT10Env

__all__ = ["MT10Episode", "ReasoningPolicy", "run_mt10", "summarize_mt10"]


class ReasoningPolicy(Protocol):
    last_reasoning: str
    last_timing: dict[str, float]

    def reset(self, seed: int | None = None) -> None: ...

    def plan_chunk(self, observation: Mapping[str, Any]) -> np.ndarray: ...


@dataclass
class MT10Episode:
    task: str
    seed: int
    instruction: str
    success: bool
    steps: int
    replans: int
    reasoning_checked: int
    reasoning_correct: int
    reason_ms: float  # total over the episode
    action_ms: float  # total over the episode
    last_reasoning: str

    def row(self) -> dict[str, Any]:
        return asdict(self)


def _pick(seed: int, task: str, episode: int, count: int) -> int:
    digest = hashlib.sha256(f"mt10-eval-instruction/{seed}/{task}/{episode}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % count


def run_mt10(policy: ReasoningPolicy, tasks: Sequence[str], instructions: Mapping[str, Sequence[str]],
             episodes: int = 20, seed: int = 1000, max_steps: int = 200, exec_horizon: int = 8,
             image_size: int = 64, camera: str | None = None, given_reasoning: bool = False,
             progress: bool = True) -> list[MT10Episode]:
    """``episodes`` closed-loop episodes per task; ``given_reasoning`` feeds the expert's annotation instead."""
    missing = [t for t in tasks if not instructions.get(t)]
    if missing:
        raise ValueError(f"no instructions for task(s) {missing}; the instructions file must list phrasings for "
                         "every evaluated task")
    records: list[MT10Episode] = []
    bar = tqdm(total=len(tasks) * episodes, desc="MT10 episodes", disable=not progress, leave=False)
    for task in tasks:
        env = MT10Env(task, image_size=image_size, max_steps=max_steps, **({"camera": camera} if camera else {}))
        try:
            for i in range(episodes):
                s = episode_seed(seed, task, i)
                phrasings = list(instructions[task])
                instruction = phrasings[_pick(seed, task, i, len(phrasings))]
                records.append(_episode(policy, env, task, s, instruction, exec_horizon, given_reasoning))
                bar.update(1)
        finally:
            env.close()
    bar.close()
    return records


def _episode(policy: ReasoningPolicy, env: MT10Env, task: str, seed: int, instruction: str, exec_horizon: int,
             given_reasoning: bool) -> MT10Episode:
    policy.reset(seed=seed)
    obs = env.reset(seed, render=True)
    replans = checked = correct = 0
    reason_ms = action_ms = 0.0
    done = success = False
    while not done:
        obs = {**obs, "instruction": instruction}
        annotation = annotate(task, obs["state"])
        if given_reasoning:
            obs["reasoning"] = annotation.text
        chunk = policy.plan_chunk(obs)
        replans += 1
        timing = policy.last_timing
        reason_ms += timing.get("reason_ms", 0.0)
        action_ms += timing.get("action_ms", 0.0)
        if timing.get("reason_ms", 0.0) > 0 and policy.last_reasoning:
            checked += 1
            correct += int(subgoal_of(policy.last_reasoning) == annotation.subgoal)
        n = min(exec_horizon, len(chunk))
        for k in range(n):
            obs, success, done = env.step(chunk[k], render=(k == n - 1))
            if done:
                break
    return MT10Episode(task, seed, instruction, bool(success), env.steps, replans, checked, correct, reason_ms,
                       action_ms, policy.last_reasoning)


def summarize_mt10(records: Sequence[MT10Episode]) -> dict[str, Any]:
    """Success per task and overall, reasoning accuracy, decisions per second and time per replan."""
    tasks = sorted({r.task for r in records}, key=[r.task for r in records].index)
    per_task = {t: float(np.mean([r.success for r in records if r.task == t])) for t in tasks}
    replans = sum(r.replans for r in records)
    checked = sum(r.reasoning_checked for r in records)
    total_ms = sum(r.reason_ms + r.action_ms for r in records)
    return {
        "success": float(np.mean(list(per_task.values()))) if per_task else float("nan"),
        "per_task": per_task,
        "episodes": len(records),
        "reasoning_accuracy": sum(r.reasoning_correct for r in records) / checked if checked else None,
        "decisions_per_s": 1000.0 * replans / total_ms if total_ms > 0 else None,
        "reason_ms_per_replan": sum(r.reason_ms for r in records) / replans if replans else None,
        "action_ms_per_replan": sum(r.action_ms for r in records) / replans if replans else None,
    }
