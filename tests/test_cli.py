"""The `diffpilot` command: config composition, overrides, clear errors, and a real data run."""

from __future__ import annotations

import pytest
import yaml

from diffpilot.cli import implied_groups, load_config, main
from diffpilot.data.d4rl import read_d4rl


def test_groups_and_overrides_compose():
    cfg = load_config("train", ["policy=chunk_flow", "data=maze2d-medium", "train.steps=7", "policy.sampler.num_steps=3"])
    assert cfg["policy"]["objective"] == {"name": "flow"}
    assert cfg["policy"]["sampler"] == {"name": "euler", "num_steps": 3}
    assert cfg["data"]["maze"] == "medium" and cfg["train"]["steps"] == 7


def test_a_tasks_per_task_values_apply_under_the_users_own_overrides():
    base = load_config("train", ["policy=dql", "data=hopper-medium"])["policy"]
    assert (base["eta"], base["actor_grad_clip"], base["critic"]["grad_clip"]) == (1.0, 9.0, 9.0)  # per_task applied
    assert "per_task" not in base
    mine = load_config("train", ["policy=dql", "data=hopper-medium", "policy.eta=0.3", "policy.critic.grad_clip=2.0"])["policy"]
    assert (mine["eta"], mine["actor_grad_clip"], mine["critic"]["grad_clip"]) == (0.3, 9.0, 2.0)
    assert mine["critic"]["lr"] == base["critic"]["lr"]  # the rest of the nested group stays
    assert load_config("train", ["policy=ofql", "data=maze2d-umaze", "policy.eta=2.5"])["policy"]["eta"] == 2.5


