"""`diffpilot deploy`: the fixed-rate loop runs an exported policy in MuJoCo without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

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
    assert 0 <= stats["deadline_misses"] <= 300
    assert stats["achieved_hz"] <= 200 * 1.05  # the loop waits for its ticks
    assert (tmp_path / "deploy" / "latency.png").stat().st_size > 0
    assert "deadline_misses" in (tmp_path / "deploy" / "report.md").read_text()
