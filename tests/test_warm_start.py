"""Real-time-iteration warm start: guess handling, NFE, reset, and what a good or bad guess does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpilot.data.windows import ChunkWindows
from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy
from diffpilot.policy.generative.warm_start import WarmStartConfig, shift_chunk
from diffpilot.train import TrainerConfig, train

NET = {"name": "unet1d", "down_dims": [16, 32], "kernel_size": 3, "n_groups": 4}


def test_shift_drops_executed_steps_and_repeats_the_last():
    chunk = torch.arange(5.0).reshape(1, 5, 1)
    assert shift_chunk(chunk, 2)[0, :, 0].tolist() == [2, 3, 4, 4, 4]
    assert torch.equal(shift_chunk(chunk, 0), chunk)
    with pytest.raises(ValueError, match=r"shift must be in \[0, 4\]"):
        shift_chunk(chunk, 5)
    with pytest.raises(ValueError, match="t_start must be in"):
        WarmStartConfig(t_start=1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A chunk policy whose action chunk is a deterministic function of the observation."""
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, size=(600, 2)).astype(np.float32)
    act = np.stack([0.8 * obs[:, 0], -0.6 * obs[:, 1]], axis=1).astype(np.float32)
    windows = ChunkWindows(obs, act, [(i, i + 1) for i in range(600)], 1, 8)  # constant chunks
    torch.manual_seed(0)
    policy = ChunkDiffusionPolicy(2, 2, obs_horizon=1, action_horizon=8, exec_horizon=4, network=NET,
                                  objective={"name": "ddpm", "num_train_steps": 100, "clip_sample": 1.0})
    policy.fit_normalizers(obs, act)
    out = tmp_path_factory.mktemp("warm")
    return train(policy, windows, TrainerConfig(steps=800, batch_size=64, lr=3e-3, ckpt_every=800, progress=False), out).policy, obs, act


def test_a_perfect_guess_is_kept_and_a_wrong_one_is_corrected_only_from_a_high_start(trained):
    policy, obs, act = trained
    policy.eval()
    o = torch.from_numpy(obs[:16])[:, None]
    cond = policy.condition(o)
    truth = policy.action_normalizer.normalize(torch.from_numpy(act[:16])[:, None].expand(-1, 8, -1))
    noise = torch.randn(policy.noise_shape(16), generator=torch.Generator().manual_seed(1))
    full = policy.sample_normalized(cond, noise).sample
    assert (full - truth).abs().mean() < 0.1  # the trained policy knows the chunk

    def warm(guess, t_start):
        policy.set_warm_start({"t_start": t_start, "renoise": True})
        return policy.warm_starter.sample(policy.net, guess, 0, noise, cond)

    kept = warm(full, 0.3)
    assert kept.nfe == 3
    assert (kept.sample - full).abs().mean() < 0.05  # a perfect guess is (nearly) a fixed point
    wrong = -truth
    low, high = warm(wrong, 0.2).sample, warm(wrong, 0.9).sample
    err_low, err_high = (low - truth).abs().mean(), (high - truth).abs().mean()
    assert err_high < 0.15 < err_low  # from a low start the guess dominates; from a high start the data does


def test_act_warm_starts_after_the_first_plan_and_reset_clears_the_guess(trained):
    policy, obs, _ = trained
    policy.set_sampler("ddim", num_steps=10)
    policy.set_warm_start({"t_start": 0.3, "renoise": True})
    policy.reset(seed=0)
    nfes = []
    for i in range(12):  # exec_horizon 4: plans at steps 0, 4, 8
        policy.act(obs[i])
        if i % 4 == 0:
            nfes.append(policy.last_nfe)
    assert nfes == [10, 3, 3]
    policy.reset(seed=0)
    policy.act(obs[0])
    assert policy.last_nfe == 10  # no guess survives a reset
    policy.set_warm_start(None)


def test_flow_policies_warm_start_with_their_own_integrator():
    torch.manual_seed(0)
    policy = ChunkDiffusionPolicy(2, 2, obs_horizon=1, action_horizon=8, exec_horizon=4, network=NET,
                                  objective={"name": "flow"}, sampler={"name": "euler", "num_steps": 10},
                                  warm_start={"t_start": 0.4, "num_steps": 2, "renoise": False})
    policy.fit_normalizers(np.zeros((4, 2)), np.ones((4, 2)) * np.arange(4)[:, None])
    policy.reset(seed=0)
    nfes = []
    for i in range(8):
        policy.act(np.zeros(2, dtype=np.float32))
        if i % 4 == 0:
            nfes.append(policy.last_nfe)
    assert nfes == [10, 2]


