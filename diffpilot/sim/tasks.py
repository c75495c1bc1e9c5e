"""Named closed-loop tasks: how to build the environment and how a data set's rows become its observations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from diffpilot.data import pick_place
from diffpilot.data.d4rl import D4RL_REF_SCORES, OfflineDataset
from diffpilot.data.locomotion import LOCOMOTION_ENVS
from diffpilot.data.maze2d import MAZES, make_maze2d_env, reference_scores


@dataclass(frozen=True)
class Task:
    """A simulator task: env factory, observation builder and where reference scores come from."""

    name: str
    make_env: Callable[[], gym.Env]
    observations: Callable[[OfflineDataset], np.ndarray]
    local_reference: Callable[[int], tuple[float, float]]


def _maze2d_task(maze: str, reward: str) -> Task:
    def observations(ds: OfflineDataset) -> np.ndarray:
        if "goal" not in ds.infos:
            raise ValueError("a maze2d data set needs infos/goal to condition the policy on the goal")
        return np.concatenate([ds.observations, ds.infos["goal"]], axis=1).astype(np.float32)

    return Task(
        name=f"maze2d-{maze}",
        make_env=lambda: make_maze2d_env(maze, reward=reward, goal_in_obs=True, eval_goal=True),
        observations=observations,
        local_reference=lambda episodes: reference_scores(maze, reward, episodes=episodes, seed=0),
    )


def locomotion_task(env: str) -> Task:
    """``hopper``/``halfcheetah``/``walker2d`` on gymnasium v5; references are D4RL's published ones."""
    if env not in LOCOMOTION_ENVS:
        raise ValueError(f"unknown locomotion env {env!r}; choose one of {sorted(LOCOMOTION_ENVS)}")
    env_id = LOCOMOTION_ENVS[env]
    return Task(
        name=env,
        make_env=lambda: gym.make(env_id),
        observations=lambda ds: ds.observations,
        local_reference=lambda episodes: D4RL_REF_SCORES[env],
    )


PICK_PLACE = Task(
    name="pick-place",
    make_env=pick_place.make_pick_place_env,
    observations=lambda ds: ds.observations.astype(np.float32),
    local_reference=lambda episodes: pick_place.reference_scores(episodes, seed=0),
)


def get_task(name: str, reward: str = "sparse") -> Task:
    """The task called ``name``: ``maze2d-{umaze,medium,large}``, ``pick-place``, ``hopper``/``halfcheetah``/``walker2d`` (with a data-set suffix)."""
    if name.startswith("maze2d-") and name[len("maze2d-"):] in MAZES:
        return _maze2d_task(name[len("maze2d-"):], reward)
    if name == PICK_PLACE.name:
        return PICK_PLACE
    family = name.split("-", 1)[0]
    if family in LOCOMOTION_ENVS:  # hopper, hopper-medium, walker2d-medium-replay, ...
        return locomotion_task(family)
    valid = [f"maze2d-{m}" for m in MAZES] + [PICK_PLACE.name] + [f"{e}[-medium|-medium-replay|-medium-expert]" for e in LOCOMOTION_ENVS]
    raise ValueError(f"unknown task {name!r}; valid tasks: {valid}")


def dataset_reference(ds: OfflineDataset) -> tuple[float, float] | None:
    """(min, max) reference returns stored in a data set's metadata, if any."""
    md = ds.metadata
    if "ref_min_score" in md and "ref_max_score" in md:
        return float(md["ref_min_score"]), float(md["ref_max_score"])
    return None
