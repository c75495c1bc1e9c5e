"""Rule calibration: the tightest parameters each logged window satisfies, plus margins.

For every window (the ego's logged future in a stack of SceneSamples) and
every parameter, calibration finds the tightest value at which the logged
trajectory still satisfies the rule (``vmax`` = highest speed, ``dsafe`` =
smallest gap, ...), with the rule's other parameters held at their loosest
bound so they cannot mask it. It works for any template whose robustness is
monotone in the parameter (every template in :mod:`diffpilot.stl.rules`) by
vectorized bisection over all windows at once on the exact robustness, so
it needs no per-template formula. The result stays on the satisfying side,
so every window satisfies its own calibrated rule; a margin then moves each
value further in its loosening direction.

:func:`calibration_report` counts how many windows satisfy their rules with
their own parameters (all, by construction), with shared parameters (a
quantile of the per-window values) and with the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from diffpilot.data.errors import DatasetError
from diffpilot.stl.formula import STLError
from diffpilot.stl.robustness import robustness
from diffpilot.stl.rules import Rule, RuleSet
from diffpilot.stl.signals import driving_signals, scene_from_arrays

__all__ = ["calibrate", "calibration_report", "logged_signals"]

_ITERS = 60


def logged_signals(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Signals ``(W, 1, F)`` of every window's logged future and which windows have a complete future.

    Stop lines and zones come from the samples' own fields.
    """
    for key in ("ego_future", "ego_future_valid"):
        if key not in arrays:
            raise DatasetError(f"stacked samples lack {key!r}; build them with diffpilot.data.scene_sample.stack_samples")
    fut = np.asarray(arrays["ego_future"], dtype=np.float64)
    complete = np.asarray(arrays["ego_future_valid"], dtype=bool).all(axis=-1)
    scene = scene_from_arrays(arrays)
    sig = driving_signals(torch.as_tensor(fut)[:, None], scene)
    return sig, complete


def _as_rules(rules: RuleSet | Sequence[Rule | str]) -> RuleSet:
    return rules if isinstance(rules, RuleSet) else RuleSet(rules)


def _tightest(rule: Rule, name: str, signals: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Per window (signals (W, 1, T)), the tightest value of parameter ``name`` that satisfies ``rule``."""
    T = int(next(iter(signals.values())).shape[-1])
    W = int(next(iter(signals.values())).shape[0])
    f = rule.formula(T)
    spec = rule.params[name]
    lo_b, hi_b = spec.bounds
    # q = loosen * value: larger q is looser; bisection keeps rho(q_hi) >= 0
    q_lo = torch.full((W, 1), min(spec.loosen * lo_b, spec.loosen * hi_b), dtype=torch.float64)
    q_hi = torch.full((W, 1), max(spec.loosen * lo_b, spec.loosen * hi_b), dtype=torch.float64)
    fixed = {}
    for other, ps in rule.params.items():
        if other != name:
            fixed[other] = torch.tensor(ps.bounds[1] if ps.loosen > 0 else ps.bounds[0], dtype=torch.float64)

    def rho(q: torch.Tensor) -> torch.Tensor:
        return robustness(f, signals, {**fixed, name: spec.loosen * q})[:, 0]

    ok_tight = rho(q_lo) >= 0
    for _ in range(_ITERS):
        mid = 0.5 * (q_lo + q_hi)
        good = (rho(mid) >= 0)[:, None]
        q_hi = torch.where(good, mid, q_hi)
        q_lo = torch.where(good, q_lo, mid)
    q = torch.where(ok_tight[:, None], q_lo, q_hi)[:, 0]
    return (spec.loosen * q).numpy()


def calibrate(
    arrays: Mapping[str, np.ndarray],
    rules: RuleSet | Sequence[Rule | str],
    margins: Mapping[str, float] | None = None,
    *,
    signals: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Per window, the tightest parameters of every rule that its logged future satisfies, loosened by ``margins``.

    ``margins`` maps parameter names to non-negative amounts (in the
    parameter's unit) added in its loosening direction. Windows whose logged
    future is incomplete get NaN. ``signals`` may be given to reuse
    :func:`logged_signals`.
    """
    rs = _as_rules(rules)
    margins = dict(margins or {})
    known = set(rs.defaults())
    unknown = sorted(set(margins) - known)
    if unknown:
        raise STLError(f"margins for unknown parameter(s) {unknown}; known: {sorted(known)}")
    for k, m in margins.items():
        if not np.isfinite(m) or m < 0:
            raise STLError(f"margin for {k!r} must be a finite number >= 0, got {m!r}")
    if signals is None:
        signals, complete = logged_signals(arrays)
    else:
        complete = np.asarray(arrays["ego_future_valid"], dtype=bool).all(axis=-1)
    out: dict[str, np.ndarray] = {}
    for rule in rs.rules:
        for name, spec in rule.params.items():
            value = _tightest(rule, name, signals) + spec.loosen * margins.get(name, 0.0)
            value[~complete] = np.nan
            out[name] = value
    return out


def _shared(values: np.ndarray, loosen: int, quantile: float) -> float:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return float("nan")
    return float(np.quantile(v, quantile if loosen > 0 else 1.0 - quantile))


def calibration_report(
    arrays: Mapping[str, np.ndarray],
    rules: RuleSet | Sequence[Rule | str],
    calibrated: Mapping[str, np.ndarray],
    *,
    quantile: float = 0.9,
    signals: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, object]:
    """How many complete windows satisfy each rule with their own, shared and default parameters.

    Shared parameters are the ``quantile`` of the per-window values towards
    the loose side (vmax: the 0.9 quantile, vmin: the 0.1 quantile).
    """
    if not 0.0 <= quantile <= 1.0:
        raise STLError(f"quantile must be in [0, 1], got {quantile}")
    rs = _as_rules(rules)
    if signals is None:
        signals, complete = logged_signals(arrays)
    else:
        complete = np.asarray(arrays["ego_future_valid"], dtype=bool).all(axis=-1)
    idx = np.flatnonzero(complete)
    sig = {k: v[idx] for k, v in signals.items()}
    missing = sorted(set(rs.defaults()) - set(calibrated))
    if missing:
        raise STLError(f"calibrated values lack parameter(s) {missing}; run calibrate with the same rules")
    per_window = {k: torch.as_tensor(np.asarray(calibrated[k])[idx], dtype=torch.float64)[:, None] for k in rs.defaults()}
    shared = {}
    for r in rs.rules:
        for k, spec in r.params.items():
            shared[k] = _shared(np.asarray(calibrated[k])[idx], spec.loosen, quantile)
    own = rs.evaluate(sig, per_window)
    common = rs.evaluate(sig, shared)
    default = rs.evaluate(sig)
    n = len(idx)
    rows = {}
    for r in rs.rules:
        rows[r.name] = {
            "own_satisfied": int((own[r.name] >= 0).sum()),
            "shared_satisfied": int((common[r.name] >= 0).sum()),
            "default_satisfied": int((default[r.name] >= 0).sum()),
            "own_share": float((own[r.name] >= 0).double().mean()) if n else float("nan"),
            "shared_share": float((common[r.name] >= 0).double().mean()) if n else float("nan"),
            "default_share": float((default[r.name] >= 0).double().mean()) if n else float("nan"),
        }
    return {
        "windows": int(len(complete)),
        "complete_windows": n,
        "quantile": quantile,
        "shared_params": shared,
        "rules": rows,
    }
