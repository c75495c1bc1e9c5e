"""Fixed-length training windows (observation history + action chunk) cut from episodes.

Windows never cross an episode boundary: indices are clamped to the episode,
which repeats the first observation before the start and the last action
after the end, the padding a chunk policy sees at the edges of an episode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ChunkWindows:
    """Index tables so a batch of windows is two fancy-indexing gathers.

    The window at row ``i`` has observations ``i - obs_horizon + 1 .. i`` and
    actions ``i - obs_horizon + 1 .. i - obs_horizon + action_horizon``: the
    chunk starts with the oldest observation, as in Diffusion Policy.
    """

    def __init__(
        self,
        observations: np.ndarray,
        actions: np.ndarray,
        episodes: Sequence[tuple[int, int]],
        obs_horizon: int,
        action_horizon: int,
    ) -> None:
        if len(observations) != len(actions):
            raise ValueError(f"observations ({len(observations)}) and actions ({len(actions)}) differ in length")
        if obs_horizon < 1 or action_horizon < obs_horizon:
            raise ValueError(
                f"need 1 <= obs_horizon <= action_horizon, got obs_horizon={obs_horizon}, action_horizon={action_horizon}"
            )
        self.observations = np.ascontiguousarray(observations, dtype=np.float32)
        self.actions = np.ascontiguousarray(actions, dtype=np.float32)
        obs_idx, act_idx = [], []
        for start, stop in episodes:
            if stop <= start:
                continue
            rows = np.arange(start, stop)[:, None]
            first = rows - obs_horizon + 1
            obs_idx.append(np.clip(first + np.arange(obs_horizon), start, stop - 1))
            act_idx.append(np.clip(first + np.arange(action_horizon), start, stop - 1))
        if not obs_idx:
            raise ValueError("no non-empty episode to cut windows from")
        self.obs_index = np.concatenate(obs_idx).astype(np.int64)
        self.act_index = np.concatenate(act_idx).astype(np.int64)

    def __len__(self) -> int:
        return len(self.obs_index)

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Windows ``rows``: ``obs`` (B, To, obs_dim) and ``action`` (B, H, act_dim)."""
        return {"obs": self.observations[self.obs_index[rows]], "action": self.actions[self.act_index[rows]]}
