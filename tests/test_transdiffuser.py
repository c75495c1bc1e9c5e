"""TransDiffuser: no peeking, bad input, the decorrelation loss, selection, warm start, augmented rows, learning."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import SampleSpec
from diffpilot.data.scene_sample import example_scene_arrays, scene_samples_from_arrays
from diffpilot.policy.checkpoint import CheckpointError
from diffpilot.policy.generative import cond_repeat_interleave
from diffpilot.policy.registry import build_policy, load_policy
from diffpilot.policy.replan import PlanMemory
from diffpilot.policy.transdiffuser import (
    TransDiffuser,
    candidate_diversity,
    decorrelation_loss,
    deltas_from_poses,
    keep_course,
    poses_from_deltas,
    select_candidates,
)
from diffpilot.train import fit

TINY = dict(TransDiffuser.TINY)


def _fitted(**options) -> TransDiffuser:
    torch.manual_seed(0)
    policy = build_policy({"name": "transdiffuser", **TINY, **options})
    policy.fit_to_batch(policy.example_batch(32, torch.Generator().manual_seed(0)))
    return policy.eval()


def test_plan_reads_only_the_past_and_present():
    policy = _fitted()
    torch.nn.init.normal_(policy.net.out.weight, std=0.5)  # a zero-initialized head would ignore every input
    sample = scene_samples_from_arrays(example_scene_arrays(3, seed=1), 1)
    policy.reset(seed=5)
    want = policy.plan(sample)
    P = policy.cfg.past_steps
    peeked = dataclasses.replace(
        sample,
        ego_future=np.random.default_rng(0).normal(size=sample.ego_future.shape) * 50,
        ego_future_valid=~sample.ego_future_valid,
        agents_pose=np.concatenate([sample.agents_pose[:, : P + 1],
                                    np.random.default_rng(1).normal(size=sample.agents_pose[:, P + 1 :].shape) * 50], 1),
        agents_valid=np.concatenate([sample.agents_valid[:, : P + 1], ~sample.agents_valid[:, P + 1 :]], 1),
    )
    policy.reset(seed=5)
    np.testing.assert_array_equal(policy.plan(peeked), want)
    # and the past does matter: a different ego history changes the plan
    moved = dataclasses.replace(sample, ego_past=sample.ego_past * 2.0, ego_status=sample.ego_status * 2.0)
    policy.reset(seed=5)
    assert not np.allclose(policy.plan(moved), want)


def test_bad_input_is_refused_with_the_field_named(tmp_path: Path):
    policy = _fitted()
    arrays = example_scene_arrays(2, seed=0)
    bad = {k: v.copy() for k, v in arrays.items()}
    bad["lanes"][0, 0, 0, 0] = np.nan
    with pytest.raises(DatasetError, match="lanes"):
        policy.plan_batch(bad)
    short = example_scene_arrays(2, seed=0, spec=SampleSpec(past_steps=2))
    with pytest.raises(DatasetError, match="past_steps=4"):
        policy.plan_batch(short)
    with pytest.raises(DatasetError, match="future_steps=6"):
        policy.training_rows(example_scene_arrays(2, seed=0, spec=SampleSpec(future_steps=6)))
    # more agents and lanes than in training are fine: they are masked token sets
    wide = example_scene_arrays(2, seed=0, spec=SampleSpec(num_agents=40, num_lanes=20))
    assert policy.plan_batch(wide).shape == (2, policy.F, 3)
    with pytest.raises(ValueError, match="noise must have shape"):
        policy.predict(policy.scene_batch(arrays), torch.zeros(2, 1, policy.F, 3))
    with pytest.raises(ValueError, match="sampler 'euler' does not fit objective 'ddpm'"):
        TransDiffuser(sampler="euler")
    with pytest.raises(ValueError, match="use_raster"):
        TransDiffuser(modality_order=["lanes", "raster"])
    with pytest.raises(ValueError, match="bad arguments for objective 'meanflow'.*time_sampler"):
        TransDiffuser(objective="meanflow", sampler="meanflow", objective_options={"time_sampler": "uniform"})
    with pytest.raises(ValueError, match="objective_options are for flow / meanflow"):
        TransDiffuser(objective_options={"time_sampling": "uniform"})
    # a checkpoint of another kind
    other = build_policy({"name": "ego_status_mlp", "hidden": 8, "depth": 1})
    other.save(tmp_path / "mlp")
    with pytest.raises(CheckpointError, match="holds a 'ego_status_mlp' policy, but a 'transdiffuser'"):
        load_policy(tmp_path / "mlp", kind="transdiffuser")
    # a distillation teacher: only for flow / meanflow, a TransDiffuser folder with the same plan size
    with pytest.raises(ValueError, match="set objective=meanflow"):
        TransDiffuser(teacher=str(tmp_path / "mlp"))
    meanflow = {**TINY, "objective": "meanflow", "sampler": "meanflow", "sampler_steps": 1}
    with pytest.raises(CheckpointError, match="teacher: .* holds a 'ego_status_mlp', expected a 'transdiffuser'"):
        TransDiffuser(**meanflow, teacher=str(tmp_path / "mlp")).load_teacher()
    with pytest.raises(CheckpointError, match="teacher: no checkpoint folder"):
        TransDiffuser(**meanflow, teacher=str(tmp_path / "absent")).load_teacher()
    with pytest.raises(ValueError, match="teacher_jump_weight must be >= 0"):
        TransDiffuser(**meanflow, teacher_jump_weight=-1.0)
    TransDiffuser(**TINY, future_steps=6).save(tmp_path / "six")
    with pytest.raises(CheckpointError, match="plans 6 waypoints, this planner 8"):
        TransDiffuser(**meanflow, teacher=str(tmp_path / "six")).load_teacher()


def test_decorrelation_loss_measures_redundant_features():
    g = torch.Generator().manual_seed(0)
    independent = torch.randn(4096, 8, generator=g)
    base = torch.randn(4096, 1, generator=g)
    redundant = base + 0.05 * torch.randn(4096, 8, generator=g)
    assert decorrelation_loss(independent) < 0.01
    assert decorrelation_loss(redundant) > 0.9
    # its gradient moves features apart
    x = redundant.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        decorrelation_loss(x).backward()
        opt.step()
    assert decorrelation_loss(x.detach()) < 0.5 * decorrelation_loss(redundant)


def test_the_shared_scene_memory_denoises_exactly_as_the_plain_decoder():
    policy = _fitted(layers=2)
    with torch.no_grad():
        torch.nn.init.normal_(policy.net.out.weight, std=0.1)  # a decoder whose output reads its input
        for layer in policy.net.layers:
            torch.nn.init.normal_(layer.film.weight, std=0.1)
    batch = policy.scene_batch(example_scene_arrays(3, seed=4))
    with torch.no_grad():
        cond = policy.net.encode(batch)
        x = torch.randn(3, policy.F, 3, generator=torch.Generator().manual_seed(5))
        t = torch.tensor([3, 7, 9])
        denoiser = policy.net.denoiser(cond)
        torch.testing.assert_close(denoiser(x, t, cond), policy.net(x, t, cond), atol=1e-6, rtol=1e-5)
        assert denoiser(x, t, cond).abs().max() > 1e-3
        with pytest.raises(ValueError, match="another condition"):
            denoiser(x, t, policy.net.encode(batch))
        # C candidates per scene query the scene's memory together: the same as repeating the scene C times
        C = 4
        xc = torch.randn(3 * C, policy.F, 3, generator=torch.Generator().manual_seed(6))
        tc = torch.randint(0, 10, (3 * C,), generator=torch.Generator().manual_seed(7))
        repeated = policy.net(xc, tc, cond_repeat_interleave(cond, C))
        torch.testing.assert_close(policy.net.denoiser(cond, C)(xc, tc, cond), repeated, atol=1e-6, rtol=1e-5)


def test_selection_rules_and_diversity():
    F = 8
    line = torch.stack([torch.arange(1, F + 1).float(), torch.zeros(F), torch.zeros(F)], -1)
    offsets = torch.tensor([0.0, 0.3, -0.3, 6.0])  # three close candidates and an outlier
    cands = torch.stack([line + torch.tensor([0.0, o, 0.0]) for o in offsets])[None]
    assert int(select_candidates(cands, "medoid")) == 0
    assert int(select_candidates(cands, "mode")) in (0, 1, 2)
    assert int(select_candidates(cands, "first")) == 0
    assert int(select_candidates(cands, "score", torch.tensor([[0.1, 0.2, 0.3, 0.9]]))) == 3
    div = float(candidate_diversity(cands)[0])
    pair = np.abs(offsets[:, None] - offsets[None]).sum().item() / 12
    assert div == pytest.approx(pair, rel=1e-5)
    poses = np.cumsum(np.random.default_rng(0).normal(size=(5, F, 3)) * 0.1, axis=1)
    np.testing.assert_allclose(poses_from_deltas(torch.as_tensor(deltas_from_poses(poses))).numpy(), poses, atol=1e-9)


def test_warm_start_replans_in_fewer_steps():
    policy = _fitted(warm_start=True, sampler_steps=10, warm_start_t=0.4)
    arrays = example_scene_arrays(2, seed=0)
    first = scene_samples_from_arrays(arrays, 0)
    policy.reset(seed=0)
    policy.plan(first)
    assert policy.last_nfe == 10
    nxt = dataclasses.replace(first, frame=first.frame + 1,
                              ego_pose_global=np.array([first.ego_status[0] * 0.5, 0.0, 0.0]))
    plan = policy.plan(nxt)
    assert policy.last_nfe == 4 and plan.shape == (policy.F, 3) and np.isfinite(plan).all()
    policy.reset()
    policy.plan(nxt)
    assert policy.last_nfe == 10  # reset forgets the previous plan


def test_augmented_rows_join_their_windows_scene():
    policy = _fitted()
    arrays = example_scene_arrays(4, seed=0)
    base = policy.training_rows(arrays)
    traj = np.zeros((3, policy.F, 4))
    traj[..., 0] = np.arange(1, policy.F + 1)
    rows = policy.training_rows(arrays, augmented={"window": np.array([0, 2, 2]), "trajectories": traj})
    assert len(rows["deltas"]) == len(base["deltas"]) + 3
    np.testing.assert_array_equal(rows["ego_status"][-2:], base["ego_status"][[2, 2]])
    with pytest.raises(DatasetError, match="augment the same root"):
        policy.training_rows(arrays, augmented={"window": np.array([9]), "trajectories": traj[:1]})


def test_training_learns_to_plan_the_logged_future():
    """A short run on generated scenes: the plans move toward the logged futures."""
    arrays = example_scene_arrays(256, seed=3)
    policy = _fitted(selection="medoid")

    def l2() -> float:
        policy.reset(seed=0)
        plans = policy.plan_batch(arrays)
        return float(np.linalg.norm(plans[..., :2] - arrays["ego_future"][..., :2], axis=-1).mean())

    before = l2()
    losses = fit(policy, arrays, steps=300, batch_size=64, lr=3e-3, warmup_steps=10, progress=False)
    after = l2()
    assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:30])
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("objective,sampler,options", [("flow", "euler", {}), ("meanflow", "meanflow", {}),
                                                       ("meanflow", "meanflow", {"time_sampling": "logit_normal"})])
def test_flow_and_one_step_meanflow_variants_train_and_plan(tmp_path: Path, objective, sampler, options):
    policy = _fitted(objective=objective, sampler=sampler, sampler_steps=1 if sampler == "meanflow" else 2,
                     objective_options=options)
    if objective == "meanflow":  # uniform times unless told otherwise; the choice survives the checkpoint
        policy.save(tmp_path / "p")
        want = options.get("time_sampling", "uniform")
        assert load_policy(tmp_path / "p").objective.time_sampling == policy.objective.time_sampling == want
    batch = policy.example_batch(8, torch.Generator().manual_seed(1))
    loss, metrics = policy.compute_loss(batch, torch.Generator().manual_seed(2))
    loss.backward()
    assert torch.isfinite(loss) and {"denoise", "decorrelation", "score_bce"} <= set(metrics)
    policy.reset(seed=0)
    plans = policy.plan_batch(example_scene_arrays(2, seed=0))
    assert plans.shape == (2, policy.F, 3) and np.isfinite(plans).all() and policy.last_nfe == policy.sampler.num_steps


def test_joint_fusion_plans_the_same_in_torch_and_onnxruntime_with_fewer_graph_ops(tmp_path: Path):
    """One cross-attention over all the modalities' tokens: it trains, survives its checkpoint, exports, and its
    graph is smaller than the per-modality one."""
    import onnx

    from diffpilot.export.onnx import export_by_kind
    from diffpilot.export.runtime import load_runtime

    with pytest.raises(ValueError, match="fusion must be one of"):
        _fitted(fusion="parallel")
    one_step = dict(objective="meanflow", sampler="meanflow", sampler_steps=1, layers=1)
    policy = _fitted(fusion="joint", **one_step)
    loss, _ = policy.compute_loss(policy.example_batch(8, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2))
    loss.backward()
    assert torch.isfinite(loss) and policy.net.layers[0].cross.keys() == {"joint"}
    torch.nn.init.normal_(policy.net.out.weight, std=0.5)  # spread the candidates
    policy.save(tmp_path / "p")
    loaded = load_policy(tmp_path / "p")
    assert loaded.cfg.fusion == "joint"
    runtime = load_runtime(export_by_kind(loaded, tmp_path / "joint.onnx"))
    sample = scene_samples_from_arrays(example_scene_arrays(2, seed=4), 0)
    noise = np.random.default_rng(0).standard_normal(loaded.noise_shape(1)).astype(np.float32)
    loaded.reset(seed=0)
    np.testing.assert_allclose(runtime.plan(sample, noise=noise), loaded.plan(sample, noise=noise), atol=2e-4)
    sequential = export_by_kind(_fitted(**one_step), tmp_path / "sequential.onnx")
    nodes = [len(onnx.load(str(p)).graph.node) for p in (tmp_path / "joint.onnx", sequential)]
    assert nodes[0] < nodes[1], nodes


def test_a_distilled_student_plans_what_its_teacher_plans_not_what_the_logs_do(tmp_path: Path):
    """The teacher learned half-length futures; a one-step MeanFlow student distilled from it on the true logs
    plans half-length too, while the same student trained on the logs alone plans full length."""
    arrays = example_scene_arrays(256, seed=3)
    halved = {**arrays, "ego_future": arrays["ego_future"] * np.array([0.5, 0.5, 1.0])}
    teacher = _fitted(selection="first")
    fit(teacher, halved, steps=200, batch_size=64, lr=3e-3, warmup_steps=10, progress=False)
    teacher.save(tmp_path / "teacher")

    def reach(policy: TransDiffuser) -> float:
        policy.reset(seed=0)
        return float(np.linalg.norm(policy.plan_batch(arrays)[:, -1, :2], axis=-1).mean())

    logged = float(np.linalg.norm(arrays["ego_future"][:, -1, :2], axis=-1).mean())
    students = {}
    for name, extra in (("distilled", {"teacher": str(tmp_path / "teacher")}), ("from logs", {})):
        student = _fitted(objective="meanflow", sampler="meanflow", sampler_steps=1, selection="first", **extra)
        fit(student, arrays, steps=200, batch_size=64, lr=3e-3, warmup_steps=10, progress=False)
        students[name] = reach(student)
        metrics = student.compute_loss(student.example_batch(8, torch.Generator().manual_seed(1)))[1]
        assert ("teacher_jump" in metrics) == (name == "distilled")  # the one-step jump's own term, with a teacher only
    taught = reach(teacher)
    assert taught < 0.7 * logged
    assert abs(students["distilled"] - taught) < 0.25 * abs(students["from logs"] - taught), (taught, students, logged)


def test_teacher_init_starts_a_smaller_student_from_its_teachers_scene_encoding_and_score_head(tmp_path: Path):
    teacher = TransDiffuser(**{**TINY, "layers": 2}, seed=0)
    torch.nn.init.normal_(teacher.net.score_head[0].weight, std=0.3)
    teacher.save(tmp_path / "teacher")
    student_options = {**TINY, "objective": "meanflow", "sampler": "meanflow", "sampler_steps": 1, "layers": 1,
                       "fusion": "joint", "teacher": str(tmp_path / "teacher"), "seed": 1}
    batch = teacher.example_batch(4, torch.Generator().manual_seed(0))

    def scores(policy: TransDiffuser) -> torch.Tensor:
        with torch.no_grad():
            return policy.net.scores(policy.net.context(policy.net.encode(batch)), batch["cand_poses"])

    cold = TransDiffuser(**student_options)
    assert cold.start_from_teacher() == []  # teacher_init off: distillation alone leaves the student's own init
    assert not torch.allclose(scores(cold), scores(teacher))
    warm = TransDiffuser(**student_options, teacher_init=True)
    copied = warm.start_from_teacher()
    torch.testing.assert_close(scores(warm), scores(teacher))  # same scene encoding, same score head
    assert any(k.startswith("encoder.") for k in copied) and any(k.startswith("score_head.") for k in copied)
    assert not any(k.startswith("layers.1.") or ".cross.joint." in k for k in copied)  # nothing the student lacks or shapes otherwise
    with pytest.raises(ValueError, match="teacher_init starts a student from its teacher's weights; set teacher="):
        TransDiffuser(**TINY, teacher_init=True)


def test_stl_guidance_raises_rule_robustness():
    policy = _fitted(guidance=True, selection="first", num_candidates=4)
    torch.nn.init.normal_(policy.net.out.weight, std=0.5)  # wild plans that break rules
    arrays = example_scene_arrays(3, seed=2)
    guide = policy._guide(arrays, policy.cfg.num_candidates)

    def robustness(guided: bool) -> float:
        policy.cfg.guidance = guided
        policy.reset(seed=0)
        policy.plan_batch(arrays)
        cands = torch.as_tensor(policy.last_candidates, dtype=torch.float32).reshape(-1, policy.F, 3)
        deltas = policy._deltas_t(cands)
        return float(guide.exact(policy.norm.normalize(deltas.reshape(len(cands), -1)).reshape(-1, policy.F, 3)).mean())

    assert robustness(True) > robustness(False)


def test_a_stop_plan_is_held_as_standstill_in_torch_and_onnxruntime(tmp_path: Path):
    from diffpilot.export.onnx import export_by_kind
    from diffpilot.export.runtime import load_runtime
    from diffpilot.policy.plan_guards import hold_standstill

    F = 8
    t = 0.5 * torch.arange(1, F + 1).float()
    creep = torch.stack([0.25 * t, torch.zeros(F), torch.zeros(F)], -1)  # 1 m in 4 s: a sampled stop, scattered
    start = torch.stack([0.1 * t * t, torch.zeros(F), torch.zeros(F)], -1)  # 0.2 m/s² from rest: 1.6 m in 4 s
    held = hold_standstill(torch.stack([creep, start]), 1.5)
    assert torch.equal(held[0], torch.zeros(F, 3)) and torch.equal(held[1], start)
    assert torch.equal(hold_standstill(creep[None], 0.0)[0], creep)

    arrays = example_scene_arrays(3, seed=2)
    moving = _fitted(hold_below_m=0.0)
    plans = moving.plan_batch(arrays)
    assert np.all(np.linalg.norm(plans[:, -1, :2], axis=1) > 0)
    always = _fitted(hold_below_m=1e3)  # every plan ends within 1 km: all held
    np.testing.assert_array_equal(always.plan_batch(arrays), np.zeros_like(plans))
    np.testing.assert_array_equal(always.plan(scene_samples_from_arrays(arrays, 0)), np.zeros((F, 3)))
    runtime = load_runtime(export_by_kind(always, tmp_path / "held.onnx"))
    np.testing.assert_array_equal(runtime.plan(scene_samples_from_arrays(arrays, 1)), np.zeros((F, 3)))
    with pytest.raises(ValueError, match="hold_below_m must be >= 0"):
        build_policy({"name": "transdiffuser", **TINY, "hold_below_m": -1.0})


def test_consistency_keeps_the_candidate_nearest_the_previous_moving_plan():
    F = 8
    t = np.arange(1, F + 1, dtype=np.float64)
    straight = np.stack([5.0 * t, np.zeros(F), np.zeros(F)], axis=1)
    memory = PlanMemory(F)
    memory.remember(straight, np.zeros(3), 10.0)  # the last plan, made at frame 10 from the origin
    previous, covered = memory.shifted(np.array([5.0, 0.0, 0.0]), 11.0)  # one keyframe later, 5 m on
    np.testing.assert_allclose(previous[: F - 1], straight[: F - 1], atol=1e-9)  # its rest, in the new frame
    assert covered.tolist() == [True] * (F - 1) + [False] and memory.moving
    assert memory.shifted(np.zeros(3), 10.0 + F) is None  # too old to bind
    ramp = np.clip(t / 4.0, 0.0, 1.0) * 3.5
    left = np.stack([5.0 * t, ramp, np.zeros(F)], axis=1)
    right = np.stack([5.0 * t, -ramp, np.zeros(F)], axis=1)
    stop = np.stack([0.1 * t, np.zeros(F), np.zeros(F)], axis=1)
    cands = torch.as_tensor(np.stack([left, straight, right, stop])[None], dtype=torch.float32)
    prev, cov = torch.as_tensor(previous[None], dtype=torch.float32), torch.as_tensor(covered[None])

    def kept(idx: int, cov=cov, admissible=None) -> int:
        return int(keep_course(cands, torch.tensor([idx]), prev, cov, 1.5, admissible))

    assert kept(0) == 1  # the selection chose the lane change; the plan in progress goes straight on
    assert kept(3) == 3  # a stop wins over the manoeuvre in progress
    assert kept(0, torch.zeros_like(cov)) == 0  # nothing covered (a previous standstill): the selection's choice
    assert kept(0, admissible=torch.tensor([[True, False, True, True]])) in (0, 2)  # never an inadmissible one
    memory.remember(np.zeros((F, 3)), np.zeros(3), 12.0)
    assert not memory.moving


def test_drivable_check_keeps_to_the_road_in_torch_and_onnxruntime(tmp_path: Path):
    from diffpilot.export.onnx import export_by_kind
    from diffpilot.export.runtime import load_runtime
    from diffpilot.policy.plan_guards import offroad_corners

    policy = _fitted(drivable_check=True, consistency=False, hold_below_m=0.0, clearance_check=False, selection="first",
                     num_candidates=6)
    torch.nn.init.normal_(policy.net.out.weight, std=0.5)  # candidates that wander off a narrow road
    arrays = example_scene_arrays(8, seed=5)
    R = arrays["drivable"].shape[-1]
    arrays["drivable"] = np.tile(np.abs(R / 2 - np.arange(R) - 0.5) < 3.0, (len(arrays["drivable"]), R, 1)).astype(np.uint8)
    assert "drivable" not in policy.training_rows(arrays)  # a plan-time check: training never reads the raster
    noise = torch.randn(policy.noise_shape(8), generator=torch.Generator().manual_seed(0))
    kept = policy.plan_batch(arrays, noise=noise)
    cands = torch.as_tensor(policy.last_candidates, dtype=torch.float32)
    off = offroad_corners(cands, torch.as_tensor(arrays["drivable"]), tuple(policy.cfg.ego_size), 1.0)
    idx = [int(np.abs(policy.last_candidates[b, :, :, :2] - kept[b, :, :2]).max((1, 2)).argmin()) for b in range(8)]
    assert [int(off[b, i]) for b, i in enumerate(idx)] == off.min(1).values.tolist()  # every kept plan: fewest off-road corners
    assert (off[:, 0] > off.min(1).values).any()  # where selection alone would have left the road
    runtime = load_runtime(export_by_kind(policy, tmp_path / "td.onnx"))
    assert "drivable" in runtime.info.inputs
    for i in range(8):
        sample = scene_samples_from_arrays(arrays, i)
        np.testing.assert_allclose(runtime.plan(sample, noise=noise[i:i + 1].numpy()),
                                   policy.plan(sample, noise=noise[i:i + 1]), atol=2e-4)


def test_an_on_board_export_fixes_the_batch_at_one_and_plans_as_the_dynamic_one(tmp_path: Path):
    import onnx

    from diffpilot.export.onnx import export_by_kind
    from diffpilot.export.runtime import load_runtime

    policy = _fitted(drivable_check=True, accel_limit=1.0)
    torch.nn.init.normal_(policy.net.out.weight, std=0.5)  # plans that speed up hard
    dynamic = load_runtime(export_by_kind(policy, tmp_path / "dynamic.onnx"))
    fixed = load_runtime(export_by_kind(policy, tmp_path / "fixed.onnx", batch=1))
    assert dynamic.batch is None and fixed.batch == 1
    assert all(i.shape[0] == 1 for i in fixed.session.get_inputs())
    nodes = {p: len(onnx.load(str(tmp_path / f"{p}.onnx")).graph.node) for p in ("dynamic", "fixed")}
    assert nodes["fixed"] < nodes["dynamic"]  # no ops that read and rebuild the batch size
    arrays = example_scene_arrays(4, seed=3)
    noise = np.random.default_rng(0).standard_normal(policy.noise_shape(4)).astype(np.float32)
    uncapped = copy.deepcopy(policy)
    uncapped.cfg.accel_limit = 0.0
    capped = 0
    for i in range(4):
        sample = scene_samples_from_arrays(arrays, i)
        want = policy.plan(sample, noise=noise[i:i + 1])
        np.testing.assert_allclose(fixed.plan(sample, noise=noise[i]), want, atol=2e-4)
        np.testing.assert_allclose(dynamic.plan(sample, noise=noise[i]), want, atol=2e-4)
        capped += not np.allclose(uncapped.plan(sample, noise=noise[i:i + 1]), want, atol=1e-3)
    assert capped  # the acceleration cap re-timed some plan, the same in torch and both graphs
    batch = {k: np.concatenate([v, v]) for k, v in fixed.feeds(scene_samples_from_arrays(arrays, 0)).items() if k != "noise"}
    assert dynamic.predict(batch).shape == (2, 8, 3)
    with pytest.raises(ValueError, match="batch fixed at 1, got a batch of 2; .* re-export with batch=null"):
        fixed.predict(batch)
    with pytest.raises(ValueError, match="batch must be null .* or an integer"):
        export_by_kind(policy, tmp_path / "none.onnx", batch=0)
    assert not (tmp_path / "none.onnx").exists()


def test_consistency_is_the_same_in_torch_and_onnxruntime(tmp_path: Path):
    from diffpilot.export.onnx import export_by_kind
    from diffpilot.export.runtime import load_runtime

    policy = _fitted(consistency=True, hold_below_m=0.0, clearance_check=False)
    torch.nn.init.normal_(policy.net.out.weight, std=0.5)  # spread the candidates
    runtime = load_runtime(export_by_kind(policy, tmp_path / "td.onnx"))
    assert runtime.info.inputs[-3:] == ("previous", "previous_covered", "noise")
    first = scene_samples_from_arrays(example_scene_arrays(2, seed=4), 0)
    later = [dataclasses.replace(first, frame=first.frame + k, ego_pose_global=np.array([2.0 * k, 0.3 * k, 0.05 * k]))
             for k in range(4)]
    rng = np.random.default_rng(0)
    noises = [rng.standard_normal(policy.noise_shape(1)).astype(np.float32) for _ in later]
    policy.reset(seed=0)
    runtime.reset(seed=0)
    changed = 0
    for sample, noise in zip(later, noises):
        want = policy.plan(sample, noise=noise)
        got = runtime.plan(sample, noise=noise)
        np.testing.assert_allclose(got, want, atol=2e-4)
        fresh = load_runtime(tmp_path / "td.onnx").plan(sample, noise=noise)  # the same draw without a last plan
        changed += int(not np.allclose(fresh, got, atol=1e-4))
    assert changed > 0  # the last plan did steer some choice, in both


