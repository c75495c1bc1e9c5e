"""Offline RL on D4RL-format data: DQL, OFQL and the BC references through the one trainer.

``train_offline_rl`` checks the data against the task's environment before any
work, builds the policy from its registered kind, and trains it with
:class:`~diffpilot.train.trainer.Trainer` on uniformly drawn
``(s, a, r, s', done)`` transitions (rows cut by a timeout are never used as a
transition), evaluating the acting policy closed loop every ``eval_every``
steps through :func:`diffpilot.sim.runner.run_episodes` and keeping ``out/policy``
(last) and ``out/best``. The trainer's state makes the run resumable exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from diffpilot.data.d4rl import D4RL_REF_SCORES, OfflineDataset
from diffpilot.data.errors import DatasetError
from diffpilot.data.locomotion import LOCOMOTION_ENVS
from diffpilot.fileio import atomic_path
from diffpilot.policy.registry import build_policy
from diffpilot.sim.runner import run_episodes, summarize
from diffpilot.sim.tasks import Task, dataset_reference, get_task, locomotion_task
from diffpilot.train import distributed
from diffpilot.train.trainer import TensorRows, Trainer, TrainerConfig

__all__ = ["OFFLINE_RL_KINDS", "load_policy_yaml", "resolve_task", "train_offline_rl"]

OFFLINE_RL_KINDS = ("dql", "ofql", "flow_bc", "diffusion_bc")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "policy"


# ----------------------------------------------------------------------------- configs and tasks


def load_policy_yaml(name: str, task_name: str | None = None) -> dict[str, Any]:
    """The options of ``conf/policy/<name>.yaml`` for ``task_name`` (per-task overrides applied)."""
    from diffpilot.policy.registry import policy_options

    path = CONF_DIR / f"{name}.yaml"
    if name not in OFFLINE_RL_KINDS or not path.is_file():
        raise ValueError(f"unknown offline-RL policy {name!r}; choose one of {sorted(OFFLINE_RL_KINDS)}")
    return policy_options(yaml.safe_load(path.read_text()), task_name)[1]


def resolve_task(task: str | Task) -> Task:
    """A :class:`Task` from a task object or a name: ``maze2d-<maze>`` or ``<hopper|halfcheetah|walker2d>[-<kind>]``."""
    if isinstance(task, Task):
        return task
    name = str(task)
    if name.startswith("maze2d-"):
        return get_task(name)
    family = name.split("-", 1)[0]
    if family in LOCOMOTION_ENVS:
        return locomotion_task(family)
    valid = ["maze2d-umaze", "maze2d-medium", "maze2d-large", *LOCOMOTION_ENVS, *(f"{e}-medium" for e in LOCOMOTION_ENVS)]
    raise ValueError(f"unknown task {name!r}; valid tasks: {valid} (locomotion names may end in -medium, -medium-replay, -medium-expert)")


def _task_for(task: str | Task, ds: OfflineDataset) -> Task:
    """Resolve ``task``; a maze2d task takes the data set's reward type, and a data set made for another maze is refused."""
    if isinstance(task, str) and task.startswith("maze2d-"):
        maze = ds.metadata.get("maze")
        if maze is not None and f"maze2d-{maze}" != task:
            raise DatasetError(f"the data set was generated in maze2d-{maze} but the task is {task!r}; use matching data")
        reward = ds.metadata.get("reward_type", "sparse")
        return get_task(task, reward)
    resolved = resolve_task(task)
    env_id = ds.metadata.get("env_id")
    if resolved.name in LOCOMOTION_ENVS and env_id is not None and env_id != LOCOMOTION_ENVS[resolved.name]:
        raise DatasetError(f"the data set was collected in {env_id} but the task {task!r} runs {LOCOMOTION_ENVS[resolved.name]}; use matching data")
    return resolved


