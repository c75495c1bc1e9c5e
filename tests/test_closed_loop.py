"""Closed loop in real MuJoCo: the runner with a scripted expert and with a trained chunk policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpilot.data.maze2d import WaypointExpert, generate_maze2d
from diffpilot.data.windows import ChunkWindows
from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy
from diffpilot.train import TrainerConfig, train
from diffpilot.sim.runner import run_episodes, summarize
from diffpilot.sim.tasks import get_task


def test_runner_records_the_expert_succeeding_every_episode():
    task = get_task("maze2d-umaze")
    env = task.make_env()
    expert = WaypointExpert(env.unwrapped.maze.maze_map)
    env.close()
    ref = (5.0, 150.0)
    records = run_episodes(task.make_env, expert, 3, seed=7, ref_scores=ref)
    assert [r.length for r in records] == [300, 300, 300]
    assert all(r.success for r in records)
    s = summarize(records)
    assert s["success_rate"] == 1.0 and s["return_mean"] > 100
    assert records[0].observations.shape == (301, 6)
    assert s["latency_ms_p50"] > 0
    assert records[0].normalized_score == pytest.approx(100 * (records[0].episode_return - 5) / 145)


@pytest.fixture(scope="module")
def maze_data():
    return generate_maze2d("umaze", 4000, seed=3, episode_len=500, progress=False, reference_episodes=4)


def test_trained_chunk_policy_runs_closed_loop_and_imitates_better_than_untrained(maze_data, tmp_path):
    ds = maze_data
    task = get_task("maze2d-umaze")
    obs = task.observations(ds)
    torch.manual_seed(0)
    net = {"name": "unet1d", "down_dims": [32, 64], "kernel_size": 3, "n_groups": 8}
    policy = ChunkDiffusionPolicy(6, 2, obs_horizon=2, action_horizon=8, exec_horizon=4, network=net,
                                  sampler={"name": "ddim", "num_steps": 5})
    policy.fit_normalizers(obs, ds.actions)
    windows = ChunkWindows(obs, ds.actions, ds.episode_slices(), 2, 8)
    held = {k: torch.from_numpy(v) for k, v in windows.batch(np.arange(0, len(windows), 37)).items()}
    noise = torch.randn(policy.noise_shape(len(held["obs"])), generator=torch.Generator().manual_seed(0))

    def imitation_error(p):
        return (p.predict({"obs": held["obs"]}, noise=noise) - held["action"]).pow(2).mean().item()

    before = imitation_error(policy.eval())
    trained = train(policy.train(), windows, TrainerConfig(steps=300, batch_size=128, lr=2e-3, ckpt_every=300, progress=False), tmp_path).policy
    after = imitation_error(trained)
    assert after < 0.5 * before, (before, after)

    ref = (float(ds.metadata["ref_min_score"]), float(ds.metadata["ref_max_score"]))
    loaded = ChunkDiffusionPolicy.load(tmp_path / "policy")
    records = run_episodes(task.make_env, loaded, 2, seed=11, ref_scores=ref)
    assert len(records) == 2 and all(r.length == 300 for r in records)
    for r in records:
        assert np.isfinite(r.episode_return) and 0 <= r.episode_return <= 300
        assert np.isfinite(r.normalized_score)
        xy = r.observations[:, :2]
        assert np.abs(xy).max() < 3.0  # stayed inside the umaze walls
        assert np.linalg.norm(xy[-1] - xy[0]) > 0.1  # it moved
    assert loaded.last_nfe == 5
