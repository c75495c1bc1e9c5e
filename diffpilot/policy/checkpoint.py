"""Checkpoints: safetensors weights + a YAML config + a format version.

Loading never unpickles: tensors come from safetensors, everything else from
YAML parsed with ``safe_load``. A SHA-256 of the weights file is stored in the
YAML so a tampered or truncated file is caught before it reaches a model.
Writes go to a temporary folder that replaces the target in one rename, so
an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffpilot.fileio import publish_dir

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(directory: str | Path, tensors: dict[str, Tensor], config: dict[str, Any], kind: str) -> Path:
    """Atomically write ``tensors`` and ``config`` (plain YAML data) to ``directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / WEIGHTS))
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "weights_sha256": _sha256(tmp / WEIGHTS),
            "config": config,
        }
        with open(tmp / CONFIG, "w") as f:
            yaml.safe_dump(meta, f, sort_keys=False)
        publish_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str | Path, kind: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint; returns ``(tensors, config)``. Checks version, kind and hash."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint folder at {directory}; pass the folder that holds {CONFIG} and {WEIGHTS}")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {p.name}; it is incomplete, save it again")
    try:
        meta = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{cfg_path} is not valid YAML ({e}); the checkpoint is damaged") from e
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise CheckpointError(f"{cfg_path} has no format_version; it was not written by diffpilot")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {directory} has format_version {meta['format_version']}, this diffpilot reads "
            f"version {FORMAT_VERSION}; re-export it with a matching diffpilot version"
        )
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"checkpoint {directory} holds a {meta.get('kind')!r}, expected a {kind!r}")
    digest = _sha256(w_path)
    if digest != meta.get("weights_sha256"):
        raise CheckpointError(
            f"{w_path} does not match the hash recorded in {cfg_path}: the weights were modified or truncated"
        )
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {w_path} as safetensors: {e}") from e
    return tensors, meta.get("config") or {}


def load_state_strict(module: nn.Module, tensors: dict[str, Tensor], source: str | Path) -> None:
    """Load ``tensors`` into ``module`` or raise one error listing every key and shape mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append("shape mismatches " + "; ".join(shapes[:8]))
        raise CheckpointError(
            f"checkpoint {source} does not fit this model ({', '.join(parts)}); "
            "the config and the weights come from different models"
        )
    module.load_state_dict(tensors, strict=True)
