"""Export by kind: the planner form (torch vs onnxruntime on the same noise), refusals, and the runtime chosen by kind."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from diffpilot.cli import main
from diffpilot.data.scenario import SampleSpec, mode_from_command
from diffpilot.data.scene_sample import example_scene_arrays, scene_samples_from_arrays
from diffpilot.export.onnx import export_by_kind, export_denoiser
from diffpilot.export.runtime import (
    KIND_DENOISER,
    KIND_PLANNER,
    KIND_POLICY,
    ExportedModelError,
    OnnxChunkPolicy,
    OnnxPlanner,
    load_runtime,
)
from diffpilot.policy.export_spec import RUNTIME_CHUNK, RUNTIME_DENOISER, RUNTIME_PLANNER
from diffpilot.policy.networks.scene_encoder import batch_from_arrays
from diffpilot.policy.registry import build_policy, load_policy, policy_class
from diffpilot.policy.stl_flow import STLFlowPlanner

TINY = dict(d_model=16, n_layers=1, n_heads=2, num_samples=2)


def _trained_looking(planner, seed: int = 0):
    """Normalizers fitted on example rows and every weight perturbed (zero-initialized layers would hide the scene)."""
    torch.manual_seed(seed)
    planner.fit_to_batch(planner.example_batch(32, torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        for p in planner.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    return planner.eval()


def _scenes(planner, n: int, seed: int, **spec) -> dict[str, np.ndarray]:
    return example_scene_arrays(n, seed=seed, spec=SampleSpec(past_steps=planner.hparams["past_steps"],
                                                              future_steps=planner.horizon, **spec))


def _torch_plan(planner, arrays, i: int, noise: np.ndarray, raster: bool = False) -> np.ndarray:
    """torch ``predict`` of scene ``i`` under the planner's plan_params and the sample's command, as states (T, 4)."""
    batch = batch_from_arrays(arrays, [i], raster=raster)
    batch["params"] = planner._param_features(planner.plan_params, arrays["ego_status"][[i], 0])
    batch["modes"] = torch.as_tensor(mode_from_command(arrays["command"][[i]]))
    return planner.predict(batch, torch.from_numpy(noise)[None])[0].double().numpy()


def _assert_poses_match(got: np.ndarray, want_states: np.ndarray, atol: float = 1e-4) -> None:
    np.testing.assert_allclose(got[:, :2], want_states[:, :2], atol=atol, rtol=1e-5)
    assert np.abs(np.angle(np.exp(1j * (got[:, 2] - want_states[:, 2])))).max() < atol


@pytest.fixture(scope="module")
def flow_export(tmp_path_factory) -> tuple[STLFlowPlanner, Path]:
    """A tiny Euler-2 STL flow planner exported through ``diffpilot export checkpoint=...``."""
    folder = tmp_path_factory.mktemp("stl")
    _trained_looking(STLFlowPlanner(**TINY)).save(folder / "policy")
    assert main(["export", f"checkpoint={folder / 'policy'}"]) == 0
    return load_policy(folder / "policy"), folder / "policy.onnx"


# --- the planner form ---------------------------------------------------------------------------


def test_planner_export_plans_like_torch_predict_and_is_described(flow_export) -> None:
    planner, path = flow_export
    runtime = load_runtime(path)
    assert isinstance(runtime, OnnxPlanner) and runtime.nfe == 2
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert (meta["kind"], meta["form"], meta["policy_kind"], meta["outputs"]) == ("planner", "states", "stl_flow_planner", "states")
    assert json.loads(meta["param_names"]) == planner.param_names and json.loads(meta["rules"]) == planner.rule_names
    sizes = {k: int(meta[k]) for k in ("horizon", "past_steps", "num_agents", "num_lanes", "lane_points", "raster_size")}
    assert sizes == {"horizon": planner.horizon, "past_steps": planner.hparams["past_steps"], "num_agents": 16,
                     "num_lanes": 12, "lane_points": 20, "raster_size": 0}
    assert json.loads(meta["sampler"]) == {"name": "euler", "num_steps": 2} and "autograd" in meta["guidance"]
    assert float(meta["check_max_abs_error"]) <= 1e-4
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[""] >= 17
    assert not any(n.op_type.startswith("Random") for n in model.graph.node)
    types = {i.name: i.type for i in runtime.session.get_inputs()}
    assert types["agents_valid"] == types["lanes_valid"] == "tensor(bool)" and types["modes"] == "tensor(int64)"

    arrays = _scenes(planner, 3, seed=5)
    for i in range(3):
        sample = scene_samples_from_arrays(arrays, i)
        noise = np.random.default_rng(i).standard_normal((planner.horizon, 2), dtype=np.float32)
        want = _torch_plan(planner, arrays, i, noise)
        _assert_poses_match(runtime.plan(sample, noise=noise), want)
        expected = planner._param_features(planner.plan_params, arrays["ego_status"][[i], 0]).numpy()
        np.testing.assert_allclose(runtime.feeds(sample, noise=noise)["params"], expected, rtol=1e-6)
    # the parameters condition the plan, and the runtime's setter feeds them as torch does
    sample, noise = scene_samples_from_arrays(arrays, 0), np.zeros((planner.horizon, 2), np.float32)
    base = runtime.plan(sample, noise=noise)
    runtime.set_rule_params(vmax=3.0, dsafe=8.0)
    cautious_planner = copy.deepcopy(planner)  # the fixture's planner stays as exported
    cautious_planner.set_rule_params(vmax=3.0, dsafe=8.0)
    cautious = runtime.plan(sample, noise=noise)
    assert np.abs(cautious - base).max() > 1e-3
    _assert_poses_match(cautious, _torch_plan(cautious_planner, arrays, 0, noise))
    with pytest.raises(ValueError, match=r"unknown rule parameter\(s\) \['speed'\]"):
        runtime.set_rule_params(speed=1.0)


def test_planner_export_predicts_batches_with_padded_agents_and_lanes_like_torch(flow_export) -> None:
    planner, path = flow_export
    runtime = load_runtime(path)
    inputs = planner.export_spec().example_inputs(4, seed=9)  # random scenes: partly padded agents and lanes
    noise = inputs.pop("noise")
    want = planner.predict(inputs, noise).numpy()
    got = runtime.predict({k: v.numpy() for k, v in inputs.items()}, noise.numpy())
    assert got.shape == (4, planner.horizon, 4)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    # a sample with fewer agent slots is padded: the same plan as torch on the unpadded scene
    arrays = _scenes(planner, 1, seed=2, num_agents=3)
    z = np.random.default_rng(0).standard_normal((planner.horizon, 2), dtype=np.float32)
    _assert_poses_match(runtime.plan(scene_samples_from_arrays(arrays, 0), noise=z), _torch_plan(planner, arrays, 0, z))
    crowded = scene_samples_from_arrays(_scenes(planner, 1, seed=2, num_agents=20), 0)
    with pytest.raises(ValueError, match="20 agent slots, this export takes at most 16"):
        runtime.plan(crowded)
    with pytest.raises(ValueError, match=r"noise must have shape \(8, 2\)"):
        runtime.plan(scene_samples_from_arrays(arrays, 0), noise=np.zeros((8, 3)))


def test_planner_runtime_is_seeded_and_runs_without_torch(flow_export, tmp_path) -> None:
    planner, path = flow_export
    runtime = load_runtime(path, seed=0)
    sample = scene_samples_from_arrays(_scenes(planner, 1, seed=7), 0)
    first = runtime.plan(sample)
    runtime.reset(seed=0)
    np.testing.assert_array_equal(runtime.plan(sample), first)
    runtime.reset(seed=1)
    assert np.abs(runtime.plan(sample) - first).max() > 1e-4
    fields = {k: getattr(sample, k) for k in ("ego_status", "command", "ego_past", "agents_pose", "agents_valid",
                                               "agents_size", "agents_category", "lanes", "lanes_valid")}
    np.savez(tmp_path / "sample.npz", **fields)
    script = textwrap.dedent(
        """
        import json, sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is not installed on this car")

        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        from diffpilot.export.runtime import OnnxPlanner, load_runtime

        planner = load_runtime(sys.argv[1], seed=0)
        assert isinstance(planner, OnnxPlanner)
        poses = planner.plan(dict(np.load(sys.argv[2])))  # a mapping of the sample's arrays works as well
        assert "torch" not in sys.modules
        print(json.dumps(poses.tolist()))
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "sample.npz")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(json.loads(done.stdout.strip().splitlines()[-1]), first, atol=1e-6)


