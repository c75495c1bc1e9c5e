"""DQL, OFQL and the BC references: real short training runs on maze2d data generated in MuJoCo."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffpilot.data.errors import DatasetError
from diffpilot.data.maze2d import generate_maze2d
from diffpilot.policy.base import Policy
from diffpilot.policy.bc import DiffusionBCPolicy, FlowBCPolicy
from diffpilot.policy.checkpoint import CheckpointError
from diffpilot.policy.dql import DQLPolicy
from diffpilot.policy.ofql import OFQLPolicy
from diffpilot.policy.registry import POLICIES, load_policy
from diffpilot.train import TrainerConfig
from diffpilot.train.offline_rl import OFFLINE_RL_KINDS, load_policy_yaml, train_offline_rl

SMALL = {"network": {"hidden": 48, "depth": 2}, "critic": {"hidden": 48, "depth": 2, "discount": 0.9}, "ema": {"start": 40}}
TRAINER = TrainerConfig(batch_size=64, log_every=25, ckpt_every=100, progress=False)


def _small(name: str) -> dict:
    opts = {k: v for k, v in SMALL.items() if k != "critic" or name in ("dql", "ofql")}
    if name == "dql":
        opts["action_selection"] = {"samples": 8, "mode": "softmax"}
    return opts


@pytest.fixture(scope="module")
def maze_data():
    # dense reward: every transition carries signal, so a few hundred steps show learning
    return generate_maze2d("umaze", 2500, seed=0, episode_len=300, reward="dense", progress=False, reference_episodes=2)


@pytest.fixture(scope="module")
def runs(maze_data, tmp_path_factory):
    """One short run per policy; the actor-critic ones evaluate closed loop once at the end."""
    out = {}
    for name, steps in (("dql", 200), ("ofql", 200), ("flow_bc", 150), ("diffusion_bc", 150)):
        folder = tmp_path_factory.mktemp(name)
        episodes = 1 if name in ("dql", "ofql") else 0
        summary = train_offline_rl(name, maze_data, "maze2d-umaze", folder, steps=steps, eval_every=0,
                                   eval_episodes=episodes, seed=0, config=TRAINER, policy_config=_small(name))
        out[name] = (folder, summary)
    return out


def _log(folder: Path) -> list[dict[str, str]]:
    with open(folder / "train_log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", ["dql", "ofql"])
def test_td_error_falls_and_actor_q_rises(runs, name):
    folder, summary = runs[name]
    log = _log(folder)
    td = [float(r["critic_td_loss"]) for r in log]
    q = [float(r["q_mean"]) for r in log]
    bc = [float(r["actor_bc_loss"]) for r in log]
    assert td[-1] < 0.6 * td[0], td
    assert q[-1] > q[0] + 0.1, q
    assert bc[-1] < bc[0], bc
    # closed-loop evaluation ran through the runner with the data set's reference scores
    assert log[-1]["eval_normalized_score"] != ""
    assert summary["reference_source"].startswith("stored in the data set")
    assert summary["best_step"] == 200 and Path(summary["best"]).is_dir()
    assert (folder / "curves.png").stat().st_size > 1000


def test_bc_references_learn_without_critic(runs):
    for name in ("flow_bc", "diffusion_bc"):
        folder, _ = runs[name]
        log = _log(folder)
        assert float(log[-1]["actor_bc_loss"]) < float(log[0]["actor_bc_loss"])
        assert "critic_td_loss" not in log[0]  # the log has the columns the policy reports


@pytest.mark.parametrize("name", sorted(OFFLINE_RL_KINDS))
def test_checkpoint_loads_and_acts_identically(runs, maze_data, name):
    folder, _ = runs[name]
    a = load_policy(folder / "policy")
    b = load_policy(folder / "policy")
    assert type(a) is POLICIES[name]
    obs = np.concatenate([maze_data.observations, maze_data.infos["goal"]], axis=1)[:20]
    a.reset(seed=5)
    b.reset(seed=5)
    acts_a = np.stack([a.act(o) for o in obs])
    acts_b = np.stack([b.act(o) for o in obs])
    np.testing.assert_array_equal(acts_a, acts_b)
    assert np.abs(acts_a).max() <= 1.0 + 1e-5  # inside the data's action range
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    batch = {"obs": torch.from_numpy(obs[:4])}
    torch.testing.assert_close(a.predict(batch, noise), b.predict(batch, noise), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        a.act(np.zeros(3, np.float32))


@pytest.mark.parametrize("name", sorted(OFFLINE_RL_KINDS))
def test_trained_policy_saves_and_loads_exactly(maze_data, tmp_path, name):
    cls = POLICIES[name]
    torch.manual_seed(0)
    policy = cls(6, 2, **_small(name))
    obs = np.concatenate([maze_data.observations, maze_data.infos["goal"]], axis=1)
    policy.fit_normalizers(obs, maze_data.actions)
    groups = policy.optim_groups()
    opts = {k: torch.optim.Adam(g.params, lr=g.lr) for k, g in groups.items()}
    gen = torch.Generator().manual_seed(0)
    goal = maze_data.infos["goal"][:64]  # the first 64 rows lie inside one episode
    batch = {"obs": torch.from_numpy(obs[:64]),
             "next_obs": torch.from_numpy(np.concatenate([maze_data.next_observations[:64], goal], 1)),
             "action": torch.from_numpy(maze_data.actions[:64]), "reward": torch.from_numpy(maze_data.rewards[:64]),
             "done": torch.zeros(64)}
    for step in range(3):
        policy.train_step(batch, opts, groups, step, gen)
    policy.eval().save(tmp_path / "p")
    loaded = load_policy(tmp_path / "p")
    assert isinstance(loaded, Policy)
    for key, value in policy.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    policy.reset(seed=9)
    loaded.reset(seed=9)
    np.testing.assert_array_equal(np.stack([policy.act(o) for o in obs[:10]]), np.stack([loaded.act(o) for o in obs[:10]]))
    other = OFQLPolicy if name != "ofql" else DQLPolicy
    with pytest.raises(CheckpointError, match=f"holds a '{name}'"):
        other.load(tmp_path / "p")


def test_ofql_acts_in_one_network_evaluation(runs, maze_data):
    obs = np.concatenate([maze_data.observations, maze_data.infos["goal"]], axis=1)[0]
    counts = {}
    for name, expected in (("ofql", 1), ("dql", 5)):
        policy = load_policy(runs[name][0] / "policy")
        calls = []
        hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in (policy.actor, policy.actor_ema)]
        policy.reset(seed=0)
        policy.act(obs)
        for h in hooks:
            h.remove()
        counts[name] = len(calls)
        assert policy.last_nfe == expected
    assert counts == {"ofql": 1, "dql": 5}


def test_meanflow_jvp_target_matches_finite_difference():
    torch.manual_seed(0)
    policy = OFQLPolicy(5, 3, network={"hidden": 32, "depth": 2}, critic={"hidden": 16, "depth": 1}).double()
    with torch.no_grad():  # leave the zero-initialized output layer: u must depend on its inputs
        for p in policy.actor.parameters():
            p.add_(0.3 * torch.randn_like(p))
    b = 6
    z, v, cond = torch.randn(b, 3, dtype=torch.float64), torch.randn(b, 3, dtype=torch.float64), torch.randn(b, 5, dtype=torch.float64)
    t = torch.rand(b, dtype=torch.float64) * 0.8 + 0.1
    r = t * torch.rand(b, dtype=torch.float64)
    u, u_tgt = policy.meanflow_target(z, r, t, v, cond)
    # the network's sinusoidal time features are computed in float32 even in a float64 model, so the
    # step must be large enough for float32 times; the central difference's own error is O(eps^2)
    eps = 1e-3
    with torch.no_grad():
        plus = policy.actor(z + eps * v, t + eps, cond, r)
        minus = policy.actor(z - eps * v, t - eps, cond, r)
        dudt = (plus - minus) / (2 * eps)
        expected = v - (t - r)[:, None] * dudt
        torch.testing.assert_close(u, policy.actor(z, t, cond, r))
    assert dudt.abs().max() > 1e-3  # a non-trivial derivative was checked
    torch.testing.assert_close(u_tgt, expected, rtol=1e-3, atol=1e-4)


def test_actor_loss_gives_the_critic_no_gradient_and_arch_is_checked():
    torch.manual_seed(0)
    for name, cls in (("dql", DQLPolicy), ("ofql", OFQLPolicy)):
        policy = cls(4, 2, **_small(name))
        batch = policy.normalize_batch(policy.example_batch(16, torch.Generator().manual_seed(0)))
        loss, _ = policy.actor_loss(batch["obs"], batch["action"], torch.Generator().manual_seed(1))
        loss.backward()
        assert all(p.grad is None for p in policy.critic.parameters()), name  # the critic step owns the critic
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.actor.net.parameters()), name
    # The actor's gradient is Diffusion-QL's BC - eta Q_sel / E|Q_other|.detach(): the same draws, replayed by hand,
    # give the same gradient (a normaliser that let gradient through would not).
    policy = DQLPolicy(4, 2, **{**_small("dql"), "eta": 50.0})  # a Q term that dominates the gradient
    with torch.no_grad():
        for p in policy.critic.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a critic with a non-trivial dependence on the action
    batch = policy.normalize_batch(policy.example_batch(16, torch.Generator().manual_seed(0)))
    policy.actor_loss(batch["obs"], batch["action"], torch.Generator().manual_seed(2))[0].backward()
    got = [p.grad.clone() for p in policy.actor.parameters()]
    policy.actor.zero_grad()
    g = torch.Generator().manual_seed(2)
    bc = policy.bc_loss(batch["obs"], batch["action"], g)
    q1, q2 = policy.critic(batch["obs"], policy.policy_action(batch["obs"], g))
    q_sel, q_other = (q1, q2) if bool(torch.rand((), generator=g) < 0.5) else (q2, q1)
    (bc - float(policy.config["eta"]) * q_sel.mean() / q_other.abs().mean().detach()).backward()
    for a, b in zip(got, (p.grad for p in policy.actor.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    residual = OFQLPolicy(4, 2, network={"arch": "residual", "hidden": 16, "depth": 1}, critic={"hidden": 16, "depth": 1})
    assert type(residual.actor).__name__ == "MLPDenoiser"
    with pytest.raises(ValueError, match="network.arch"):
        OFQLPolicy(4, 2, network={"arch": "resnet"})


def test_resume_equals_uninterrupted(maze_data, tmp_path):
    opts = {"network": {"hidden": 32, "depth": 1}, "critic": {"hidden": 32, "depth": 1}, "ema": {"start": 5, "every": 2},
            "action_selection": {"samples": 4, "mode": "softmax"}}
    cfg = TrainerConfig(batch_size=32, log_every=5, ckpt_every=10, progress=False)
    kwargs = dict(steps=40, eval_every=0, eval_episodes=0, seed=3, config=cfg, policy_config=opts)
    train_offline_rl("dql", maze_data, "maze2d-umaze", tmp_path / "full", **kwargs)

    def interrupt(step, metrics):
        if step == 27:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_offline_rl("dql", maze_data, "maze2d-umaze", tmp_path / "cut", on_step=interrupt, **kwargs)
    resumed = train_offline_rl("dql", maze_data, "maze2d-umaze", tmp_path / "cut", **kwargs)
    assert resumed["steps"] == 40
    full = load_file(tmp_path / "full" / "policy" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "policy" / "model.safetensors")
    assert full.keys() == cut.keys() and any(k.startswith("critic_target.") for k in full)
    for key in full:
        torch.testing.assert_close(full[key], cut[key], rtol=0, atol=0, msg=key)
    full_log, cut_log = _log(tmp_path / "full"), _log(tmp_path / "cut")
    for row in full_log + cut_log:
        assert float(row.pop("train_s")) > 0  # wall clock: the one column allowed to differ
    assert full_log == cut_log


def test_bad_inputs_fail_before_training(maze_data, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="unknown task 'cartpole'"):
        train_offline_rl("dql", maze_data, "cartpole", out, steps=5)
    with pytest.raises(ValueError, match="unknown offline-RL policy 'iql'"):
        train_offline_rl("iql", maze_data, "maze2d-umaze", out, steps=5)
    with pytest.raises(DatasetError, match="collected in PointMaze_UMaze-v3 but the task 'hopper-medium' runs Hopper-v5"):
        train_offline_rl("ofql", maze_data, "hopper-medium", out, steps=5)
    with pytest.raises(DatasetError, match="observation size mismatch"):
        train_offline_rl("ofql", replace(maze_data, metadata={}), "hopper-medium", out, steps=5)
    with pytest.raises(DatasetError, match="generated in maze2d-umaze"):
        train_offline_rl("ofql", maze_data, "maze2d-large", out, steps=5)
    wide = replace(maze_data, actions=np.concatenate([maze_data.actions, maze_data.actions[:, :1]], axis=1))
    with pytest.raises(DatasetError, match="action size mismatch"):
        train_offline_rl("dql", wide, "maze2d-umaze", out, steps=5)
    broken = replace(maze_data)
    broken.rewards = maze_data.rewards.copy()
    broken.rewards[17] = np.nan
    with pytest.raises(DatasetError, match="'rewards' holds NaN or inf at row 17"):
        train_offline_rl("dql", broken, "maze2d-umaze", out, steps=5)
    assert not out.exists()


def test_policy_configs_build_and_apply_task_overrides():
    for name, cls in (("dql", DQLPolicy), ("ofql", OFQLPolicy), ("flow_bc", FlowBCPolicy), ("diffusion_bc", DiffusionBCPolicy)):
        opts = load_policy_yaml(name, "hopper-medium")
        policy = cls(11, 3, **opts)
        assert policy.config["network"]["hidden"] == 256
    dql = load_policy_yaml("dql", "walker2d-medium")
    assert dql["actor_grad_clip"] == 1.0 and dql["critic"]["grad_clip"] == 1.0 and dql["critic"]["tau"] == 0.005
    ant = load_policy_yaml("dql", "antmaze-large-play")
    assert ant["critic"]["max_q_backup"] is True and ant["reward_bias"] == -1.0 and ant["eta"] == 4.5
    with pytest.raises(ValueError, match="unknown option 'etaa'"):
        DQLPolicy(11, 3, etaa=1.0)


def test_ofql_actor_exports_to_onnx_and_the_runtime_acts_like_torch(runs, maze_data, tmp_path):
    from diffpilot.export.onnx import export_actor
    from diffpilot.export.runtime import OnnxChunkPolicy

    policy = load_policy(runs["ofql"][0] / "best")
    path = export_actor(policy, tmp_path / "ofql.onnx")
    runtime = OnnxChunkPolicy(path)
    assert (runtime.nfe, runtime.info.form, runtime.exec_horizon) == (1, "one_step", 1)
    obs = np.concatenate([maze_data.observations, maze_data.infos["goal"]], axis=1)[:5].astype(np.float32)
    noise = np.random.default_rng(0).standard_normal((5, 1, policy.action_dim)).astype(np.float32)
    got = runtime.predict(obs[:, None], noise)[:, 0]
    want = policy.predict({"obs": torch.from_numpy(obs)}, noise=torch.from_numpy(noise[:, 0])).numpy()
    assert np.abs(got - want).max() <= 1e-5
    runtime.reset(seed=0)
    assert runtime.act(obs[0]).shape == (policy.action_dim,)
    with pytest.raises(ValueError, match="needs the critic"):
        export_actor(load_policy(runs["dql"][0] / "best"), tmp_path / "dql.onnx")
    assert not (tmp_path / "dql.onnx").exists()


@pytest.mark.parametrize("name", ["dql", "ofql"])
def test_argmax_selection_picks_the_highest_q_candidate(name):
    """Q-picked acting: of the candidates drawn in one batch, the one the target critic scores highest."""
    k = 12
    policy = POLICIES[name](5, 3, network={"hidden": 16, "depth": 1}, critic={"hidden": 16, "depth": 1},
                            action_selection={"samples": k, "mode": "argmax"})
    policy.eval()
    cond = torch.randn(4, 5)
    chosen = policy.select_actions(cond, torch.Generator().manual_seed(7)).sample
    rep = cond.repeat_interleave(k, dim=0)
    cand = policy.sample(policy.actor_ema, rep, torch.Generator().manual_seed(7)).sample
    q = policy.critic_target.q_min(rep, cand).view(4, k)
    best = cand.view(4, k, 3)[torch.arange(4), q.argmax(dim=1)]
    torch.testing.assert_close(chosen, best, rtol=0, atol=0)
    assert len({tuple(row.tolist()) for row in cand.view(4, k, 3)[0]}) == k  # distinct candidates: the pick is a real choice
    assert (q.argmax(dim=1) != 0).any()  # not simply the first candidate
