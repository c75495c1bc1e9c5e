"""ONNX export and the torch-free runtime: parity with torch, self-checks, metadata, bad input, closed loop."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from diffpilot.export.onnx import (
    ExportCheckError,
    export_denoiser,
    export_policy,
    export_warm_start,
    quantize_dynamic_int8,
)
from diffpilot.export.runtime import EXPORT_FORMAT, ExportedModelError, OnnxChunkPolicy
from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy

OBS_DIM, ACTION_DIM, H, EXEC, TO = 6, 2, 8, 4, 2
UNET = {"name": "unet1d", "down_dims": [16, 32], "kernel_size": 3, "n_groups": 4}
TRANSFORMER = {"name": "transformer", "d_model": 32, "n_heads": 2, "n_layers": 1}
DDPM = {"name": "ddpm", "num_train_steps": 10, "clip_sample": 1.0}
OBS_LOW = np.array([0.5, 0.5, -3.0, -3.0, 0.5, 0.5], dtype=np.float32)
OBS_HIGH = np.array([3.5, 1.5, 3.0, 3.0, 3.5, 1.5], dtype=np.float32)


def make_policy(objective: dict, sampler: dict, network: dict = UNET, seed: int = 0) -> ChunkDiffusionPolicy:
    """A tiny policy with every weight perturbed (FiLM/last layers start at zero) and fitted normalizers."""
    torch.manual_seed(seed)
    policy = ChunkDiffusionPolicy(
        OBS_DIM, ACTION_DIM, obs_horizon=TO, action_horizon=H, exec_horizon=EXEC,
        network=network, objective=objective, sampler=sampler,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    rng = np.random.default_rng(seed)
    obs = rng.uniform(OBS_LOW, OBS_HIGH, (256, OBS_DIM))
    actions = rng.uniform(-1.0, 1.0, (256, ACTION_DIM)) * np.array([1.0, 0.5])
    policy.fit_normalizers(obs, actions)
    return policy.eval()


def observations(batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(OBS_LOW, OBS_HIGH, (batch, TO, OBS_DIM)).astype(np.float32)


def torch_actions(policy: ChunkDiffusionPolicy, obs: np.ndarray, noise: np.ndarray, step_noise=None) -> np.ndarray:
    with torch.no_grad():
        cond = policy.condition(torch.from_numpy(obs))
        sn = None if step_noise is None else torch.from_numpy(step_noise)
        sample = policy.sampler.sample(policy.net, torch.from_numpy(noise), cond, step_noise=sn).sample
        return policy.action_normalizer.unnormalize(sample).numpy()


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def ddim_export(tmp_path_factory) -> tuple[ChunkDiffusionPolicy, Path]:
    """DDPM-trained policy exported with DDIM-10: shared by the runtime tests."""
    policy = make_policy(DDPM, {"name": "ddpm"})
    path = export_policy(policy, tmp_path_factory.mktemp("ddim") / "policy.onnx", {"name": "ddim", "num_steps": 10})
    policy.set_sampler("ddim", num_steps=10)
    return policy, path


@pytest.fixture(scope="module")
def meanflow_policy() -> ChunkDiffusionPolicy:
    return make_policy({"name": "meanflow"}, {"name": "meanflow", "num_steps": 1})


# --- parity torch vs onnxruntime ----------------------------------------------------------


def test_ddim10_policy_matches_torch_and_is_described(ddim_export) -> None:
    policy, path = ddim_export
    runtime = OnnxChunkPolicy(path)
    obs, noise = observations(5, seed=1), np.random.default_rng(2).standard_normal((5, H, ACTION_DIM), dtype=np.float32)
    got = runtime.predict(obs, noise)
    want = policy.predict({"obs": torch.from_numpy(obs)}, torch.from_numpy(noise)).numpy()
    assert got.shape == (5, H, ACTION_DIM)
    assert np.abs(got - want).max() <= 1e-5
    assert want.std() > 1e-2  # a non-trivial function of obs and noise
    assert np.abs(runtime.predict(obs, noise + 0.5) - got).max() > 1e-3
    assert runtime.last_nfe == 10
    meta = metadata(path)
    assert meta["diffpilot_format"] == str(EXPORT_FORMAT)
    described = (meta["kind"], meta["form"], meta["inputs"], meta["outputs"])
    assert described == ("chunk_policy", "multi_step", "obs,noise", "actions")
    assert json.loads(meta["sampler"]) == {"name": "ddim", "num_steps": 10}
    sizes = [int(meta[k]) for k in ("obs_dim", "action_dim", "obs_horizon", "action_horizon", "exec_horizon", "nfe")]
    assert sizes == [OBS_DIM, ACTION_DIM, TO, H, EXEC, 10]
    assert float(meta["check_max_abs_error"]) <= 1e-5
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[""] >= 17
    assert not any(n.op_type.startswith("Random") for n in model.graph.node)  # noise only comes in as an input
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert not any(n.metadata_props for n in model.graph.node)  # no exporter stack traces shipped


def test_ddpm_ancestral_takes_step_noise(tmp_path) -> None:
    policy = make_policy({**DDPM, "num_train_steps": 2}, {"name": "ddpm"})
    path = export_policy(policy, tmp_path / "ddpm.onnx")
    runtime = OnnxChunkPolicy(path)
    assert runtime.session.get_inputs()[2].name == "step_noise"
    rng = np.random.default_rng(3)
    obs = observations(2, seed=3)
    noise = rng.standard_normal((2, H, ACTION_DIM), dtype=np.float32)
    step_noise = rng.standard_normal((2, 2, H, ACTION_DIM), dtype=np.float32)
    got = runtime.predict(obs, noise, step_noise)
    assert np.abs(got - torch_actions(policy, obs, noise, step_noise)).max() <= 1e-5
    assert np.abs(runtime.predict(obs, noise, step_noise * -1.0) - got).max() > 1e-4  # the step noise is used
    assert metadata(path)["step_noise_steps"] == "2"
    with pytest.raises(ValueError, match=r"step_noise must have shape \(2, 2, 8, 2\)"):
        runtime.predict(obs, noise, step_noise[:1])


def test_flow_euler_policy_matches_torch(tmp_path) -> None:
    policy = make_policy({"name": "flow"}, {"name": "euler", "num_steps": 2})
    runtime = OnnxChunkPolicy(export_policy(policy, tmp_path / "flow.onnx"))
    obs, noise = observations(4, seed=4), np.random.default_rng(4).standard_normal((4, H, ACTION_DIM), dtype=np.float32)
    want = torch_actions(policy, obs, noise)
    assert np.abs(runtime.predict(obs, noise) - want).max() <= 1e-5
    assert want.std() > 1e-2
    assert runtime.info.form == "multi_step" and runtime.nfe == 2


def test_meanflow_one_step_policy_matches_torch(tmp_path, meanflow_policy) -> None:
    runtime = OnnxChunkPolicy(export_policy(meanflow_policy, tmp_path / "meanflow.onnx"))
    obs, noise = observations(2, seed=5), np.random.default_rng(5).standard_normal((2, H, ACTION_DIM), dtype=np.float32)
    want = torch_actions(meanflow_policy, obs, noise)
    assert np.abs(runtime.predict(obs, noise) - want).max() <= 1e-5
    assert want.std() > 1e-2
    assert (runtime.info.form, runtime.nfe) == ("one_step", 1)


def test_meanflow_denoiser_has_r_and_matches_torch(tmp_path, meanflow_policy) -> None:
    import onnxruntime as ort

    path = export_denoiser(meanflow_policy, tmp_path / "denoiser.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "t", "cond", "r"]
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(2, H, ACTION_DIM, generator=g), torch.rand(2, generator=g)
    cond = torch.randn(2, TO * OBS_DIM, generator=g)
    r = t * 0.3
    with torch.no_grad():
        want = meanflow_policy.net(x, t, cond, r).numpy()
    (got,) = session.run(None, {"x": x.numpy(), "t": t.numpy(), "cond": cond.numpy(), "r": r.numpy()})
    assert np.abs(got - want).max() <= 1e-5
    meta = metadata(path)
    assert meta["kind"] == "denoiser" and json.loads(meta["objective"]) == {"name": "meanflow"}
    with pytest.raises(ExportedModelError, match="'denoiser' export, but OnnxChunkPolicy runs 'chunk_policy'"):
        OnnxChunkPolicy(path)


# --- the runtime's closed loop ---------------------------------------------------------------


def test_runtime_closed_loop_equals_torch_act(ddim_export) -> None:
    policy, path = ddim_export
    runtime = OnnxChunkPolicy(path)
    policy.reset(seed=7)
    runtime.reset(seed=7)
    g = torch.Generator().manual_seed(7)  # the torch policy draws its chunk noise this way after reset(seed=7)
    rng = np.random.default_rng(8)
    base = rng.uniform(OBS_LOW, OBS_HIGH)
    for step in range(3 * EXEC + 1):
        obs = (base + 0.05 * step).astype(np.float32)
        noise = torch.randn((1, H, ACTION_DIM), generator=g).numpy() if step % EXEC == 0 else None
        want = policy.act(obs)
        got = runtime.act(obs, noise)
        assert got.shape == (ACTION_DIM,)
        assert np.abs(got - want).max() <= 1e-5, step


def test_runtime_runs_where_torch_cannot_be_imported(ddim_export) -> None:
    _, path = ddim_export
    script = textwrap.dedent(
        """
        import json, sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is not installed on this robot")

        sys.meta_path.insert(0, NoTorch())
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the import block did not work")
        import numpy as np
        from diffpilot.export.runtime import OnnxChunkPolicy

        policy = OnnxChunkPolicy(sys.argv[1], seed=0)
        action = policy.act(np.full(6, 1.0, dtype=np.float32))
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        print(json.dumps([float(a) for a in action]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    here = OnnxChunkPolicy(path, seed=0).act(np.full(6, 1.0, dtype=np.float32))
    np.testing.assert_allclose(json.loads(done.stdout.strip().splitlines()[-1]), here, atol=1e-6)


def test_runtime_drives_a_mujoco_episode(ddim_export) -> None:
    from diffpilot.sim.runner import run_episodes
    from diffpilot.sim.tasks import get_task

    _, path = ddim_export
    (record,) = run_episodes(get_task("maze2d-umaze").make_env, OnnxChunkPolicy(path), 1, seed=0, progress=False)
    assert record.length == 300
    assert np.isfinite(record.observations).all()
    assert np.ptp(record.observations[:, :2], axis=0).max() > 1e-2  # the actions moved the point mass


# --- refusals and bad input -------------------------------------------------------------------


def test_export_writes_nothing_when_its_check_fails(tmp_path, meanflow_policy) -> None:
    path = tmp_path / "policy.onnx"
    path.write_bytes(b"previous export")
    # No tolerance at all demands float64-exact fp32 output, which no fp32 graph delivers.
    with pytest.raises(ExportCheckError, match="off the float64 result by"):
        export_policy(meanflow_policy, path, atol=0.0, rtol=0.0, fp32_slack=0.0)
    assert path.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.onnx"]


def test_sampler_override_must_fit_the_objective(tmp_path, meanflow_policy) -> None:
    with pytest.raises(ValueError, match="needs a DDPM objective"):
        export_policy(meanflow_policy, tmp_path / "x.onnx", {"name": "ddim", "num_steps": 4})
    assert not (tmp_path / "x.onnx").exists()


def test_runtime_names_a_foreign_export_format(tmp_path, ddim_export) -> None:
    _, path = ddim_export
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "diffpilot_format":
            prop.value = "99"
    onnx.save(model, str(tmp_path / "future.onnx"))
    with pytest.raises(ExportedModelError, match=rf"export format '99', but this runtime reads format {EXPORT_FORMAT}"):
        OnnxChunkPolicy(tmp_path / "future.onnx")
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "plain.onnx"))
    with pytest.raises(ExportedModelError, match="no 'diffpilot_format' metadata"):
        OnnxChunkPolicy(tmp_path / "plain.onnx")