def test_meanflow_transformer_planner_with_raster_and_cfg_exports(tmp_path) -> None:
    planner = _trained_looking(STLFlowPlanner(objective="meanflow", sampler_steps=1, network="transformer",
                                              use_raster=True, param_dropout=0.2, cfg_scale=1.5, **TINY), seed=1)
    path = export_by_kind(planner, tmp_path / "meanflow.onnx", raster_size=32)
    runtime = load_runtime(path)
    assert isinstance(runtime, OnnxPlanner) and runtime.nfe == 1
    assert runtime.info.inputs[9] == "drivable" and runtime.raster_size == 32
    assert planner.export_spec(raster_size=32).inputs == runtime.info.inputs  # the spec names what the file takes
    arrays = _scenes(planner, 2, seed=4, raster_size=32)
    for i in range(2):
        noise = np.random.default_rng(10 + i).standard_normal((planner.horizon, 2), dtype=np.float32)
        want = _torch_plan(planner, arrays, i, noise, raster=True)
        _assert_poses_match(runtime.plan(scene_samples_from_arrays(arrays, i), noise=noise), want)


# --- refusals -------------------------------------------------------------------------------------


def test_configurations_without_an_onnx_form_are_refused_with_the_reason(tmp_path) -> None:
    path = tmp_path / "x.onnx"
    ddpm = build_policy({"name": "param_ddpm_planner", **TINY, "sampler": "ddpm", "num_train_steps": 4})
    with pytest.raises(ValueError, match=r"DDPMSampler, which draws fresh noise at every step \(4 steps\).*'ddim'"):
        export_by_kind(ddpm, path)
    dql = build_policy({"name": "dql", **policy_class("dql").TINY}, 5, 2)
    with pytest.raises(ValueError, match="picks among 50 candidates by Q"):
        export_by_kind(dql, path)
    vae = build_policy({"name": "conditional_vae_planner", **TINY})
    with pytest.raises(ValueError, match="sampler= does not apply to a 'conditional_vae_planner'"):
        export_by_kind(vae, path, {"name": "ddim", "num_steps": 2})
    with pytest.raises(ValueError, match="needs a DDPM objective"):
        export_by_kind(STLFlowPlanner(**TINY), path, {"name": "ddim", "num_steps": 2})
    with pytest.raises(ValueError, match="export sizes must be >= 1"):
        export_by_kind(STLFlowPlanner(**TINY), path, num_agents=0)
    mlp = build_policy({"name": "ego_status_mlp", **policy_class("ego_status_mlp").TINY})
    with pytest.raises(ValueError, match=r"'ego_status_mlp' policy has no ONNX export; exportable kinds: .*stl_flow_planner"):
        export_by_kind(mlp, path)
    assert not path.exists()
    # the command line says the same in one line, exit status 2
    ddpm.save(tmp_path / "ddpm")
    assert main(["export", f"checkpoint={tmp_path / 'ddpm'}"]) == 2
    assert not (tmp_path / "policy.onnx").exists()


