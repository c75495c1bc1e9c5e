"""`diffpilot sweep`: a 4-trial grid on local Ray Tune through the one trainer, its table and plot, resume,
and one-line refusals of a bad search space."""

from __future__ import annotations

import csv

import pytest

from diffpilot.cli import load_config, main
from diffpilot.sweep import trial_configs

TINY = ["data.num_steps=600", "data.episode_len=300", "data.reference_episodes=0", "policy.network.down_dims=[8,16]",
        "+policy.network.n_groups=4", "policy.action_horizon=8", "policy.exec_horizon=4",
        "train.steps=4", "train.batch_size=8", "train.log_every=1", "train.ckpt_every=2"]
SPACE = "sweep.space={train.lr: [1e-3, 1e-2], policy.objective.num_train_steps: [10, 20]}"


def test_a_four_trial_grid_runs_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFPILOT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    args = ["sweep", *TINY, SPACE, "sweep.workers=2", "sweep.asha.grace_period=2", f"out={out}"]
    assert main(args) == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {(r["train.lr"], r["policy.objective.num_train_steps"]) for r in rows} == {
        ("0.001", "10"), ("0.001", "20"), ("0.01", "10"), ("0.01", "20")}
    assert all(r["status"] in ("finished", "stopped by ASHA") for r in rows)
    assert any(r["status"] == "finished" for r in rows)
    best = [float(r["loss_best"]) for r in rows]
    assert best == sorted(best)  # best first (mode min)
    for r in rows:  # every trial trained through the trainer in its own folder
        assert (out / "trials" / r["trial"] / "train_log.csv").is_file()
    assert (out / "sweep.png").stat().st_size > 0 and "| trial |" in (out / "results.md").read_text()
    # rerun: the experiment is restored, finished trials are not trained again
    logs = {r["trial"]: (out / "trials" / r["trial"] / "train_log.csv").read_text() for r in rows}
    assert main(args) == 0
    assert {t: (out / "trials" / t / "train_log.csv").read_text() for t in logs} == logs
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4


@pytest.mark.parametrize("override, message", [
    ("sweep.space={train.nope: [1, 2]}", "sweep.space key 'train.nope' is not a setting"),
    ("sweep.space={train.lr: 0.1}", "sweep.space.train.lr must be a non-empty list"),
    ("sweep.search=bayes", "sweep.search must be one of"),
])
def test_a_bad_search_space_is_one_line_and_exit_2(override, message, tmp_path, capsys):
    assert main(["sweep", override, f"out={tmp_path / 's'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "s").exists()


def test_random_search_draws_seeded_settings():
    cfg = load_config("sweep", ["sweep.search=random", "sweep.samples=5", SPACE])
    a, b = trial_configs(cfg), trial_configs(cfg)
    assert a == b and len(a) == 5
    assert all(t["train.lr"] in (1e-3, 1e-2) and t["policy.objective.num_train_steps"] in (10, 20) for t in a)
