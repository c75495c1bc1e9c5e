"""Locomotion data sets built the D4RL way on gymnasium MuJoCo v5 (Hopper, HalfCheetah, Walker2d).

Recipe (Fu et al. 2020, re-run locally because the v5 simulators differ from
D4RL's v2 ones):

1. One SAC run (stable-baselines3, default hyperparameters) of ``sac_steps``
   environment steps, evaluated every ``eval_interval`` steps (deterministic
   actions, ``eval_episodes`` episodes), with a snapshot of the policy at each
   evaluation. Its final policy is the **expert**; the expert return is that
   policy's mean return over ``reference_episodes`` episodes (a longer run
   than the medium policy's, not a constant).
2. The **medium** policy is the first snapshot whose evaluation return
   reaches a third of the way from the random policy's return to the expert
   return, i.e. a normalized score of about 33 (D4RL's "about a third of
   the expert"; measured from the random return so it also means something
   when returns are negative, as in HalfCheetah early on).
3. ``medium`` = ``transitions`` steps of the medium policy acting
   stochastically; ``medium-replay`` = the SAC replay buffer up to the step
   the medium policy was taken (everything the agent saw until it became
   "medium"); ``medium-expert`` = the medium rollouts followed by as many
   expert rollouts (``infos/expert`` says which half a row comes from).
4. Reference scores the D4RL way: ``ref_min`` = uniform random policy (its
   action space seeded per episode) over ``reference_episodes`` episodes,
   ``ref_max`` = the expert over as many;
   both stored in each file's metadata next to D4RL's published values.

The SAC run is sequential; the rollouts and the reference episodes that
follow it are split into items with their own seeds and run with
:func:`diffpilot.parallel.ordered_map` (``workers=`` local Ray processes, or
``ray_address=`` a cluster): ``segments`` independent rollout runs per policy
(each seeded from the data set seed and its index, joined in order), and the
reference episodes one seed each. The files do not depend on the number of
workers; ``segments=1`` (the default) is the single run.

Files live under ``diffpilot.fileio.cache_dir()/locomotion/``. The SAC run
checkpoints after every evaluation (SB3's own zip for the agent; the replay
buffer as plain arrays in ``.npz``, never a pickle), so an interrupted build
resumes; finished files are reused.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import yaml
from tqdm.auto import tqdm

from diffpilot.data.d4rl import D4RL_REF_SCORES, OfflineDataset, read_d4rl, write_d4rl
from diffpilot.data.errors import DatasetError
from diffpilot.fileio import atomic_path, atomic_write_text

__all__ = [
    "KINDS",
    "LOCOMOTION_ENVS",
    "build_locomotion_dataset",
]

LOCOMOTION_ENVS: dict[str, str] = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
KINDS = ("medium", "medium-replay", "medium-expert", "expert")
DEFAULT_SAC_STEPS = 300_000
DEFAULT_TRANSITIONS = 200_000
MEDIUM_FRACTION = 1.0 / 3.0


def _check_env(env: str) -> str:
    if env not in LOCOMOTION_ENVS:
        raise DatasetError(f"unknown locomotion env {env!r}; choose one of {sorted(LOCOMOTION_ENVS)}")
    return LOCOMOTION_ENVS[env]


# ----------------------------------------------------------------------------- rollouts


def _rollout(policy: Any, env_id: str, transitions: int, seed: int, desc: str, progress: bool) -> OfflineDataset:
    """``transitions`` steps of ``policy(obs) -> action`` (None: uniform random), in D4RL rows."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    o = np.zeros((transitions, obs_dim), np.float32)
    no = np.zeros((transitions, obs_dim), np.float32)
    a = np.zeros((transitions, act_dim), np.float32)
    r = np.zeros(transitions, np.float32)
    term = np.zeros(transitions, bool)
    tout = np.zeros(transitions, bool)
    obs, _ = env.reset(seed=seed)
    episode = 0
    with tqdm(total=transitions, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for i in range(transitions):
            act = env.action_space.sample() if policy is None else policy(obs)
            nxt, rew, terminated, truncated, _ = env.step(act)
            o[i], a[i], r[i], no[i] = obs, act, rew, nxt
            term[i], tout[i] = terminated, truncated and not terminated
            if terminated or truncated:
                episode += 1
                obs, _ = env.reset(seed=seed + episode)
            else:
                obs = nxt
            bar.update(1)
    if not (term[-1] or tout[-1]):
        tout[-1] = True  # the budget cut the last episode: a time limit, not a task end
    env.close()
    return OfflineDataset(observations=o, actions=a, rewards=r, terminals=term, timeouts=tout, next_observations=no)


def _mean_return(policy: Any, env_id: str, episodes: int, seed: int) -> float:
    """Mean undiscounted return over ``episodes`` episodes (``policy`` None: uniform random)."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    total = 0.0
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done = False
        while not done:
            act = env.action_space.sample() if policy is None else policy(obs)
            obs, rew, terminated, truncated, _ = env.step(act)
            total += float(rew)
            done = terminated or truncated
    env.close()
    return total / episodes


def _sb3_policy(model: Any, deterministic: bool) -> Any:
    return lambda obs: model.predict(obs, deterministic=deterministic)[0]


@contextlib.contextmanager
def _torch_sandbox() -> Iterator[None]:
    """The block runs on one torch thread and may reseed the global torch RNG; both are restored after.

    SB3 samples stochastic actions from the global torch RNG, so each shard
    seeds it itself (in a Ray worker or in this process alike) and leaves the
    caller's stream as it was.
    """
    import torch

    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _load_sac(snapshot: str | None) -> Any:
    if snapshot is None:
        return None
    from stable_baselines3 import SAC

    return SAC.load(snapshot, device="cpu")


def _rollout_segment(job: tuple[str, str, int, int, str, bool]) -> OfflineDataset:
    """One rollout segment (an :func:`ordered_map` item): ``(snapshot, env_id, transitions, seed, desc, progress)``.

    The policy acts stochastically, its action noise drawn from torch seeded with the segment's seed.
    """
    import torch

    snapshot, env_id, transitions, seed, desc, progress = job
    with _torch_sandbox():
        model = _load_sac(snapshot)
        torch.manual_seed(seed)  # after loading: building the networks draws from the RNG too
        return _rollout(_sb3_policy(model, False), env_id, transitions, seed, desc, progress)


def _episode_rewards(job: tuple[str | None, str, Sequence[int]]) -> list[list[float]]:
    """The rewards of whole episodes, one per seed (an :func:`ordered_map` item): ``(snapshot, env_id, seeds)``.

    ``snapshot`` None is the uniform random policy, its action space seeded per
    episode; otherwise the snapshot acts deterministically. Each return depends
    only on its seed, so the episodes may be split across workers in any way.
    """
    snapshot, env_id, seeds = job
    out: list[list[float]] = []
    with _torch_sandbox():
        model = _load_sac(snapshot)
        policy = None if model is None else _sb3_policy(model, True)
        env = gym.make(env_id)
        try:
            for s in seeds:
                env.action_space.seed(int(s))
                obs, _ = env.reset(seed=int(s))
                rewards: list[float] = []
                done = False
                while not done:
                    act = env.action_space.sample() if policy is None else policy(obs)
                    obs, rew, terminated, truncated, _ = env.step(act)
                    rewards.append(float(rew))
                    done = terminated or truncated
                out.append(rewards)
        finally:
            env.close()
    return out


def _reference_return(snapshot: str | None, env_id: str, episodes: int, seed: int, workers: int,
                      ray_address: str | None) -> float:
    """Mean return over ``episodes`` episodes seeded ``seed + ep``, in ``max(workers, 1)`` shards of whole episodes."""
    from diffpilot.parallel import ordered_map

    seeds = [seed + ep for ep in range(episodes)]
    shards = max(1, min(int(workers), episodes))
    parts = [seeds[i::shards] for i in range(shards)]
    rewards = ordered_map(_episode_rewards, [(snapshot, env_id, p) for p in parts], workers=workers, ray_address=ray_address)
    by_seed = {s: r for p, rs in zip(parts, rewards) for s, r in zip(p, rs)}
    total = 0.0
    for s in seeds:  # one running sum in episode and step order, whatever the sharding
        for r in by_seed[s]:
            total += r
    return total / episodes


# ----------------------------------------------------------------------------- SAC run


@dataclass
class _Run:
    """The finished SAC run: where its files are and what it measured."""

    folder: Path
    progress: dict[str, Any]

    def snapshot(self, step: int) -> Path:
        return self.folder / "snapshots" / f"sac_{step}.zip"


def _save_model(model: Any, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        model.save(f)


def _save_buffer(model: Any, path: Path) -> None:
    buf = model.replay_buffer
    n = buf.buffer_size if buf.full else buf.pos
    arrays = {k: getattr(buf, k)[:n, 0] for k in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _load_buffer(model: Any, path: Path, rows: int) -> None:
    """Refill the replay buffer with its first ``rows`` rows (the rows of the snapshot being resumed)."""
    with np.load(path, allow_pickle=False) as z:
        if int(z["rewards"].shape[0]) < rows:
            raise DatasetError(f"{path} holds {z['rewards'].shape[0]} rows but the SAC snapshot is at step {rows}; delete {path.parent} and rebuild")
        n = rows
        buf = model.replay_buffer
        for key in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
            getattr(buf, key)[:n, 0] = z[key][:n]
    buf.pos, buf.full = n % buf.buffer_size, n >= buf.buffer_size
    if n:
        # The environment restarts on resume: close the interrupted episode as a time-limit cut.
        buf.dones[n - 1, 0], buf.timeouts[n - 1, 0] = 1.0, 1.0


def _sac_run(env: str, folder: Path, sac_steps: int, seed: int, eval_interval: int, eval_episodes: int,
             reference_episodes: int, progress: bool, workers: int = 1, ray_address: str | None = None) -> _Run:
    """Run (or resume, or reuse) the SAC run that yields the medium and expert policies."""
    from stable_baselines3 import SAC

    env_id = _check_env(env)
    prog_path = folder / "progress.yaml"
    prog: dict[str, Any] = yaml.safe_load(prog_path.read_text()) if prog_path.exists() else {}
    if prog.get("done"):
        return _Run(folder, prog)
    folder.mkdir(parents=True, exist_ok=True)
    train_env = gym.make(env_id)
    if prog.get("step"):
        model = SAC.load(folder / "snapshots" / f"sac_{prog['step']}.zip", env=train_env, device="cpu", buffer_size=sac_steps)
        _load_buffer(model, folder / "buffer.npz", int(prog["step"]))
        model._last_obs = None  # the fresh environment must be reset before the next step
    else:
        prog = {"env_id": env_id, "sac_steps": sac_steps, "seed": seed, "step": 0, "evals": []}
        model = SAC("MlpPolicy", train_env, buffer_size=sac_steps, seed=seed, device="cpu", verbose=0)
    bar = tqdm(total=sac_steps, initial=int(prog["step"]), desc=f"SAC {env_id}", disable=not progress, dynamic_ncols=True)
    while prog["step"] < sac_steps:
        chunk = min(eval_interval, sac_steps - prog["step"])
        model.learn(total_timesteps=chunk, reset_num_timesteps=False, progress_bar=False)
        prog["step"] = int(model.num_timesteps)
        ret = _mean_return(_sb3_policy(model, True), env_id, eval_episodes, seed=10_000 + seed)
        prog["evals"].append({"step": prog["step"], "return": ret})
        _save_model(model, folder / "snapshots" / f"sac_{prog['step']}.zip")
        _save_buffer(model, folder / "buffer.npz")
        atomic_write_text(prog_path, yaml.safe_dump(prog, sort_keys=False))
        bar.update(chunk)
        bar.set_postfix(ret=f"{ret:.0f}")
    bar.close()
    train_env.close()
    # Reference returns the D4RL way (episodes sharded over the workers), and the medium snapshot chosen against them.
    expert = str(folder / "snapshots" / f"sac_{prog['step']}.zip")
    prog["ref_min_score"] = _reference_return(None, env_id, reference_episodes, 20_000 + seed, workers, ray_address)
    prog["ref_max_score"] = _reference_return(expert, env_id, reference_episodes, 20_000 + seed, workers, ray_address)
    prog["reference_episodes"] = reference_episodes
    lo, hi = prog["ref_min_score"], prog["ref_max_score"]
    threshold = lo + MEDIUM_FRACTION * (hi - lo)
    reached = [e for e in prog["evals"] if e["return"] >= threshold]
    medium = reached[0] if reached else max(prog["evals"], key=lambda e: e["return"])
    prog.update(medium_threshold=threshold, medium_step=int(medium["step"]), medium_eval_return=float(medium["return"]),
                expert_step=int(prog["step"]), done=True)
    atomic_write_text(prog_path, yaml.safe_dump(prog, sort_keys=False))
    return _Run(folder, prog)


def _warn_if_weak(env: str, expert: float, steps: int, seed: int) -> None:
    """One line on stderr when the expert returns under half of D4RL's: its medium and expert sets are weaker
    than their names say (SAC's HalfCheetah can settle running on its back, near 1,500, for a whole run)."""
    d4rl_expert = D4RL_REF_SCORES[env][1]
    if expert < 0.5 * d4rl_expert:
        print(f"{env}: the SAC expert ({steps} steps, seed {seed}) returns {expert:.0f}, under half of D4RL's expert "
              f"({d4rl_expert:.0f}); a longer run (data.sac_steps=) or another seed (data.seed=) may reach more",
              file=sys.stderr)


# ----------------------------------------------------------------------------- data sets


def _metadata(env: str, kind: str, run: _Run, transitions: int, segments: int = 1) -> dict[str, Any]:
    p = run.progress
    d4rl_min, d4rl_max = D4RL_REF_SCORES[env]
    return {
        "env_id": LOCOMOTION_ENVS[env],
        "kind": kind,
        "name": f"{env}-{kind}",
        "seed": int(p["seed"]),
        "sac_steps": int(p["sac_steps"]),
        "medium_step": int(p["medium_step"]),
        "medium_eval_return": float(p["medium_eval_return"]),
        "medium_threshold": float(p["medium_threshold"]),
        "expert_step": int(p["expert_step"]),
        "rollout_transitions": int(transitions),
        "ref_min_score": float(p["ref_min_score"]),
        "ref_max_score": float(p["ref_max_score"]),
        "ref_source": (
            f"local: uniform random policy (min) and the SAC expert, deterministic (max), "
            f"each over {p['reference_episodes']} episodes"
        ),
        "reference_episodes": int(p["reference_episodes"]),
        "d4rl_ref_min_score": d4rl_min,
        "d4rl_ref_max_score": d4rl_max,
        "recipe": (
            "D4RL locomotion: one SB3 SAC run; medium = first snapshot reaching 1/3 of the way from the random "
            "to the expert return, rolled out stochastically; medium-replay = the SAC replay buffer up to that "
            "snapshot; medium-expert = medium rollouts + as many expert rollouts"
        ),
        "versions": {n: version(n) for n in ("gymnasium", "mujoco", "stable-baselines3")},
        **({"rollout_segments": int(segments)} if segments > 1 else {}),
    }


def _replay_dataset(run: _Run) -> OfflineDataset:
    n = int(run.progress["medium_step"])
    with np.load(run.folder / "buffer.npz", allow_pickle=False) as z:
        if z["rewards"].shape[0] < n:
            raise DatasetError(f"{run.folder / 'buffer.npz'} holds {z['rewards'].shape[0]} rows, fewer than the medium step {n}; delete {run.folder} and rebuild")
        dones, timeouts = z["dones"][:n] > 0.5, z["timeouts"][:n] > 0.5
        timeouts = timeouts & dones
        terminals = dones & ~timeouts
        timeouts = timeouts.copy()
        if not (terminals[-1] or timeouts[-1]):
            timeouts[-1] = True  # the buffer stops mid-episode where the medium policy was taken
        return OfflineDataset(
            observations=z["observations"][:n], actions=z["actions"][:n], rewards=z["rewards"][:n],
            terminals=terminals, timeouts=timeouts, next_observations=z["next_observations"][:n],
        )


def _segment_seeds(rollout_seed: int, segments: int) -> list[int]:
    """One seed per rollout segment; ``segments=1`` keeps the single run's seed."""
    if segments == 1:
        return [rollout_seed]
    return [int(np.random.SeedSequence([rollout_seed, i]).generate_state(1)[0]) for i in range(segments)]


def _policy_rollouts(run: _Run, which: str, transitions: int, seed: int, progress: bool, segments: int = 1,
                     workers: int = 1, ray_address: str | None = None) -> OfflineDataset:
    """``transitions`` rows of the medium or expert snapshot acting stochastically, as ``segments`` runs joined in order."""
    from diffpilot.parallel import ordered_map

    step = run.progress["medium_step"] if which == "medium" else run.progress["expert_step"]
    snapshot = str(run.snapshot(int(step)))
    rollout_seed = seed * 1000 + (1 if which == "medium" else 2) * 100_000
    lengths = [transitions // segments + (i < transitions % segments) for i in range(segments)]
    jobs = [(snapshot, run.progress["env_id"], n, s, f"{which} rollouts", progress and segments == 1)
            for n, s in zip(lengths, _segment_seeds(rollout_seed, segments))]
    parts = ordered_map(_rollout_segment, jobs, workers=workers, ray_address=ray_address,
                        progress=progress and segments > 1, desc=f"{which} rollout segments", unit="segment")
    if len(parts) == 1:
        return parts[0]
    return OfflineDataset(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in
                             ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")})


def build_locomotion_dataset(
    env: str,
    kind: str,
    cache: Path | None = None,
    sac_steps: int | None = None,
    transitions: int | None = None,
    seed: int = 0,
    *,
    eval_interval: int | None = None,
    eval_episodes: int = 5,
    reference_episodes: int = 100,
    progress: bool = True,
    segments: int = 1,
    workers: int = 1,
    ray_address: str | None = None,
) -> Path:
    """Build (once) the D4RL-style ``<env>-<kind>`` data set and return its HDF5 path.

    ``env``: hopper, halfcheetah, walker2d. ``kind``: medium, medium-replay,
    medium-expert (or expert). ``sac_steps`` (default 300k) is the SAC run's
    length, ``transitions`` (default 200k) the rollout size per policy.
    ``cache`` defaults to ``diffpilot.fileio.cache_dir()/locomotion``.

    ``segments > 1`` collects each policy's rollouts as that many independent
    runs (seeded from ``seed``, the policy and the segment index), joined in
    order; the file name then ends in ``-seg<N>``. ``workers`` / ``ray_address``
    run the segments and the reference episodes on Ray
    (:func:`diffpilot.parallel.ordered_map`); the files are the same for any
    number of workers, so neither is part of the name. The SAC run itself is
    sequential, and workers beyond ``segments`` idle during the rollouts.
    """
    _check_env(env)
    if kind not in KINDS:
        raise DatasetError(f"unknown locomotion data kind {kind!r}; choose one of {list(KINDS)}")
    sac_steps = DEFAULT_SAC_STEPS if sac_steps is None else int(sac_steps)
    transitions = DEFAULT_TRANSITIONS if transitions is None else int(transitions)
    if sac_steps < 200 or transitions < 2 or eval_episodes < 1 or reference_episodes < 1:
        raise DatasetError(
            f"need sac_steps >= 200, transitions >= 2, eval_episodes >= 1 and reference_episodes >= 1; got "
            f"{sac_steps}, {transitions}, {eval_episodes}, {reference_episodes}"
        )
    eval_interval = max(500, sac_steps // 30) if eval_interval is None else int(eval_interval)
    if eval_interval < 1:
        raise DatasetError(f"eval_interval must be >= 1, got {eval_interval}")
    if isinstance(segments, bool) or not isinstance(segments, (int, np.integer)) or not 1 <= segments <= transitions:
        raise DatasetError(f"segments must be an integer in [1, transitions={transitions}], got {segments!r}")
    segments = int(segments) if kind != "medium-replay" else 1  # the replay buffer has no rollouts to split
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise DatasetError(f"workers must be a positive integer, got {workers!r}")
    workers = int(workers)
    if cache is None:
        from diffpilot.fileio import cache_dir

        cache = cache_dir() / "locomotion"
    root = Path(cache)
    path = root / f"{env}-{kind}-{transitions}-sac{sac_steps}-s{seed}{f'-seg{segments}' if segments > 1 else ''}.hdf5"
    if path.exists():
        return path
    from diffpilot.parallel import ray_session

    with ray_session(workers, ray_address):  # one Ray for the reference episodes and all the rollouts
        run = _sac_run(env, root / f"{env}-sac{sac_steps}-s{seed}", sac_steps, seed, eval_interval, eval_episodes,
                       reference_episodes, progress, workers, ray_address)
        if kind != "medium-expert":  # (its two halves are built below, and each says it)
            _warn_if_weak(env, float(run.progress["ref_max_score"]), int(run.progress["expert_step"]), seed)
        meta = _metadata(env, kind, run, transitions, segments)
        if kind == "medium-replay":
            ds = _replay_dataset(run)
        elif kind in ("medium", "expert"):
            ds = _policy_rollouts(run, kind, transitions, seed, progress, segments, workers, ray_address)
        else:
            kw = dict(eval_interval=eval_interval, eval_episodes=eval_episodes, reference_episodes=reference_episodes,
                      progress=progress, segments=segments, workers=workers, ray_address=ray_address)
            medium = read_d4rl(build_locomotion_dataset(env, "medium", root, sac_steps, transitions, seed, **kw))
            expert = read_d4rl(build_locomotion_dataset(env, "expert", root, sac_steps, transitions, seed, **kw))
            parts = (medium, expert)
            ds = OfflineDataset(
                **{k: np.concatenate([getattr(p, k) for p in parts]) for k in
                   ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")},
                infos={"expert": np.concatenate([np.zeros(len(medium), np.uint8), np.ones(len(expert), np.uint8)])},
            )
        ds.metadata = meta
        return write_d4rl(path, ds)