def _reference(task: Task, ds: OfflineDataset, episodes: int) -> tuple[tuple[float, float], str]:
    ref = dataset_reference(ds)
    if ref is not None:
        return ref, f"stored in the data set ({ds.metadata.get('ref_source', 'metadata')})"
    family = task.name.split("-", 1)[0]
    if family in LOCOMOTION_ENVS:
        return D4RL_REF_SCORES[family], "D4RL's published reference (the data set stores none)"
    return task.local_reference(episodes), f"local reference over {episodes} episodes"


def _check_data(ds: OfflineDataset, task: Task) -> tuple[np.ndarray, np.ndarray | None]:
    """Policy observations for every row and their successors; one clear error on any mismatch."""
    if len(ds) < 2:
        raise DatasetError(f"the data set has {len(ds)} rows; offline RL needs at least 2 transitions")
    for key in ("observations", "actions", "rewards"):
        arr = getattr(ds, key)
        if not np.isfinite(arr).all():
            row = int(np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))[0])
            raise DatasetError(f"data set key {key!r} holds NaN or inf at row {row}; repair or drop that row before training")
    if ds.next_observations is not None and not np.isfinite(ds.next_observations).all():
        raise DatasetError("data set key 'next_observations' holds NaN or inf; repair the data before training")
    try:
        obs = task.observations(ds)
        next_obs = task.observations(replace(ds, observations=ds.next_observations)) if ds.next_observations is not None else None
    except ValueError as err:
        raise DatasetError(f"the data set does not fit task {task.name!r}: {err}") from err
    env = task.make_env()
    try:
        env_obs, env_act = env.observation_space.shape, env.action_space.shape
    finally:
        env.close()
    if tuple(obs.shape[1:]) != tuple(env_obs):
        raise DatasetError(
            f"observation size mismatch: the data set gives observations of size {obs.shape[1]} for task "
            f"{task.name!r} but its environment observes {env_obs}; use the data set made for this task"
        )
    if (ds.act_dim,) != tuple(env_act):
        raise DatasetError(
            f"action size mismatch: the data set's actions have size {ds.act_dim} but task {task.name!r} "
            f"takes actions of shape {env_act}; use the data set made for this task"
        )
    return obs, next_obs


def _transition_arrays(ds: OfflineDataset, obs: np.ndarray, next_obs: np.ndarray | None) -> dict[str, torch.Tensor]:
    view = OfflineDataset(
        observations=obs, actions=ds.actions, rewards=ds.rewards, terminals=ds.terminals,
        timeouts=ds.timeouts, next_observations=next_obs,
    )
    tr = view.transitions()
    if len(tr.rewards) == 0:
        raise DatasetError("the data set has no usable (s, a, r, s') transition (every row ends at a timeout)")
    return {
        "obs": torch.from_numpy(tr.observations),
        "action": torch.from_numpy(tr.actions),
        "reward": torch.from_numpy(tr.rewards),
        "next_obs": torch.from_numpy(tr.next_observations),
        "done": torch.from_numpy(tr.dones.astype(np.float32)),
    }


# ----------------------------------------------------------------------------- training


def _score(policy: torch.nn.Module, task: Task, ref: tuple[float, float], episodes: int, seed: int) -> dict[str, float]:
    return summarize(run_episodes(task.make_env, policy, int(episodes), seed=seed, ref_scores=ref, progress=False))


def evaluate_policy(
    policy: torch.nn.Module, dataset: OfflineDataset, task: str | Task, episodes: int, seed: int = 1000,
    reference_episodes: int = 100,
) -> dict[str, float]:
    """The closed-loop evaluation :func:`train_offline_rl` runs, for a policy loaded afterwards.

    Same episodes (``seed``) and the same references as training's, so a
    stored policy scores what its run scored unless its settings changed
    (e.g. another ``action_selection``).
    """
    resolved = _task_for(task, dataset)
    ref, _ = _reference(resolved, dataset, reference_episodes)
    return _score(policy, resolved, ref, episodes, seed)


