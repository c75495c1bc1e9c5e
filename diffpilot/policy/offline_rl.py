"""The offline-RL trainer shared by DQL, OFQL and the BC references, with closed-loop evaluation.

``train_offline_rl`` checks data against the task's environment before any
work, then runs gradient steps on uniformly drawn ``(s, a, r, s', done)``
transitions (rows cut by a timeout are never used as a transition),
evaluates the acting policy closed loop every ``eval_every`` steps through
:func:`diffpilot.sim.runner.run_episodes`, and keeps ``out/last`` and
``out/best`` policies. Everything needed to resume (all weights, every
optimizer's moments, the step, the numpy and torch generator states, the log)
is one safetensors + YAML checkpoint in ``out/state``; all randomness of
training flows through those two generators, so a run interrupted after a
checkpoint and resumed ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from diffpilot.data.d4rl import D4RL_REF_SCORES, OfflineDataset
from diffpilot.data.errors import DatasetError
from diffpilot.data.locomotion import LOCOMOTION_ENVS, locomotion_task
from diffpilot.fileio import atomic_path, save_figure
from diffpilot.policy.bc import DiffusionBCPolicy, FlowBCPolicy, SingleStepPolicy
from diffpilot.policy.checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from diffpilot.policy.dql import DQLPolicy
from diffpilot.policy.ofql import OFQLPolicy
from diffpilot.sim.runner import run_episodes, summarize
from diffpilot.sim.tasks import Task, dataset_reference, get_task

__all__ = [
    "LOG_COLUMNS",
    "OfflineRLConfig",
    "POLICIES",
    "load_offline_policy",
    "load_policy_yaml",
    "plot_offline_curves",
    "policy_options",
    "resolve_task",
    "train_offline_rl",
]

POLICIES: dict[str, type[SingleStepPolicy]] = {
    "dql": DQLPolicy,
    "ofql": OFQLPolicy,
    "flow_bc": FlowBCPolicy,
    "diffusion_bc": DiffusionBCPolicy,
}
STATE_KIND = "offline_rl_state"
LOG_COLUMNS = ("step", "critic_td_loss", "actor_bc_loss", "actor_q_loss", "q_mean", "eval_normalized_score", "eval_return")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "policy"


@dataclass
class OfflineRLConfig:
    """Trainer settings (the policy's own hyperparameters live in its options)."""

    steps: int = 1000
    batch_size: int = 256
    eval_every: int = 0  # 0: evaluate only at the end
    eval_episodes: int = 5  # 0: no closed-loop evaluation
    eval_seed: int = 1000
    ckpt_every: int = 500
    log_every: int = 100
    seed: int = 0
    reference_episodes: int = 100  # for a task's local reference when the data set stores none
    progress: bool = True
    policy: dict[str, Any] = field(default_factory=dict)  # options passed to the policy class

    def check(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"OfflineRLConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_episodes"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"OfflineRLConfig.{name} must be >= 0, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- configs and tasks


def policy_options(policy_cfg: dict[str, Any], task_name: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(policy name, options)`` from a ``conf/policy/*.yaml`` mapping, with the task's overrides applied.

    ``per_task[<task>]`` (e.g. ``hopper-medium-replay``) is merged over the
    base options; nested dicts merge one level deep.
    """
    cfg = dict(policy_cfg)
    name = cfg.pop("name", None)
    if name not in POLICIES:
        raise ValueError(f"unknown offline-RL policy {name!r}; choose one of {sorted(POLICIES)}")
    per_task = cfg.pop("per_task", None) or {}
    if task_name is not None and task_name in per_task:
        for key, value in (per_task[task_name] or {}).items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
    return name, cfg


def load_policy_yaml(name: str, task_name: str | None = None) -> dict[str, Any]:
    """The options of ``conf/policy/<name>.yaml`` for ``task_name`` (per-task overrides applied)."""
    path = CONF_DIR / f"{name}.yaml"
    if name not in POLICIES or not path.is_file():
        raise ValueError(f"unknown offline-RL policy {name!r}; choose one of {sorted(POLICIES)}")
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


# ----------------------------------------------------------------------------- checkpoint


def _state(policy: SingleStepPolicy, opts: dict[str, torch.optim.Optimizer], gen: torch.Generator) -> tuple[dict, dict]:
    tensors = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    scalars: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for name, opt in opts.items():
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{name}.{pid}.{key}"] = value
                else:
                    scalars[f"{name}.{pid}.{key}"] = value
        groups[name] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    tensors["rng.train"] = gen.get_state()
    return tensors, {"param_groups": groups, "optim_scalars": scalars}


def _restore(path: Path, policy: SingleStepPolicy, opts: dict[str, torch.optim.Optimizer], gen: torch.Generator) -> dict:
    tensors, meta = load_checkpoint(path, kind=STATE_KIND)
    load_state_strict(policy, {k[7:]: v for k, v in tensors.items() if k.startswith("policy.")}, path)
    for name, opt in opts.items():
        state: dict[int, dict[str, Any]] = {}
        prefix = f"optim.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                pid, sub = key[len(prefix):].split(".", 1)
                state.setdefault(int(pid), {})[sub] = value
        for key, value in meta["optim_scalars"].items():
            gname, pid, sub = key.split(".", 2)
            if gname == name:
                state.setdefault(int(pid), {})[sub] = value
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"][name]})
    gen.set_state(tensors["rng.train"])
    return meta


def _write_log(path: Path, log: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(LOG_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in log:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_COLUMNS})


def plot_offline_curves(log: list[dict[str, Any]], path: str | Path) -> Path:
    """PNG of TD loss, BC loss, Q of the policy's actions and the evaluation score against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("critic_td_loss", "critic TD loss"), ("actor_bc_loss", "actor BC loss"), ("q_mean", "Q(s, a_pi)"),
              ("eval_normalized_score", "eval normalized score")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (key, title) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in log if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("gradient step")
        ax.grid(alpha=0.3)
    if any(r.get("critic_td_loss") for r in log):
        axes[0].set_yscale("log")
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


# ----------------------------------------------------------------------------- training


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
    config: OfflineRLConfig | None = None,
    policy_config: dict[str, Any] | None = None,
    resume: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``policy_name`` (dql, ofql, flow_bc, diffusion_bc) on ``dataset`` for ``task``; returns a summary.

    ``config`` supplies the other trainer settings (its ``steps``,
    ``eval_every``, ``eval_episodes`` and ``seed`` are replaced by the
    arguments); ``policy_config`` are the policy's options (e.g. from
    :func:`load_policy_yaml`), defaulting to ``config.policy``. Outputs in
    ``out_dir``: ``state/`` (resumable state), ``last/`` and ``best/``
    (policies, loadable with :func:`load_offline_policy`), ``train_log.csv``,
    ``curves.png``, ``run.yaml``. ``on_step(step, metrics)`` is called after
    every step (progress hooks; an exception there stops the run like an
    interruption). With ``resume`` a run continues from ``out_dir/state``.
    """
    if policy_name not in POLICIES:
        raise ValueError(f"unknown offline-RL policy {policy_name!r}; choose one of {sorted(POLICIES)}")
    cfg = replace(config or OfflineRLConfig(), steps=int(steps), eval_every=int(eval_every),
                  eval_episodes=int(eval_episodes), seed=int(seed))
    if policy_config is not None:
        cfg.policy = dict(policy_config)
    cfg.check()
    task = _task_for(task, dataset)
    obs, next_obs = _check_data(dataset, task)
    data = _transition_arrays(dataset, obs, next_obs)
    n = int(data["obs"].shape[0])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    policy = POLICIES[policy_name](obs.shape[1], dataset.act_dim, **cfg.policy)
    policy.fit_normalizers(obs, dataset.actions)
    policy.train()
    opts = {name: torch.optim.Adam(params, lr=lr) for name, (params, lr) in policy.optim_groups().items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    ref, ref_source = _reference(task, dataset, cfg.reference_episodes) if cfg.eval_episodes else ((0.0, 1.0), "none")
    fingerprint = {"rows": len(dataset), "transitions": n, "obs_dim": int(obs.shape[1]), "act_dim": dataset.act_dim,
                   "reward_sum": float(dataset.rewards.sum(dtype=np.float64))}

    step, log, best, train_s = 0, [], {"score": None, "step": None}, 0.0
    acc: dict[str, list[float]] = {}
    state_dir = out / "state"
    if resume and state_dir.exists():
        try:
            meta = _restore(state_dir, policy, opts, gen)
        except CheckpointError as err:
            raise CheckpointError(f"cannot resume from {state_dir}: {err}. Delete it to start over.") from err
        if meta.get("policy_name") != policy_name or meta.get("data") != fingerprint:
            raise CheckpointError(
                f"{state_dir} belongs to a different run (policy {meta.get('policy_name')!r}, data {meta.get('data')}); "
                f"use another out_dir or delete it to start over"
            )
        step, log, best = int(meta["step"]), list(meta["log"]), dict(meta["best"])
        rng.bit_generator.state = meta["numpy_rng"]
        acc = {k: list(v) for k, v in meta.get("accumulators", {}).items()}
        train_s = float(meta.get("train_s", 0.0))

    run_info = {"policy_name": policy_name, "task": task.name, "trainer": {k: v for k, v in asdict(cfg).items() if k != "policy"},
                "policy": policy.config, "reference": list(ref), "reference_source": ref_source, "data": fingerprint}
    with atomic_path(out / "run.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(run_info, sort_keys=False))

    def evaluate() -> dict[str, float]:
        policy.eval()
        records = run_episodes(task.make_env, policy, cfg.eval_episodes, seed=cfg.eval_seed, ref_scores=ref, progress=False)
        policy.train()
        return summarize(records)

    def checkpoint() -> None:
        tensors, meta = _state(policy, opts, gen)
        meta.update(step=step, numpy_rng=rng.bit_generator.state, log=log, best=best, accumulators=acc,
                    policy_name=policy_name, data=fingerprint, train_s=train_s)
        save_checkpoint(state_dir, tensors, meta, kind=STATE_KIND)
        policy.save(out / "last")
        _write_log(out / "train_log.csv", log)
        plot_offline_curves(log, out / "curves.png")

    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {policy_name}", disable=not cfg.progress, dynamic_ncols=True)
    while step < cfg.steps:
        t0 = time.perf_counter()
        rows = torch.from_numpy(rng.integers(0, n, size=cfg.batch_size))
        batch = {k: v[rows] for k, v in data.items()}
        metrics = policy.update(batch, opts, step, gen)
        train_s += time.perf_counter() - t0
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"{bad} became non-finite at step {step}; lower the learning rate or eta, or scale the rewards")
        step += 1
        for key, value in metrics.items():
            acc.setdefault(key, []).append(value)
        if on_step is not None:
            on_step(step, metrics)
        due_eval = cfg.eval_episodes > 0 and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps)
        if step % cfg.log_every == 0 or step == cfg.steps or due_eval:
            row: dict[str, Any] = {"step": step, **{k: float(np.mean(v)) for k, v in acc.items()}}
            acc = {}
            if due_eval:
                summary = evaluate()
                score = summary.get("normalized_score", summary["return_mean"])
                row.update(eval_normalized_score=score, eval_return=summary["return_mean"])
                if best["score"] is None or score >= best["score"]:
                    best = {"score": float(score), "step": step}
                    policy.save(out / "best")
                bar.set_postfix(score=f"{score:.1f}")
            log.append(row)
        bar.update(1)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or due_eval:
            checkpoint()
    bar.close()
    if not (out / "last").exists():
        checkpoint()
    evals = [r for r in log if r.get("eval_normalized_score") is not None]
    return {
        "policy": policy_name,
        "task": task.name,
        "steps": step,
        "final_score": evals[-1]["eval_normalized_score"] if evals else None,
        "best_score": best["score"],
        "best_step": best["step"],
        "reference": list(ref),
        "reference_source": ref_source,
        "train_s_per_1k_steps": 1000.0 * train_s / max(step, 1),
        "last": str(out / "last"),
        "best": str(out / "best") if (out / "best").exists() else None,
        "log": str(out / "train_log.csv"),
        "curves": str(out / "curves.png"),
    }


def load_offline_policy(directory: str | Path) -> SingleStepPolicy:
    """Load any policy this module trains (``out/last`` or ``out/best``), by the kind stored in it."""
    directory = Path(directory)
    cfg_path = directory / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"no policy checkpoint at {directory}; pass a folder such as <out>/best or <out>/last")
    kind = (yaml.safe_load(cfg_path.read_text()) or {}).get("kind")
    if kind not in POLICIES:
        raise CheckpointError(f"{directory} holds a {kind!r}, not one of the offline-RL policies {sorted(POLICIES)}")
    return POLICIES[kind].load(directory)
