"""Convert our formulas into stlpy formulas (for its solvers and as an independent robustness check).

stlpy accepts negation on predicates only, so negations are pushed down to
the predicates (De Morgan, ``~G = F~``, ``~F = G~`` and the dual of Until).
Until is built from stlpy's and/or trees with explicit time offsets rather
than ``STLFormula.until``: stlpy's until asks the left operand to hold from
``t+a`` on, ours (the usual discrete-time definition) from ``t`` on.
Every interval must be bounded: stlpy has no unbounded operators.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from diffpilot.stl.formula import (
    Affine,
    Always,
    And,
    Eventually,
    Formula,
    Not,
    Or,
    Predicate,
    STLError,
    Until,
)

__all__ = ["signals_to_stlpy", "to_stlpy"]


def _value(c: Affine, params: Mapping[str, float], formula: Formula) -> float:
    v = c.const
    for name, k in c.terms:
        if name not in params:
            raise STLError(f"formula {formula} needs parameter {name!r} with no value given; given: {sorted(params)}")
        v += k * float(params[name])
    return float(v)


def to_stlpy(formula: Formula, signal_order: Sequence[str], params: Mapping[str, float] | None = None):  # noqa: ANN201
    """The stlpy formula equal to ``formula`` for the given parameter values.

    ``signal_order`` fixes the rows of stlpy's ``(d, T)`` signal array
    (see :func:`signals_to_stlpy`).
    """
    from stlpy.STL import LinearPredicate, STLTree

    params = {} if params is None else dict(params)
    order = list(signal_order)
    index = {n: i for i, n in enumerate(order)}
    unknown = sorted(formula.signals() - set(index))
    if unknown:
        raise STLError(f"formula {formula} reads signal(s) {unknown} missing from signal_order {order}")
    missing = sorted(formula.params() - set(params))
    if missing:
        raise STLError(f"formula {formula} needs parameter(s) {missing} with no value given; given: {sorted(params)}")
    d = len(order)

    def conv(f: Formula, neg: bool):  # noqa: ANN202
        if isinstance(f, Predicate):
            a = np.zeros(d)
            for name, c in f.terms:
                a[index[name]] = _value(c, params, formula)
            b = _value(f.threshold, params, formula)
            return LinearPredicate(-a, -b, name=f"~{f}") if neg else LinearPredicate(a, b, name=str(f))
        if isinstance(f, Not):
            return conv(f.arg, not neg)
        if isinstance(f, (And, Or)):
            kind = "and" if isinstance(f, And) != neg else "or"
            return STLTree([conv(c, neg) for c in f.args], kind, [0] * len(f.args))
        if isinstance(f, (Always, Eventually)):
            if f.b is None:
                raise STLError(f"stlpy needs bounded intervals; {f} has none; give b")
            kind = "and" if isinstance(f, Always) != neg else "or"
            child = conv(f.arg, neg)
            steps = list(range(f.a, f.b + 1))
            return STLTree([child] * len(steps), kind, steps)
        if isinstance(f, Until):
            if f.b is None:
                raise STLError(f"stlpy needs bounded intervals; {f} has none; give b")
            left, right = conv(f.left, neg), conv(f.right, neg)
            inner_kind, outer_kind = ("or", "and") if neg else ("and", "or")
            branches = []
            for tp in range(f.a, f.b + 1):
                branches.append(STLTree([left] * tp + [right], inner_kind, list(range(tp)) + [tp]))
            return STLTree(branches, outer_kind, [0] * len(branches))
        raise STLError(f"cannot convert formula node {type(f).__name__}: {f}")

    return conv(formula, False)


def signals_to_stlpy(signals: Mapping[str, np.ndarray], signal_order: Sequence[str]) -> np.ndarray:
    """Stack 1-D signals ``(T,)`` into stlpy's ``(d, T)`` array in ``signal_order``."""
    missing = [n for n in signal_order if n not in signals]
    if missing:
        raise STLError(f"signals {missing} from signal_order are not given; known: {sorted(signals)}")
    return np.stack([np.asarray(signals[n], dtype=np.float64).reshape(-1) for n in signal_order])
