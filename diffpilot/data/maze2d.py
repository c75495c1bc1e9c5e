"""D4RL's maze2d data sets, rebuilt on gymnasium-robotics PointMaze.

The published maze2d files were made with a different simulator binding
(mujoco-py) and coordinate frame, so they cannot be regenerated bit for bit.
This module follows the same recipe (Fu et al. 2020, D4RL):

* a point mass in a U / medium / large maze, actions are x/y forces in [-1, 1];
* an expert that plans on the maze grid (value iteration over free cells) and
  steers to the next cell center with a PD law
  ``a = clip(10 * (waypoint - pos) - 1 * vel, -1, 1)``;
* data collection runs the expert toward a random goal, with Gaussian noise
  on its actions, and draws a new random goal whenever the current one is
  reached, in fixed-length chunks marked as timeouts;
* evaluation episodes have a fixed goal (the cell D4RL's maze spec marks
  ``G``), a random start cell, and last 300 / 600 / 800 steps;
* reward: sparse = 1 within 0.5 of the goal, dense = exp(-distance).

Because the simulator differs, the reference returns used to normalize
scores are recomputed here the D4RL way (random policy for the minimum, the
noise-free expert for the maximum) and stored in the file's metadata.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Literal, Sequence

import gymnasium
import farama_notifications

# gymnasium-robotics prints a notice about its Adroit hand rewards on import;
# diffpilot never builds those environments, so the notice is only noise here.
farama_notifications.notifications.pop("gymnasium_robotics", None)
import gymnasium_robotics  # noqa: E402
import numpy as np
from gymnasium import spaces

from diffpilot.data.d4rl import D4RL_REF_SCORES, OfflineDataset, write_d4rl
from diffpilot.data.errors import DatasetError

__all__ = [
    "MAZES",
    "Maze2DEnv",
    "MazeSpec",
    "WaypointController",
    "WaypointExpert",
    "generate_maze2d",
    "make_maze2d_env",
    "reference_scores",
]

RewardType = Literal["sparse", "dense"]
GOAL_RADIUS = 0.5  # D4RL's sparse reward and success radius (PointMaze itself uses 0.45)
Cell = tuple[int, int]

gymnasium.register_envs(gymnasium_robotics)


@dataclass(frozen=True)
class MazeSpec:
    """One maze: its gymnasium id, evaluation episode limit and evaluation goal.

    ``eval_goal_cell`` is the (row, col) D4RL's maze string marks ``G``; the
    gymnasium-robotics maps use the same strings, so rows and columns agree.
    ``d4rl_ref_scores`` are the published references, for information only:
    they were measured in D4RL's simulator, not this one.
    """

    name: str
    env_id: str
    episode_limit: int
    eval_goal_cell: Cell
    d4rl_ref_scores: tuple[float, float]


MAZES: dict[str, MazeSpec] = {
    "umaze": MazeSpec("umaze", "PointMaze_UMaze-v3", 300, (1, 1), D4RL_REF_SCORES["maze2d-umaze"]),
    "medium": MazeSpec("medium", "PointMaze_Medium-v3", 600, (6, 6), D4RL_REF_SCORES["maze2d-medium"]),
    "large": MazeSpec("large", "PointMaze_Large-v3", 800, (7, 9), D4RL_REF_SCORES["maze2d-large"]),
}


def _spec(maze: str) -> MazeSpec:
    if maze not in MAZES:
        raise DatasetError(f"unknown maze {maze!r}; choose one of {sorted(MAZES)}")
    return MAZES[maze]


def _check_reward(reward: str) -> None:
    if reward not in ("sparse", "dense"):
        raise DatasetError(f"unknown reward type {reward!r}; choose 'sparse' or 'dense'")


def _free_grid(maze_map: Sequence[Sequence[int | str]]) -> np.ndarray:
    """Boolean grid of free cells; the letter cells (r/g/c) of gymnasium maps are free."""
    rows = [[cell != 1 for cell in row] for row in maze_map]
    if not rows or len({len(r) for r in rows}) != 1:
        raise DatasetError("maze_map must be a non-empty rectangular list of rows")
    return np.array(rows, dtype=bool)


class _Grid:
    """Cell <-> world conversion, the same convention as gymnasium-robotics (unit cells, maze centred at 0)."""

    def __init__(self, maze_map: Sequence[Sequence[int | str]], scaling: float = 1.0) -> None:
        self.free = _free_grid(maze_map)
        self.rows, self.cols = self.free.shape
        self.scaling = float(scaling)
        self.x_center = self.cols / 2 * self.scaling
        self.y_center = self.rows / 2 * self.scaling

    def cell_to_xy(self, cell: Cell) -> np.ndarray:
        i, j = cell
        return np.array([(j + 0.5) * self.scaling - self.x_center, self.y_center - (i + 0.5) * self.scaling])

    def xy_to_cell(self, xy: np.ndarray) -> Cell:
        i = math.floor((self.y_center - float(xy[1])) / self.scaling)
        j = math.floor((float(xy[0]) + self.x_center) / self.scaling)
        return min(max(i, 0), self.rows - 1), min(max(j, 0), self.cols - 1)

    def free_cells(self) -> list[Cell]:
        return [(int(i), int(j)) for i, j in np.argwhere(self.free)]


class WaypointController:
    """Grid planner + PD tracker, the expert behind D4RL's maze2d data.

    For each goal cell, value iteration over the free cells (reward -1 per
    move, 4-connected) gives every cell the neighbour one step closer to the
    goal. The ball steers to that neighbour's centre, or to the goal itself
    once it is in the goal's cell. Plans are cached per goal cell, so a step
    costs a table lookup.
    """

    _MOVES = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)])

    def __init__(
        self,
        maze_map: Sequence[Sequence[int | str]],
        p_gain: float = 10.0,
        d_gain: float = 1.0,
        scaling: float = 1.0,
    ) -> None:
        self.grid = _Grid(maze_map, scaling)
        self.p_gain = float(p_gain)
        self.d_gain = float(d_gain)
        self._plans: dict[Cell, np.ndarray] = {}

    def values(self, goal_cell: Cell) -> np.ndarray:
        """Negative shortest-path length to ``goal_cell`` per cell (-inf for walls and unreachable cells)."""
        free = self.grid.free
        if not free[goal_cell]:
            raise DatasetError(f"goal cell {goal_cell} is a wall; pick a free cell of the maze")
        v = np.full(free.shape, -np.inf)
        v[goal_cell] = 0.0
        padded = np.full((free.shape[0] + 2, free.shape[1] + 2), -np.inf)
        for _ in range(free.size):
            padded[1:-1, 1:-1] = v
            best = np.max([padded[1 + di : padded.shape[0] - 1 + di, 1 + dj : padded.shape[1] - 1 + dj] for di, dj in self._MOVES], axis=0)
            new = np.where(free, best - 1.0, -np.inf)
            new[goal_cell] = 0.0
            if np.array_equal(new, v):
                break
            v = new
        return v

    def plan(self, goal_cell: Cell) -> np.ndarray:
        """(rows, cols, 2) array: the next cell to head for from each cell (the cell itself at the goal)."""
        if goal_cell not in self._plans:
            v = self.values(goal_cell)
            rows, cols = v.shape
            nxt = np.zeros((rows, cols, 2), dtype=np.int64)
            for i in range(rows):
                for j in range(cols):
                    nxt[i, j] = (i, j)
                    if not np.isfinite(v[i, j]) or (i, j) == goal_cell:
                        continue
                    best = v[i, j]
                    for di, dj in self._MOVES:
                        ni, nj = i + di, j + dj
                        if 0 <= ni < rows and 0 <= nj < cols and v[ni, nj] > best:
                            best, nxt[i, j] = v[ni, nj], (ni, nj)
            self._plans[goal_cell] = nxt
        return self._plans[goal_cell]

    def waypoint(self, pos: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """Where to steer now: the next cell centre on the shortest path, or the goal in its own cell."""
        goal_cell = self.grid.xy_to_cell(goal)
        cell = self.grid.xy_to_cell(pos)
        if cell == goal_cell:
            return np.asarray(goal, dtype=np.float64)
        nxt = self.plan(goal_cell)[cell]
        return self.grid.cell_to_xy((int(nxt[0]), int(nxt[1])))

    def act(self, pos: np.ndarray, vel: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """PD action toward the current waypoint, clipped to the action box [-1, 1]."""
        target = self.waypoint(pos, goal)
        action = self.p_gain * (target - pos) - self.d_gain * np.asarray(vel)
        return np.clip(action, -1.0, 1.0)


class WaypointExpert:
    """The waypoint controller as a closed-loop policy on goal-conditioned observations.

    Reads position, velocity and goal from ``[x, y, vx, vy, goal_x, goal_y]``
    (what ``make_maze2d_env(goal_in_obs=True)`` returns), so it runs through
    the same runner as a learned policy: the reference row of maze2d tables.
    """

    def __init__(self, maze_map: Sequence[Sequence[int | str]]) -> None:
        self.controller = WaypointController(maze_map)

    def reset(self, seed: int | None = None) -> None:
        pass

    def act(self, observation: np.ndarray) -> np.ndarray:
        if np.shape(observation) != (6,):
            raise ValueError(f"WaypointExpert needs [x, y, vx, vy, goal_x, goal_y], got shape {np.shape(observation)}")
        return self.controller.act(observation[:2], observation[2:4], observation[4:6])


class Maze2DEnv(gymnasium.Wrapper):
    """PointMaze with D4RL's flat observation, reward and evaluation protocol.

    Observation: float32 ``[x, y, vx, vy]``, plus ``[goal_x, goal_y]`` when
    ``goal_in_obs``. The wrapped PointMaze runs as a continuing task with a
    fixed target, so the episode ends only at the time limit, like D4RL's.
    ``info`` carries ``success`` (within 0.5 of the goal) and ``goal``.
    """

    def __init__(
        self,
        env: gymnasium.Env,
        spec: MazeSpec,
        reward: RewardType = "sparse",
        goal_in_obs: bool = True,
        eval_goal: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(env)
        _check_reward(reward)
        self.maze_spec = spec
        self.reward_type = reward
        self.goal_in_obs = goal_in_obs
        self.eval_goal = eval_goal
        self.grid = _Grid(self.unwrapped.maze.maze_map, self.unwrapped.maze.maze_size_scaling)
        dim = 6 if goal_in_obs else 4
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self._rng = np.random.default_rng(seed)
        self._next_seed = seed

    @property
    def maze_map(self) -> list[list[int]]:
        """The maze as 0 (free) / 1 (wall) rows, what :class:`WaypointController` takes."""
        return [[0 if free else 1 for free in row] for row in self.grid.free]

    @property
    def goal(self) -> np.ndarray:
        return np.array(self.unwrapped.goal, dtype=np.float64)

    def set_goal(self, xy: np.ndarray) -> None:
        """Move the target (continuing tasks switch goals without resetting the ball)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(2)
        if not self.grid.free[self.grid.xy_to_cell(xy)]:
            raise DatasetError(f"goal {xy.tolist()} lies in a wall cell; pick a point in a free cell")
        self.unwrapped.goal = xy.copy()
        self.unwrapped.update_target_site_pos()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is None and self._next_seed is not None:
            seed = self._next_seed
        self._next_seed = None
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        opts = dict(options or {})
        if self.eval_goal:
            opts.setdefault("goal_cell", np.array(self.maze_spec.eval_goal_cell))
            if "reset_cell" not in opts:
                cells = self.grid.free_cells()
                opts["reset_cell"] = np.array(cells[self._rng.integers(len(cells))])
        obs, info = self.env.reset(seed=seed, options=opts or None)
        if self.eval_goal:
            # PointMaze jitters the goal by up to 0.25; D4RL evaluates against the exact cell centre.
            self.set_goal(self.grid.cell_to_xy(tuple(opts["goal_cell"])))
        state = obs["observation"]
        info.update(self._info(state))
        return self._obs(state), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, _, terminated, truncated, info = self.env.step(action)
        state = obs["observation"]
        goal = self.unwrapped.goal
        dist = math.hypot(state[0] - goal[0], state[1] - goal[1])
        reward = (1.0 if dist <= GOAL_RADIUS else 0.0) if self.reward_type == "sparse" else math.exp(-dist)
        info.update(self._info(state, dist))
        return self._obs(state), reward, terminated, truncated, info

    def _info(self, state: np.ndarray, dist: float | None = None) -> dict[str, Any]:
        if dist is None:
            dist = float(np.linalg.norm(state[:2] - self.unwrapped.goal))
        return {"success": dist <= GOAL_RADIUS, "goal": self.goal, "distance": dist}

    def _obs(self, state: np.ndarray) -> np.ndarray:
        if self.goal_in_obs:
            return np.concatenate([state, self.unwrapped.goal]).astype(np.float32)
        return np.asarray(state, dtype=np.float32).copy()


