"""The truncated anchor diffusion planner: anchors, learning on real driving logs, no peeking, the anchors command.

Training runs on the small embedded driving set (6 simulated scenes, written
as nuScenes and read back through the devkit), once per module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffpilot.cli import main
from diffpilot.data.errors import DatasetError
from diffpilot.data.nuscenes import load_scene_samples
from diffpilot.data.scenario import SampleSpec
from diffpilot.data.scene_sample import scene_samples_from_arrays, stack_samples
from diffpilot.driving_jobs import driving_data_job
from diffpilot.policy.diffusiondrive import DiffusionDrivePlanner, cluster_anchors, load_anchors, save_anchors
from diffpilot.policy.registry import build_policy, load_policy
from diffpilot.train import fit

VERSION = "v1.0-diffpilot"
SMALL = {"num_anchors": 8, "d_model": 32, "heads": 2, "ffn": 64, "encoder_hidden": 32}


def _l2(plans: np.ndarray, arrays: dict) -> np.ndarray:
    """Mean x, y distance to the logged future over its valid waypoints, per row."""
    valid = arrays["ego_future_valid"]
    err = np.linalg.norm(plans[..., :2] - arrays["ego_future"][..., :2], axis=-1)
    return (err * valid).sum(-1) / valid.sum(-1)


@pytest.fixture(scope="module")
def data() -> tuple[dict, dict]:
    root = driving_data_job({"num_scenes": 6})
    train = load_scene_samples(root, VERSION, "train", SampleSpec(), progress=False)
    val = load_scene_samples(root, VERSION, "val", SampleSpec(), progress=False)
    return train, val


@pytest.fixture(scope="module")
def trained(data) -> tuple[DiffusionDrivePlanner, list[float]]:
    torch.manual_seed(0)
    planner = build_policy({"name": "diffusiondrive_planner", **SMALL})
    losses = fit(planner, data[0], steps=300, batch_size=64, seed=0, lr=2e-3, warmup_steps=0, schedule="constant",
                 progress=False)
    return planner.eval(), losses


def test_kmeans_anchors_recover_well_separated_clusters():
    rng = np.random.default_rng(0)
    t = np.arange(1, 9) * 0.5
    centres = [np.stack([10 * t, 0 * t, 0 * t], 1),  # straight at 10 m/s
               np.stack([6 * t, 0.4 * t**2, 0.13 * t], 1),  # bending left
               np.stack([3 * t, -0.3 * t**2, -0.2 * t], 1)]  # slow, bending right
    fut = np.concatenate([c + rng.normal(0, 0.05, size=(30, 8, 3)) for c in centres])
    valid = np.ones(fut.shape[:2], bool)
    valid[::7, -1] = False  # incomplete futures are left out of the clustering
    anchors = cluster_anchors({"ego_future": fut, "ego_future_valid": valid}, k=3, seed=1)
    assert anchors.shape == (3, 8, 3)
    for c in centres:
        gap = np.abs(anchors - c).max(axis=(1, 2)).min()
        assert gap < 0.1, gap
    again = cluster_anchors({"ego_future": fut, "ego_future_valid": valid}, k=3, seed=1)
    np.testing.assert_array_equal(anchors, again)
    with pytest.raises(DatasetError, match=r"only 3 distinct complete ego futures .* lower k"):
        cluster_anchors({"ego_future": np.repeat(np.stack(centres), 5, axis=0)}, k=4)


def test_training_lowers_the_loss_and_beats_every_fixed_anchor(data, trained):
    planner, losses = trained
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])
    for arrays, factor in ((data[0], 0.5), (data[1], 1.0)):
        planner.reset(0)
        plan_l2 = _l2(planner.plan_batch(arrays), arrays).mean()
        fixed = np.stack([_l2(np.broadcast_to(a, arrays["ego_future"].shape), arrays) for a in planner.anchors.numpy()], 1)
        # the best single trajectory for the whole set (what a scene-blind planner could do at best)
        assert plan_l2 < factor * fixed.mean(0).min(), (plan_l2, fixed.mean(0).min())


def test_plan_reads_only_the_past_and_present(data, trained):
    planner, _ = trained
    arrays = data[1]
    H = SampleSpec().past_steps + 1
    for i in (0, len(arrays["token"]) // 2):
        sample = scene_samples_from_arrays(arrays, i)
        planner.reset(3)
        before = planner.plan(sample)
        sample.ego_future[:] = np.nan
        sample.ego_future_valid[:] = False
        sample.agents_pose[:, H:] = np.nan
        sample.agents_valid[:, H:] = ~sample.agents_valid[:, H:]
        planner.reset(3)
        np.testing.assert_array_equal(planner.plan(sample), before)
        assert before.shape == (8, 3) and np.isfinite(before).all()


def test_bad_input_is_named_and_more_agents_than_trained_is_fine(data, trained):
    planner, _ = trained
    sample = scene_samples_from_arrays(data[1], 0)
    sample.ego_status[0] = np.nan
    with pytest.raises(ValueError, match="ego_status"):
        planner.plan(sample)
    arrays = stack_samples([scene_samples_from_arrays(data[1], 0)])
    with pytest.raises(DatasetError, match=r"past_steps=4"):
        planner.plan_batch({**arrays, "ego_past": arrays["ego_past"][:, 1:]})
    wide = dict(arrays)
    for key, fill in (("agents_pose", 0.0), ("agents_valid", False), ("agents_size", 0.0), ("agents_category", -1)):
        pad = np.full((1, 8) + arrays[key].shape[2:], fill, dtype=arrays[key].dtype)
        wide[key] = np.concatenate([arrays[key], pad], axis=1)
    wide["lanes"] = np.concatenate([arrays["lanes"], np.zeros((1, 3) + arrays["lanes"].shape[2:])], axis=1)
    wide["lanes_valid"] = np.concatenate([arrays["lanes_valid"], np.zeros((1, 3), bool)], axis=1)
    noise = torch.randn(planner.noise_shape(1), generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(planner.plan_batch(wide, noise), planner.plan_batch(arrays, noise), atol=1e-5)
    # nothing to attend to (no agents, no lanes) is still a finite plan thanks to the null tokens
    empty = {**arrays, "agents_valid": np.zeros_like(arrays["agents_valid"]),
             "lanes_valid": np.zeros_like(arrays["lanes_valid"])}
    assert np.isfinite(planner.plan_batch(empty, noise)).all()


def test_drivable_check_keeps_the_peer_to_the_road_in_torch_and_onnxruntime(tmp_path, data, trained):
    import copy

    from diffpilot.export.onnx import export_by_kind
    from diffpilot.export.runtime import load_runtime
    from diffpilot.policy.plan_guards import offroad_corners

    checked = build_policy({"name": "diffusiondrive_planner", **SMALL, "drivable_check": True})
    assert "drivable" not in checked.training_rows(data[0])  # a plan-time check: training never reads the raster
    fit(checked, data[0], steps=3, batch_size=16, seed=0, progress=False)
    planner = copy.deepcopy(trained[0])
    planner.cfg.drivable_check, planner.cfg.clearance_check, planner.cfg.hold_below_m = True, False, 0.0
    arrays = {k: np.asarray(v)[:6] for k, v in data[1].items()}
    R = arrays["drivable"].shape[-1]
    arrays["drivable"] = np.tile(np.abs(R / 2 - np.arange(R) - 0.5) < 2.0, (6, R, 1)).astype(np.uint8)  # a 4-m road
    noise = torch.randn(planner.noise_shape(6), generator=torch.Generator().manual_seed(0))
    batch = planner.scene_batch(arrays)
    with torch.no_grad():
        poses, logits = planner.candidates(batch, noise)
    off = offroad_corners(poses, batch["drivable"], tuple(planner.cfg.ego_size), 1.0)
    kept = planner.plan_batch(arrays, noise)
    idx = [int(np.abs(poses[b, :, :, :2].numpy() - kept[b, :, :2]).max((1, 2)).argmin()) for b in range(6)]
    assert [int(off[b, i]) for b, i in enumerate(idx)] == off.min(1).values.tolist()  # fewest off-road corners
    assert (off[torch.arange(6), logits.argmax(1)] > off.min(1).values).any()  # the best-scored mode alone left the road
    runtime = load_runtime(export_by_kind(planner, tmp_path / "dd.onnx"))
    assert "drivable" in runtime.info.inputs
    for i in range(6):
        got = runtime.plan(scene_samples_from_arrays(arrays, i), noise=noise[i:i + 1].numpy())
        np.testing.assert_allclose(got, kept[i], atol=2e-4)


def test_anchors_command_writes_the_file_the_planner_reads_and_refuses_bad_input(tmp_path, capsys, data):
    out = tmp_path / "anchors"
    assert main(["driving", "anchors", "data.num_scenes=6", "k=5", f"out={out}", "progress=false"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "anchors.npz")
    anchors = load_anchors(out / "anchors.npz")
    assert anchors.shape == (5, 8, 3) and (out / "anchors.png").stat().st_size > 1000

    planner = build_policy({"name": "diffusiondrive_planner", **SMALL, "num_anchors": 5,
                            "anchors": str(out / "anchors.npz")})
    rows = planner.training_rows(data[0])
    planner.fit_to_batch(rows)
    np.testing.assert_allclose(planner.anchors.numpy(), anchors, atol=1e-5)
    planner.save(tmp_path / "p")
    (out / "anchors.npz").unlink()  # the anchors travel with the weights, not the file
    np.testing.assert_array_equal(load_policy(tmp_path / "p").anchors.numpy(), planner.anchors.numpy())
    with pytest.raises(FileNotFoundError, match=r"no anchors file at .*anchors\.npz; write one with"):
        planner.fit_to_batch(rows)
    bad = tmp_path / "bad.npz"
    save_anchors(bad, anchors[:3])
    wrong = build_policy({"name": "diffusiondrive_planner", **SMALL, "num_anchors": 5, "anchors": str(bad)})
    with pytest.raises(DatasetError, match=r"bad\.npz holds anchors of shape \(3, 8, 3\).*num_anchors=3"):
        wrong.fit_to_batch(rows)
    bad.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"bad\.npz is not a readable anchors \.npz"):
        load_anchors(bad)

    for args, message in ((["k=0"], "k must be a positive integer"),
                          (["k=100000"], "lower k"),
                          ([f"out={bad}"], "is a file; pass a folder")):
        argv = ["driving", "anchors", "data.num_scenes=6", f"out={tmp_path / 'none'}", "progress=false", *args]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "none").exists()
