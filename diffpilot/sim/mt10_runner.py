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

``workers > 1`` (local Ray processes) or ``ray_address`` (a cluster) runs
the (task, episode) pairs through :func:`diffpilot.parallel.ordered_map`.
Each worker builds its own policy (once per worker process and call) from a
checkpoint folder or a ``policy_factory``, or receives a pickled copy of a
picklable policy object (a torch policy; not an onnxruntime one, whose
sessions do not pickle), and keeps one environment per task. Every episode
depends only on its seed, so the records equal the one-worker records in
order, except the timing fields (``reason_ms``, ``action_ms``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
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


def run_mt10(policy: ReasoningPolicy | str | os.PathLike[str] | None, tasks: Sequence[str],
             instructions: Mapping[str, Sequence[str]], episodes: int = 20, seed: int = 1000, max_steps: int = 200,
             exec_horizon: int = 8, image_size: int = 64, camera: str | None = None, given_reasoning: bool = False,
             progress: bool = True, *, workers: int = 1, ray_address: str | None = None,
             policy_factory: Callable[[], ReasoningPolicy] | None = None) -> list[MT10Episode]:
    """``episodes`` closed-loop episodes per task; ``given_reasoning`` feeds the expert's annotation instead.

    ``policy``: a policy object, or a saved policy folder (loaded with
    :func:`diffpilot.policy.registry.load_policy`); or None with
    ``policy_factory``, a picklable zero-argument callable that builds one
    (e.g. ``functools.partial(OnnxVLAPolicy, "model.onnx")``). ``workers`` /
    ``ray_address`` run the episodes on Ray (see the module docstring); there
    a folder or a factory is rebuilt once per worker, and a policy object must
    pickle. ``workers=1`` without an address runs here, one policy for all episodes.
    """
    missing = [t for t in tasks if not instructions.get(t)]
    if missing:
        raise ValueError(f"no instructions for task(s) {missing}; the instructions file must list phrasings for "
                         "every evaluated task")
    if policy is None and policy_factory is None:
        raise ValueError("pass a policy, a saved policy folder, or a policy_factory")
    if policy is not None and policy_factory is not None:
        raise ValueError("pass either a policy (object or folder) or a policy_factory, not both")
    if isinstance(policy, (str, os.PathLike)):
        from diffpilot.policy.registry import load_policy

        policy_factory, policy = functools.partial(load_policy, Path(policy)), None
    from diffpilot.parallel import ordered_map, ray_session

    with ray_session(workers, ray_address) as use_ray:
        if use_ray:
            if policy is not None:
                try:
                    pickle.dumps(policy)
                except Exception as exc:  # e.g. onnxruntime sessions
                    raise ValueError(f"a {type(policy).__name__} cannot be sent to Ray workers ({exc}); pass "
                                     "policy_factory= (or a saved policy folder) so each worker builds its own") from exc
            jobs = []
            for task in tasks:
                phrasings = list(instructions[task])
                for i in range(episodes):
                    jobs.append((task, episode_seed(seed, task, i), phrasings[_pick(seed, task, i, len(phrasings))]))
            spec = _WorkerSpec(uuid.uuid4().hex, policy, policy_factory, max_steps, image_size, camera, exec_horizon,
                               given_reasoning)
            return ordered_map(functools.partial(_worker_episode, spec), jobs, workers=workers,
                               ray_address=ray_address, progress=progress, desc="MT10 episodes", unit="episode")
    if policy is None:
        policy = policy_factory()
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


@dataclass(frozen=True)
class _WorkerSpec:
    """What a Ray worker needs to run episodes of one :func:`run_mt10` call (``token`` names the call)."""

    token: str
    policy: Any
    policy_factory: Callable[[], ReasoningPolicy] | None
    max_steps: int
    image_size: int
    camera: str | None
    exec_horizon: int
    given_reasoning: bool


_WORKER_STATE: dict[str, Any] = {}  # per worker process: the current call's policy and one environment per task


def _worker_episode(spec: _WorkerSpec, job: tuple[str, int, str]) -> MT10Episode:
    """One (task, seed, instruction) episode in a Ray worker (an :func:`ordered_map` item)."""
    task, seed, instruction = job
    state = _WORKER_STATE
    if state.get("token") != spec.token:
        for env in state.get("envs", {}).values():
            env.close()
        state.clear()
        state.update(token=spec.token, envs={},
                     policy=spec.policy if spec.policy is not None else spec.policy_factory())
    envs = state["envs"]
    if task not in envs:
        envs[task] = MT10Env(task, image_size=spec.image_size, max_steps=spec.max_steps,
                             **({"camera": spec.camera} if spec.camera else {}))
    return _episode(state["policy"], envs[task], task, seed, instruction, spec.exec_horizon, spec.given_reasoning)


def _episode(policy: ReasoningPolicy, env: MT10Env, task: str, seed: int, instruction: str, exec_horizon: int,
             given_reasoning: bool) -> MT10Episode:
    if given_reasoning and not hasattr(policy, "given_reasoning"):
        raise ValueError(f"a {type(policy).__name__} cannot read given reasoning; evaluate the torch policy")
    if hasattr(policy, "given_reasoning"):
        policy.given_reasoning = given_reasoning  # the runner's flag decides: read the annotation or generate
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
