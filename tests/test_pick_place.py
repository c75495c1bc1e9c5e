"""The MuJoCo pick-and-place task: physics of the grasp, the scripted expert, the data set, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from diffpilot.data.d4rl import read_d4rl
from diffpilot.data.pick_place import (
    ACTION_DIM,
    GRIP_DIM,
    OBJECT_HALF,
    OBS_DIM,
    PickPlaceExpert,
    generate_pick_place,
    make_pick_place_env,
)
from diffpilot.sim.runner import run_episodes
from diffpilot.sim.tasks import get_task


def test_the_expert_picks_and_places_from_every_start():
    records = run_episodes(make_pick_place_env, PickPlaceExpert(noise=0.1, seed=0), episodes=8, seed=0, progress=False)
    assert all(r.success for r in records)
    assert all(r.length == 100 for r in records)


def test_closing_on_the_cube_lifts_it_and_opening_drops_it():
    env = make_pick_place_env()
    obs, _ = env.reset(seed=3)
    expert = PickPlaceExpert(noise=0.0)
    for _ in range(30):  # approach, descend, close, start carrying
        obs, *_ = env.step(expert.act(obs))
    assert expert.phase == "carry"
    lift = np.array([0.0, 0.0, 1.0, -1.0], dtype=np.float32)
    for _ in range(10):
        obs, *_ = env.step(lift)
    assert obs[9] > OBJECT_HALF + 0.1  # the cube rose with the hand
    assert obs[6] > 0.015  # the fingers stopped on the cube (4 cm wide), not closed
    for _ in range(15):
        obs, *_ = env.step(np.array([0.0, 0.0, 0.0, 1.0], dtype=np.float32))
    assert obs[9] < OBJECT_HALF + 0.01  # released: it fell back to the table


def test_random_actions_rarely_succeed_and_the_grip_is_binary():
    env = make_pick_place_env()
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    openings = []
    for _ in range(40):
        a = rng.uniform(-1, 1, ACTION_DIM).astype(np.float32)
        a[GRIP_DIM] = 0.3  # any positive value opens fully
        obs, reward, *_ = env.step(a)
        openings.append(obs[6])
    assert reward == 0.0
    assert openings[-1] == pytest.approx(0.045, abs=2e-3)


def test_bad_actions_are_named():
    env = make_pick_place_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([0, np.nan, 0, 1.0]))


def test_generated_demos_load_as_d4rl_with_reference_scores(tmp_path):
    path = generate_pick_place(tmp_path / "pp.hdf5", episodes=3, reference_episodes=2, progress=False)
    ds = read_d4rl(path)
    assert ds.observations.shape == (300, OBS_DIM) and ds.actions.shape == (300, ACTION_DIM)
    assert set(np.unique(ds.actions[:, GRIP_DIM])) == {-1.0, 1.0}
    assert int(ds.timeouts.sum()) == 3
    ref_min, ref_max = ds.metadata["ref_min_score"], ds.metadata["ref_max_score"]
    assert ref_min < 5 < 50 < ref_max <= 100
    assert list(ds.metadata["discrete_action_dims"]) == [GRIP_DIM]
    task = get_task("pick-place")
    assert task.observations(ds).shape == (300, OBS_DIM)