def test_runtime_rejects_files_that_are_not_onnx(tmp_path) -> None:
    (tmp_path / "weights.onnx").write_text("this is not a protobuf")
    with pytest.raises(ExportedModelError, match="is not a loadable ONNX model"):
        OnnxChunkPolicy(tmp_path / "weights.onnx")
    with pytest.raises(FileNotFoundError, match="no exported model"):
        OnnxChunkPolicy(tmp_path / "missing.onnx")


def test_runtime_rejects_bad_observations(ddim_export) -> None:
    runtime = OnnxChunkPolicy(ddim_export[1])
    with pytest.raises(ValueError, match=r"expects an observation of shape \(6,\), got \(5,\)"):
        runtime.act(np.zeros(5))
    with pytest.raises(ValueError, match="non-finite observation"):
        runtime.act(np.array([0, 0, np.nan, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"shape \(B, 2, 6\), got \(3, 6\)"):
        runtime.predict(np.zeros((3, 6)))
    with pytest.raises(ValueError, match=r"noise must have shape \(1, 8, 2\), got \(1, 8, 3\)"):
        runtime.act(np.zeros(6), noise=np.zeros((8, 3)))
    with pytest.raises(ValueError, match="graph_optimization must be one of"):
        OnnxChunkPolicy(ddim_export[1], graph_optimization="max")


# --- int8 ------------------------------------------------------------------------------------


def test_int8_quantization_of_a_transformer_policy(tmp_path) -> None:
    policy = make_policy({"name": "flow"}, {"name": "euler", "num_steps": 1}, network=TRANSFORMER)
    fp32 = export_policy(policy, tmp_path / "fp32.onnx")
    int8 = quantize_dynamic_int8(fp32, tmp_path / "int8.onnx")
    assert int8.stat().st_size < fp32.stat().st_size
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"} and "ConvInteger" not in ops
    meta = metadata(int8)
    assert meta["quantization"] == "dynamic_int8_matmul_gemm" and meta["kind"] == "chunk_policy"
    obs, noise = observations(3, seed=9), np.random.default_rng(9).standard_normal((3, H, ACTION_DIM), dtype=np.float32)
    want = OnnxChunkPolicy(fp32).predict(obs, noise)
    got = OnnxChunkPolicy(int8).predict(obs, noise)
    error = np.abs(got - want).max()
    assert 0.0 < error < 0.05 * np.ptp(want)  # quantized, and still close to fp32
    assert float(meta["quantization_max_abs_error"]) > 0.0
    with pytest.raises(ExportCheckError, match="int8 outputs differ from fp32"):
        quantize_dynamic_int8(fp32, tmp_path / "strict.onnx", max_error=0.0)
    assert not (tmp_path / "strict.onnx").exists()


# --- the warm-start form -----------------------------------------------------------------------


@pytest.mark.parametrize("discrete_mode", ["clip", "scale"])
def test_warm_start_export_replays_torch_act_over_cold_and_warm_plans(tmp_path, discrete_mode) -> None:
    """One file runs the full denoise first and the 2-NFE warm start after, as the torch policy's act() does."""
    torch.manual_seed(3)
    policy = ChunkDiffusionPolicy(
        OBS_DIM, ACTION_DIM, obs_horizon=TO, action_horizon=H, exec_horizon=EXEC,
        network=UNET, objective=DDPM, sampler={"name": "ddim", "num_steps": 5},
        warm_start={"t_start": 0.4, "renoise": discrete_mode == "scale"},
        discrete_dims=[1], discrete_mode=discrete_mode,
    )
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    rng = np.random.default_rng(0)
    actions = np.c_[rng.uniform(-1, 1, 256), np.sign(rng.standard_normal(256))]
    policy.fit_normalizers(rng.uniform(OBS_LOW, OBS_HIGH, (256, OBS_DIM)), actions)
    policy.eval()
    path = export_warm_start(policy, tmp_path / "warm.onnx")
    meta = metadata(path)
    assert (meta["form"], meta["nfe"], meta["warm_nfe"]) == ("warm_start", "5", "2")
    runtime = OnnxChunkPolicy(path)
    policy.reset(seed=5)
    runtime.reset(seed=5)
    g = torch.Generator().manual_seed(5)
    nfes = []
    for step in range(3 * EXEC):
        obs = rng.uniform(OBS_LOW, OBS_HIGH).astype(np.float32)
        noise = torch.randn((1, H, ACTION_DIM), generator=g).numpy() if step % EXEC == 0 else None
        want, got = policy.act(obs), runtime.act(obs, noise)
        if step % EXEC == 0:
            nfes.append((policy.last_nfe, runtime.last_nfe))
        assert np.abs(got - want).max() <= 1e-4, step
        assert got[1] in (-1.0, 1.0)
    assert nfes == [(5, 5), (2, 2), (2, 2)]
    runtime.reset()
    runtime.act(obs)
    assert runtime.last_nfe == 5  # reset forgets the previous chunk


def test_warm_start_export_needs_a_warm_start_config_and_a_deterministic_sampler(tmp_path) -> None:
    policy = make_policy(DDPM, {"name": "ddpm"})
    with pytest.raises(ValueError, match="no warm_start config"):
        export_warm_start(policy, tmp_path / "w.onnx")
    with pytest.raises(ValueError, match="deterministic sampler"):
        export_warm_start(policy, tmp_path / "w.onnx", {"t_start": 0.3})
    assert not (tmp_path / "w.onnx").exists()
