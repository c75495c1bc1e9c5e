"""STL compliance reports: rates match a direct RuleSet evaluation, rollout windows, controllability, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffpilot.data.scenario import DT, to_ego_frame
from diffpilot.data.scene_sample import build_scene_sample, stack_samples
from diffpilot.data.traffic.generate import simulate_scenes
from diffpilot.stl import RuleSet, STLError, driving_signals, scene_from_arrays
from diffpilot.stl.metrics import applicable_rules
from diffpilot.stl.report import (
    compliance_report,
    controllability_figure,
    evaluate_compliance,
    trajectories_from_rollouts,
)
from diffpilot.train import fit

RULES = ["speed_limit", "lane_keeping", "heading", "safe_distance", "lane_change", "comfort"]


@pytest.fixture(scope="module")
def logs():
    return simulate_scenes(3, seed=3, progress=False)[1]


@pytest.fixture(scope="module")
def arrays(logs):
    return stack_samples([build_scene_sample(log, f) for log in logs for f in range(4, log.num_frames - 8, 3)])


def test_report_matches_direct_ruleset_evaluation(tmp_path, arrays) -> None:
    rules = RuleSet(RULES)
    params = {**rules.defaults(), "vmax": 9.0}
    path = compliance_report(tmp_path, rules=rules, arrays=arrays, params=params, title="logged", worst=3)
    assert path == tmp_path / "report.md"
    for name in ("report.md", "report.html", "robustness_hist.png", "compliance.json",
                 "worst_00.png", "worst_01.png", "worst_02.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "worst_03.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "Satisfaction per rule" in md and "![robustness](robustness_hist.png)" in md and "vmax" in md

    # the same verdicts computed directly from the signals of the logged futures
    sig = driving_signals(torch.as_tensor(arrays["ego_future"])[:, None], scene_from_arrays(arrays))
    rho = rules.evaluate(sig, params)
    modes = np.where(arrays["command"] == 1, 1, np.where(arrays["command"] == 2, 2, 0))
    report = json.loads((tmp_path / "compliance.json").read_text())
    by_rule = {r["rule"]: r for r in report["rules"]}
    for name in RULES:
        applies = np.array([name in applicable_rules(RULES, int(m)) for m in modes])
        sat = (rho[name][:, 0].numpy() >= 0)[applies]
        assert by_rule[name]["applicable"] == int(applies.sum())
        assert by_rule[name]["satisfied"] == int(sat.sum())
    # a tighter speed limit can only lower the speed rule's rate
    tight = evaluate_compliance(arrays, rules, {**params, "vmax": 3.0})
    assert tight.satisfied["speed_limit"].sum() < by_rule["speed_limit"]["satisfied"]
    # the worst windows are the least robust ones, in order
    worst = [w["robustness"] for w in report["worst"]]
    assert worst == sorted(worst)


def test_trajectories_from_rollouts_are_ego_frame_driven_futures(logs) -> None:
    from diffpilot.policy.driving_baselines import build_planner
    from diffpilot.sim.driving.simulator import DrivingSimulator

    log = logs[0]
    ro = DrivingSimulator(reactive=False).run(log, build_planner("lane_follower"), start_frame=4, end_frame=16)
    win = trajectories_from_rollouts([ro], [log])
    H = 8
    assert win.trajectories.shape == (len(win.index), H, 4)
    assert list(win.frame) == list(range(4, 16 - H + 1))
    spf = int(round(DT / ro.dt))
    for i, f in enumerate(win.frame):
        r = (f - ro.start_frame) * spf
        fut = r + spf * np.arange(1, H + 1)
        expect = to_ego_frame(ro.ego_states[fut, :3], ro.ego_states[r, :3])
        np.testing.assert_allclose(win.trajectories[i, :, :3], expect, atol=1e-9)
        np.testing.assert_allclose(win.trajectories[i, :, 3], ro.ego_states[fut, 3])
        # the sample the window is scored in sits at the driven pose and holds the driven future
        np.testing.assert_allclose(win.arrays["ego_pose_global"][i], ro.ego_states[r, :3], atol=1e-9)
        np.testing.assert_allclose(win.arrays["ego_future"][i], expect, atol=1e-9)
    # consecutive windows overlap: the first step of window k+1 starts where window k's first step ends
    assert np.all(win.trajectories[:, 0, 0] > 0.0)


def test_controllability_cautious_is_slower(tmp_path, arrays) -> None:
    from diffpilot.data.scene_sample import scene_samples_from_arrays
    from diffpilot.policy.stl_flow import STLFlowPlanner, data_from_logs

    planner = STLFlowPlanner(sampler_steps=2, d_model=32, n_layers=1, n_heads=2, seed=0, num_samples=8)
    fit(planner, data_from_logs(arrays, perturb=6, seed=0), steps=400, batch_size=64)
    sample = scene_samples_from_arrays(arrays, len(arrays["command"]) // 2)
    # the planner learned parameters in hindsight (the speed band a drive kept), so a setting names the whole band
    settings = {"cautious": {"vmin": 0.0, "vmax": 8.0}, "aggressive": {"vmin": 6.0, "vmax": 15.0}}
    before = dict(planner.plan_params)
    res = controllability_figure(planner, sample, settings, tmp_path / "ctrl.png", n=8)
    assert res.path.stat().st_size > 0
    assert res.plans["cautious"].shape == (8, 8, 4)
    assert res.mean_speed["cautious"] < res.mean_speed["aggressive"]
    assert planner.plan_params == before  # the figure leaves the planner's own setting alone
    with pytest.raises(ValueError, match="at least two"):
        controllability_figure(planner, sample, {"one": {"vmax": 5.0}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="not this planner"):
        controllability_figure(planner, sample, {"a": {"amax": 1.0}, "b": {"vmax": 5.0}}, tmp_path / "x.png")


def test_bad_input_raises_clearly(tmp_path, arrays) -> None:
    with pytest.raises(STLError, match="unknown rule 'speeding'"):
        RuleSet(["speeding"])
    rules = RuleSet(["speed_limit", "safe_distance"])
    with pytest.raises(STLError, match=r"\['dsafe'\].*no value"):
        compliance_report(tmp_path, rules=rules, arrays=arrays, params={"vmin": 0.0, "vmax": 10.0})
    with pytest.raises(STLError, match="belong to no rule"):
        compliance_report(tmp_path, rules=rules, arrays=arrays, params={**rules.defaults(), "theta_max": 0.3})
    with pytest.raises(ValueError, match=r"\(N, T, 3\|4\)"):
        compliance_report(tmp_path, rules=rules, arrays=arrays, trajectories=np.zeros((3, 8)))
    with pytest.raises(ValueError, match="index"):
        compliance_report(tmp_path, rules=rules, arrays=arrays, trajectories=np.zeros((3, 8, 3)))
    assert not (tmp_path / "report.md").exists()


def test_job_config_rejects_unknown_settings() -> None:
    from diffpilot.stl_jobs import stl_config, stl_report_job

    cfg = stl_config({"params": {"vmax": 12.0}, "planner": {"samples": 2}})
    assert cfg["params"] == {"vmax": 12.0} and cfg["planner"]["samples"] == 2 and cfg["planner"]["train_steps"] > 0
    with pytest.raises(ValueError, match="unknown setting 'planner.sampels'"):
        stl_config({"planner": {"sampels": 2}})
    with pytest.raises(ValueError, match="source must be one of"):
        stl_report_job({"source": "video"})
