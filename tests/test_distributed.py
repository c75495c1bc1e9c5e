"""Data-parallel training (torchrun semantics, gloo on CPU) through the one trainer.

Two processes sharing a global batch end with the weights of one process
training on that batch (the DDPM chunk policy, DQL, OFQL through its JVP, the
ego-status driving planner); the EMA is the same on every process; only rank 0
writes; a run interrupted and resumed equals an uninterrupted one, also when
resumed by one process from a two-process checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffpilot.policy.generative import shard
from diffpilot.policy.registry import build_policy, policy_class
from diffpilot.train import TensorRows, Trainer, TrainerConfig, distributed

KINDS = ("chunk_diffusion", "dql", "ofql", "ego_status_mlp")
STEPS, BATCH = 4, 8


class Interrupted(Exception):
    pass


def _setup(kind: str):
    torch.manual_seed(0)
    policy = build_policy({"name": kind, **policy_class(kind).TINY}, 5, 2)
    data = policy.example_batch(32, torch.Generator().manual_seed(0))
    policy.fit_to_batch(data)
    # float64, so that the order of the sums (one batch vs two shards) stays far below what is compared
    policy.double()
    data = {k: v.double() if torch.is_floating_point(v) else v for k, v in data.items()}
    return policy, TensorRows(data)


def _train(kind: str, out: str | None, stop_at: int | None = None, grad_clip: float | None = None) -> Trainer:
    policy, data = _setup(kind)
    own = policy_class(kind).OWN_TRAIN_KEYS
    cfg = TrainerConfig(steps=STEPS, batch_size=BATCH, seed=3, progress=False, log_every=1, ckpt_every=1,
                        **({} if own else {"lr": 1e-2, "warmup_steps": 1, "grad_clip": grad_clip}))

    def on_step(step: int, metrics: dict) -> None:
        if stop_at is not None and step == stop_at:
            raise Interrupted

    trainer = Trainer(policy, data, cfg, out, on_step=on_step)
    try:
        trainer.run()
    except Interrupted:
        pass
    return trainer


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {**{f"policy.{k}": v.detach().clone().contiguous() for k, v in trainer.policy.state_dict().items()},
            **{f"acting.{k}": v.detach().clone().contiguous() for k, v in trainer.acting.state_dict().items()}}


def _job(result_dir: str, jobs: list[tuple[str, str, str | None, int | None]]) -> None:
    """Every process: run each (name, kind, out, stop_at); every rank saves its weights."""
    torch.set_num_threads(1)
    for name, kind, out, stop_at in jobs:
        trainer = _train(kind, out, stop_at)
        save_file(_weights(trainer), str(Path(result_dir) / f"{name}.rank{distributed.rank()}.safetensors"))
        meta = {"world": distributed.world_size(), "local_batch": trainer.local_batch}
        (Path(result_dir) / f"{name}.rank{distributed.rank()}.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One two-process launch for every check (spawning costs seconds), and the one-process references."""
    root = tmp_path_factory.mktemp("ddp")
    two, one = root / "two", root / "one"
    two.mkdir()
    one.mkdir()
    jobs = [(kind, kind, None, None) for kind in KINDS]
    jobs += [("full", "chunk_diffusion", str(root / "full2"), None),
             ("cut", "chunk_diffusion", str(root / "cut2"), 3),
             ("cut_resumed", "chunk_diffusion", str(root / "cut2"), None),
             ("dql_cut", "dql", str(root / "dqlcut2"), 3)]
    distributed.launch(_job, 2, str(two), jobs)
    _job(str(one), [(kind, kind, None, None) for kind in KINDS] + [("full", "chunk_diffusion", None, None),
                                                                 ("dql_full", "dql", None, None)])
    return root


