"""Signal Temporal Logic: formulas, batched exact and smooth robustness, driving rules, calibration."""

from __future__ import annotations

from diffpilot.stl.calibration import calibrate, calibration_report, logged_signals
from diffpilot.stl.formula import (
    Affine,
    Always,
    And,
    Eventually,
    Formula,
    Not,
    Or,
    Param,
    Predicate,
    Signal,
    STLError,
    Until,
    always,
    eventually,
)
from diffpilot.stl.robustness import robustness, robustness_trace
from diffpilot.stl.rules import RULES, ParamSpec, Rule, RuleSet, default_params, make_rule, stack_param_sets
from diffpilot.stl.signals import (
    SIGNAL_NAMES,
    DrivingScene,
    driving_signals,
    map_context,
    scene_from_arrays,
    scene_from_sample,
)

__all__ = [
    "RULES",
    "SIGNAL_NAMES",
    "Affine",
    "Always",
    "And",
    "DrivingScene",
    "Eventually",
    "Formula",
    "Not",
    "Or",
    "Param",
    "ParamSpec",
    "Predicate",
    "Rule",
    "RuleSet",
    "STLError",
    "Signal",
    "Until",
    "always",
    "calibrate",
    "calibration_report",
    "default_params",
    "driving_signals",
    "eventually",
    "logged_signals",
    "make_rule",
    "map_context",
    "robustness",
    "robustness_trace",
    "scene_from_arrays",
    "scene_from_sample",
    "stack_param_sets",
]
