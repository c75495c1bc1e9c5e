"""The `diffpilot` command: config composition, overrides, clear errors, and a real data run."""

from __future__ import annotations

import pytest

from diffpilot.cli import load_config, main
from diffpilot.data.d4rl import read_d4rl


def test_groups_and_overrides_compose():
    cfg = load_config("train", ["policy=chunk_flow", "data=maze2d-medium", "train.steps=7", "policy.sampler.num_steps=3"])
    assert cfg["policy"]["objective"] == {"name": "flow"}
    assert cfg["policy"]["sampler"] == {"name": "euler", "num_steps": 3}
    assert cfg["data"]["maze"] == "medium" and cfg["train"]["steps"] == 7


def test_bad_configuration_is_one_clear_message(capsys):
    assert main(["train", "train.stepz=5"]) == 2
    assert "Could not override 'train.stepz'" in capsys.readouterr().err
    assert main(["train", "policy=nope"]) == 2
    assert "policy" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "missing required setting(s) ['checkpoint']" in capsys.readouterr().err


def test_cfg_flag_prints_without_running(capsys):
    assert main(["demo", "--cfg", "train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "eval_samplers" in out


def test_data_command_writes_a_valid_cached_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFPILOT_CACHE", str(tmp_path))
    args = ["data", "maze2d-umaze", "data.num_steps=600", "data.episode_len=300", "data.reference_episodes=2", "progress=false"]
    assert main(args) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert path.startswith(str(tmp_path))
    ds = read_d4rl(path)
    assert len(ds) == 600 and ds.metadata["maze"] == "umaze" and "ref_max_score" in ds.metadata
    mtime = (tmp_path / "datasets").stat().st_mtime_ns
    assert main(args) == 0  # cached: not generated again
    assert (tmp_path / "datasets").stat().st_mtime_ns == mtime


def test_unknown_task_is_refused():
    from diffpilot.sim.tasks import get_task

    with pytest.raises(ValueError, match="unknown task 'maze3d'.*maze2d-umaze"):
        get_task("maze3d")


def test_export_command_writes_a_model_the_runtime_runs(tmp_path, capsys):
    import numpy as np

    from diffpilot.export.runtime import OnnxChunkPolicy
    from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy

    policy = ChunkDiffusionPolicy(6, 2, action_horizon=8, exec_horizon=4,
                                  network={"name": "unet1d", "down_dims": [16, 32], "kernel_size": 3, "n_groups": 4})
    policy.fit_normalizers(np.random.default_rng(0).normal(size=(50, 6)), np.random.default_rng(1).uniform(-1, 1, (50, 2)))
    policy.save(tmp_path / "policy")
    assert main(["export", f"checkpoint={tmp_path / 'policy'}", "sampler={name: ddim, num_steps: 2}"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert path == str(tmp_path / "policy.onnx")
    runtime = OnnxChunkPolicy(path)
    assert runtime.nfe == 2
    assert runtime.act(np.zeros(6, dtype=np.float32)).shape == (2,)