def make_maze2d_env(
    maze: str = "umaze",
    reward: RewardType = "sparse",
    goal_in_obs: bool = True,
    eval_goal: bool = True,
    max_episode_steps: int | None = None,
    seed: int | None = None,
) -> Maze2DEnv:
    """A maze2d environment: D4RL's observation, reward and (with ``eval_goal``) evaluation goal.

    ``eval_goal=True`` fixes the goal at ``MAZES[maze].eval_goal_cell`` and
    starts from a random free cell; ``False`` keeps PointMaze's random goal.
    Episodes last the maze's D4RL limit unless ``max_episode_steps`` is given.
    """
    spec = _spec(maze)
    _check_reward(reward)
    limit = spec.episode_limit if max_episode_steps is None else int(max_episode_steps)
    if limit <= 0:
        raise DatasetError(f"max_episode_steps must be positive, got {max_episode_steps}")
    base = gymnasium.make(
        spec.env_id,
        continuing_task=True,
        reset_target=False,
        max_episode_steps=limit,
        disable_env_checker=True,
    )
    return Maze2DEnv(base, spec, reward=reward, goal_in_obs=goal_in_obs, eval_goal=eval_goal, seed=seed)


def _rollout_returns(env: Maze2DEnv, episodes: int, seed: int, expert: bool) -> np.ndarray:
    controller = WaypointController(env.maze_map)
    env.action_space.seed(seed)
    returns = np.zeros(episodes)
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done = False
        while not done:
            if expert:
                action = controller.act(obs[:2], obs[2:4], env.unwrapped.goal)
            else:
                action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            returns[ep] += reward
            done = terminated or truncated
    return returns


