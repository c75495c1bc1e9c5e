"""The trainer: learns, checkpoints, and resumes to exactly the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpilot.data.windows import ChunkWindows
from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy
from diffpilot.policy.checkpoint import CheckpointError
from diffpilot.train import TensorRows, TrainerConfig, train

TINY_NET = {"name": "unet1d", "down_dims": [16, 32], "kernel_size": 3, "n_groups": 4}


def _data(n: int = 400):
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
    act = np.stack([obs[:, 0] * 0.8, -obs[:, 1]], axis=1).astype(np.float32)
    return obs, act


def _policy(obs, act, **kw):
    torch.manual_seed(0)
    p = ChunkDiffusionPolicy(3, 2, obs_horizon=2, action_horizon=8, exec_horizon=4, network=TINY_NET, **kw)
    p.fit_normalizers(obs, act)
    return p


def test_windows_stay_inside_episodes():
    obs = np.arange(10, dtype=np.float32)[:, None]
    act = np.arange(10, dtype=np.float32)[:, None] + 100
    w = ChunkWindows(obs, act, [(0, 4), (4, 10)], obs_horizon=2, action_horizon=4)
    assert len(w) == 10
    b = w.batch(np.array([0, 3, 4, 9]))
    assert b["obs"][:, :, 0].tolist() == [[0, 0], [2, 3], [4, 4], [8, 9]]
    assert b["action"][:, :, 0].tolist() == [[100, 100, 101, 102], [102, 103, 103, 103], [104, 104, 105, 106], [108, 109, 109, 109]]
    with pytest.raises(ValueError, match="obs_horizon <= action_horizon"):
        ChunkWindows(obs, act, [(0, 10)], obs_horizon=5, action_horizon=4)


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    obs, act = _data()
    windows = ChunkWindows(obs, act, [(0, 200), (200, 400)], 2, 8)
    cfg = TrainerConfig(steps=24, batch_size=32, warmup_steps=4, ckpt_every=12, log_every=4, progress=False)
    full = train(_policy(obs, act), windows, cfg, tmp_path / "full").policy

    class Interrupted(ChunkWindows):
        """The same windows, but the process dies while drawing batch 16 (after the step-12 checkpoint)."""

        calls = 0

        def batch(self, rows):
            Interrupted.calls += 1
            if Interrupted.calls == 16:
                raise KeyboardInterrupt
            return super().batch(rows)

    with pytest.raises(KeyboardInterrupt):
        train(_policy(obs, act), Interrupted(obs, act, [(0, 200), (200, 400)], 2, 8), cfg, tmp_path / "split")
    # A new process starts from a fresh model: resume must restore everything.
    resumed = train(_policy(obs, act), windows, cfg, tmp_path / "split").policy
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    log = (tmp_path / "split" / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,train_s,lr" and log[-1].startswith("24,")
    assert (tmp_path / "split" / "curves.png").is_file()


def test_training_reduces_the_loss_and_the_saved_policy_acts(tmp_path):
    obs, act = _data()
    windows = ChunkWindows(obs, act, [(0, 400)], 2, 8)
    policy = _policy(obs, act)
    rows = np.arange(0, 400, 4)
    batch = {k: torch.from_numpy(v) for k, v in windows.batch(rows).items()}
    g = torch.Generator().manual_seed(1)
    before = policy.compute_loss(batch, generator=g)[0].item()
    ema = train(policy, windows, TrainerConfig(steps=150, batch_size=64, lr=3e-3, ckpt_every=150, ema_decay=0.9, progress=False), tmp_path).policy
    after = ema.compute_loss(batch, generator=g.manual_seed(1))[0].item()
    assert after < 0.5 * before, (before, after)
    loaded = ChunkDiffusionPolicy.load(tmp_path / "policy")
    loaded.reset(seed=3)
    actions = [loaded.act(o) for o in obs[:6]]
    assert all(a.shape == (2,) and np.isfinite(a).all() for a in actions)
    with pytest.raises(ValueError, match=r"expects an observation of shape \(3,\)"):
        loaded.act(np.zeros(4))


def test_noise_in_means_the_same_chunk_out():
    obs, act = _data()
    policy = _policy(obs, act).eval()
    hist = torch.from_numpy(obs[:4].reshape(2, 2, 3))
    noise = torch.randn(policy.noise_shape(2), generator=torch.Generator().manual_seed(5))
    a = policy.predict({"obs": hist}, noise=noise)
    b = policy.predict({"obs": hist}, noise=noise.clone())
    c = policy.predict({"obs": hist}, noise=torch.randn_like(noise))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_corrupt_resume_state_says_how_to_recover(tmp_path):
    obs, act = _data()
    windows = ChunkWindows(obs, act, [(0, 400)], 2, 8)
    cfg = TrainerConfig(steps=4, batch_size=8, ckpt_every=2, progress=False)
    train(_policy(obs, act), windows, cfg, tmp_path)
    (tmp_path / "state" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="Delete it to start over"):
        train(_policy(obs, act), windows, TrainerConfig(steps=8, batch_size=8, progress=False), tmp_path)


def test_row_weights_decide_which_rows_are_drawn(tmp_path):
    obs, act = _data()
    windows = ChunkWindows(obs, act, [(0, 400)], 2, 8)
    rows = windows.batch(np.arange(len(windows)))
    poisoned = {k: torch.from_numpy(v.copy()) for k, v in rows.items()}
    half = len(windows) // 2
    poisoned["obs"][half:] = float("nan")  # a draw of any of these rows makes the loss non-finite
    weights = np.r_[np.ones(half), np.zeros(len(windows) - half)]
    cfg = TrainerConfig(steps=30, batch_size=64, lr=1e-3, ckpt_every=30, progress=False)
    train(_policy(obs, act), TensorRows(poisoned, weights), cfg, None)  # never draws a zero-weight row
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(_policy(obs, act), TensorRows(poisoned), cfg, None)  # the uniform draw does
    with pytest.raises(ValueError, match="row weights"):
        TensorRows(poisoned, -weights)