def _load(root: Path, name: str, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(root / f"{name}.rank{rank}.safetensors"))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_equal_one_with_the_same_global_batch(runs, kind):
    meta = json.loads((runs / "two" / f"{kind}.rank1.json").read_text())
    assert meta == {"world": 2, "local_batch": BATCH // 2}
    one, two = _load(runs / "one", kind), _load(runs / "two", kind)
    start = _setup(kind)[0].state_dict()
    assert any(not torch.equal(one[f"policy.{k}"], v) for k, v in start.items()), "training changed nothing"
    _assert_close(two, one)


@pytest.mark.parametrize("kind", KINDS)
def test_weights_and_ema_are_identical_on_every_process(runs, kind):
    r0, r1 = _load(runs / "two", kind, 0), _load(runs / "two", kind, 1)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_rank_zero_alone_writes_and_an_interrupted_run_resumes_exactly(runs):
    out = runs / "full2"
    assert (out / "state").is_dir() and (out / "policy").is_dir() and (out / "train_log.csv").is_file()
    log = (out / "train_log.csv").read_text().strip().splitlines()
    assert len(log) == 1 + STEPS  # one writer: one row per step, not two
    # interrupted after step 3 (last checkpoint: step 2), then the same command again
    resumed = _load(runs / "two", "cut_resumed")
    _assert_close(resumed, _load(runs / "two", "full"))
    _assert_close(resumed, _load(runs / "one", "full"))
    assert (runs / "cut2" / "train_log.csv").read_text().count("\n") == 1 + STEPS


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    import shutil

    for name, kind, ref in (("cut2", "chunk_diffusion", "full"), ("dqlcut2", "dql", "dql_full")):
        out = tmp_path / name
        shutil.copytree(runs / name, out)
        state = (out / "state" / "config.yaml").read_text()
        assert "step: 2\n" in state and "world_size: 2\n" in state  # written by the two-process run at step 2
        trainer = _train(kind, str(out))
        assert trainer.step == STEPS
        _assert_close(_weights(trainer), _load(runs / "one", ref))


def test_gradient_clipping_sees_the_global_gradient(tmp_path):
    """Clipping after the all-reduce: a tight clip gives the one-process result (clipping each shard would not)."""
    distributed.launch(_clip_job, 2, str(tmp_path))
    one = _train("chunk_diffusion", None, grad_clip=1e-3)
    _assert_close(load_file(str(tmp_path / "clip.safetensors")), _weights(one))


def _clip_job(result_dir: str) -> None:
    torch.set_num_threads(1)
    trainer = _train("chunk_diffusion", None, grad_clip=1e-3)
    if distributed.is_main():
        save_file(_weights(trainer), str(Path(result_dir) / "clip.safetensors"))


def test_a_global_batch_that_does_not_split_is_refused():
    d = distributed.Dist(rank=0, world=3)
    with pytest.raises(ValueError, match="train.batch_size=8 .* does not split over 3 processes"):
        d.local_batch(8)


def test_sharded_draws_are_the_global_draw_cut_in_rows():
    full = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    parts = []
    for rank in range(3):
        with shard.batch_shard(rank, 3, lambda t: None):
            parts.append(shard.randn((2, 3), generator=torch.Generator().manual_seed(1)))
            assert shard.global_rows(2) == 6
    assert torch.equal(torch.cat(parts), full)
    assert shard.current() is None and torch.equal(shard.randn((6, 3), generator=torch.Generator().manual_seed(1)), full)
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"


def test_torchrun_trains_through_the_cli_with_rank_zero_writing(tmp_path):
    """`torchrun --nproc_per_node=2 -m diffpilot.cli train ...`: one run folder, the global batch in the log line."""
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "DIFFPILOT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "diffpilot.cli",
           "train", "data.num_steps=1200", "data.episode_len=300", "data.reference_episodes=0",
           "policy.network.down_dims=[8,16]", "+policy.network.n_groups=4", "train.steps=3", "train.batch_size=8",
           "train.ckpt_every=3", "train.log_every=1", f"out={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 8 = 2 process(es) x 4" in proc.stdout + proc.stderr
    assert (out / "policy" / "model.safetensors").is_file() and (out / "run.yaml").is_file()
    assert len((out / "train_log.csv").read_text().strip().splitlines()) == 1 + 3
    assert len(list((tmp_path / "cache" / "datasets").glob("*.hdf5"))) == 1
