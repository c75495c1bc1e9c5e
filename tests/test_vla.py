"""DiffusionVLA: vocabulary, cached decoding, injection, and the whole path on real MT10 demonstrations.

The end-to-end test generates a small real demonstration file (Meta-World
scripted experts, rendered frames), trains a small policy through
``diffpilot train``, evaluates it closed loop with user-supplied phrasings
through ``diffpilot eval``, exports it with ``diffpilot export`` and drives
the exported graphs with the torch-free runtime.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffpilot.cli import main
from diffpilot.data.mt10 import generate_mt10, load_mt10
from diffpilot.policy.diffusion_vla import DiffusionVLAPolicy
from diffpilot.policy.registry import load_policy
from diffpilot.policy.text import WordVocab, words
from diffpilot.vla_jobs import task_balanced_weights

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")

TASKS = ["reach", "drawer-close"]
SMALL_POLICY = ["policy.image_size=32", "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2",
                "policy.network.down_dims=[16,32]", "policy.action_horizon=8", "policy.exec_horizon=4",
                "policy.reason_every=2", "policy.objective.num_train_steps=20", "policy.sampler.num_steps=3"]


def _small(**kw) -> DiffusionVLAPolicy:
    opts = dict(DiffusionVLAPolicy.TINY) | kw
    torch.manual_seed(0)
    policy = DiffusionVLAPolicy(**opts)
    policy.fit_to_batch(policy.example_batch(32, torch.Generator().manual_seed(0)))
    return policy.eval()


def test_vocabulary_maps_unknown_words_to_unk_and_never_fails():
    vocab = WordVocab.build(["pick the puck ; the puck is near", "open the drawer"])
    assert words("Open the DRAWER, now;") == ["open", "the", "drawer", ",", "now", ";"]
    ids = vocab.encode("open the fridge ; quickly")
    assert ids.count(vocab.unk) == 2 and vocab.decode(ids) == "open the ;"
    assert vocab.encode("") == [] and vocab.unknown_fraction("fridge door") == 1.0
    assert vocab.decode([*vocab.encode("pick the puck"), vocab.eos, *vocab.encode("drawer")]) == "pick the puck"
    with pytest.raises(ValueError, match="special tokens"):
        WordVocab(["a", "b"])


def test_cached_greedy_decoding_equals_decoding_by_full_passes():
    policy = _small(max_reasoning=8)
    batch = policy.example_batch(3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        prefix, ignore = policy.prefix(batch)
        cached = policy.generate(prefix, ignore)
        # reference: one full forward per token, argmax of the last position
        text = cached[:, :1]
        for _ in range(policy.config["max_reasoning"] - 1):
            hidden = policy.reasoner(prefix, ignore, text, torch.zeros_like(text, dtype=torch.bool))
            text = torch.cat([text, policy.reasoner.logits(hidden[:, -1]).argmax(-1, keepdim=True)], dim=1)
    for row in range(3):
        want = text[row, 1:].tolist()
        got = cached[row, 1:].tolist()
        n = want.index(policy.vocab.eos) if policy.vocab.eos in want else len(want)
        assert got[:n] == want[:n]


def test_injection_starts_blind_to_reasoning_and_then_reads_it():
    policy = _small()
    batch = policy.example_batch(2, torch.Generator().manual_seed(2))
    other = batch["text"].roll(1, dims=0)
    with torch.no_grad():
        prefix, ignore = policy.prefix(batch)
        a, _ = policy.condition(prefix, ignore, batch["text"], batch["low_dim"])
        b, _ = policy.condition(prefix, ignore, other, batch["low_dim"])
        torch.testing.assert_close(a, b)  # zero-initialized FiLM: reasoning has no effect yet
        torch.nn.init.normal_(policy.inject.scale.weight, std=0.5)
        a, _ = policy.condition(prefix, ignore, batch["text"], batch["low_dim"])
        b, _ = policy.condition(prefix, ignore, other, batch["low_dim"])
    assert (a - b).abs().max() > 1e-3


def test_spatial_softmax_reads_where_a_spot_is():
    from diffpilot.policy.diffusion_vla import SpatialSoftmax

    soft = SpatialSoftmax(channels=1, keypoints=1)
    with torch.no_grad():
        soft.maps.weight.fill_(1.0)
        soft.maps.bias.zero_()
        soft.log_temperature.fill_(4.0)
    spot = torch.zeros(2, 1, 9, 17)
    spot[0, 0, 2, 12] = 1.0  # row 2 of 9 -> y = -0.5; column 12 of 17 -> x = 0.5
    spot[1, 0, 8, 0] = 1.0  # bottom-left corner -> (-1, 1)
    xy = soft(spot)[:, 0]
    torch.testing.assert_close(xy, torch.tensor([[0.5, -0.5], [-1.0, 1.0]]), atol=0.02, rtol=0)


def test_keypoint_policy_exports_and_the_runtime_matches_torch(tmp_path):
    from diffpilot.export.onnx import export_by_kind
    from diffpilot.export.runtime import load_runtime

    policy = _small(keypoints=4)
    assert policy.prefix_len == _small().prefix_len + 1  # the keypoint token joins the prefix
    with torch.no_grad():
        torch.nn.init.normal_(policy.inject.scale.weight, std=0.5)
    export_by_kind(policy, tmp_path / "kp.onnx")
    runtime = load_runtime(tmp_path / "kp.onnx")
    obs = policy.example_observation(np.random.default_rng(3))
    noise = np.random.default_rng(4).standard_normal((1, policy.action_horizon, 4)).astype(np.float32)
    got = runtime.plan_chunk(obs, noise=noise)
    want = policy.predict(policy.observation_batch(obs), torch.from_numpy(noise))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)
    with torch.no_grad():  # the keypoint token reaches the head's condition, and a shifted image moves it
        conds = [policy.condition(*policy.prefix(policy.observation_batch(o)), None, torch.zeros(1, 7))[0]
                 for o in (obs, {**obs, "image": np.roll(obs["image"], 5, axis=1)})]
    d = policy.config["d_model"]
    assert conds[0].shape[-1] == 2 * d + 7 and (conds[0][:, -d:] - conds[1][:, -d:]).abs().max() > 1e-4


def _fit_object(policy: DiffusionVLAPolicy, seed: int, steps: int) -> tuple[dict, float, float]:
    """Train on one random batch; returns it and the first and last logged ``object_loss``."""
    g = torch.Generator().manual_seed(seed)
    batch = policy.example_batch(16, g)
    policy.fit_to_batch(batch)
    policy.train()
    opt = torch.optim.Adam(policy.parameters(), 3e-3)
    losses = []
    for _ in range(steps):
        loss, metrics = policy.compute_loss(batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(metrics["object_loss"])
    return batch, losses[0], losses[-1]


def test_object_probe_learns_where_the_object_is_and_stays_out_of_the_plan():
    policy = _small(object_loss=1.0)
    batch, first, last = _fit_object(policy, seed=6, steps=40)
    assert last < 0.6 * first  # logged on its own, and it learns
    with pytest.raises(ValueError, match="object positions"):
        policy.fit_to_batch({k: v for k, v in batch.items() if k != "object"})
    assert _small().object_head is None and not any("object" in k for k in _small().state_dict())


def test_image_object_estimate_feeds_the_head_and_reads_only_the_image(tmp_path):
    from diffpilot.export.onnx import export_by_kind
    from diffpilot.export.runtime import load_runtime

    with pytest.raises(ValueError, match="object_input=true"):
        _small(object_input=True)  # no object_loss: the estimate would never learn
    policy = _small(object_loss=1.0, object_input=True, object_noise=0.01, image_shift=0)  # random images: no shift
    batch, first, last = _fit_object(policy, seed=7, steps=80)
    assert last < 0.5 * first, (first, last)
    policy.zero_grad()  # the action loss alone never moves the estimate: the head reads it detached
    policy.objective.loss(policy.head, policy.action_normalizer.normalize(batch["action"]),
                          policy.condition(*policy.prefix(batch), batch["text"], batch["low_dim"])[0]).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in policy.object_head.parameters())
    policy.eval()
    obs = policy.example_observation(np.random.default_rng(3))
    with torch.no_grad():
        est = [policy.object_estimate(policy.prefix(policy.observation_batch(o))[0])
               for o in (obs, {**obs, "proprio": obs["proprio"] + 0.3}, {**obs, "image": np.roll(obs["image"], 5, 1)})]
        cond = policy.condition(*policy.prefix(policy.observation_batch(obs)), None, torch.zeros(1, 7))[0]
    torch.testing.assert_close(est[0], est[1])  # the hand's position does not enter the estimate
    assert (est[0] - est[2]).abs().max() > 1e-4 and cond.shape[-1] == policy.config["d_model"] + 7 + 3
    torch.testing.assert_close(cond[:, -3:], est[0])  # eval: the head reads the estimate itself, no jitter
    export_by_kind(policy, tmp_path / "obj.onnx")
    noise = np.random.default_rng(4).standard_normal((1, policy.action_horizon, 4)).astype(np.float32)
    got = load_runtime(tmp_path / "obj.onnx").plan_chunk(obs, noise=noise)
    want = policy.predict(policy.observation_batch(obs), torch.from_numpy(noise))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)


def test_bad_observations_get_clear_errors():
    policy = _small()
    obs = policy.example_observation(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"RGB image of shape \(32, 32, 3\)"):
        policy.act({**obs, "image": np.zeros((64, 64, 3), np.uint8)})
    with pytest.raises(ValueError, match=r"RGB image of shape"):
        policy.act({**obs, "image": np.zeros((32, 32), np.uint8)})
    with pytest.raises(ValueError, match="lacks"):
        policy.act({k: v for k, v in obs.items() if k != "instruction"})
    action = policy.act({**obs, "instruction": "zzz qqq ; unseen words everywhere"})  # unknown words: <unk>
    assert action.shape == (4,) and np.isfinite(action).all()
    onehot = _small(instruction="onehot", tasks=["reach", "push"])
    with pytest.raises(ValueError, match="unknown task 'fly'"):
        onehot.act({**obs, "task": "fly"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vla")
    data = generate_mt10(root / "demos.hdf5", episodes_per_task=2, image_size=32, obs_every=4, tasks=TASKS,
                         progress=False)
    out = root / "run"
    rc = main(["train", "policy=diffusion_vla", f"data.path={data}", "data.balance_tasks=true", f"out={out}",
               *SMALL_POLICY,
               "train.steps=150", "train.batch_size=32", "train.lr=3e-3", "train.log_every=25", "train.ckpt_every=150",
               "progress=false"])
    assert rc == 0
    return {"root": root, "data": data, "out": out}


def test_training_learns_the_reasoning_and_the_actions(trained):
    with open(trained["out"] / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    first, last = rows[0], rows[-1]
    assert {"action_loss", "reasoning_ce", "loss"} <= set(first)  # both terms logged on their own
    assert float(last["reasoning_ce"]) < 0.5 * float(first["reasoning_ce"])
    assert float(last["action_loss"]) < float(first["action_loss"])
    policy = load_policy(trained["out"] / "policy")
    demos = load_mt10(trained["data"])
    assert policy.tasks == demos.tasks and set(words(demos.reasoning[0])) <= set(policy.vocab.tokens)


def test_balanced_tasks_weigh_every_task_alike(trained):
    demos = load_mt10(trained["data"])
    task = demos.task[demos.observed_rows]
    assert np.bincount(task).min() < np.bincount(task).max()  # reach episodes are shorter than drawer-close ones
    weights = task_balanced_weights(demos)
    mass = np.bincount(task, weights=weights)
    np.testing.assert_allclose(mass, mass[0])


def test_eval_with_user_phrasings_and_the_exported_runtime(trained, tmp_path):
    phrasings = tmp_path / "mine.yaml"
    phrasings.write_text(yaml.safe_dump({"reach": ["go touch the target spot"], "drawer-close": ["shove the drawer in"]}))
    out = tmp_path / "eval"
    rc = main(["eval", f"checkpoint={trained['out'] / 'policy'}", f"sim.instructions={phrasings}", "sim.episodes=1",
               "sim.max_steps=24", f"out={out}", "progress=false"])
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert [e["instruction"] for e in result["episodes"]] == ["go touch the target spot", "shove the drawer in"]
    assert set(result["summary"]["per_task"]) == set(TASKS)
    assert result["summary"]["reasoning_accuracy"] is not None and result["summary"]["decisions_per_s"] > 0

    gt = tmp_path / "gt"
    assert main(["eval", f"checkpoint={trained['out'] / 'policy'}", "sim.given_reasoning=true", "sim.tasks=[reach]",
                 "sim.episodes=1", "sim.max_steps=8", f"out={gt}", "progress=false"]) == 0
    episode = json.loads((gt / "eval.json").read_text())["episodes"][0]
    assert episode["last_reasoning"].startswith("reach for the goal ;")  # the expert's annotation, read in

    onnx = tmp_path / "vla.onnx"
    assert main(["export", f"checkpoint={trained['out'] / 'policy'}", f"out={onnx}"]) == 0
    assert onnx.is_file() and (tmp_path / "vla.prefill.onnx").is_file() and (tmp_path / "vla.step.onnx").is_file()
    from diffpilot.export.runtime import OnnxVLAPolicy, load_runtime
    from diffpilot.sim.mt10 import MT10Env

    runtime = load_runtime(onnx)
    assert isinstance(runtime, OnnxVLAPolicy)
    policy = load_policy(trained["out"] / "policy")
    with MT10Env("reach", image_size=32, max_steps=10) as env:
        obs = {**env.reset(seed=5), "instruction": "reach the goal"}
    noise = np.random.default_rng(0).standard_normal((1, 8, 4)).astype(np.float32)
    policy.reset()
    got = runtime.plan_chunk(obs, noise=noise)
    want = policy.predict(policy.observation_batch(obs), torch.from_numpy(noise))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match=r"lacks \['image'\]"):
        runtime.plan_chunk({**obs, "image": None})
    with pytest.raises(ValueError, match=r"RGB image of shape \(32, 32, 3\)"):
        runtime.plan_chunk({**obs, "image": np.zeros((32, 32, 4), np.uint8)})
    assert runtime.last_reasoning and runtime.last_reasoning == policy.vocab.decode(
        policy.generate(*policy.prefix(policy.observation_batch(obs)))[0, 1:].tolist())


def test_user_mistakes_exit_2_and_write_nothing(trained, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"fly-to-moon": ["fly"]}))
    out = tmp_path / "eval"
    assert main(["eval", f"checkpoint={trained['out'] / 'policy'}", f"sim.instructions={bad}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'fly-to-moon'" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert main(["eval", f"checkpoint={tmp_path / 'nope'}", "sim.instructions=heldout"]) == 2
    assert "no saved policy" in capsys.readouterr().err
    assert main(["train", "policy=diffusion_vla", "data=maze2d-umaze", f"out={tmp_path / 'x'}"]) == 2
    assert "diffusion_vla trains on data=mt10" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["train", "policy=diffusion_vla", f"data.path={trained['data']}", "data.balance_tasks=sometimes",
                 f"out={tmp_path / 'y'}"]) == 2
    assert "data.balance_tasks must be true or false" in capsys.readouterr().err and not (tmp_path / "y").exists()
