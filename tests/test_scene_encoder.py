"""Scene encoder: token shapes, padding masks, permutation invariance, no peeking at the future."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpilot.data.scene_sample import build_scene_sample, stack_samples
from diffpilot.data.traffic.generate import simulate_scenes
from diffpilot.policy.networks.scene_encoder import MODALITIES, SceneEncoder, batch_from_arrays


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    _, logs = simulate_scenes(1, seed=3, progress=False)
    log = logs[0]
    return stack_samples([build_scene_sample(log, f) for f in range(0, log.num_frames, 4)])


def _encoder(**kw) -> SceneEncoder:
    torch.manual_seed(0)
    return SceneEncoder(d_model=32, past_steps=4, hidden=32, **kw).eval()


def test_token_shapes_groups_and_masks(arrays):
    enc = _encoder()
    batch = batch_from_arrays(arrays, [0, 1, 2])
    tokens, mask = enc(batch)
    K, L = arrays["agents_pose"].shape[1], arrays["lanes"].shape[1]
    assert tokens.shape == (3, 2 + K + L, 32) and mask.shape == (3, 2 + K + L) and mask.dtype == torch.bool
    sl = enc.group_slices(K, L)
    assert list(sl) == list(MODALITIES[:4])
    agents_present = batch["agents_valid"][:, :, 4] & (batch["agents_category"] >= 0)
    assert torch.equal(mask[:, sl["agents"]], ~agents_present)
    assert torch.equal(mask[:, sl["lanes"]], ~batch["lanes_valid"])
    assert not mask[:, :2].any()
    # masked tokens are exactly zero, unmasked ones are not
    assert mask.any(), "the test scene should have padded agent slots"
    tokens = tokens.detach()
    assert float(tokens[mask].abs().max()) == 0.0
    assert bool((tokens[~mask].abs().sum(-1) > 0).all())
    pooled = SceneEncoder.pooled(tokens, mask)
    assert pooled.shape == (3, 32)
    manual = tokens[0][~mask[0]].mean(0)
    assert torch.allclose(pooled[0], manual, atol=1e-6)


def test_padded_agents_and_lanes_do_not_change_the_output(arrays):
    enc = _encoder()
    batch = batch_from_arrays(arrays, [0, 1])
    # make sure some slot is padding: drop the last agent and the last lane of sample 0
    batch["agents_valid"][0, -1] = False
    batch["agents_category"][0, -1] = -1
    batch["lanes_valid"][0, -1] = False
    tokens, mask = enc(batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["agents_pose"][0, -1] = torch.randn_like(changed["agents_pose"][0, -1]) * 30
    changed["agents_size"][0, -1] = 9.0
    changed["lanes"][0, -1] = torch.randn_like(changed["lanes"][0, -1]) * 30
    tokens2, mask2 = enc(changed)
    assert torch.equal(mask, mask2)
    assert torch.allclose(tokens, tokens2, atol=0)
    # a real (unmasked) agent's values do matter
    assert not bool(mask[0, 2]), "the test scene should have at least one agent"
    changed["agents_pose"][0, 0, :5] += 3.0
    tokens3, _ = enc(changed)
    assert not torch.allclose(tokens3, tokens2)


def test_agent_permutation_permutes_tokens_and_keeps_pooled(arrays):
    enc = _encoder()
    batch = batch_from_arrays(arrays, [0, 1])
    K = batch["agents_pose"].shape[1]
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(1))
    permuted = dict(batch)
    for k in ("agents_pose", "agents_valid", "agents_size", "agents_category"):
        permuted[k] = batch[k][:, perm]
    t1, m1 = enc(batch)
    t2, m2 = enc(permuted)
    sl = enc.group_slices(K, batch["lanes"].shape[1])["agents"]
    assert torch.allclose(t1[:, sl][:, perm], t2[:, sl], atol=1e-6)
    assert torch.allclose(SceneEncoder.pooled(t1, m1), SceneEncoder.pooled(t2, m2), atol=1e-5)


def test_agents_future_is_not_read(arrays):
    enc = _encoder()
    batch = batch_from_arrays(arrays, [0])
    changed = {k: v.clone() for k, v in batch.items()}
    changed["agents_pose"][:, :, 5:] += 10.0  # columns after the present (past_steps=4)
    assert torch.equal(enc(batch)[0], enc(changed)[0])


def test_raster_tokens_and_bad_input(arrays):
    enc = _encoder(use_raster=True, raster_tokens=4)
    batch = batch_from_arrays(arrays, [0, 1], raster=True)
    groups = enc.forward_groups(batch)
    assert list(groups) == list(MODALITIES)
    assert groups["raster"][0].shape == (2, 4, 32)
    tokens, mask = enc(batch)
    assert tokens.shape[1] == mask.shape[1] == 2 + batch["agents_pose"].shape[1] + batch["lanes"].shape[1] + 4
    # gradients reach every modality's weights
    # (a plain sum of LayerNorm outputs has zero gradient; project on random directions instead)
    (tokens * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for name in ("ego_status_mlp", "ego_history_mlp", "agent_mlp", "lane_point_mlp", "raster_cnn"):
        grads = [p.grad for p in getattr(enc, name).parameters()]
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads), name
    with pytest.raises(ValueError, match="past_steps"):
        SceneEncoder(d_model=16, past_steps=2)(batch_from_arrays(arrays, [0]))
    with pytest.raises(ValueError, match="drivable"):
        enc({k: v for k, v in batch.items() if k != "drivable"})
    with pytest.raises(ValueError, match="square"):
        SceneEncoder(use_raster=True, raster_tokens=3)
    with pytest.raises(ValueError, match="lack"):
        batch_from_arrays({"ego_status": arrays["ego_status"]}, [0])
