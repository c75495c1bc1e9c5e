"""Parametric driving rules (STL templates) over the signals of :mod:`diffpilot.stl.signals`.

Each :class:`Rule` builds its formula for a trajectory of ``T`` steps (time
unit: one step = :data:`~diffpilot.data.scenario.DT` = 0.5 s) and names its
parameters, with defaults, units, physical bounds and the direction in
which a parameter *loosens* the rule (used by calibration). Parameter names
are unique across templates, so one flat dict of values serves a whole
:class:`RuleSet`.

Templates (defaults in brackets):

* ``speed_limit``: G (vmin <= speed <= vmax) [vmin 0 m/s, vmax 15 m/s]
* ``lane_keeping``: G (dmin <= lane_offset <= dmax) [-0.9 m, 0.9 m]
* ``heading``: G |heading_error| <= theta_max [0.35 rad]
* ``safe_distance``: G min_distance >= dsafe [0.5 m gap between disc covers]
* ``lane_change``: F[0, T//2] G |target_offset| <= w_target [0.5 m]
* ``stop_at_line``: the stop line is not crossed before the ego has been
  slower than eps_stop for ``dwell_steps`` + 1 consecutive steps, either
  within the horizon or already in the known past (an ego pulling away
  after stopping at the line did stop):
  ``((stop_distance >= 0) U (G[0,k] speed <= eps_stop)) | G stop_distance >= 0
  | F[0,H-k] G[0,k] past_speed <= eps_stop`` with ``H = min(``
  :data:`STOP_HISTORY_STEPS` ``, T - 1)``; the last disjunct is left out
  when ``H < k`` [eps_stop 0.3 m/s, k = 2 steps]. ``past_speed`` runs
  backward from now (:mod:`diffpilot.stl.signals`), so ``F`` / ``G`` over it
  read the past; the Until and G are bounded by the horizon (same values as
  unbounded ones on ``T`` steps) so the formula converts to stlpy.
* ``yield``: G zone_conflict <= -zone_margin — never inside a conflict zone
  (crosswalk) while another agent is inside it [zone_margin 0 m]
* ``comfort``: G (|accel_long| <= amax & |jerk_long| <= jmax)
  [amax 4.0 m/s², jmax 4.13 m/s³, NAVSIM's longitudinal jerk bound]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from diffpilot.data.scenario import FUTURE_STEPS, SampleSpec
from diffpilot.stl.formula import Always, Eventually, Formula, Param, Signal, STLError, Until
from diffpilot.stl.robustness import robustness

__all__ = ["RULES", "STOP_HISTORY_STEPS", "ParamSpec", "Rule", "RuleSet", "default_params", "make_rule",
           "stack_param_sets"]

STOP_HISTORY_STEPS = SampleSpec().past_steps
"""Past steps ``stop_at_line`` reads: ``past_speed`` from now back to 4 steps (2 s) ago.

