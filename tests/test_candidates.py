"""Scored candidate bank: candidate shapes, scores that agree with the one-shot scorer, cache, Ray parity, bad rows.

Runs on the hand-made roads of ``test_driving_eval`` (a straight two-lane
road with a lead car and a 90-degree left bend), written as nuScenes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffpilot.data.errors import DatasetError
from diffpilot.data.nuscenes import NuScenesReader, load_scene_samples
from diffpilot.data.nuscenes_format import write_nuscenes
from diffpilot.sim.driving import candidates as cand
from diffpilot.sim.driving.candidates import FAMILIES, SUBSCORES, candidate_trajectories, scored_candidates
from diffpilot.sim.driving.scoring import score_trajectory
from test_driving_eval import BEND, LOCATION, STRAIGHT, VERSION, _log, _map


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    geom = _map()
    logs = [
        _log("train-bend", BEND, "lane_bend", 6.0, 15.0, [], geom),
        _log("train-straight", STRAIGHT, "lane_right", 10.0, 5.0, [(40.0, 10.0, 0.0)], geom),
        _log("scene-straight", STRAIGHT, "lane_right", 8.0, 10.0, [(35.0, 8.0, 0.0)], geom),
    ]
    root = tmp_path_factory.mktemp("cand") / "data"
    write_nuscenes(root, VERSION, {LOCATION: geom}, logs, {"train": ["train-bend", "train-straight"], "val": ["scene-straight"]})
    return root


@pytest.fixture(scope="module")
def arrays(data: Path) -> dict[str, np.ndarray]:
    """Every third training row (both scenes, frames spread over each)."""
    full = load_scene_samples(data, VERSION, "train", progress=False)
    return {k: v[::3] for k, v in full.items()}


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bank")


@pytest.fixture(scope="module")
def bank(data: Path, arrays: dict[str, np.ndarray], bank_dir: Path) -> dict[str, np.ndarray]:
    return scored_candidates(data, VERSION, "train", arrays, num_candidates=8, seed=0, progress=False, cache_dir=bank_dir)


def _row(arrays: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: arrays[k][i] for k in ("ego_future", "ego_future_valid", "ego_status")}


def test_candidates_start_with_the_logged_future_and_are_kinematic(arrays: dict[str, np.ndarray]) -> None:
    F = arrays["ego_future"].shape[1]
    one = candidate_trajectories(_row(arrays, 0), 12, np.random.default_rng(0))
    assert one.shape == (12, F, 3) and np.all(np.isfinite(one))
    np.testing.assert_allclose(one[0], arrays["ego_future"][0])
    np.testing.assert_array_equal(one, candidate_trajectories(_row(arrays, 0), 12, np.random.default_rng(0)))
    # Distinct plans (the log may be driving at constant velocity), every step a forward move no longer than 0.5 s at the top speed reachable at 2.4 m/s².
    assert len({c.tobytes() for c in one[1:]}) == 11
    step = np.linalg.norm(np.diff(np.concatenate([np.zeros((12, 1, 3)), one], axis=1)[..., :2], axis=1), axis=-1)
    assert step.max() <= 0.5 * (arrays["ego_status"][0, 0] + 2.4 * 0.5 * F) + 1e-6
    stop = one[FAMILIES.index("stop")]
    assert np.linalg.norm(stop[-1, :2] - stop[-2, :2]) < np.linalg.norm(one[1, -1, :2] - one[1, -2, :2])

    stacked = candidate_trajectories(arrays, 3, np.random.default_rng(1))
    assert stacked.shape == (len(arrays["frame"]), 3, F, 3)

    # A future cut short by the end of the log keeps its valid prefix and goes on at its last speed.
    row = _row(arrays, 0)
    row["ego_future_valid"] = np.arange(F) < 3
    row["ego_future"] = np.where(row["ego_future_valid"][:, None], row["ego_future"], 0.0)
    cut = candidate_trajectories(row, 1, np.random.default_rng(0))[0]
    np.testing.assert_allclose(cut[:3], arrays["ego_future"][0, :3])
    np.testing.assert_allclose(cut, arrays["ego_future"][0], atol=0.3)  # constant speed on a straight: nearly the log
    with pytest.raises(ValueError, match="num"):
        candidate_trajectories(row, 0, np.random.default_rng(0))


def test_bank_is_aligned_with_the_rows_and_scored_like_score_trajectory(
        data: Path, arrays: dict[str, np.ndarray], bank: dict[str, np.ndarray]) -> None:
    W, F = arrays["ego_future"].shape[:2]
    assert bank["candidates"].shape == (W, 8, F, 3) and bank["candidates"].dtype == np.float32
    assert bank["scores"].shape == (W, 8, len(SUBSCORES)) and bank["scores"].dtype == np.float32
    valid = arrays["ego_future_valid"]
    assert not valid.all()  # the last rows' futures run past the end of the log
    np.testing.assert_allclose(bank["candidates"][:, 0][valid], arrays["ego_future"][valid], atol=1e-4)
    s = bank["scores"]
    assert np.all((s >= 0.0) & (s <= 1.0))
    assert set(np.unique(s[..., SUBSCORES.index("nc")])) <= {0.0, 0.5, 1.0}
    pdms = s[..., SUBSCORES.index("pdms")]
    assert pdms.std() > 0.1 and (pdms < 0.5).any() and (pdms > 0.9).any()
    assert np.all(pdms[:, 0] > 0.9)  # the logged drive is safe and on the road

    reader = NuScenesReader(data, VERSION)
    names = {rec["token"]: rec["name"] for rec in reader.nusc.scene}
    for i in (0, W - 1):  # one row per scene
        log = reader.scenario_log(names[str(arrays["scene_token"][i])])
        frame = int(arrays["frame"][i])
        for c in range(8):
            direct = score_trajectory(log, frame, bank["candidates"][i, c].astype(np.float64))
            np.testing.assert_allclose(s[i, c], [direct[k] for k in SUBSCORES], atol=1e-6, err_msg=f"row {i} candidate {c}")


def test_cache_is_reused_and_rows_do_not_depend_on_their_neighbours(
        data: Path, arrays: dict[str, np.ndarray], bank: dict[str, np.ndarray], bank_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(list((bank_dir / "candidates").glob("*.h5"))) == 1
    with monkeypatch.context() as mp:
        mp.setattr(cand, "_score_all", lambda *a, **k: pytest.fail("a cached bank was scored again"))
        again = scored_candidates(data, VERSION, "train", arrays, num_candidates=8, seed=0, progress=False, cache_dir=bank_dir)
    for k in bank:
        np.testing.assert_array_equal(again[k], bank[k])
    # A subset of the rows gets the same candidates and scores for those rows (its own cache file).
    half = {k: v[::2] for k, v in arrays.items()}
    part = scored_candidates(data, VERSION, "train", half, num_candidates=8, seed=0, progress=False, cache_dir=bank_dir)
    for k in bank:
        np.testing.assert_array_equal(part[k], bank[k][::2])
    other = scored_candidates(data, VERSION, "train", half, num_candidates=3, seed=1, progress=False, cache_dir=bank_dir)
    assert other["candidates"].shape[1] == 3 and not np.array_equal(other["candidates"][:, 1:], part["candidates"][:, 1:3])
    assert len(list((bank_dir / "candidates").glob("*.h5"))) == 3


def test_two_ray_workers_give_the_in_process_bank(data: Path, arrays: dict[str, np.ndarray], bank: dict[str, np.ndarray],
                                                  tmp_path: Path) -> None:
    remote = scored_candidates(data, VERSION, "train", arrays, num_candidates=8, seed=0, workers=2, progress=False,
                               cache_dir=tmp_path)
    for k in bank:
        np.testing.assert_array_equal(remote[k], bank[k])


def test_rows_from_outside_the_split_are_named(data: Path, arrays: dict[str, np.ndarray], tmp_path: Path) -> None:
    val = load_scene_samples(data, VERSION, "val", progress=False)
    mixed = {k: np.concatenate([arrays[k][:2], val[k][:1]]) for k in arrays}
    with pytest.raises(DatasetError, match=r"split 'train'.*row 2 \(scene_token 'tok-scene-straight', scene 'scene-straight', frame \d+\)"):
        scored_candidates(data, VERSION, "train", mixed, progress=False, cache_dir=tmp_path)
    late = {k: v[:1].copy() for k, v in arrays.items()}
    late["frame"][0] = 19  # the last keyframe has no future to score against
    with pytest.raises(DatasetError, match="row 0: frame 19"):
        scored_candidates(data, VERSION, "train", late, progress=False, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="num_candidates"):
        scored_candidates(data, VERSION, "train", arrays, num_candidates=0, progress=False, cache_dir=tmp_path)
    assert not (tmp_path / "candidates").exists()
