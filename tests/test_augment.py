"""The augmentation job: shards on disk, resume, Ray parity, reading back, bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from diffpilot.data.errors import DatasetError
from diffpilot.data.scene_sample import build_scene_sample, stack_samples
from diffpilot.data.traffic.generate import simulate_scenes
from diffpilot.planning import augment, read_augmented
from diffpilot.stl import RuleSet, driving_signals, scene_from_arrays


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    _, logs = simulate_scenes(1, seed=3, progress=False)
    return stack_samples([build_scene_sample(logs[0], f) for f in range(4, logs[0].num_frames - 1, 7)])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_augment_writes_shards_reads_back_and_resumes(arrays: dict, tmp_path: Path) -> None:
    out = augment(arrays, tmp_path / "aug", samples_per_window=3, shard_size=2, steps=40, progress=False)
    complete = np.flatnonzero(arrays["ego_future_valid"].all(axis=1))
    shards = sorted(out.glob("shard_*.h5"))
    assert len(shards) == -(-len(complete) // 2)
    d = read_augmented(out)
    n = len(d["mode"])
    assert n > 0 and all(len(d[k]) == n for k in ("trajectories", "controls", "params", "window", "robustness"))
    assert d["trajectories"].shape[1:] == (8, 4) and d["controls"].shape[1:] == (8, 2)
    np.testing.assert_array_equal(d["windows"], complete)
    assert int(d["kept"].sum()) == n and (d["kept"] <= d["attempted"]).all()
    assert d["attempted"][:, 0].tolist() == [3] * len(complete)  # keep_lane is always attempted
    assert set(np.unique(d["window"])) <= set(complete)
    rob = d["robustness"]
    assert (rob[~np.isnan(rob)] > 0).all()
    assert list(d["modes"]) == ["keep_lane", "left", "right"] and "lane_change" in list(d["rule_names"])
    # re-score the kept keep-lane trajectories with their stored parameters
    rules = RuleSet(["speed_limit", "lane_keeping", "heading", "safe_distance", "comfort"])
    sel = np.flatnonzero(d["mode"] == 0)
    scene = scene_from_arrays(arrays, d["window"][sel])
    names = list(d["param_names"])
    params = {k: torch.as_tensor(d["params"][sel, names.index(k)], dtype=torch.float64)[:, None]
              for k in rules.defaults()}
    exact = rules.evaluate(driving_signals(torch.as_tensor(d["trajectories"][sel], dtype=torch.float64)[:, None], scene),
                           params)
    # stored as float32: allow for the rounding of the stored trajectories
    for k, v in exact.items():
        assert (v[:, 0] > -1e-3).all(), k
    # resume: nothing recomputed, files untouched; a deleted shard is redone alone
    before = {p.name: (p.stat().st_mtime_ns, _digest(p)) for p in shards}
    augment(arrays, out, samples_per_window=3, shard_size=2, steps=40, progress=False)
    assert {p.name: (p.stat().st_mtime_ns, _digest(p)) for p in shards} == before
    shards[0].unlink()
    augment(arrays, out, samples_per_window=3, shard_size=2, steps=40, progress=False)
    assert _digest(shards[0]) == before[shards[0].name][1]
    assert all(p.stat().st_mtime_ns == before[p.name][0] for p in shards[1:])
    with h5py.File(shards[1], "r") as h5:
        assert h5.attrs["complete"] and h5["trajectories"].dtype == np.float32
    # another configuration in the same folder is refused
    with pytest.raises(DatasetError, match="another configuration"):
        augment(arrays, out, samples_per_window=4, shard_size=2, steps=40, progress=False)


def test_ray_workers_write_the_same_shards(arrays: dict, tmp_path: Path) -> None:
    win = np.flatnonzero(arrays["ego_future_valid"].all(axis=1))[:2]
    kw = dict(samples_per_window=2, shard_size=1, steps=15, progress=False, windows=win, modes=("keep_lane", "left"))
    one = read_augmented(augment(arrays, tmp_path / "one", workers=1, **kw))
    two = read_augmented(augment(arrays, tmp_path / "two", workers=2, **kw))
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_array_equal(one[k], two[k], err_msg=k)


def test_convex_solver_and_bad_input(arrays: dict, tmp_path: Path) -> None:
    win = np.flatnonzero(arrays["ego_future_valid"].all(axis=1))[:1]
    d = read_augmented(augment(arrays, tmp_path / "cvx", samples_per_window=2, solver="convex", windows=win,
                               modes=("keep_lane",), progress=False))
    assert len(d["mode"]) >= 1 and (d["robustness"][~np.isnan(d["robustness"])] > 0).all()
    with pytest.raises(DatasetError, match="unknown mode"):
        augment(arrays, tmp_path / "bad", modes=("keep_lane", "reverse"), progress=False)
    with pytest.raises(DatasetError, match="samples_per_window"):
        augment(arrays, tmp_path / "bad", samples_per_window=-1, progress=False)
    with pytest.raises(DatasetError, match="solver"):
        augment(arrays, tmp_path / "bad", solver="milp", progress=False)
    with pytest.raises(DatasetError, match="unknown parameter"):
        augment(arrays, tmp_path / "bad", param_noise={"vmaxx": 1.0}, progress=False)
    with pytest.raises(DatasetError, match="lack"):
        augment({"command": arrays["command"]}, tmp_path / "bad", progress=False)
    with pytest.raises(DatasetError, match="no augmentation output"):
        read_augmented(tmp_path / "nothing")