def test_jacobian_norm_recovers_a_known_spectral_norm():
    from diffpilot.policy.warm_start_tuning import jacobian_norm

    a = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    x = torch.randn(4, 6, 2)
    assert jacobian_norm(lambda z: z @ a, x, generator=torch.Generator().manual_seed(0)) == pytest.approx(3.0, rel=1e-3)


def test_tuning_picks_the_smallest_start_that_agrees_with_the_full_sampler(trained):
    from diffpilot.policy.warm_start_tuning import tune_warm_start

    policy, obs, _ = trained
    policy.set_sampler("ddim", num_steps=10)
    policy.set_warm_start(None)
    hist = torch.from_numpy(obs[:24])[:, None]
    report = tune_warm_start(policy, hist, hist, candidates=(0.1, 0.3, 0.6, 0.9), tolerance=0.08)
    nfes = [r["nfe"] for r in report.rows]
    assert nfes == sorted(nfes) and nfes[0] == 1 and nfes[-1] == 9
    assert all(0 < r["lipschitz"] < 100 for r in report.rows)
    assert report.t_start is not None
    for r in report.rows:
        if r["t_start"] < report.t_start - 1e-9:
            assert r["gap_mean"] > 0.08
        if r["t_start"] == pytest.approx(report.t_start):
            assert r["gap_mean"] <= 0.08


def test_discrete_dimensions_snap_and_the_two_variants_shape_the_model_space():
    """"scale" trains binary dims at +-1/f; "clip" weakens a warm guess's binary entries to +-1/f."""
    acts = np.array([[0.5, 1.0], [-0.5, -1.0], [0.0, 1.0]], dtype=np.float32)
    for mode in ("none", "scale", "clip"):
        policy = ChunkDiffusionPolicy(
            3, 2, obs_horizon=1, action_horizon=4, exec_horizon=2,
            network=NET, discrete_dims=[1] if mode != "none" else [],
            discrete_mode=mode, discrete_factor=10.0,
        )
        policy.fit_normalizers(np.zeros((3, 3), dtype=np.float32), acts)
        model = policy.to_model_space(torch.from_numpy(acts))
        assert torch.allclose(model[:, 1], torch.tensor([1.0, -1.0, 1.0]) / (10.0 if mode == "scale" else 1.0))
        sample = torch.tensor([[0.3, 0.02], [-0.3, -0.5]])
        out = policy.to_actions(sample * torch.tensor([1.0, 0.1 if mode == "scale" else 1.0]))
        if mode == "none":
            assert torch.allclose(out[:, 1], torch.tensor([0.02, -0.5]))
        else:
            assert out[:, 1].tolist() == [1.0, -1.0]
        guess = policy.warm_guess(torch.tensor([[0.7, 0.9], [0.7, -0.9]]))
        expected = [0.1, -0.1] if mode == "clip" else [0.9, -0.9]
        assert torch.allclose(guess[:, 1], torch.tensor(expected))
        assert torch.allclose(guess[:, 0], torch.tensor([0.7, 0.7]))
    policy = ChunkDiffusionPolicy(3, 2, obs_horizon=1, action_horizon=4, exec_horizon=2, network=NET, discrete_dims=[1])
    policy.set_discrete_mode("clip")
    assert policy.config["discrete_mode"] == "clip"
    with pytest.raises(ValueError, match="train a policy with discrete_mode=scale"):
        policy.set_discrete_mode("scale")
    with pytest.raises(ValueError, match="needs discrete_dims"):
        ChunkDiffusionPolicy(3, 2, obs_horizon=1, action_horizon=4, exec_horizon=2, discrete_mode="clip")
    with pytest.raises(ValueError, match="must index action dimensions"):
        ChunkDiffusionPolicy(3, 2, obs_horizon=1, action_horizon=4, exec_horizon=2, discrete_dims=[2], discrete_mode="clip")