# --- the runtime by kind ----------------------------------------------------------------------------


def test_load_runtime_picks_the_runtime_by_kind(flow_export, tmp_path) -> None:
    _, planner_path = flow_export
    torch.manual_seed(0)
    chunk = build_policy({"name": "chunk_diffusion", **policy_class("chunk_diffusion").TINY}, 5, 2)
    chunk.fit_normalizers(np.random.default_rng(0).normal(size=(50, 5)), np.random.default_rng(1).uniform(-1, 1, (50, 2)))
    chunk_path = export_by_kind(chunk.eval(), tmp_path / "chunk.onnx")
    runtime = load_runtime(chunk_path, seed=3)
    assert isinstance(runtime, OnnxChunkPolicy) and runtime.act(np.zeros(5, np.float32)).shape == (2,)
    assert isinstance(load_runtime(planner_path), OnnxPlanner)
    with pytest.raises(ExportedModelError, match="'planner' export, but OnnxChunkPolicy runs 'chunk_policy'.*load_runtime"):
        OnnxChunkPolicy(planner_path)
    with pytest.raises(ExportedModelError, match="'chunk_policy' export, but OnnxPlanner runs 'planner'"):
        OnnxPlanner(chunk_path)
    with pytest.raises(ExportedModelError, match="'denoiser' export \\(one network call\\)"):
        load_runtime(export_denoiser(chunk, tmp_path / "net.onnx"))
    model = onnx.load(str(chunk_path))
    for prop in model.metadata_props:
        if prop.key == "kind":
            prop.value = "teleporter"
    onnx.save(model, str(tmp_path / "future.onnx"))
    with pytest.raises(ExportedModelError, match="'teleporter' export; this runtime runs .*upgrade diffpilot"):
        load_runtime(tmp_path / "future.onnx")


def test_the_policy_layer_writes_the_kinds_the_runtime_reads() -> None:
    assert (RUNTIME_CHUNK, RUNTIME_PLANNER, RUNTIME_DENOISER) == (KIND_POLICY, KIND_PLANNER, KIND_DENOISER)
