"""The policy contract, checked for every registered kind: a new kind is tested by registering it.

For each kind: a tiny build; a finite loss that backpropagates into every
optimizer group; ``predict`` deterministic given its noise and seed; save ->
load (by stored kind) bit-exact; ``act``/``plan`` shapes; an ONNX round trip
where the kind is exportable, run by the runtime ``load_runtime`` picks (for a
driving kind, ``plan`` compared with torch ``predict`` on the same scene and
noise), and a clear refusal where it is not; and a resumed training run that
equals an uninterrupted one.
"""

from __future__ import annotations

import csv

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffpilot.policy.checkpoint import CheckpointError
from diffpilot.policy.registry import POLICIES, build_policy, load_policy, policy_class, policy_options
from diffpilot.train import TensorRows, TrainerConfig, train

KINDS = sorted(POLICIES)
OBS_DIM, ACT_DIM = 5, 2


def _build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    policy = build_policy({"name": kind, **policy_class(kind).TINY}, OBS_DIM, ACT_DIM)
    gen = torch.Generator().manual_seed(seed)
    data = policy.example_batch(64, gen)
    policy.fit_to_batch(data)
    return policy, data


def test_the_registry_holds_every_policy_family():
    assert {"chunk_diffusion", "dql", "ofql", "flow_bc", "diffusion_bc"} <= set(KINDS)
    with pytest.raises(ValueError, match="unknown policy kind 'nope'.*chunk_diffusion"):
        policy_class("nope")