def train_offline_rl(
    policy_name: str,
    dataset: OfflineDataset,
    task: str | Task,
    out_dir: str | Path,
    steps: int = 1000,
    eval_every: int = 0,
    eval_episodes: int = 5,
    seed: int = 0,
    *,
    config: TrainerConfig | None = None,
    policy_config: dict[str, Any] | None = None,
    eval_seed: int = 1000,
    reference_episodes: int = 100,
    resume: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``policy_name`` (dql, ofql, flow_bc, diffusion_bc) on ``dataset`` for ``task``; returns a summary.

    ``config`` supplies the other trainer settings (its ``steps``,
    ``eval_every`` and ``seed`` are replaced by the arguments);
    ``policy_config`` are the policy's options (e.g. from
    :func:`load_policy_yaml`; default: the kind's defaults). Outputs in
    ``out_dir``: ``state/``, ``policy/`` (last), ``best/``, ``train_log.csv``,
    ``curves.png``, ``run.yaml``; load a policy with
    :func:`diffpilot.policy.registry.load_policy`. ``on_step(step, metrics)``
    is called after every step, ``on_log(row)`` after every log row. ``eval_episodes`` 0 skips evaluation.
    """
    if policy_name not in OFFLINE_RL_KINDS:
        raise ValueError(f"unknown offline-RL policy {policy_name!r}; choose one of {sorted(OFFLINE_RL_KINDS)}")
    if int(eval_episodes) < 0:
        raise ValueError(f"eval_episodes must be >= 0, got {eval_episodes}")
    cfg = replace(config or TrainerConfig(log_every=100), steps=int(steps), eval_every=int(eval_every), seed=int(seed))
    cfg.check()
    task = _task_for(task, dataset)
    obs, next_obs = _check_data(dataset, task)
    data = _transition_arrays(dataset, obs, next_obs)

    out = Path(out_dir)
    torch.manual_seed(cfg.seed)
    options = policy_config if policy_config is not None else {}
    policy = build_policy({"name": policy_name, **options}, obs.shape[1], dataset.act_dim)
    policy.fit_normalizers(obs, dataset.actions)
    ref, ref_source = _reference(task, dataset, reference_episodes) if eval_episodes else ((0.0, 1.0), "none")
    fingerprint = {"rows": len(dataset), "transitions": int(data["obs"].shape[0]), "obs_dim": int(obs.shape[1]),
                   "act_dim": dataset.act_dim, "reward_sum": float(dataset.rewards.sum(dtype=np.float64))}

    def evaluate(acting: torch.nn.Module) -> dict[str, float]:
        return _score(acting, task, ref, eval_episodes, eval_seed)

    trainer = Trainer(policy, TensorRows(data), cfg, out, evaluator=evaluate if eval_episodes else None,
                      fingerprint=fingerprint, on_step=on_step, on_log=on_log)
    out.mkdir(parents=True, exist_ok=True)
    run_info = {"policy_name": policy_name, "task": task.name, "trainer": asdict(cfg), "policy": policy.config,
                "reference": list(ref), "reference_source": ref_source, "data": fingerprint}
    if distributed.is_main():  # under torchrun rank 0 alone writes
        with atomic_path(out / "run.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(run_info, sort_keys=False))
    result = trainer.run(resume=resume)
    final = result.final_eval or {}
    return {
        "policy": policy_name,
        "task": task.name,
        "steps": result.steps,
        "final_score": final.get("normalized_score", final.get("return_mean")),
        "best_score": result.best_score,
        "best_step": result.best_step,
        "reference": list(ref),
        "reference_source": ref_source,
        "train_s_per_1k_steps": result.train_s_per_1k_steps,
        "last": str(result.last),
        "best": str(result.best) if result.best else None,
        "log": str(out / "train_log.csv"),
        "curves": str(out / "curves.png"),
    }
