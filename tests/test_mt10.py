"""Meta-World MT10: scripted-expert demonstrations, reasoning text, the file layout and the evaluation environment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

import diffpilot.data.mt10 as mt10
from diffpilot.data.mt10 import (
    HELDOUT_INSTRUCTIONS,
    MT10_TASKS,
    SUBGOALS,
    TRAIN_INSTRUCTIONS,
    annotate,
    generate_mt10,
    load_instructions,
    load_mt10,
    subgoal_of,
    write_episodes,
)
from diffpilot.data.mt10_env import make_expert
from diffpilot.data.mt10_reasoning import describe_relation
from diffpilot.sim.mt10 import MT10Env

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")

TASKS = ["pick-place", "drawer-close"]
SMALL = {"episodes_per_task": 2, "image_size": 32, "obs_every": 8, "tasks": TASKS, "progress": False}


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_mt10(tmp_path_factory.mktemp("mt10") / "demos.hdf5", **SMALL)


def _phases(subgoals: list[str]) -> list[str]:
    return [s for i, s in enumerate(subgoals) if i == 0 or s != subgoals[i - 1]]


def test_expert_goes_through_the_pick_place_phases_in_order():
    env = MT10Env("pick-place", image_size=32)
    expert = make_expert("pick-place")
    obs = env.reset(seed=7, render=False)
    subgoals, texts, success, done = [], [], False, False
    while not done:
        note = annotate("pick-place", obs["state"])
        subgoals.append(note.subgoal)
        texts.append(note.text)
        obs, success, done = env.step(expert.get_action(obs["state"].astype(np.float64)), render=False)
    env.close()
    assert success and env.steps < 150
    assert _phases(subgoals) == SUBGOALS["pick-place"]
    carrying = texts[-1]
    assert carrying.startswith("carry the puck to the goal ; the puck is at the gripper , near ; the goal is ")
    for text in texts:
        assert text == text.lower() and subgoal_of(text) in SUBGOALS["pick-place"]
        assert all(tok in (";", ",") or tok.isalpha() for tok in text.split()), text


def test_relation_words_follow_the_robot_view():
    assert describe_relation(np.array([0.0, 0.0, 0.0])) == "at the gripper"
    assert describe_relation(np.array([-0.1, 0.0, 0.0])) == "left of the gripper"
    assert describe_relation(np.array([0.1, 0.0, 0.01])) == "right of the gripper"
    assert describe_relation(np.array([0.0, 0.2, 0.15])) == "ahead and above the gripper"
    assert describe_relation(np.array([0.05, -0.2, 0.0])) == "behind the gripper"
    assert describe_relation(np.array([-0.08, 0.0, -0.1])) == "below and left of the gripper"
    with pytest.raises(ValueError, match="fly-away.*reach"):
        annotate("fly-away", np.zeros(39))


def test_episode_seeds_move_the_objects_and_repeat_them():
    env = MT10Env("push", image_size=32)
    first = env.reset(seed=1)
    other = env.reset(seed=2)
    again = env.reset(seed=1)
    env.close()
    fresh = MT10Env("push", image_size=32)
    anew = fresh.reset(seed=1)
    fresh.close()
    assert np.linalg.norm(first["state"][4:7] - other["state"][4:7]) > 0.01
    assert np.linalg.norm(first["goal"] - other["goal"]) > 0.01
    for obs in (again, anew):
        np.testing.assert_array_equal(obs["state"], first["state"])
        np.testing.assert_array_equal(obs["image"], first["image"])
    assert first["image"].dtype == np.uint8 and first["image"].shape == (32, 32, 3) and first["image"].std() > 10
    assert first["proprio"].shape == (4,) and first["proprio"].dtype == np.float32 and first["task"] == "push"
    with pytest.raises(ValueError, match="fly-away.*pick-place"):
        MT10Env("fly-away")


def test_generated_file_has_the_documented_layout(demo_file: Path):
    d = load_mt10(demo_file)
    with h5py.File(demo_file, "r") as h5:
        assert h5.attrs["format"] == "diffpilot.mt10" and int(h5.attrs["version"]) == 1
        assert json.loads(h5.attrs["tasks"]) == TASKS and int(h5.attrs["obs_every"]) == 8
        assert json.loads(h5.attrs["failed"]).keys() == set(TASKS)
        for k, dtype in (("actions", np.float32), ("state", np.float32), ("proprio", np.float32),
                         ("goal", np.float32), ("episode", np.int32), ("task", np.int32), ("step", np.int32),
                         ("image_index", np.int32), ("images", np.uint8)):
            assert h5[k].dtype == dtype, k
        assert h5py.check_string_dtype(h5["reasoning"].dtype).encoding == "utf-8"
        assert h5["episodes/seed"].dtype == np.int64 and h5["episodes/success"].dtype == np.bool_
    n = len(d)
    assert d.actions.shape == (n, 4) and d.state.shape == (n, 39) and d.goal.shape == (n, 3)
    np.testing.assert_array_equal(d.proprio, d.state[:, :4])
    np.testing.assert_array_equal(d.goal, d.state[:, 36:39])
    assert d.num_episodes == 4 and d.episode_success.all()
    assert list(d.episode_task) == [0, 0, 1, 1] and len(set(d.episode_seed.tolist())) == 4
    assert d.episode_start[0] == 0 and (d.episode_start[1:] == d.episode_start[:-1] + d.episode_length[:-1]).all()
    assert d.episode_start[-1] + d.episode_length[-1] == n
    for i in range(d.num_episodes):
        sl = d.episode_slice(i)
        assert (d.episode[sl] == i).all() and (d.step[sl] == np.arange(d.episode_length[i])).all()
        task = d.tasks[d.episode_task[i]]
        assert _phases(d.subgoal[sl]) == SUBGOALS[task]
        assert [subgoal_of(t) for t in d.reasoning[sl]] == d.subgoal[sl]
    observed = d.step % 8 == 0
    assert ((d.image_index >= 0) == observed).all()
    assert (d.image_index[observed] == np.arange(observed.sum())).all()
    assert d.images.shape == (observed.sum(), 32, 32, 3)
    train = load_instructions(TRAIN_INSTRUCTIONS)
    heldout = load_instructions(HELDOUT_INSTRUCTIONS)
    for i, text in enumerate(d.episode_instruction):
        task = d.tasks[d.episode_task[i]]
        assert text in train[task] and text not in heldout[task]


def test_stored_episode_replays_in_the_evaluation_environment(demo_file: Path):
    d = load_mt10(demo_file)
    i = 2  # the first drawer-close episode
    sl = d.episode_slice(i)
    env = MT10Env(d.tasks[d.episode_task[i]], image_size=d.image_size, camera=d.camera)
    obs = env.reset(int(d.episode_seed[i]))
    np.testing.assert_array_equal(obs["state"], d.state[sl.start])
    np.testing.assert_array_equal(obs["image"], d.images[d.image_index[sl.start]])
    success = done = False
    for row in range(sl.start, sl.stop):
        np.testing.assert_allclose(obs["state"], d.state[row], atol=1e-6)
        obs, success, done = env.step(d.actions[row], render=False)
    env.close()
    assert success and done


def test_rerun_is_cached_and_an_interrupted_run_resumes(demo_file: Path, tmp_path: Path, monkeypatch):
    before = demo_file.stat().st_mtime_ns
    calls: list[tuple[str, int]] = []
    real = mt10.run_shard

    def counting(config, task, chunk):  # noqa: ANN001, ANN202
        calls.append((task, chunk))
        if len(calls) == 2 and fail_second:
            raise KeyboardInterrupt
        return real(config, task, chunk)

    monkeypatch.setattr(mt10, "run_shard", counting)
    fail_second = False
    assert generate_mt10(demo_file, **SMALL) == demo_file
    assert calls == [] and demo_file.stat().st_mtime_ns == before
    out = tmp_path / "resumed.hdf5"
    fail_second = True
    with pytest.raises(KeyboardInterrupt):
        generate_mt10(out, **{**SMALL, "tasks": ["reach", "button-press-topdown"], "episodes_per_task": 1})
    assert not out.exists() and calls == [("reach", 0), ("button-press-topdown", 0)]
    fail_second = False
    generate_mt10(out, **{**SMALL, "tasks": ["reach", "button-press-topdown"], "episodes_per_task": 1})
    assert calls[2:] == [("button-press-topdown", 0)]
    assert load_mt10(out).num_episodes == 2 and not list(tmp_path.glob("*.shards-*"))


def test_reader_names_what_is_wrong(demo_file: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="diffpilot data mt10"):
        load_mt10(tmp_path / "none.hdf5")
    broken = tmp_path / "broken.hdf5"
    broken.write_bytes(demo_file.read_bytes())
    with h5py.File(broken, "a") as h5:
        del h5["subgoal"]
        del h5["episodes/length"]
    with pytest.raises(ValueError, match=r"subgoal.*episodes/length.*HDF5 layout"):
        load_mt10(broken)
    bad_images = tmp_path / "images.hdf5"
    bad_images.write_bytes(demo_file.read_bytes())
    with h5py.File(bad_images, "a") as h5:
        m = len(h5["images"])
        del h5["images"]
        h5["images"] = np.zeros((m, 32, 32), np.float32)
    with pytest.raises(ValueError, match=r"uint8 \[M, 32, 32, 3\]"):
        load_mt10(bad_images)
    wrong = tmp_path / "wrong.hdf5"
    wrong.write_bytes(demo_file.read_bytes())
    with h5py.File(wrong, "a") as h5:
        h5.attrs["format"] = "d4rl"
    with pytest.raises(ValueError, match="diffpilot.mt10"):
        load_mt10(wrong)


def test_instruction_files_are_checked(tmp_path: Path):
    train, heldout = load_instructions(TRAIN_INSTRUCTIONS), load_instructions(HELDOUT_INSTRUCTIONS)
    assert list(train) == list(MT10_TASKS) == list(heldout)
    for task in MT10_TASKS:
        assert len(train[task]) >= 5 and len(heldout[task]) >= 3 and not set(train[task]) & set(heldout[task])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"reach": ["go to the goal"], "fly-away": ["fly"]}))
    with pytest.raises(ValueError, match=r"'fly-away'.*window-close"):
        load_instructions(bad)
    bad.write_text(yaml.safe_dump({"reach": []}))
    with pytest.raises(ValueError, match="non-empty list"):
        load_instructions(bad)
    bad.write_text(yaml.safe_dump({"reach": ["go", 3]}))
    with pytest.raises(ValueError, match="not non-empty strings"):
        load_instructions(bad)
    bad.write_text(yaml.safe_dump({"reach": ["go"]}))
    with pytest.raises(ValueError, match=r"no phrasings for task\(s\) \['push'\]"):
        generate_mt10(tmp_path / "x.hdf5", instructions=bad, tasks=["reach", "push"], progress=False)


def test_cli_refuses_a_bad_instructions_file(tmp_path: Path, capsys):
    from diffpilot.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("reach: [go]\nfly-away: [fly]\n")
    assert main(["data", "mt10", f"data.instructions={bad}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fly-away" in err[0] and "valid tasks" in err[0]


def test_two_ray_workers_write_the_same_bytes(demo_file: Path, tmp_path: Path):
    out = generate_mt10(tmp_path / "ray.hdf5", workers=2, **SMALL)
    assert out.read_bytes() == demo_file.read_bytes()
    assert os.stat(out).st_size > 10_000


def test_own_recordings_fill_the_layout(demo_file: Path, tmp_path: Path):
    d = load_mt10(demo_file)
    eps = []
    for i in (2, 0):
        sl = d.episode_slice(i)
        rows = d.image_index[sl]
        eps.append({"task": d.tasks[d.episode_task[i]], "instruction": "my words", "seed": -1,
                    "state": d.state[sl], "actions": d.actions[sl], "images": d.images[rows[rows >= 0]]})
    mine = load_mt10(write_episodes(tmp_path / "mine.hdf5", eps, image_size=32, obs_every=8))
    assert mine.tasks == ["pick-place", "drawer-close"] and list(mine.episode_task) == [1, 0]
    sl = d.episode_slice(2)
    np.testing.assert_array_equal(mine.state[: sl.stop - sl.start], d.state[sl])
    assert mine.reasoning[: sl.stop - sl.start] == d.reasoning[sl] and mine.episode_instruction == ["my words"] * 2
    with pytest.raises(ValueError, match=r"images uint8 \[\d+, 32, 32, 3\]"):
        write_episodes(tmp_path / "bad.hdf5", [{**eps[0], "images": eps[0]["images"][:1]}], image_size=32, obs_every=8)


def _expected_target(task: str, phase: int, s: np.ndarray) -> np.ndarray:
    """The position the expert's script aims for in each branch (its own formulas)."""
    hand, obj, goal = s[0:3], s[4:7], s[36:39]
    if task == "pick-place":
        puck = obj + np.array([-0.005, 0.0, 0.0])
        return [puck + [0, 0, 0.1], puck + [0, 0, 0.03], hand, goal][phase]
    drawer = obj + np.array([0.0, 0.0, -0.02])
    return [np.array([hand[0], hand[1], drawer[2] + 0.5]), drawer + [0, -0.075, 0.23], drawer + [0, -0.075, 0.0],
            drawer][phase]


def test_annotated_phase_is_the_branch_the_expert_takes(demo_file: Path):
    d = load_mt10(demo_file)
    for task in TASKS:
        expert = make_expert(task)
        rows = np.flatnonzero(d.task == d.tasks.index(task))
        for row in rows:
            state = d.state[row].astype(np.float64)
            aimed = type(expert)._desired_pos(expert._parse_obs(state.copy()))  # noqa: SLF001 - the script's branch
            phase = SUBGOALS[task].index(d.subgoal[row])
            np.testing.assert_allclose(aimed, _expected_target(task, phase, state), atol=1e-6, err_msg=f"{task} {row}")