@pytest.mark.parametrize("kind", KINDS)
def test_config_maps_one_to_one_and_refuses_unknown_keys(kind):
    _, options = policy_options({"name": kind})
    assert set(options) == {f for f in policy_class(kind).Config.__dataclass_fields__}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['not_a_key'\]"):
        policy_options({"name": kind, "not_a_key": 1})


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_finite_and_reaches_every_optimizer_group(kind):
    policy, data = _build(kind)
    loss, metrics = policy.compute_loss(data, torch.Generator().manual_seed(1))
    assert loss.ndim == 0 and torch.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
    loss.backward()
    for name, group in policy.optim_groups().items():
        grads = [p.grad for p in group.params if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"group {name!r} got no gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_predict_is_deterministic_given_noise_and_seed(kind):
    policy, data = _build(kind)
    policy.eval()
    batch = {k: v[:3] for k, v in data.items()}
    noise = torch.randn(policy.noise_shape(3), generator=torch.Generator().manual_seed(2))
    policy.reset(seed=4)
    a = policy.predict(batch, noise)
    policy.reset(seed=4)
    b = policy.predict(batch, noise.clone())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(a).all() and a.shape[0] == 3


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_by_stored_kind_is_bit_exact_and_acts_alike(kind, tmp_path):
    policy, data = _build(kind)
    policy.eval().save(tmp_path / "p")
    loaded = load_policy(tmp_path / "p")
    assert type(loaded) is type(policy)
    for key, value in policy.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    policy.reset(seed=1)
    loaded.reset(seed=1)
    if hasattr(policy, "plan"):  # driving: plan() from a scene sample, (F, 3) ego-frame poses
        from test_driving_baselines import make_sample

        for speed in (0.0, 7.0):
            plan = policy.plan(make_sample(speed=speed))
            assert plan.ndim == 2 and plan.shape[1] == 3 and np.isfinite(plan).all()
            np.testing.assert_array_equal(plan, loaded.plan(make_sample(speed=speed)))
        return
    if hasattr(policy, "example_observation"):  # language-instructed: an observation dict, its own action size
        rng = np.random.default_rng(0)
        obs = [policy.example_observation(rng) for _ in range(6)]
        act_dim = policy.action_dim
    else:
        obs = list(np.random.default_rng(0).normal(size=(6, OBS_DIM)).astype(np.float32))
        act_dim = ACT_DIM
    acts = np.stack([policy.act(o) for o in obs])
    assert acts.shape == (6, act_dim) and np.isfinite(acts).all()
    np.testing.assert_array_equal(acts, np.stack([loaded.act(o) for o in obs]))
    other = next(k for k in KINDS if k != kind)
    policy.reset(seed=1)
    with pytest.raises(CheckpointError, match=f"holds a '{kind}' policy, but a '{other}'"):
        load_policy(tmp_path / "p", kind=other)


@pytest.mark.parametrize("kind", KINDS)
def test_export_round_trip_where_the_kind_is_exportable(kind, tmp_path):
    from diffpilot.export.onnx import export_by_kind
    from diffpilot.export.runtime import OnnxChunkPolicy, OnnxPlanner, load_runtime

    policy, data = _build(kind)
    policy.eval()
    path = tmp_path / "p.onnx"
    if not policy.EXPORTABLE:
        with pytest.raises(ValueError, match=r"no ONNX export|needs the critic|fresh noise"):
            export_by_kind(policy, path)
        assert not path.exists()
        return
    export_by_kind(policy, path)
    runtime = load_runtime(path)
    if hasattr(policy, "plan"):  # driving: the runtime's plan of a scene is torch predict's with the same noise
        from diffpilot.data.scenario import SampleSpec
        from diffpilot.data.scene_sample import example_scene_arrays, scene_samples_from_arrays

        assert isinstance(runtime, OnnxPlanner)
        arrays = example_scene_arrays(2, seed=3, spec=SampleSpec(past_steps=runtime.past_steps, future_steps=runtime.horizon))
        for i in range(2):
            sample = scene_samples_from_arrays(arrays, i)
            noise = np.random.default_rng(i).standard_normal(runtime.noise_shape, dtype=np.float32)
            feeds = runtime.feeds(sample, noise=noise)  # the graph's inputs: predict's batch format
            batch = {k: torch.from_numpy(v) for k, v in feeds.items() if k != "noise"}
            want = policy.predict(batch, torch.from_numpy(noise)[None])[0].double().numpy()
            got = runtime.plan(sample, noise=noise)
            assert got.shape == (runtime.horizon, 3) and np.isfinite(got).all()
            np.testing.assert_allclose(got[:, :2], want[:, :2], atol=1e-4, rtol=1e-5)
            assert np.abs(np.angle(np.exp(1j * (got[:, 2] - want[:, 2])))).max() < 1e-4
        return
    if hasattr(policy, "example_observation"):  # the runtime's chunk is torch's for the same observation and noise
        rng = np.random.default_rng(0)
        for _ in range(2):
            o = policy.example_observation(rng)
            noise = rng.standard_normal(policy.noise_shape(1)).astype(np.float32)
            policy.reset(seed=0)
            runtime.reset(seed=0)
            batch = policy.observation_batch(o)
            want = policy.predict(batch, torch.from_numpy(noise))[0].numpy()
            np.testing.assert_allclose(runtime.plan_chunk(o, noise=noise), want, atol=1e-4, rtol=1e-4)
        return
    assert isinstance(runtime, OnnxChunkPolicy)
    obs = np.random.default_rng(0).normal(size=(OBS_DIM,)).astype(np.float32)
    runtime.reset(seed=0)
    assert runtime.act(obs).shape == (ACT_DIM,)


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_training_equals_an_uninterrupted_run(kind, tmp_path):
    cfg = TrainerConfig(steps=12, batch_size=16, log_every=3, ckpt_every=5, progress=False, seed=7)
    if not policy_class(kind).OWN_TRAIN_KEYS:
        cfg.warmup_steps = 2

    def run(out: Path, interrupt_at: int | None = None):
        policy, data = _build(kind)
        source = TensorRows(data)

        def on_step(step, metrics):
            if step == interrupt_at:
                raise KeyboardInterrupt

        return train(policy, source, cfg, out, on_step=on_step)

    run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", interrupt_at=8)  # after the step-5 checkpoint
    resumed = run(tmp_path / "cut")
    assert resumed.steps == 12
    full = load_file(tmp_path / "full" / "policy" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "policy" / "model.safetensors")
    assert full.keys() == cut.keys()
    for key in full:
        torch.testing.assert_close(full[key], cut[key], rtol=0, atol=0, msg=key)
    logs = {}
    for name in ("full", "cut"):
        with open(tmp_path / name / "train_log.csv") as f:
            logs[name] = list(csv.DictReader(f))
    cut_seconds = [float(row.pop("train_s")) for row in logs["cut"]]
    [row.pop("train_s") for row in logs["full"]]  # wall clock: the one column allowed to differ
    assert logs["full"] == logs["cut"]
    assert cut_seconds == sorted(cut_seconds) and cut_seconds[0] > 0  # training time adds up across the resume


def test_every_policy_yaml_maps_one_to_one_onto_its_config():
    import dataclasses

    import yaml

    from diffpilot.cli import load_config

    conf = Path(__file__).resolve().parent.parent / "diffpilot" / "conf" / "policy"
    seen = set()
    for path in sorted(conf.glob("*.yaml")):
        cfg = load_config("train", [f"policy={path.stem}"])["policy"]  # composed as the CLI composes it
        kind, _ = policy_options(cfg)
        fields = {f.name for f in dataclasses.fields(policy_class(kind).Config)}
        assert set(cfg) - {"name", "per_task"} == fields, path.name
        assert yaml.safe_load(path.read_text())  # not empty
        seen.add(kind)
    assert seen == set(KINDS)  # every registered kind has a YAML
