"""Checkpoints: round trip, and one clear error for every kind of damage or mismatch."""

from __future__ import annotations

import pickle

import pytest
import torch
import yaml
from torch import nn

from diffpilot.data.normalizer import Normalizer
from diffpilot.policy.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, load_state_strict, save_checkpoint


class Tiny(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.layer = nn.Linear(3, width)
        self.norm = Normalizer(3)


def _save(tmp_path, model=None):
    model = model or Tiny()
    return save_checkpoint(tmp_path / "ckpt", model.state_dict(), {"width": 4, "nested": {"a": [1, 2]}}, kind="tiny"), model


def test_round_trip_restores_every_tensor_and_the_config(tmp_path):
    path, model = _save(tmp_path)
    tensors, config = load_checkpoint(path, kind="tiny")
    fresh = Tiny()
    load_state_strict(fresh, tensors, path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert config == {"width": 4, "nested": {"a": [1, 2]}}
    meta = yaml.safe_load((path / "config.yaml").read_text())
    assert meta["format_version"] == FORMAT_VERSION


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path, _ = _save(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    tensors, _ = load_checkpoint(path)
    assert "layer.weight" in tensors


def test_tampered_weights_are_caught(tmp_path):
    path, _ = _save(tmp_path)
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="modified or truncated"):
        load_checkpoint(path)


def test_version_mismatch_names_both_versions(tmp_path):
    path, _ = _save(tmp_path)
    meta = yaml.safe_load((path / "config.yaml").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (path / "config.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(CheckpointError, match=rf"format_version {FORMAT_VERSION + 1}.*version {FORMAT_VERSION}"):
        load_checkpoint(path)


def test_wrong_kind_and_missing_files(tmp_path):
    path, _ = _save(tmp_path)
    with pytest.raises(CheckpointError, match="holds a 'tiny', expected a 'policy'"):
        load_checkpoint(path, kind="policy")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_shape_and_key_mismatch_listed_in_one_error(tmp_path):
    path, _ = _save(tmp_path, Tiny(width=4))
    tensors, _ = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"layer.weight: checkpoint \(4, 3\) vs model \(5, 3\)"):
        load_state_strict(Tiny(width=5), tensors, path)
    tensors["extra.bias"] = torch.zeros(1)
    del tensors["norm.scale"]
    with pytest.raises(CheckpointError, match=r"missing keys \['norm.scale'\].*unexpected keys \['extra.bias'\]"):
        load_state_strict(Tiny(), tensors, path)


def test_overwrite_is_atomic_and_leaves_no_temp_folders(tmp_path):
    path, _ = _save(tmp_path)
    save_checkpoint(path, {"w": torch.ones(2)}, {"v": 2}, kind="tiny")
    tensors, config = load_checkpoint(path)
    assert config == {"v": 2} and torch.equal(tensors["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
