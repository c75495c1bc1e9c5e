"""The trajectory optimizer as a closed-loop planner: optimize at every replanning step (receding horizon).

Each call optimizes ``samples`` control sequences for the sample's window under the
planner's rule parameters and the mode its command asks for, then drives the plan
:func:`~diffpilot.stl.metrics.preferred_plan` picks. The previous plan, shifted by
the replanning interval, starts one of the samples (a warm start), so a plan that
still satisfies the rules is kept rather than found again from scratch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import COMMANDS, DT, FUTURE_STEPS, SceneSample, wrap_angle
from diffpilot.data.scene_sample import stack_samples
from diffpilot.planning.augment import DEFAULT_RULES
from diffpilot.planning.gradient import MODES, optimize_controls, window_scene
from diffpilot.stl.metrics import preferred_plan
from diffpilot.stl.rules import RuleSet

__all__ = ["TrajOptPlanner"]


class TrajOptPlanner:
    """Receding-horizon gradient trajectory optimization; a driving :class:`~diffpilot.data.scenario.Planner`.

    ``params`` override the rules' default parameters; ``replan_every`` (seconds) is how far the
    previous plan is shifted for the warm start, the simulator's replanning interval.
    """

    def __init__(
        self,
        rules: Sequence[str] = DEFAULT_RULES,
        params: Mapping[str, float] | None = None,
        *,
        horizon: int = FUTURE_STEPS,
        samples: int = 16,
        steps: int = 30,
        warm_start: bool = True,
        replan_every: float = DT,
        seed: int = 0,
    ) -> None:
        self.rules = RuleSet(list(rules))
        known = self.rules.defaults()
        unknown = sorted(set(params or {}) - set(known))
        if unknown:
            raise DatasetError(f"unknown rule parameter(s) {unknown}; these rules take {sorted(known)}")
        if horizon < 2 or samples < 1 or steps < 0 or replan_every <= 0:
            raise DatasetError(f"need horizon >= 2, samples >= 1, steps >= 0, replan_every > 0; got "
                               f"{horizon}, {samples}, {steps}, {replan_every}")
        self.params = {**known, **(params or {})}
        self.horizon, self.samples, self.steps = int(horizon), int(samples), int(steps)
        self.warm_start, self.shift = bool(warm_start), max(1, int(round(replan_every / DT)))
        self.seed = int(seed)
        self._calls = 0
        self._last: torch.Tensor | None = None  # controls (T, 2) of the plan driven last

    def reset(self, seed: int | None = None) -> None:
        self._calls, self._last = 0, None
        if seed is not None:
            self.seed = int(seed)

    def _warm(self) -> torch.Tensor | None:
        if not self.warm_start or self._last is None:
            return None
        shifted = torch.cat([self._last[self.shift:], self._last[-1:].expand(self.shift, 2)])
        return shifted[None, None, None]  # (B, M, K, T, 2)

    def plan(self, sample: SceneSample) -> np.ndarray:
        """Ego-frame poses ``(T, 3)`` at DT of the preferred optimized plan."""
        arrays = stack_samples([sample])
        mode = COMMANDS[int(sample.command)] if COMMANDS[int(sample.command)] in MODES else "keep_lane"  # stop: keep lane
        result = None
        for m in dict.fromkeys((mode, "keep_lane")):  # a lane change towards a missing lane is planned as lane keeping
            scene = window_scene(arrays, [0], [MODES.index(m)], dtype=torch.float64)
            init = self._warm()
            res = optimize_controls(scene, self.rules, self.params, modes=(m,), init="random" if init is None else init,
                                    steps=self.steps, samples=self.samples, horizon=self.horizon,
                                    seed=self.seed + self._calls)
            if bool(res.mode_valid.all()):
                result = res
                break
        self._calls += 1
        if result is None:
            raise DatasetError("the trajectory optimizer found no lane to plan on in this sample (no valid lanes)")
        states = result.trajectories[0, 0].numpy()
        best = preferred_plan(states, result.min_robustness[0, 0].numpy())
        self._last = result.controls[0, 0, best].to(torch.float64)
        poses = states[best, :, :3].copy()
        poses[:, 2] = wrap_angle(poses[:, 2])
        return poses
