"""Ray for the embarrassingly parallel jobs: the same bytes from 1 or 2 workers.

One local Ray (2 CPUs) serves the module. maze2d segments, driving scenes and
closed-loop episodes are split into items that carry their own seeds and are
merged in order, so the files (and the episode records, latencies aside) do
not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffpilot.data.d4rl import read_d4rl
from diffpilot.data.locomotion import build_locomotion_dataset
from diffpilot.data.maze2d import generate_maze2d
from diffpilot.data.traffic.generate import generate_driving_dataset
from diffpilot.parallel import ordered_map, ray_session
from diffpilot.policy.diffusion_vla import DiffusionVLAPolicy
from diffpilot.policy.registry import build_policy, load_policy
from diffpilot.policy.text import WordVocab
from diffpilot.sim.mt10_runner import run_mt10
from diffpilot.sim.runner import run_episodes
from diffpilot.sim.tasks import get_task


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_ordered_map_keeps_item_order_on_ray():
    items = [300, 1, 200, 2, 100, 3, 0]  # unequal work: tasks finish out of order
    assert ordered_map(math.factorial, items, workers=2) == [math.factorial(x) for x in items]
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        with ray_session(0):
            pass


def test_maze2d_segments_give_the_same_file_on_1_and_2_workers(tmp_path):
    kw = dict(seed=3, episode_len=100, reference_episodes=0, progress=False, segments=3)
    one = generate_maze2d("umaze", 300, path=tmp_path / "one.hdf5", workers=1, **kw)
    two = generate_maze2d("umaze", 300, path=tmp_path / "two.hdf5", workers=2, **kw)
    assert (tmp_path / "one.hdf5").read_bytes() == (tmp_path / "two.hdf5").read_bytes()
    assert len(one) == 300 and np.array_equal(one.timeouts.nonzero()[0], [99, 199, 299])
    # the segments are different runs (their own seeds), not one run copied
    assert not np.allclose(two.observations[:100], two.observations[100:200])


def test_driving_scenes_give_the_same_files_on_1_and_2_workers(tmp_path):
    a = generate_driving_dataset(tmp_path / "a", num_scenes=3, seed=1, val_fraction=0.34, workers=1)
    b = generate_driving_dataset(tmp_path / "b", num_scenes=3, seed=1, val_fraction=0.34, workers=2)
    ta, tb = _tree(Path(a)), _tree(Path(b))
    assert any(name.endswith("scene.json") for name in ta) and ta == tb


def test_episodes_on_2_workers_equal_1_worker():
    torch.manual_seed(0)
    task = get_task("maze2d-umaze")
    policy = build_policy({"name": "flow_bc", "network": {"hidden": 16, "depth": 1}}, 6, 2).eval()
    kw = dict(seed=11, ref_scores=(0.0, 100.0), progress=False)
    one = run_episodes(task.make_env, policy, 2, workers=1, **kw)
    two = run_episodes(task.make_env, policy, 2, workers=2, **kw)
    assert [r.episode for r in two] == [0, 1]
    for r1, r2 in zip(one, two):
        assert (r1.seed, r1.episode_return, r1.length, r1.success) == (r2.seed, r2.episode_return, r2.length, r2.success)
        assert np.array_equal(r1.observations, r2.observations)


def test_locomotion_rollouts_give_the_same_files_on_1_and_2_workers(tmp_path):
    # the smallest SAC run the builder takes; the rollouts and reference episodes are what is sharded
    kw = dict(sac_steps=200, transitions=120, seed=2, eval_interval=200, eval_episodes=1, reference_episodes=3,
              progress=False, segments=2)
    one = build_locomotion_dataset("hopper", "medium-expert", tmp_path / "one", workers=1, **kw)
    two = build_locomotion_dataset("hopper", "medium-expert", tmp_path / "two", workers=2, **kw)
    assert one.name == two.name == "hopper-medium-expert-120-sac200-s2-seg2.hdf5"
    for name in ("hopper-medium-120-sac200-s2-seg2.hdf5", "hopper-expert-120-sac200-s2-seg2.hdf5", one.name,
                 "hopper-sac200-s2/progress.yaml"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    ds = read_d4rl(one)
    assert len(ds) == 240 and ds.metadata["rollout_segments"] == 2
    assert (ds.terminals | ds.timeouts)[[59, 119, 179, 239]].all()  # every segment ends its last episode
    # the segments are different runs (their own seeds), not one run copied
    assert not np.allclose(ds.actions[:60], ds.actions[60:120])


def test_mt10_episodes_on_2_workers_equal_1_worker(tmp_path):
    torch.manual_seed(0)
    # a vocabulary of real words: the generated reasoning then follows the frames, so the records see the actions
    vocab = WordVocab.build(["reach the goal move to target touch red point gripper open close above puck"]).tokens
    policy = DiffusionVLAPolicy(**DiffusionVLAPolicy.TINY, tasks=["reach"], vocab=vocab)
    policy.fit_to_batch(policy.example_batch(8, torch.Generator().manual_seed(0)))
    folder = policy.save(tmp_path / "vla")
    instructions = {"reach": ["reach the goal", "move to the target", "touch the red point"]}
    kw = dict(episodes=2, seed=5, max_steps=16, exec_horizon=policy.exec_horizon, image_size=32, progress=False)
    one = run_mt10(load_policy(folder), ["reach"], instructions, **kw)
    two = run_mt10(folder, ["reach"], instructions, workers=2, **kw)  # each worker loads the folder
    shipped = run_mt10(load_policy(folder), ["reach"], instructions, workers=2, **kw)  # a pickled copy
    timing = ("reason_ms", "action_ms")
    rows = [[{k: v for k, v in r.row().items() if k not in timing} for r in recs] for recs in (one, two, shipped)]
    assert len(rows[0]) == 2 and rows[0][0]["seed"] != rows[0][1]["seed"]
    assert rows[0][0]["steps"] == 16 and rows[0][0]["replans"] == 4 and rows[0][0]["reasoning_checked"] == 2
    assert rows[1] == rows[0] and rows[2] == rows[0]

    class Unpicklable:  # like an onnxruntime policy: its sessions do not pickle
        def __reduce__(self):
            raise TypeError("cannot pickle 'InferenceSession' object")

    with pytest.raises(ValueError, match="pass policy_factory="):
        run_mt10(Unpicklable(), ["reach"], instructions, workers=2, **kw)
