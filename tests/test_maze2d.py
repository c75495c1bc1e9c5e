"""maze2d on real MuJoCo PointMaze: the expert controller, the generator and the reference scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffpilot.data.d4rl import read_d4rl
from diffpilot.data.errors import DatasetError
from diffpilot.data.maze2d import MAZES, WaypointController, generate_maze2d, make_maze2d_env, reference_scores


def test_value_iteration_gives_shortest_path_lengths() -> None:
    ctrl = WaypointController([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]])
    v = ctrl.values((1, 1))
    # along the U: (1,1) (1,2) (1,3) (2,3) (3,3) (3,2) (3,1)
    assert [v[c] for c in [(1, 1), (1, 2), (1, 3), (2, 3), (3, 3), (3, 2), (3, 1)]] == [0, -1, -2, -3, -4, -5, -6]
    assert v[0, 0] == -np.inf
    assert tuple(ctrl.plan((1, 1))[3, 1]) == (3, 2)
    with pytest.raises(DatasetError, match="wall"):
        ctrl.values((0, 0))


@pytest.mark.parametrize(
    "maze, pairs",
    [
        ("umaze", [((3, 1), (1, 1)), ((1, 1), (3, 1)), ((1, 3), (3, 1))]),
        ("medium", [((1, 1), (6, 6)), ((6, 6), (1, 1)), ((4, 1), (1, 6))]),
    ],
)
def test_controller_reaches_goals_within_the_episode_limit(maze: str, pairs: list) -> None:
    env = make_maze2d_env(maze, eval_goal=False)
    ctrl = WaypointController(env.maze_map)
    limit = MAZES[maze].episode_limit
    try:
        for i, (start, goal) in enumerate(pairs):
            obs, info = env.reset(seed=i, options={"reset_cell": np.array(start), "goal_cell": np.array(goal)})
            assert not info["success"]
            np.testing.assert_allclose(obs[4:6], env.goal, atol=1e-6)
            reached_at = None
            for t in range(limit):
                obs, reward, terminated, truncated, info = env.step(ctrl.act(obs[:2], obs[2:4], obs[4:6]))
                if info["success"]:
                    reached_at = t
                    assert reward == 1.0
                    break
                assert reward == 0.0 and not terminated and not truncated
            assert reached_at is not None, f"{maze}: no success from {start} to {goal} in {limit} steps"
    finally:
        env.close()


def test_eval_env_has_fixed_goal_flat_obs_and_time_limit() -> None:
    env = make_maze2d_env("umaze", reward="dense", seed=4)
    try:
        assert env.observation_space.shape == (6,) and env.observation_space.dtype == np.float32
        starts = set()
        for ep in range(4):
            obs, info = env.reset()
            starts.add(env.grid.xy_to_cell(obs[:2]))
            np.testing.assert_allclose(info["goal"], env.grid.cell_to_xy(MAZES["umaze"].eval_goal_cell))
        assert len(starts) > 1, "start cells should be random"
        steps, truncated = 0, False
        while not truncated:
            obs, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))
            steps += 1
            assert not terminated
            assert reward == pytest.approx(np.exp(-np.linalg.norm(obs[:2] - obs[4:6])), rel=1e-5)
        assert steps == 300
    finally:
        env.close()
    with pytest.raises(DatasetError, match="unknown maze"):
        make_maze2d_env("huge")


def test_generated_dataset_is_valid_consistent_and_reaches_goals(tmp_path: Path) -> None:
    path = tmp_path / "maze2d-umaze.hdf5"
    made = generate_maze2d("umaze", 2000, seed=1, episode_len=500, path=path, progress=False, reference_episodes=2)
    ds = read_d4rl(path)
    assert len(ds) == 2000 and ds.obs_dim == 4 and ds.act_dim == 2
    np.testing.assert_array_equal(ds.observations, made.observations)
    assert ds.rewards.max() == 1.0 and ds.metadata["goals_reached"] >= 3
    assert not ds.terminals.any()
    np.testing.assert_array_equal(ds.timeouts.nonzero()[0], [499, 999, 1499, 1999])
    assert np.abs(ds.actions).max() <= 1.0
    # actions are noisy expert actions, not saturated controller outputs only
    assert 0 < np.mean(np.abs(ds.actions) < 0.999)
    for start, stop in ds.episode_slices():
        np.testing.assert_array_equal(ds.next_observations[start : stop - 1], ds.observations[start + 1 : stop])
    np.testing.assert_allclose(ds.infos["qpos"], ds.observations[:, :2], atol=1e-6)
    np.testing.assert_allclose(ds.infos["qvel"], ds.observations[:, 2:], atol=1e-6)
    # sparse reward is 1 exactly where the next position is within 0.5 of the goal in force
    dist = np.linalg.norm(ds.next_observations[:, :2] - ds.infos["goal"], axis=1)
    np.testing.assert_array_equal(ds.rewards == 1.0, dist <= 0.5)
    meta = ds.metadata
    assert meta["maze"] == "umaze" and meta["reward_type"] == "sparse" and meta["seed"] == 1
    assert meta["ref_source"] == "local" and meta["eval_episode_limit"] == 300
    assert meta["ref_max_score"] > meta["ref_min_score"]
    assert len(ds.transitions().observations) == 1996


def test_generation_is_deterministic_per_seed() -> None:
    a = generate_maze2d("umaze", 300, seed=7, progress=False, reference_episodes=0)
    b = generate_maze2d("umaze", 300, seed=7, progress=False, reference_episodes=0)
    c = generate_maze2d("umaze", 300, seed=8, progress=False, reference_episodes=0)
    np.testing.assert_array_equal(a.observations, b.observations)
    assert not np.array_equal(a.observations, c.observations)


def test_expert_reference_return_is_far_above_random() -> None:
    low, high = reference_scores("umaze", "sparse", episodes=4, seed=0)
    assert 0.0 <= low < high <= 300.0
    assert high - low > 100.0