def test_a_maze_data_set_implies_its_own_maze_for_evaluation(capsys):
    assert main(["train", "--cfg", "policy=ofql", "data=maze2d-medium"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["sim"]["task"] == "maze2d-medium"
    assert main(["sweep", "--cfg", "policy=dql", "data=maze2d-large"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["sim"]["task"] == "maze2d-large"
    assert main(["train", "--cfg", "data=maze2d-medium", "sim=maze2d-umaze"]) == 0  # what the user gives wins
    assert yaml.safe_load(capsys.readouterr().out)["sim"]["task"] == "maze2d-umaze"
    assert main(["train", "--cfg", "policy=ofql", "data=hopper-medium"]) == 0  # no sim of that name: nothing implied
    assert yaml.safe_load(capsys.readouterr().out)["sim"]["task"] == "maze2d-umaze"
    implied = implied_groups("train", ["policy=diffusion_vla", "data=maze2d-medium"])
    assert [o for o in implied if o.startswith("sim=")] == ["sim=mt10"]  # one sim: the policy's, never two


def test_eval_runs_where_the_checkpoint_was_trained_unless_told_otherwise(tmp_path, capsys):
    def sim_of(*overrides: str) -> dict:
        assert main(["eval", "--cfg", *overrides]) == 0
        return yaml.safe_load(capsys.readouterr().out)["sim"]

    maze, hopper, bare = tmp_path / "maze", tmp_path / "hopper", tmp_path / "bare"
    for d in (maze, hopper, bare):
        d.mkdir()
    (maze / "run.yaml").write_text(yaml.safe_dump({"policy_name": "ofql", "task": "maze2d-medium"}))
    (hopper / "run.yaml").write_text(yaml.safe_dump({"policy_name": "dql", "task": "hopper-medium-replay"}))
    assert sim_of(f"checkpoint={maze / 'policy'}")["task"] == "maze2d-medium"
    assert sim_of(f"checkpoint={hopper / 'policy'}")["task"] == "hopper-medium-replay"
    assert sim_of(f"checkpoint={maze / 'policy'}", "sim=maze2d-large")["task"] == "maze2d-large"
    assert sim_of(f"checkpoint={maze / 'policy'}", "sim.task=maze2d-umaze")["task"] == "maze2d-umaze"
    assert sim_of(f"checkpoint={bare / 'policy'}")["task"] == "maze2d-umaze"  # no run.yaml: the default


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


def _one_line_exit_2(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_user_mistakes_are_one_line_exit_2_and_leave_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFPILOT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "x"
    msg = _one_line_exit_2(capsys, ["train", "policy=ofql", "data.path=/nonexistent/file.hdf5", f"out={out}"])
    assert "data.path=/nonexistent/file.hdf5 does not exist" in msg and not out.exists()
    msg = _one_line_exit_2(capsys, ["train", "policy=dql", "train.lr=1e-4", f"out={out}"])
    assert "train.lr does not apply to policy 'dql'; set policy.actor_lr" in msg and not out.exists()
    msg = _one_line_exit_2(capsys, ["train", "policy=dql", "+policy.etaa=3", f"out={out}"])
    assert "unknown key(s) ['etaa'] for policy 'dql'" in msg and not out.exists()
    msg = _one_line_exit_2(capsys, ["train", "policy=ego_status_mlp", f"out={out}"])
    assert "trains on data=driving" in msg and not out.exists()
    msg = _one_line_exit_2(capsys, ["eval", f"checkpoint={tmp_path / 'nope'}"])
    assert "no saved policy at" in msg
    msg = _one_line_exit_2(capsys, ["train", "policy=transdiffuser", "data=driving", "policy.objective=meanflow",
                                    "policy.sampler=meanflow", "policy.sampler_steps=1",
                                    f"policy.teacher={tmp_path / 'nope'}", f"out={out}"])
    assert "teacher: no checkpoint folder at" in msg and not out.exists() and not (tmp_path / "cache").exists()


def test_eval_and_export_load_any_kind_by_its_stored_kind(tmp_path, capsys):
    import numpy as np
    import torch

    from diffpilot.policy.registry import build_policy

    torch.manual_seed(0)
    dql = build_policy({"name": "dql", "network": {"hidden": 16, "depth": 1}, "critic": {"hidden": 16, "depth": 1}}, 6, 2)
    dql.fit_normalizers(np.random.default_rng(0).normal(size=(40, 6)), np.random.default_rng(1).uniform(-1, 1, (40, 2)))
    dql.save(tmp_path / "dql")
    msg = _one_line_exit_2(capsys, ["export", f"checkpoint={tmp_path / 'dql'}"])
    assert "needs the critic" in msg and not (tmp_path / "policy.onnx").exists()
    flow = build_policy({"name": "flow_bc", "network": {"hidden": 16, "depth": 1}}, 6, 2)
    flow.fit_normalizers(np.random.default_rng(0).normal(size=(40, 6)), np.random.default_rng(1).uniform(-1, 1, (40, 2)))
    flow.save(tmp_path / "flow")
    assert main(["export", f"checkpoint={tmp_path / 'flow'}", f"out={tmp_path / 'flow.onnx'}"]) == 0
    assert (tmp_path / "flow.onnx").is_file()
    msg = _one_line_exit_2(capsys, ["export", f"checkpoint={tmp_path / 'flow'}", "sampler={name: euler, num_steps: 2}"])
    assert "sampler= does not apply to a 'flow_bc' policy" in msg


def test_a_driving_kind_trains_resumes_and_evaluates_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFPILOT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ego"
    args = ["train", "policy=ego_status_mlp", "data=driving", "data.num_scenes=6", "train.steps=30", "train.batch_size=32",
            "train.ckpt_every=10", "policy.hidden=32", "policy.depth=1", f"out={out}", "progress=false"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "policy")
    log = (out / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and log[-1].startswith("30,")
    assert main(args[:4] + ["train.steps=40"] + args[5:]) == 0  # resumes from step 30
    assert (out / "train_log.csv").read_text().splitlines()[-1].startswith("40,")
    assert main(["eval", f"checkpoint={out / 'policy'}", "progress=false"]) == 0
    report = (out / "eval" / "report.md").read_text()
    assert "ego_status_mlp:ego" in report and "lane_follower" in report


def test_transdiffuser_trains_with_its_score_head_evaluates_and_exports_through_the_cli(tmp_path, capsys, monkeypatch):
    """The issue's path on a fresh data set: train (scored candidates built by the job), drive, export, runtime."""
    import numpy as np

    from diffpilot.data.scene_sample import example_scene_arrays, scene_samples_from_arrays
    from diffpilot.export.runtime import OnnxPlanner, load_runtime

    monkeypatch.setenv("DIFFPILOT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "td"
    args = ["train", "policy=transdiffuser", "data=driving", "data.num_scenes=6", "data.score_every=10",
            "train.steps=12", "train.batch_size=16", "policy.d_model=16", "policy.hidden=16", "policy.heads=2",
            "policy.layers=1", "policy.num_candidates=3", "policy.sampler_steps=2", f"out={out}", "progress=false"]
    assert main(args) == 0
    header = (out / "train_log.csv").read_text().splitlines()[0].split(",")
    assert {"denoise", "decorrelation", "score_bce"} <= set(header)
    rows = yaml.safe_load((out / "state" / "config.yaml").read_text())["config"]["fingerprint"]["rows"]
    assert main([*args[:-2], "train.steps=2", "data.recovery_copies=1", f"out={tmp_path / 'td_rec'}", "progress=false"]) == 0
    with_recovery = yaml.safe_load((tmp_path / "td_rec" / "state" / "config.yaml").read_text())["config"]["fingerprint"]["rows"]
    assert rows < with_recovery < 2 * rows + 1  # one recovery window per moving logged keyframe, beside the logged ones
    drive = tmp_path / "drive"
    assert main(["driving", "eval", f"planners=[{out / 'policy'}]", "data.num_scenes=6", "max_scenes=1",
                 "modes=[non_reactive]", "navsim.frames_per_scene=1", "figures.scenes=0", f"out={drive}",
                 "progress=false"]) == 0
    assert "transdiffuser:td" in (drive / "report.md").read_text()
    assert main(["export", f"checkpoint={out / 'policy'}", f"out={tmp_path / 'td.onnx'}", "batch=1"]) == 0
    runtime = load_runtime(tmp_path / "td.onnx")
    assert isinstance(runtime, OnnxPlanner) and runtime.noise_shape == (3, 8, 3) and runtime.batch == 1
    capsys.readouterr()
    msg = _one_line_exit_2(capsys, ["export", f"checkpoint={out / 'policy'}", f"out={tmp_path / 'td0.onnx'}", "batch=0"])
    assert "batch must be null" in msg and not (tmp_path / "td0.onnx").exists()
    plan = runtime.plan(scene_samples_from_arrays(example_scene_arrays(1), 0))
    assert plan.shape == (8, 3) and bool(np.isfinite(plan).all())
    capsys.readouterr()
    msg = _one_line_exit_2(capsys, ["train", "policy=ego_status_mlp", "data=driving", "data.num_scenes=6",
                                    f"data.augmented={tmp_path}", f"out={tmp_path / 'mlp'}", "progress=false"])
    assert "data.augmented does not apply to a 'ego_status_mlp' policy" in msg
    msg = _one_line_exit_2(capsys, [*args[:4], "data.recovery_copies=-1", f"out={tmp_path / 'bad'}", "progress=false"])
    assert "data.recovery_*" in msg and "copies=-1 (must be >= 0)" in msg
    assert not (tmp_path / "bad").exists()