def reference_scores(maze: str, reward: RewardType = "sparse", episodes: int = 100, seed: int = 0) -> tuple[float, float]:
    """``(ref_min, ref_max)`` the D4RL way, measured in this simulator.

    ref_min is the mean return of a uniform random policy, ref_max that of the
    noise-free expert, each over ``episodes`` evaluation episodes (fixed goal,
    random start, the maze's episode limit). Both use the same start cells.
    """
    if episodes <= 0:
        raise DatasetError(f"episodes must be positive, got {episodes}")
    env = make_maze2d_env(maze, reward=reward, goal_in_obs=False, eval_goal=True)
    try:
        low = _rollout_returns(env, episodes, seed, expert=False).mean()
        high = _rollout_returns(env, episodes, seed, expert=True).mean()
    finally:
        env.close()
    return float(low), float(high)


def generate_maze2d(
    maze: str,
    num_steps: int,
    *,
    seed: int = 0,
    reward: RewardType = "sparse",
    episode_len: int = 1000,
    action_noise_std: float = 0.5,
    goal_tolerance: float = 0.1,
    path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    reference_episodes: int = 100,
    segments: int = 1,
    workers: int = 1,
    ray_address: str | None = None,
) -> OfflineDataset:
    """Collect a maze2d data set with D4RL's recipe; write it to ``path`` when given.

    The expert chases a random goal (a free cell's centre jittered by up to
    0.1) and a new goal is drawn each time the ball is within
    ``goal_tolerance`` of it, and at the end of every ``episode_len``-step
    chunk (marked ``timeouts``). The ball is never reset, so ``terminals`` are
    all False and every row's successor is real (stored as
    ``next_observations``). ``action_noise_std`` is Gaussian noise on the
    expert's actions, added before clipping to [-1, 1]; D4RL's generation
    script offers the same noise (std 0.5, its ``--noisy`` option), which keeps
    the data from being a single deterministic behaviour. ``reference_episodes=0``
    skips the reference returns.

    ``segments > 1`` collects the rows as that many independent runs of whole
    ``episode_len`` chunks, each seeded from ``(seed, segment)``, joined in
    order: they run as Ray tasks on ``workers`` CPUs or a cluster at
    ``ray_address`` (:func:`diffpilot.parallel.ordered_map`), and the file is
    the same for any number of workers. ``segments=1`` is the single run.
    """
    from diffpilot.parallel import ordered_map

    spec = _spec(maze)
    _check_reward(reward)
    if num_steps <= 0 or episode_len <= 0:
        raise DatasetError(f"num_steps and episode_len must be positive, got {num_steps} and {episode_len}")
    if action_noise_std < 0 or goal_tolerance <= 0:
        raise DatasetError("action_noise_std must be >= 0 and goal_tolerance > 0")
    chunks = math.ceil(num_steps / episode_len)
    if isinstance(segments, bool) or not isinstance(segments, (int, np.integer)) or not 1 <= segments <= chunks:
        raise DatasetError(f"segments must be an integer in [1, {chunks}] (whole {episode_len}-step chunks of "
                           f"{num_steps} steps), got {segments!r}")
    per = [chunks // segments + (i < chunks % segments) for i in range(segments)]
    lengths = [min(n * episode_len, num_steps - sum(per[:i]) * episode_len) for i, n in enumerate(per)]
    seeds = [seed] if segments == 1 else [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(segments)]
    jobs = [(maze, reward, n, s_, episode_len, action_noise_std, goal_tolerance, progress and segments == 1)
            for n, s_ in zip(lengths, seeds)]
    parts = ordered_map(_collect_segment, jobs, workers=int(workers), ray_address=ray_address,
                        progress=progress and segments > 1, desc=f"maze2d-{maze} segments", unit="segment")

    metadata: dict[str, Any] = {
        "maze": maze,
        "env_id": spec.env_id,
        "reward_type": reward,
        "seed": seed,
        "episode_len": episode_len,
        "eval_episode_limit": spec.episode_limit,
        "eval_goal_cell": np.array(spec.eval_goal_cell),
        "action_noise_std": action_noise_std,
        "goal_tolerance": goal_tolerance,
        "observation_layout": "x,y,vx,vy",
        "recipe": (
            "D4RL maze2d: grid value-iteration waypoints + PD a=clip(10*(wp-pos)-1*vel,-1,1), "
            f"Gaussian action noise std {action_noise_std}, new random goal when within {goal_tolerance} "
            f"and every {episode_len} steps; reward {reward} (radius {GOAL_RADIUS} / exp(-dist))"
        ),
        "goals_reached": int(sum(p["goals_reached"] for p in parts)),
        "d4rl_ref_min_score": spec.d4rl_ref_scores[0],
        "d4rl_ref_max_score": spec.d4rl_ref_scores[1],
        "versions": {name: version(name) for name in ("gymnasium", "gymnasium-robotics", "mujoco")},
        **({"segments": int(segments)} if segments > 1 else {}),
    }
    if reference_episodes > 0:
        ref_min, ref_max = reference_scores(maze, reward, reference_episodes, seed)
        metadata.update(ref_min_score=ref_min, ref_max_score=ref_max, ref_source="local", reference_episodes=reference_episodes)

    def cat(key: str) -> np.ndarray:
        return np.concatenate([p[key] for p in parts])

    dataset = OfflineDataset(
        observations=cat("observations"),
        actions=cat("actions"),
        rewards=cat("rewards"),
        terminals=np.zeros(num_steps, dtype=bool),
        timeouts=cat("timeouts"),
        next_observations=cat("next_observations"),
        infos={"goal": cat("goal"), "qpos": cat("qpos"), "qvel": cat("qvel")},
        metadata=metadata,
    )
    if path is not None:
        write_d4rl(path, dataset)
    return dataset


def _collect_segment(args: tuple) -> dict[str, Any]:
    """One uninterrupted run of the expert: ``num_steps`` rows from one seed (a task of :func:`generate_maze2d`)."""
    maze, reward, num_steps, seed, episode_len, action_noise_std, goal_tolerance, progress = args
    rng = np.random.default_rng(seed)
    env = make_maze2d_env(maze, reward=reward, goal_in_obs=False, eval_goal=False, max_episode_steps=num_steps + 1, seed=seed)
    controller = WaypointController(env.maze_map)
    cells = env.grid.free_cells()

    def random_goal() -> np.ndarray:
        cell = cells[rng.integers(len(cells))]
        return env.grid.cell_to_xy(cell) + rng.uniform(-0.1, 0.1, size=2)

    obs_buf = np.zeros((num_steps + 1, 4), dtype=np.float64)
    actions = np.zeros((num_steps, 2), dtype=np.float32)
    rewards = np.zeros(num_steps, dtype=np.float32)
    timeouts = np.zeros(num_steps, dtype=bool)
    goals = np.zeros((num_steps, 2), dtype=np.float32)
    qpos = np.zeros((num_steps, 2), dtype=np.float32)
    qvel = np.zeros((num_steps, 2), dtype=np.float32)

    noise = rng.normal(0.0, action_noise_std, size=(num_steps, 2)) if action_noise_std > 0 else None
    bar = _progress(num_steps, f"maze2d-{maze}", progress)
    goals_reached = 0
    try:
        obs, _ = env.reset()
        env.set_goal(random_goal())
        obs_buf[0] = obs
        for t in range(num_steps):
            goal = env.unwrapped.goal
            goals[t] = goal
            qpos[t] = env.unwrapped.data.qpos[:2]
            qvel[t] = env.unwrapped.data.qvel[:2]
            action = controller.act(obs[:2], obs[2:4], goal)
            if noise is not None:
                action = np.clip(action + noise[t], -1.0, 1.0)
            obs, r, _, _, info = env.step(action)
            actions[t] = action
            rewards[t] = r
            obs_buf[t + 1] = obs
            chunk_end = (t + 1) % episode_len == 0 or t + 1 == num_steps
            timeouts[t] = chunk_end
            if info["distance"] <= goal_tolerance or chunk_end:
                goals_reached += info["distance"] <= goal_tolerance
                env.set_goal(random_goal())
            if bar is not None and (t + 1) % 1000 == 0:
                bar.update(1000)
        if bar is not None:
            bar.update(num_steps - bar.n)
    finally:
        if bar is not None:
            bar.close()
        env.close()
    return {"observations": obs_buf[:-1], "next_observations": obs_buf[1:], "actions": actions, "rewards": rewards,
            "timeouts": timeouts, "goal": goals, "qpos": qpos, "qvel": qvel, "goals_reached": int(goals_reached)}


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=0.5)
