"""The Policy interface that simulators, the exporter and the CLI rely on."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
from torch import Tensor


@runtime_checkable
class Policy(Protocol):
    """A closed-loop controller that can also be queried in batches.

    ``reset`` clears per-episode state (observation history, queued actions,
    warm-start guesses); ``act`` maps one observation to one action;
    ``predict`` maps a batch of conditions to a batch of samples.
    """

    def reset(self, seed: int | None = None) -> None: ...

    def act(self, observation: np.ndarray) -> np.ndarray: ...

    def predict(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor: ...

    def save(self, directory: Any) -> Any: ...
