"""Recovery windows: displaced logged drives whose futures steer back onto the logged path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffpilot.data.nuscenes import NuScenesReader, load_scene_samples
from diffpilot.data.recovery import RecoverySpec, displaced_log, lateral_offset, recovery_samples
from diffpilot.data.scenario import DT, SampleSpec, to_ego_frame, to_global_frame, wrap_angle
from diffpilot.data.scene_sample import build_scene_sample
from diffpilot.data.traffic.generate import generate_driving_dataset

VERSION = "v1.0-diffpilot"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_driving_dataset(tmp_path_factory.mktemp("rec") / "ds", num_scenes=3, seed=4, val_fraction=0.34)


@pytest.fixture(scope="module")
def log(root: Path):
    reader = NuScenesReader(root, VERSION)
    return reader.scenario_log(reader.scene_names("train")[0])


def _moving_frame(log) -> int:
    speed = np.linalg.norm(np.diff(log.ego_pose[:, :2], axis=0), axis=1) / DT
    return int(np.flatnonzero(speed[4:-10] > 3.0)[0]) + 5


def test_lateral_offset_is_c1_and_zero_outside_its_window() -> None:
    t = np.linspace(-3.0, 4.0, 7001)
    d, rate = lateral_offset(t, 1.2, -0.8, recover_s=2.5, approach_s=2.0)
    assert np.all(d[t <= -2.0] == 0) and np.all(d[t >= 2.5] == 0)
    at0 = np.argmin(np.abs(t))
    assert d[at0] == pytest.approx(1.2) and rate[at0] == pytest.approx(-0.8)
    np.testing.assert_allclose(np.gradient(d, t)[1:-1], rate[1:-1], atol=2e-3)  # the rate is the offset's derivative
    assert np.max(np.abs(np.diff(rate))) < 1e-2  # no jump in rate anywhere (C1)


def test_displaced_ego_is_beside_the_logged_one_and_rejoins_the_logged_path(log) -> None:
    f = _moving_frame(log)
    moved = displaced_log(log, f, 1.0, np.deg2rad(4.0), recover_s=2.5, approach_s=2.0)
    rel = to_ego_frame(moved.ego_pose[f], log.ego_pose[f])
    assert rel[0] == pytest.approx(0.0, abs=1e-9) and rel[1] == pytest.approx(1.0)  # 1 m to the left
    assert rel[2] == pytest.approx(np.deg2rad(4.0), abs=np.deg2rad(0.5))
    far = np.abs(log.times - log.times[f]) >= 2.5
    np.testing.assert_array_equal(moved.ego_pose[far], log.ego_pose[far])  # the rest of the drive is the log's
    # Headings follow the displaced path: the direction of motion between keyframes matches them.
    seg = np.diff(moved.ego_pose[:, :2], axis=0)
    moving = np.linalg.norm(seg, axis=1) > 1.0
    course = np.arctan2(seg[:, 1], seg[:, 0])
    mid = np.arctan2(np.sin(moved.ego_pose[:-1, 2]) + np.sin(moved.ego_pose[1:, 2]),
                     np.cos(moved.ego_pose[:-1, 2]) + np.cos(moved.ego_pose[1:, 2]))
    assert np.max(np.abs(wrap_angle(course - mid))[moving]) < np.deg2rad(2.0)
    # The window's future, mapped back to the global frame, ends on the logged path.
    sample = build_scene_sample(moved, f, SampleSpec())
    fut = to_global_frame(sample.ego_future, sample.ego_pose_global)
    last = f + SampleSpec().future_steps
    np.testing.assert_allclose(fut[-1], log.ego_pose[last], atol=1e-9)
    assert np.linalg.norm(sample.ego_future[0, :2] - np.array([0, 0])) > 0  # it moves
    assert abs(to_ego_frame(fut[0], log.ego_pose[f + 1])[1]) < 1.0  # already steering back after 0.5 s


def test_recovery_samples_are_deterministic_per_scene_and_skip_what_cannot_be_displaced(root: Path) -> None:
    reader = NuScenesReader(root, VERSION)
    logs = [reader.scenario_log(n) for n in reader.scene_names("train")]
    spec, rec = SampleSpec(), RecoverySpec(copies=2, seed=3)
    both = recovery_samples(logs, spec, rec)
    one = recovery_samples(logs[1:], spec, rec)
    tail = [s for s in both if s.scene_token == logs[1].scene_token]
    assert [s.token for s in tail] == [s.token for s in one]
    np.testing.assert_array_equal(np.stack([s.ego_past for s in tail]), np.stack([s.ego_past for s in one]))
    assert all(s.token.rsplit("#r", 1)[1] in {"0", "1"} for s in both)
    logged = sum(lg.num_frames - 1 - spec.past_steps for lg in logs)
    assert 0 < len(both) <= 2 * logged
    assert all(s.ego_status[0] >= rec.min_speed - 1.0 for s in both)  # nothing displaced at standstill
    lateral = np.array([abs(s.ego_past[0, 1]) for s in both])
    assert lateral.max() > 0.2  # the past shows the drift
    assert recovery_samples(logs, spec, RecoverySpec(copies=0)) == []


def test_load_scene_samples_caches_recovery_windows_apart_from_the_logged_ones(root: Path, tmp_path: Path) -> None:
    spec = SampleSpec()
    logged = load_scene_samples(root, VERSION, "train", spec, cache_dir=tmp_path, progress=False)
    rec = load_scene_samples(root, VERSION, "train", spec, cache_dir=tmp_path, progress=False,
                             recovery=RecoverySpec(copies=1))
    again = load_scene_samples(root, VERSION, "train", spec, cache_dir=tmp_path, progress=False,
                               recovery=RecoverySpec(copies=1))
    assert len(list((tmp_path / "nuscenes").glob("*.h5"))) == 2
    assert all("#r0" in t for t in rec["token"]) and not any("#r" in t for t in logged["token"])
    np.testing.assert_array_equal(rec["ego_future"], again["ego_future"])
    with pytest.raises(ValueError, match="copies must be >= 1"):
        load_scene_samples(root, VERSION, "train", spec, cache_dir=tmp_path, recovery=RecoverySpec(copies=0))


@pytest.mark.parametrize("kwargs, match", [
    ({"copies": -1}, "copies=-1"), ({"lateral_m": -1.0}, "lateral_m"), ({"heading_deg": 60.0}, "heading_deg"),
    ({"recover_s": 0.1}, "recover_s"), ({"min_speed": 0.0}, "min_speed"),
])
def test_bad_recovery_settings_name_the_setting(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RecoverySpec(**kwargs)


def test_a_window_whose_displaced_ego_would_overlap_an_agent_is_dropped(log) -> None:
    from dataclasses import replace

    from diffpilot.data.recovery import _clear_of_agents

    f = _moving_frame(log)
    moved = displaced_log(log, f, 1.0, 0.0)
    ego = moved.ego_pose[f]
    beside = ego + np.array([-np.sin(ego[2]), np.cos(ego[2]), 0.0]) * 1.0  # 1 m to the left: boxes overlap
    far = ego + np.array([-np.sin(ego[2]), np.cos(ego[2]), 0.0]) * 4.0  # one lane over: clear
    for pose, clear in ((beside, False), (far, True)):
        agents_pose = np.repeat(pose[None, None], log.num_frames, axis=1)
        crowded = replace(moved, agents_token=["a"], agents_category=np.array([0]), agents_size=np.array([[4.5, 1.9]]),
                          agents_pose=agents_pose, agents_valid=np.ones((1, log.num_frames), bool))
        assert _clear_of_agents(crowded, f) is clear
