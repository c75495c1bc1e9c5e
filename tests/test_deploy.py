"""`diffpilot deploy`: the fixed-rate loop runs an exported policy in MuJoCo without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from diffpilot.export import control_loop
from diffpilot.export.control_loop import run_fixed_rate
from diffpilot.export.onnx import export_policy
from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy

BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this robot")
sys.meta_path.insert(0, _NoTorch())
from diffpilot.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules, "deploy imported torch"
sys.exit(code)
"""


def test_deploy_runs_at_a_fixed_rate_without_torch(tmp_path):
    policy = ChunkDiffusionPolicy(6, 2, action_horizon=8, exec_horizon=4,
                                  network={"name": "unet1d", "down_dims": [16, 32], "kernel_size": 3, "n_groups": 4},
                                  sampler={"name": "ddim", "num_steps": 2})
    policy.fit_normalizers(np.random.default_rng(0).normal(size=(50, 6)), np.random.default_rng(1).uniform(-1, 1, (50, 2)))
    model = export_policy(policy, tmp_path / "policy.onnx")
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, "deploy", f"model={model}", "hz=200", "sim.episodes=1", f"out={tmp_path / 'deploy'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads((tmp_path / "deploy" / "deploy.json").read_text())
    assert stats["ticks"] == 300 and stats["hz"] == 200
    assert 0 < stats["latency_ms_p50"] <= stats["latency_ms_p99"] <= stats["latency_ms_max"]
    assert stats["miss_rate"] == stats["deadline_misses"] / 300 and len(stats["episode_returns"]) == 1
    assert (tmp_path / "deploy" / "latency.png").stat().st_size > 0
    assert "deadline_misses" in (tmp_path / "deploy" / "report.md").read_text()


class _Clock:
    """A fake ``time`` module: ``perf_counter`` reads it, ``sleep`` and the policy advance it."""

    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


class _CountingEnv(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, length: int) -> None:
        self.length, self.t = length, 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(2, np.float32), 1.0, False, self.t >= self.length, {}


class _Policy:
    """``act()`` takes ``latencies_s[i]`` of fake time on call ``i``."""

    def __init__(self, clock: _Clock, latencies_s) -> None:
        self.clock, self.latencies, self.calls, self.seeds = clock, list(latencies_s), 0, []

    def reset(self, seed=None) -> None:
        self.seeds.append(seed)

    def act(self, obs):
        self.clock.now += self.latencies[self.calls]
        self.calls += 1
        return np.zeros(1, np.float32)


def test_fixed_rate_loop_counts_late_ticks_and_waits_out_the_rest(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(control_loop, "time", clock)
    # 10 Hz: a 100 ms period; ticks 1 and 3 (0-based) overrun it, the others take 20 ms
    lat = [0.02, 0.15, 0.02, 0.3, 0.02, 0.02]
    policy = _Policy(clock, lat)
    stats, lat_ms = run_fixed_rate(lambda: _CountingEnv(3), policy, hz=10.0, episodes=2, seed=5)
    assert stats.ticks == 6 and policy.calls == 6 and policy.seeds == [5, 6]
    np.testing.assert_allclose(lat_ms, np.array(lat) * 1e3)
    assert stats.deadline_misses == 2 and stats.miss_rate == pytest.approx(2 / 6)
    assert stats.episode_returns == [3.0, 3.0]
    # an on-time tick sleeps to its deadline: the rest of the period after a 20 ms act()
    assert clock.slept == pytest.approx([0.08] * 4)
    assert stats.latency_ms_max == pytest.approx(300.0) and stats.latency_ms_p50 == pytest.approx(20.0)
    assert stats.achieved_hz == pytest.approx(6 / clock.now)
    with pytest.raises(ValueError, match="hz must be positive"):
        run_fixed_rate(lambda: _CountingEnv(3), policy, hz=0.0)
