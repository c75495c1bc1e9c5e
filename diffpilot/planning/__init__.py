"""Trajectory optimization under STL driving rules and the data-augmentation job built on it."""

from __future__ import annotations

from typing import Any

from diffpilot.planning.augment import DEFAULT_MARGINS, DEFAULT_NOISE, DEFAULT_RULES, augment, read_augmented, sample_params
from diffpilot.planning.dynamics import (
    UnicycleLimits,
    controls_from_poses,
    controls_from_raw,
    raw_from_controls,
    rollout,
    rollout_numpy,
)
from diffpilot.planning.gradient import MODES, RULE_SCALES, TrajOptResult, active_rules, mode_scenes, optimize_controls
from diffpilot.planning.receding import TrajOptPlanner

__all__ = [
    "CONVEX_RULES",
    "DEFAULT_MARGINS",
    "DEFAULT_NOISE",
    "DEFAULT_RULES",
    "MODES",
    "RULE_SCALES",
    "ConvexPlanner",
    "ConvexResult",
    "TrajOptPlanner",
    "TrajOptResult",
    "UnicycleLimits",
    "active_rules",
    "augment",
    "controls_from_poses",
    "controls_from_raw",
    "mode_scenes",
    "optimize_controls",
    "raw_from_controls",
    "read_augmented",
    "rollout",
    "rollout_numpy",
    "sample_params",
    "solve_convex",
]

_CONVEX = ("CONVEX_RULES", "ConvexPlanner", "ConvexResult", "solve_convex")


def __getattr__(name: str) -> Any:
    """The convex planner's names, imported on first use: it loads cvxpy (seconds), which the rest does not need."""
    if name in _CONVEX:
        from diffpilot.planning import convex

        return getattr(convex, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
