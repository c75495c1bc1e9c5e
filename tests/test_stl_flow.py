"""STL-conditioned flow planner, its DDPM / VAE baselines and the open-loop STL metrics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import Planner
from diffpilot.data.scene_sample import build_scene_sample, scene_samples_from_arrays, stack_samples
from diffpilot.data.traffic.generate import simulate_scenes
from diffpilot.planning.dynamics import controls_from_poses, rollout
from diffpilot.policy.checkpoint import CheckpointError
from diffpilot.policy.driving_generative import CTGGuidance, ConditionalVAEPlanner, ParamDDPMPlanner
from diffpilot.policy.stl_flow import (
    GuidanceConfig,
    PlannerData,
    STLFlowPlanner,
    data_from_augmented,
    data_from_logs,
    hindsight_params,
)
from diffpilot.stl import RuleSet
from diffpilot.stl import metrics as M
from diffpilot.train import fit

SMALL = dict(d_model=32, n_layers=2, n_heads=4, num_samples=8)


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    _, logs = simulate_scenes(4, seed=0, progress=False)
    samples = [build_scene_sample(log, f) for log in logs for f in range(0, log.num_frames - 8, 2)]
    return stack_samples(samples)


@pytest.fixture(scope="module")
def split(arrays) -> tuple[PlannerData, PlannerData]:
    """Training rows (logged + perturbed) from three scenes; the logged rows of the fourth scene for testing."""
    data = data_from_logs(arrays, perturb=3, seed=0)
    scenes = np.asarray(arrays["scene_token"])
    test_scene = sorted(set(scenes))[-1]
    is_test = scenes[data.window] == test_scene
    train = _rows(data, ~is_test)
    logged = np.arange(len(data)) < len(np.unique(data.window))  # the first block holds the unperturbed rows
    test = _rows(data, is_test & logged)
    return train, test


def _rows(d: PlannerData, keep: np.ndarray) -> PlannerData:
    return PlannerData(arrays=d.arrays, window=d.window[keep], controls=d.controls[keep],
                       params={k: v[keep] for k, v in d.params.items()}, modes=d.modes[keep])


@pytest.fixture(scope="module")
def trained(split) -> STLFlowPlanner:
    train, _ = split
    planner = STLFlowPlanner(sampler_steps=2, seed=0, **SMALL)
    losses = fit(planner, train, steps=300, batch_size=64)
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:5])
    return planner


def _evaluate(planner, test: PlannerData, guidance=None, n: int = 8, seed: int = 0):
    noise = torch.randn((len(test) * n, planner.horizon, 2), generator=torch.Generator().manual_seed(seed))
    out = planner.sample(test.arrays, test.window, test.params, test.modes, n=n, noise=noise, guidance=guidance)
    rho = planner.satisfaction(out.states, test.arrays, test.window, test.params, test.modes)
    return out, rho


# --------------------------------------------------------------------------- dynamics and data


def test_controls_from_poses_inverts_the_rollout(arrays):
    fut = arrays["ego_future"]
    v0 = arrays["ego_status"][:, 0]
    complete = arrays["ego_future_valid"].all(axis=1)
    c = controls_from_poses(fut, v0)
    _, states = rollout(torch.as_tensor(c), torch.as_tensor(v0), clip=False)
    states = states.numpy()
    # logs: the sideways slip of a step is dropped, headings are exact
    assert np.abs(states[complete, :, :2] - fut[complete, :, :2]).max() < 0.15
    assert np.abs(states[complete, :, 2] - fut[complete, :, 2]).max() < 1e-9
    # rollouts: exact inverse, and unclipped (closed form) = clipped (step by step) inside the limits
    rng = np.random.default_rng(0)
    ctrl = np.stack([rng.uniform(-0.4, 0.4, (5, 8)), rng.uniform(-2.0, 2.0, (5, 8))], axis=-1)
    st = rollout(torch.as_tensor(ctrl), torch.full((5,), 8.0), clip=False)[1].numpy()
    assert np.allclose(controls_from_poses(st[..., :3], np.full(5, 8.0)), ctrl, atol=1e-9)
    _, st_planning = rollout(torch.as_tensor(ctrl), torch.full((5,), 8.0))
    assert np.allclose(st, st_planning.numpy(), atol=1e-9)


def test_hindsight_parameters_are_satisfied_by_their_rows(split):
    train, _ = split
    rules = RuleSet(["speed_limit", "lane_keeping", "heading", "safe_distance", "lane_change"])
    v0 = torch.as_tensor(train.arrays["ego_status"][train.window, 0])
    _, states = rollout(torch.as_tensor(train.controls), v0, clip=False)
    rho = M.rule_robustness(states[:, None], train.arrays, train.window, rules, train.params, train.modes)
    assert all(bool((r >= 0).all()) for r in rho.values())
    # the perturbed rows spread vmax beyond what the scene alone decides
    assert np.ptp(train.params["vmax"]) > 5.0
    with pytest.raises(DatasetError, match="per row"):
        PlannerData(arrays=train.arrays, window=train.window, controls=train.controls,
                    params={"vmax": train.params["vmax"][:3]}, modes=train.modes)
    p = hindsight_params(train.arrays, train.window[:4], train.controls[:4], train.modes[:4], rules, {"vmax": 1.0})
    assert np.allclose(p["vmax"], train.params["vmax"][:4])


# --------------------------------------------------------------------------- the flow planner


def test_training_raises_compliance_over_an_untrained_planner(trained, split):
    _, test = split
    untrained = STLFlowPlanner(sampler_steps=2, seed=0, **SMALL)
    fit(untrained, split[0], steps=1)  # normalizers fitted, weights barely moved
    _, rho0 = _evaluate(untrained, test)
    out, rho1 = _evaluate(trained, test)
    assert out.nfe == 2
    c0, c1 = M.compliance(rho0 >= 0), M.compliance(rho1 >= 0)
    assert c1 > c0 + 0.1, (c0, c1)
    ade0 = M.min_ade(untrained.sample(test.arrays, test.window, test.params, test.modes, n=8).states,
                     test.arrays["ego_future"][test.window]).mean()
    ade1 = M.min_ade(out.states, test.arrays["ego_future"][test.window]).mean()
    assert ade1 < ade0


def test_guidance_raises_robustness_at_equal_nfe(trained, split):
    _, test = split
    plain, rho = _evaluate(trained, test)
    guided, rho_g = _evaluate(trained, test, guidance=GuidanceConfig(steps=None, refine=3))
    assert guided.nfe == plain.nfe == 2
    assert 2 + 1 <= guided.guide_steps <= 2 + 3  # one per sampler step, then refinement until all are robust
    assert np.mean(np.minimum(rho_g, 1.0)) > np.mean(np.minimum(rho, 1.0))
    assert M.compliance(rho_g >= 0) >= M.compliance(rho >= 0)


def test_vmax_controls_the_speed_profile(trained, split):
    _, test = split
    noise = torch.randn((len(test) * 8, 8, 2), generator=torch.Generator().manual_seed(1))
    speeds = {}
    for vmax in (5.0, 15.0):
        params = {**test.params, "vmax": np.full(len(test), vmax)}
        out = trained.sample(test.arrays, test.window, params, test.modes, n=8, noise=noise)
        speeds[vmax] = out.states[..., 3].mean(axis=(1, 2))  # per window
    assert speeds[5.0].mean() < speeds[15.0].mean() - 0.5, (speeds[5.0].mean(), speeds[15.0].mean())
    assert (speeds[5.0] <= speeds[15.0] + 1e-6).mean() > 0.7


def test_plan_save_load_roundtrip(trained, arrays, tmp_path):
    sample = scene_samples_from_arrays(arrays, 5)
    assert isinstance(trained, Planner)
    trained.set_rule_params(vmax=8.0)
    trained.reset(seed=3)
    plan = trained.plan(sample)
    assert plan.shape == (8, 3) and np.isfinite(plan).all()
    assert np.all(np.abs(plan[:, 2]) <= math.pi)
    trained.save(tmp_path / "flow")
    loaded = STLFlowPlanner.load(tmp_path / "flow")
    assert loaded.plan_params["vmax"] == 8.0
    loaded.reset(seed=3)
    assert np.allclose(loaded.plan(sample), plan, atol=1e-5)
    with pytest.raises(CheckpointError, match="expected"):
        ParamDDPMPlanner.load(tmp_path / "flow")
    with pytest.raises(ValueError, match="unknown rule parameter"):
        trained.set_rule_params(speed=3.0)
    trained.set_rule_params(vmax=15.0)


def test_meanflow_option_samples_in_one_step(split):
    train, test = split
    planner = STLFlowPlanner(objective="meanflow", sampler_steps=1, seed=0, **SMALL)
    losses = fit(planner, train, steps=20, batch_size=32)
    assert np.isfinite(losses).all()
    out, rho = _evaluate(planner, test, n=4)
    assert out.nfe == 1 and out.states.shape == (len(test), 4, 8, 4) and np.isfinite(out.states).all()
    guided, _ = _evaluate(planner, test, n=4, guidance=GuidanceConfig(refine=1, steps=None))
    assert guided.nfe == 1 and 1 <= guided.guide_steps <= 2


# --------------------------------------------------------------------------- baselines


def test_ddpm_baseline_trains_samples_and_ctg_guides_every_step(split, tmp_path):
    train, test = split
    planner = ParamDDPMPlanner(num_train_steps=50, sampler="ddim", sampler_steps=5, seed=0, **SMALL)
    losses = fit(planner, train, steps=120, batch_size=64)
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:5])
    out, rho = _evaluate(planner, test, n=4)
    assert out.nfe == 5 and out.states.shape == (len(test), 4, 8, 4)
    g, rho_g = _evaluate(planner, test, n=4, guidance=CTGGuidance(scale=0.3, inner=2))
    assert g.nfe == 5 and g.guide_steps == 5 * 2
    assert np.mean(np.minimum(rho_g, 1.0)) > np.mean(np.minimum(rho, 1.0))
    planner.save(tmp_path / "ddpm")
    loaded = ParamDDPMPlanner.load(tmp_path / "ddpm")
    again, _ = _evaluate(loaded, test, n=4)
    assert np.allclose(again.states, out.states, atol=1e-5)


def test_vae_baseline_trains_and_samples(split):
    train, test = split
    planner = ConditionalVAEPlanner(latent_dim=4, seed=0, **SMALL)
    losses = fit(planner, train, steps=150, batch_size=64)
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:5])
    out, rho = _evaluate(planner, test, n=4)
    assert out.nfe == 1 and out.states.shape == (len(test), 4, 8, 4)
    # different latent draws give different plans
    assert np.std(out.states[:, :, -1, :2], axis=1).mean() > 1e-3
    untrained = ConditionalVAEPlanner(latent_dim=4, seed=0, **SMALL)
    fit(untrained, train, steps=1)
    ade0 = M.min_ade(_evaluate(untrained, test, n=4)[0].states, test.arrays["ego_future"][test.window]).mean()
    ade1 = M.min_ade(out.states, test.arrays["ego_future"][test.window]).mean()
    assert ade1 < ade0
    with pytest.raises(ValueError, match="latent_dim"):
        ConditionalVAEPlanner(latent_dim=100)


# --------------------------------------------------------------------------- metrics on hand-made cases


def _straight(length: float, lateral: float = 0.0, T: int = 4) -> np.ndarray:
    x = np.linspace(length / T, length, T)
    return np.stack([x, np.full(T, lateral), np.zeros(T)], axis=-1)


def test_success_and_compliance():
    sat = np.array([[True, False, False, False], [False, False, False, False], [True, True, True, False]])
    assert M.success(sat) == pytest.approx(2 / 3)
    assert M.compliance(sat) == pytest.approx(4 / 12)
    with pytest.raises(DatasetError, match="windows, samples"):
        M.success(np.ones(3, dtype=bool))


def test_valid_area_swept_and_hull():
    one = np.stack([_straight(10.0), _straight(10.0, lateral=5.0)])[None]  # (1, 2, 4, 3)
    w = 2.0
    single = M.valid_area(one, np.array([[True, False]]), width=w)[0]
    assert single == pytest.approx(10 * w + math.pi * (w / 2) ** 2, rel=1e-2)  # a stadium
    both = M.valid_area(one, np.array([[True, True]]), width=w)[0]
    assert single < both < 3 * single
    same = np.stack([_straight(10.0), _straight(10.0)])[None]
    assert M.valid_area(same, np.ones((1, 2), bool), width=w)[0] == pytest.approx(single)  # a union, not a sum
    assert M.valid_area(one, np.array([[False, False]]))[0] == 0.0
    ends = np.zeros((1, 3, 1, 3))
    ends[0, :, 0, :2] = [[0, 0], [4, 0], [0, 3]]
    assert M.valid_area(ends, np.ones((1, 3), bool), method="hull")[0] == pytest.approx(6.0)
    with pytest.raises(ValueError, match="method"):
        M.valid_area(one, np.ones((1, 2), bool), method="box")


def test_endpoint_entropy_min_ade_fde():
    same = np.repeat(_straight(10.0)[None], 4, axis=0)[None]
    assert M.endpoint_entropy(same, cell_m=1.0)[0] == pytest.approx(0.0)
    spread = np.stack([_straight(10.0, lateral=3.0 * i) for i in range(4)])[None]
    assert M.endpoint_entropy(spread, cell_m=1.0)[0] == pytest.approx(math.log(4))
    half = np.array([[True, True, False, False]])
    assert M.endpoint_entropy(spread, half)[0] == pytest.approx(math.log(2))
    assert np.isnan(M.endpoint_entropy(spread, np.zeros((1, 4), bool))[0])
    gt = _straight(10.0)[None]
    trajs = np.stack([_straight(10.0, lateral=1.0), _straight(10.0, lateral=2.0)])[None]
    assert M.min_ade(trajs, gt)[0] == pytest.approx(1.0)
    assert M.min_fde(trajs, gt)[0] == pytest.approx(1.0)
    shifted = trajs.copy()
    shifted[0, 0, -1, 1] = 4.0  # only the final point of the first sample moves
    assert M.min_ade(shifted, gt)[0] == pytest.approx(min((1 + 1 + 1 + 4) / 4, 2.0))
    valid = np.array([[True, True, False, False]])
    assert M.min_fde(shifted, gt, valid)[0] == pytest.approx(1.0)  # the last valid step is step 1
    with pytest.raises(DatasetError, match="logged futures"):
        M.min_ade(trajs, gt[:, :2])


def test_mode_rules_summary_and_timing(monkeypatch):
    assert M.applicable_rules(["speed_limit", "lane_keeping", "lane_change"], 0) == ["speed_limit", "lane_keeping"]
    assert M.applicable_rules(["speed_limit", "lane_keeping", "lane_change"], 1) == ["speed_limit", "lane_change"]
    per_rule = {"speed_limit": torch.tensor([[1.0, -1.0]]), "lane_keeping": torch.tensor([[-2.0, 3.0]]),
                "lane_change": torch.tensor([[0.5, 0.5]])}
    assert torch.equal(M.mode_robustness(per_rule, [0]), torch.tensor([[-2.0, -1.0]]))
    assert torch.equal(M.mode_robustness(per_rule, [2]), torch.tensor([[0.5, -1.0]]))
    soft = M.mode_robustness(per_rule, [2], smooth=0.05)
    assert torch.all(soft <= torch.tensor([[0.5, -1.0]]) + 1e-9) and torch.allclose(soft, torch.tensor([[0.5, -1.0]]), atol=0.05)
    with pytest.raises(DatasetError, match="mode"):
        M.applicable_rules(["speed_limit"], 5)
    trajs = np.stack([_straight(10.0), _straight(12.0)])[None]
    row = M.open_loop_summary(trajs, np.array([[True, False]]), _straight(10.0)[None], seconds_per_batch=0.5)
    assert row["success"] == 1.0 and row["compliance"] == 0.5 and row["min_ade_m"] == pytest.approx(0.0)
    assert row["time_per_batch_s"] == 0.5 and row["valid_area_m2"] > 0
    # time_per_batch: the median of the timed calls, the warm-up call left out (a fake clock the calls advance)
    clock = SimpleNamespace(now=0.0)
    clock.perf_counter = lambda: clock.now
    monkeypatch.setattr(M, "time", clock)
    durations = iter([9.0, 1.0, 4.0, 2.0])
    calls = []

    def call():
        calls.append(1)
        clock.now += next(durations)

    assert M.time_per_batch(call, repeats=3, warmup=1) == 2.0
    assert len(calls) == 4
    with pytest.raises(ValueError, match="repeats"):
        M.time_per_batch(call, repeats=0)


def test_trains_on_trajectory_optimizer_augmented_rows(arrays, tmp_path):
    from diffpilot.planning.augment import augment, read_augmented

    out = augment(arrays, tmp_path / "aug", samples_per_window=4, windows=np.arange(2), steps=20, progress=False)
    aug = read_augmented(out)
    data = data_from_augmented(arrays, aug)
    assert len(data) == len(aug["controls"]) > 0
    # the optimizer's controls roll out to its trajectories under our decoder
    v0 = torch.as_tensor(arrays["ego_status"][data.window, 0])
    states = rollout(torch.as_tensor(data.controls), v0, clip=False)[1].numpy()
    assert np.allclose(states, aug["trajectories"], atol=1e-3)
    planner = STLFlowPlanner(rules=list(aug["rule_names"]), sampler_steps=1, seed=0, **SMALL)
    assert set(planner.param_names) <= set(data.params)
    losses = fit(planner, data, steps=10, batch_size=16)
    assert np.isfinite(losses).all()
    sampled = planner.sample(arrays, data.window[:2], {k: v[:2] for k, v in data.params.items()}, data.modes[:2], n=2)
    assert sampled.states.shape == (2, 2, 8, 4)
    with pytest.raises(DatasetError, match="lack"):
        data_from_augmented(arrays, {k: v for k, v in aug.items() if k != "modes"})
