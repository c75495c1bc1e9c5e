"""A DiffusionVLA observation dict -> the checked numpy inputs, shared by the torch policy and the runtime.

Plain numpy (no torch), so the onnxruntime runtime reads observations exactly
as the torch policy does: the same required fields, the same low-dim vector
(hand xyz + gripper + goal xyz, or the full state) and the same image check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["check_image", "observation_arrays"]


def check_image(image: Any, size: int) -> np.ndarray:
    """An (S, S, 3) uint8 image of the trained size (floats in [0, 1] or [0, 255] are converted), or a clear error."""
    arr = np.asarray(image)
    if arr.shape != (size, size, 3):
        raise ValueError(f"expected an RGB image of shape ({size}, {size}, 3), got {arr.shape}; render at the size the "
                         f"policy was trained on (image_size={size})")
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise ValueError("the image has non-finite values")
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def observation_arrays(observation: Mapping[str, Any], *, low_dim: str, low_dim_size: int, image_size: int | None,
                       onehot: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``(low-dim vector (D,) float32, image (S, S, 3) uint8 or None)``; a missing field is named in the error.

    ``image_size=None``: the policy reads no image. ``onehot``: it reads ``task`` instead of ``instruction``.
    """
    needed = ["state"] if low_dim == "state" else ["proprio", "goal"]
    needed += ["image"] * (image_size is not None) + ["task" if onehot else "instruction"]
    missing = [k for k in needed if observation.get(k) is None]
    if missing:
        raise ValueError(f"the observation lacks {missing}; pass a dict with image (HxWx3), proprio, goal, state, "
                         "instruction and task")
    if low_dim == "state":
        low = np.asarray(observation["state"], np.float32).reshape(-1)
    else:
        low = np.concatenate([np.asarray(observation["proprio"], np.float32).reshape(-1),
                              np.asarray(observation["goal"], np.float32).reshape(-1)])
    if low.shape != (low_dim_size,) or not np.isfinite(low).all():
        raise ValueError(f"the observation's {low_dim} vector must be {low_dim_size} finite numbers, got shape {low.shape}")
    image = check_image(observation["image"], image_size) if image_size is not None else None
    return low, image