A sample's ``P`` past poses give the speed now and 1 .. P-1 steps back
(backward differences; the oldest pose only bounds the step after it), so
with the default ``P`` = 4 the entry 4 steps back is unknown and the rule in
effect sees 1.5 s; a sample with a longer past fills it. History beyond this
is not read; unknown entries are padded with a speed that never counts as a
stop."""


@dataclass(frozen=True)
class ParamSpec:
    """One rule parameter: default value, unit, physical bounds and loosening direction (+1: larger is looser)."""

    default: float
    unit: str
    bounds: tuple[float, float]
    loosen: int


@dataclass(frozen=True)
class Rule:
    """A named parametric rule: ``build(T)`` gives its formula for signals of ``T`` steps."""

    name: str
    build: Callable[[int], Formula]
    params: Mapping[str, ParamSpec]
    doc: str = ""
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def formula(self, steps: int) -> Formula:
        if steps not in self._cache:
            self._cache[steps] = self.build(steps)
        return self._cache[steps]

    def signals(self, steps: int = FUTURE_STEPS) -> frozenset[str]:
        return self.formula(steps).signals()

    def defaults(self) -> dict[str, float]:
        return {k: p.default for k, p in self.params.items()}


def _G(f: Formula) -> Formula:
    return Always(f, 0, None)


def _speed_limit() -> Rule:
    v = Signal("speed")
    return Rule(
        "speed_limit",
        lambda T: _G((v >= Param("vmin")) & (v <= Param("vmax"))),
        {"vmin": ParamSpec(0.0, "m/s", (-30.0, 60.0), -1), "vmax": ParamSpec(15.0, "m/s", (-30.0, 60.0), +1)},
        "speed stays in [vmin, vmax]",
    )


def _lane_keeping() -> Rule:
    d = Signal("lane_offset")
    return Rule(
        "lane_keeping",
        lambda T: _G((d >= Param("dmin")) & (d <= Param("dmax"))),
        {"dmin": ParamSpec(-0.9, "m", (-30.0, 30.0), -1), "dmax": ParamSpec(0.9, "m", (-30.0, 30.0), +1)},
        "lateral offset to the reference lane stays in [dmin, dmax] (left positive)",
    )


def _heading() -> Rule:
    e = Signal("heading_error")
    th = Param("theta_max")
    return Rule(
        "heading",
        lambda T: _G((e <= th) & (-e <= th)),
        {"theta_max": ParamSpec(0.35, "rad", (0.0, 3.5), +1)},
        "heading error to the reference lane stays within theta_max",
    )


def _safe_distance() -> Rule:
    return Rule(
        "safe_distance",
        lambda T: _G(Signal("min_distance") >= Param("dsafe")),
        {"dsafe": ParamSpec(0.5, "m", (-20.0, 60.0), -1)},
        "gap to every other agent stays at least dsafe",
    )


def _lane_change() -> Rule:
    o = Signal("target_offset")
    w = Param("w_target")
    return Rule(
        "lane_change",
        lambda T: Eventually(_G((o <= w) & (-o <= w)), 0, max(T // 2, 0)),
        {"w_target": ParamSpec(0.5, "m", (0.0, 30.0), +1)},
        "within the first half of the horizon the ego reaches the target lane (|offset| <= w_target) and stays",
    )


def _stop_at_line(dwell_steps: int = 2) -> Rule:
    d, v, past = Signal("stop_distance"), Signal("speed"), Signal("past_speed")
    eps = Param("eps_stop")
    k = int(dwell_steps)
    if k < 0:
        raise STLError(f"dwell_steps must be >= 0 steps, got {dwell_steps}")

    def build(T: int) -> Formula:
        if T < 1:
            raise STLError(f"stop_at_line needs signals of at least 1 step, got {T}")
        before = d >= 0.0
        parts: list[Formula] = []
        if T - 1 - k >= 0:
            parts.append(Until(before, Always(v <= eps, 0, k), 0, T - 1 - k))
        parts.append(Always(before, 0, T - 1))
        history = min(STOP_HISTORY_STEPS, T - 1)
        if history >= k:
            parts.append(Eventually(Always(past <= eps, 0, k), 0, history - k))
        out = parts[0]
        for p in parts[1:]:
            out = out | p
        return out

    return Rule(
        "stop_at_line",
        build,
        {"eps_stop": ParamSpec(0.3, "m/s", (0.0, 40.0), +1)},
        f"the front bumper does not cross the stop line before the ego was slower than eps_stop for {k + 1} steps, "
        f"within the horizon or within the last {STOP_HISTORY_STEPS} steps before now",
    )


def _yield() -> Rule:
    return Rule(
        "yield",
        lambda T: _G(Signal("zone_conflict") <= -Param("zone_margin")),
        {"zone_margin": ParamSpec(0.0, "m", (-60.0, 60.0), -1)},
        "the ego is never inside a conflict zone while another agent is inside it",
    )


def _comfort() -> Rule:
    a, j = Signal("accel_long"), Signal("jerk_long")
    amax, jmax = Param("amax"), Param("jmax")
    return Rule(
        "comfort",
        lambda T: _G((a <= amax) & (-a <= amax) & (j <= jmax) & (-j <= jmax)),
        {"amax": ParamSpec(4.0, "m/s^2", (0.0, 200.0), +1), "jmax": ParamSpec(4.13, "m/s^3", (0.0, 2000.0), +1)},
        "|longitudinal acceleration| <= amax and |longitudinal jerk| <= jmax",
    )


RULES: dict[str, Callable[[], Rule]] = {
    "speed_limit": _speed_limit,
    "lane_keeping": _lane_keeping,
    "heading": _heading,
    "safe_distance": _safe_distance,
    "lane_change": _lane_change,
    "stop_at_line": _stop_at_line,
    "yield": _yield,
    "comfort": _comfort,
}
"""Every template by name (call to build a :class:`Rule`)."""


def make_rule(name: str, **kwargs: object) -> Rule:
    """The template ``name`` (``stop_at_line`` takes ``dwell_steps``)."""
    if name not in RULES:
        raise STLError(f"unknown rule {name!r}; known rules: {sorted(RULES)}")
    return RULES[name](**kwargs)  # type: ignore[arg-type]


def default_params(rules: Sequence[Rule]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rules:
        out.update(r.defaults())
    return out


class RuleSet:
    """Several rules evaluated together: per-rule robustness tensors from one set of signals."""

    def __init__(self, rules: Sequence[Rule | str] = tuple(RULES)) -> None:
        built = [make_rule(r) if isinstance(r, str) else r for r in rules]
        if not built:
            raise STLError("a RuleSet needs at least one rule")
        names = [r.name for r in built]
        if len(set(names)) != len(names):
            raise STLError(f"rule names repeat in {names}")
        seen: dict[str, str] = {}
        for r in built:
            for p in r.params:
                if p in seen:
                    raise STLError(f"parameter {p!r} belongs to both {seen[p]!r} and {r.name!r}; rename one")
                seen[p] = r.name
        self.rules: list[Rule] = built

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    def defaults(self) -> dict[str, float]:
        return default_params(self.rules)

    def evaluate(
        self,
        signals: Mapping[str, Tensor],
        params: Mapping[str, Tensor | float] | None = None,
        *,
        smooth: float | None = None,
    ) -> dict[str, Tensor]:
        """Robustness of every rule at step 0; parameters missing from ``params`` take their defaults.

        Shapes broadcast as in :func:`~diffpilot.stl.robustness.robustness`:
        signals ``(N, 1, T)`` and parameters ``(1, M)`` give ``(N, M)`` for
        every rule (a rule none of whose parameters vary is expanded).
        """
        if not signals:
            raise STLError("no signals given; compute them with diffpilot.stl.signals.driving_signals")
        T = int(next(iter(signals.values())).shape[-1])
        values: dict[str, Tensor | float] = dict(self.defaults())
        if params:
            unknown = sorted(set(params) - set(values))
            if unknown:
                raise STLError(f"parameter(s) {unknown} belong to no rule in {self.names}; known: {sorted(values)}")
            values.update(params)
        out: dict[str, Tensor] = {}
        for r in self.rules:
            f = r.formula(T)
            out[r.name] = robustness(f, signals, {k: values[k] for k in r.params}, smooth=smooth)  # type: ignore[misc]
        # rules without a batched parameter still come back in the common (N, M) shape
        shape = torch.broadcast_shapes(*[v.shape for v in out.values()])
        return {k: v.expand(shape) for k, v in out.items()}

    def satisfied(self, signals: Mapping[str, Tensor], params: Mapping[str, Tensor | float] | None = None) -> dict[str, Tensor]:
        """Boolean satisfaction (exact robustness >= 0) per rule."""
        return {k: v >= 0 for k, v in self.evaluate(signals, params).items()}


def stack_param_sets(sets: Sequence[Mapping[str, float]]) -> dict[str, Tensor]:
    """``M`` parameter dicts -> one dict of ``(1, M)`` tensors (to broadcast against ``(N, 1, T)`` signals)."""
    keys = sorted(set().union(*[set(s) for s in sets])) if sets else []
    for i, s in enumerate(sets):
        missing = [k for k in keys if k not in s]
        if missing:
            raise STLError(f"parameter set {i} lacks {missing}; every set needs the same keys")
    return {k: torch.as_tensor(np.array([[float(s[k]) for s in sets]]), dtype=torch.float64) for k in keys}
