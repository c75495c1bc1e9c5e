"""D4RL HDF5 round trips, the reader's refusal of malformed files, and the Minari reader."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

from diffpilot.data.d4rl import D4RL_REF_SCORES, OfflineDataset, normalized_score, read_d4rl, write_d4rl
from diffpilot.data.errors import DatasetError
from diffpilot.data.minari import read_minari, write_minari


def _dataset(n: int = 50, seed: int = 0, next_obs: bool = True) -> OfflineDataset:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n + 1, 3)).astype(np.float32)
    timeouts = np.zeros(n, dtype=bool)
    timeouts[[19, 39]] = True
    terminals = np.zeros(n, dtype=bool)
    terminals[29] = True
    return OfflineDataset(
        observations=obs[:-1],
        actions=rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        terminals=terminals,
        timeouts=timeouts,
        next_observations=obs[1:] if next_obs else None,
        infos={"goal": rng.normal(size=(n, 2)), "step": np.arange(n)},
        metadata={"maze": "umaze", "seed": 3, "ref_min_score": 1.5, "flag": True,
                  "cell": np.array([1, 1]), "versions": {"mujoco": "4.0.0"}},
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_keeps_every_key_dtype_and_value(tmp_path: Path) -> None:
    ds = _dataset()
    path = write_d4rl(tmp_path / "d.hdf5", ds)
    back = read_d4rl(path)
    for key in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations"):
        np.testing.assert_array_equal(getattr(back, key), getattr(ds, key))
    assert back.observations.dtype == np.float32 and back.terminals.dtype == np.bool_
    assert set(back.infos) == {"goal", "step"}
    np.testing.assert_allclose(back.infos["goal"], ds.infos["goal"])
    np.testing.assert_array_equal(back.infos["step"], np.arange(50))
    assert back.metadata["maze"] == "umaze" and back.metadata["seed"] == 3
    assert back.metadata["ref_min_score"] == 1.5 and back.metadata["flag"] is True
    np.testing.assert_array_equal(back.metadata["cell"], [1, 1])
    assert back.metadata["versions/mujoco"] == "4.0.0"
    assert (len(back), back.obs_dim, back.act_dim) == (50, 3, 2)
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


def test_reads_d4rl_style_float_flags_and_byte_metadata(tmp_path: Path) -> None:
    path = tmp_path / "d4rl_like.hdf5"
    n = 10
    with h5py.File(path, "w") as f:
        f["observations"] = np.ones((n, 4), np.float32)
        f["actions"] = np.zeros((n, 2), np.float32)
        f["rewards"] = np.arange(n, dtype=np.float32)
        f["terminals"] = np.eye(1, n, 4, dtype=np.float32)[0]
        f["timeouts"] = np.eye(1, n, n - 1, dtype=np.uint8)[0]
        f["metadata/algorithm"] = np.bytes_(b"SAC")
    ds = read_d4rl(path)
    assert ds.terminals.dtype == np.bool_ and ds.terminals.nonzero()[0].tolist() == [4]
    assert ds.timeouts.nonzero()[0].tolist() == [n - 1]
    assert ds.metadata["algorithm"] == "SAC"
    assert ds.next_observations is None


def _rewrite(path: Path, key: str, value: np.ndarray | None) -> None:
    with h5py.File(path, "a") as f:
        del f[key]
        if value is not None:
            f[key] = value


MALFORMED: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing key": (lambda p: _rewrite(p, "actions", None), ["'actions'", "missing"]),
    "length mismatch": (lambda p: _rewrite(p, "rewards", np.zeros(49, np.float32)), ["'rewards'", "49", "50"]),
    "nan row": (lambda p: _rewrite(p, "observations", np.where(np.arange(50)[:, None] == 17, np.nan, 1.0).repeat(3, 1).astype(np.float32)), ["'observations'", "row 17"]),
    "inf row": (lambda p: _rewrite(p, "actions", np.where(np.arange(50)[:, None] == 33, np.inf, 0.0).repeat(2, 1).astype(np.float32)), ["'actions'", "row 33"]),
    "string dtype": (lambda p: _rewrite(p, "rewards", np.array([b"x"] * 50)), ["'rewards'", "|S1"]),
    "wrong rank": (lambda p: _rewrite(p, "rewards", np.zeros((50, 2), np.float32)), ["'rewards'", "(50, 2)"]),
    "non-binary flag": (lambda p: _rewrite(p, "terminals", np.full(50, 2.0, np.float32)), ["'terminals'", "row 0"]),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_file_gets_specific_error_and_stays_untouched(tmp_path: Path, kind: str) -> None:
    path = write_d4rl(tmp_path / "bad.hdf5", _dataset())
    corrupt, expected = MALFORMED[kind]
    corrupt(path)
    before = _sha(path)
    with pytest.raises(DatasetError) as err:
        read_d4rl(path)
    for fragment in expected:
        assert fragment in str(err.value), (fragment, str(err.value))
    assert str(path) in str(err.value)
    assert _sha(path) == before


def test_not_hdf5_and_missing_file_name_the_path(tmp_path: Path) -> None:
    text = tmp_path / "notes.hdf5"
    text.write_text("not an hdf5 file")
    before = _sha(text)
    with pytest.raises(DatasetError, match="not an HDF5 file") as err:
        read_d4rl(text)
    assert str(text) in str(err.value) and _sha(text) == before
    missing = tmp_path / "nowhere.hdf5"
    with pytest.raises(DatasetError, match="not found") as err:
        read_d4rl(missing)
    assert str(missing) in str(err.value)


def test_unsupported_metadata_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    ds = _dataset()
    ds.metadata["callback"] = object()
    with pytest.raises(DatasetError, match="'callback'"):
        write_d4rl(tmp_path / "d.hdf5", ds)
    assert list(tmp_path.iterdir()) == []


def test_episode_slices_and_transitions_skip_timeouts() -> None:
    ds = _dataset(next_obs=False)
    assert ds.episode_slices() == [(0, 20), (20, 30), (30, 40), (40, 50)]
    tr = ds.transitions()
    # rows 19 and 39 end in a timeout, row 49 has no successor: 47 real transitions
    assert len(tr.observations) == 47
    kept = np.setdiff1d(np.arange(50), [19, 39, 49])
    np.testing.assert_array_equal(tr.observations, ds.observations[kept])
    np.testing.assert_array_equal(tr.next_observations, ds.observations[kept + 1])
    np.testing.assert_array_equal(tr.dones, kept == 29)

    with_next = _dataset(next_obs=True)
    tr2 = with_next.transitions()
    kept2 = np.setdiff1d(np.arange(50), [19, 39])
    np.testing.assert_array_equal(tr2.next_observations, with_next.next_observations[kept2])
    assert ds.episode_returns().shape == (4,)
    np.testing.assert_allclose(ds.episode_returns().sum(), ds.rewards.sum(dtype=np.float64), rtol=1e-6)


def test_in_memory_dataset_is_validated_too() -> None:
    ds = _dataset()
    with pytest.raises(DatasetError, match="'actions'.*49"):
        OfflineDataset(ds.observations, ds.actions[:49], ds.rewards, ds.terminals, ds.timeouts)


def test_normalized_score_matches_d4rl_reference_table() -> None:
    lo, hi = D4RL_REF_SCORES["maze2d-umaze"]
    assert normalized_score(lo, lo, hi) == 0.0
    assert normalized_score(hi, lo, hi) == pytest.approx(100.0)
    assert normalized_score(92.855, lo, hi) == pytest.approx(50.0)
    lo, hi = D4RL_REF_SCORES["hopper"]
    assert normalized_score(3234.3, lo, hi) == pytest.approx(100.0)
    assert normalized_score(0.0, lo, hi) == pytest.approx(100 * 20.272305 / 3254.572305)
    with pytest.raises(DatasetError, match="ref_max equals ref_min"):
        normalized_score(1.0, 5.0, 5.0)


def _minari_episode(rng: np.random.Generator, n: int, terminated: bool) -> dict:
    obs = rng.normal(size=(n + 1, 4)).astype(np.float32)
    return {
        "observations": {"observation": obs, "desired_goal": obs[:, :2] + 1.0, "achieved_goal": obs[:, :2]},
        "actions": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        "rewards": rng.normal(size=n),
        "terminations": np.eye(1, n, n - 1, dtype=bool)[0] if terminated else np.zeros(n, bool),
        "truncations": np.zeros(n, bool) if terminated else np.eye(1, n, n - 1, dtype=bool)[0],
        "infos": {"success": np.arange(n + 1) % 2 == 0},
    }


def test_minari_round_trip_flattens_dict_observations(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    episodes = [_minari_episode(rng, 7, terminated=False), _minari_episode(rng, 5, terminated=True)]
    write_minari(tmp_path, "D4RL/pointmaze/umaze-v2", episodes, metadata={"ref_min_score": 2.0})
    ds = read_minari(tmp_path, "D4RL/pointmaze/umaze-v2")
    assert len(ds) == 12 and ds.obs_dim == 8 and ds.act_dim == 2
    assert ds.metadata["observation_layout"] == "observation[0:4],achieved_goal[4:6],desired_goal[6:8]"
    assert ds.metadata["minari/ref_min_score"] == 2.0 and ds.metadata["minari/total_steps"] == 12
    first = episodes[0]["observations"]
    np.testing.assert_array_equal(ds.observations[:7, :4], first["observation"][:-1])
    np.testing.assert_array_equal(ds.next_observations[:7, 6:8], first["desired_goal"][1:])
    np.testing.assert_array_equal(ds.timeouts.nonzero()[0], [6])
    np.testing.assert_array_equal(ds.terminals.nonzero()[0], [11])
    np.testing.assert_array_equal(ds.infos["success"][:7], np.arange(1, 8) % 2 == 0)
    assert ds.episode_slices() == [(0, 7), (7, 12)]
    # a direct path to the data set folder works as well
    direct = read_minari(tmp_path / "D4RL/pointmaze/umaze-v2")
    np.testing.assert_array_equal(direct.actions, ds.actions)
    # and the result survives a trip through the D4RL writer
    back = read_d4rl(write_d4rl(tmp_path / "from_minari.hdf5", ds))
    np.testing.assert_array_equal(back.next_observations, ds.next_observations)


def test_minari_errors_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_minari(tmp_path / "absent", "D4RL/pointmaze/umaze-v2")
    with pytest.raises(DatasetError, match="umaze-v9"):
        read_minari(tmp_path, "D4RL/pointmaze/umaze-v9")
    rng = np.random.default_rng(2)
    folder = write_minari(tmp_path, "test/env/tiny-v0", [_minari_episode(rng, 4, True), _minari_episode(rng, 4, True)])
    with h5py.File(folder / "main_data.hdf5", "a") as f:
        del f["episode_1"]
    with pytest.raises(DatasetError, match="'episode_1' is missing"):
        read_minari(tmp_path, "test/env/tiny-v0")
    with h5py.File(folder / "main_data.hdf5", "a") as f:
        del f["episode_0/rewards"]
    with h5py.File(folder / "main_data.hdf5", "a") as f:
        f.copy("episode_0", "episode_1")
    with pytest.raises(DatasetError, match="no 'rewards'"):
        read_minari(tmp_path, "test/env/tiny-v0")
