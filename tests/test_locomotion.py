"""D4RL-style locomotion data: a tiny real SAC run on Hopper-v5 and the data sets built from it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml

from diffpilot.data import locomotion
from diffpilot.data.d4rl import read_d4rl
from diffpilot.data.errors import DatasetError
from diffpilot.data.locomotion import build_locomotion_dataset

TINY = dict(sac_steps=600, transitions=250, seed=0, eval_interval=200, eval_episodes=1, reference_episodes=2, progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("locomotion")
    paths = {kind: build_locomotion_dataset("hopper", kind, root, **TINY) for kind in ("medium-replay", "medium", "medium-expert")}
    return root, paths


def test_files_are_valid_d4rl_with_reference_scores(built):
    root, paths = built
    progress = yaml.safe_load((root / "hopper-sac600-s0" / "progress.yaml").read_text())
    assert [e["step"] for e in progress["evals"]] == [200, 400, 600]
    for kind, path in paths.items():
        ds = read_d4rl(path)
        md = ds.metadata
        assert md["env_id"] == "Hopper-v5" and md["kind"] == kind
        assert ds.obs_dim == 11 and ds.act_dim == 3 and ds.next_observations is not None
        assert np.isfinite([md["ref_min_score"], md["ref_max_score"]]).all()
        assert md["ref_min_score"] == pytest.approx(progress["ref_min_score"])
        assert md["ref_max_score"] == pytest.approx(progress["ref_max_score"])
        assert md["medium_step"] in (200, 400, 600)
        assert md["d4rl_ref_max_score"] == 3234.3
        # every episode ends at a terminal or a timeout; rows inside an episode chain s' -> s
        ends = ds.terminals | ds.timeouts
        assert ends[-1]
        inside = np.flatnonzero(~ends[:-1])
        np.testing.assert_array_equal(ds.next_observations[inside], ds.observations[inside + 1])
    assert len(read_d4rl(paths["medium"])) == 250


def test_medium_is_the_first_snapshot_past_a_third(built):
    root, _ = built
    p = yaml.safe_load((root / "hopper-sac600-s0" / "progress.yaml").read_text())
    threshold = p["ref_min_score"] + (p["ref_max_score"] - p["ref_min_score"]) / 3
    assert p["medium_threshold"] == pytest.approx(threshold)
    reached = [e["step"] for e in p["evals"] if e["return"] >= threshold]
    if reached:
        assert p["medium_step"] == reached[0]


def test_medium_replay_is_the_replay_buffer(built):
    root, paths = built
    ds = read_d4rl(paths["medium-replay"])
    n = ds.metadata["medium_step"]
    # the buffer keeps SB3's dtypes (float64 observations for Hopper); D4RL files hold float32
    with np.load(root / "hopper-sac600-s0" / "buffer.npz", allow_pickle=False) as z:
        assert len(ds) == n
        np.testing.assert_array_equal(ds.observations, z["observations"][:n].astype(np.float32))
        np.testing.assert_array_equal(ds.actions, z["actions"][:n].astype(np.float32))
        np.testing.assert_array_equal(ds.rewards, z["rewards"][:n].astype(np.float32))
        np.testing.assert_array_equal(ds.next_observations, z["next_observations"][:n].astype(np.float32))
        np.testing.assert_array_equal(ds.terminals[:-1], (z["dones"][: n - 1] > 0.5) & ~(z["timeouts"][: n - 1] > 0.5))


def test_medium_expert_has_both_halves(built):
    _, paths = built
    mixed = read_d4rl(paths["medium-expert"])
    medium = read_d4rl(paths["medium"])
    flag = mixed.infos["expert"]
    assert len(mixed) == 500 and flag[:250].sum() == 0 and flag[250:].all()
    np.testing.assert_array_equal(mixed.observations[:250], medium.observations)
    np.testing.assert_array_equal(mixed.actions[:250], medium.actions)
    assert not np.array_equal(mixed.actions[250:], medium.actions)  # the second half comes from the expert
    assert mixed.timeouts[249] or mixed.terminals[249]  # halves never join into one episode


def test_second_call_reuses_the_cache(built, monkeypatch):
    root, paths = built
    before = {k: p.stat().st_mtime_ns for k, p in paths.items()}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached data set was built again")

    for name in ("_sac_run", "_rollout", "write_d4rl"):
        monkeypatch.setattr(locomotion, name, no_rebuild)
    again = {kind: build_locomotion_dataset("hopper", kind, root, **TINY) for kind in paths}
    assert again == paths
    assert {k: p.stat().st_mtime_ns for k, p in again.items()} == before


def test_bad_requests_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="unknown locomotion env 'ant'"):
        build_locomotion_dataset("ant", "medium", tmp_path)
    with pytest.raises(DatasetError, match="unknown locomotion data kind 'random'"):
        build_locomotion_dataset("hopper", "random", tmp_path)
    assert not any(tmp_path.iterdir())


def test_interrupted_sac_run_resumes_from_its_last_snapshot(built, tmp_path, capsys):
    root, _ = built
    src = root / "hopper-sac600-s0"
    run = tmp_path / "hopper-sac600-s0"
    shutil.copytree(src, run)
    # the state an interruption right after the step-400 evaluation leaves behind
    full = yaml.safe_load((src / "progress.yaml").read_text())
    cut = {k: full[k] for k in ("env_id", "sac_steps", "seed")}
    cut.update(step=400, evals=full["evals"][:2])
    (run / "progress.yaml").write_text(yaml.safe_dump(cut))
    (run / "snapshots" / "sac_600.zip").unlink()
    path = build_locomotion_dataset("hopper", "medium-replay", tmp_path, **TINY)
    resumed = yaml.safe_load((run / "progress.yaml").read_text())
    assert resumed["done"] and [e["step"] for e in resumed["evals"]] == [200, 400, 600]
    assert (run / "snapshots" / "sac_600.zip").exists()
    with np.load(src / "buffer.npz") as a, np.load(run / "buffer.npz") as b:
        assert b["rewards"].shape[0] == 600
        np.testing.assert_array_equal(a["observations"][:399], b["observations"][:399])
        assert b["timeouts"][399] == 1  # the restart is marked as a time-limit cut
    assert len(read_d4rl(path)) == resumed["medium_step"]
    # A 600-step SAC run is no expert: building on it says so, with the options that fix it.
    warned = capsys.readouterr().err
    assert f"returns {resumed['ref_max_score']:.0f}, under half of D4RL's expert (3234)" in warned
    assert "data.sac_steps=" in warned and "data.seed=" in warned
    locomotion._warn_if_weak("hopper", 2813.0, 300_000, 0)  # our 300k-step run: silent
    assert capsys.readouterr().err == ""
