"""Signal Temporal Logic formulas over named scalar signals, with named parameters.

A formula is an immutable tree. Leaves are linear predicates
``sum_i c_i * signal_i >= threshold`` whose coefficients and threshold may
contain named parameters (:class:`Param`), so one tree is a *template*
(``speed <= vmax``) that is evaluated for many parameter values at once.

Time is discrete: every interval ``[a, b]`` counts **steps of the signal's
sampling period** (0.5 s for the driving data, :data:`diffpilot.data.scenario.DT`),
``a`` and ``b`` inclusive. ``b=None`` means "up to the last step where the
operand is defined".

Semantics (robustness ``rho`` at step ``t``):

* predicate: ``sum_i c_i * s_i[t] - threshold``
* ``Not``: ``-rho``; ``And`` / ``Or``: min / max over the operands
* ``Always[a,b] phi``: min of ``rho_phi`` over ``[t+a, t+b]``
* ``Eventually[a,b] phi``: max of ``rho_phi`` over ``[t+a, t+b]``
* ``phi Until[a,b] psi``: max over ``t' in [t+a, t+b]`` of
  ``min(rho_psi[t'], min of rho_phi over [t, t'))`` — phi must hold from
  ``t`` up to (not including) the step where psi holds.

Example::

    speed, vmax = Signal("speed"), Param("vmax")
    rule = Always(speed <= vmax, 0, 19)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar, Union

__all__ = [
    "Affine",
    "Always",
    "And",
    "Eventually",
    "Formula",
    "Not",
    "Or",
    "Param",
    "Predicate",
    "STLError",
    "Signal",
    "Until",
    "always",
    "eventually",
]


class STLError(ValueError):
    """A formula, its interval, its signals or its parameter values are malformed.

    The message names the formula and the part that is wrong and says how to fix it.
    """


Number = Union[int, float]


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _fmt_num(x: float) -> str:
    return f"{x:g}"


# ---------------------------------------------------------------------------
# Parameters: affine expressions sum_j k_j * p_j + const
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """``const + sum_j k_j * param_j``: the value a coefficient or a threshold takes for given parameters."""

    terms: tuple[tuple[str, float], ...] = ()
    const: float = 0.0

    @staticmethod
    def of(x: Affine | Param | Number) -> Affine:
        """Coerce a number, a :class:`Param` or an :class:`Affine` into an :class:`Affine`."""
        if isinstance(x, Affine):
            return x
        if isinstance(x, Param):
            return Affine(((x.name, 1.0),), 0.0)
        if _is_number(x):
            value = float(x)
            if not math.isfinite(value):
                raise STLError(f"a constant in a formula must be finite, got {x!r}")
            return Affine((), value)
        raise STLError(f"expected a number or Param, got {type(x).__name__} {x!r}")

    def _combine(self, other: Affine, sign: float) -> Affine:
        acc: dict[str, float] = dict(self.terms)
        for name, k in other.terms:
            acc[name] = acc.get(name, 0.0) + sign * k
        terms = tuple((n, k) for n, k in acc.items() if k != 0.0)
        return Affine(terms, self.const + sign * other.const)

    def __add__(self, other: Affine | Param | Number) -> Affine:
        return self._combine(Affine.of(other), 1.0)

    __radd__ = __add__

    def __sub__(self, other: Affine | Param | Number) -> Affine:
        return self._combine(Affine.of(other), -1.0)

    def __rsub__(self, other: Affine | Param | Number) -> Affine:
        return Affine.of(other)._combine(self, -1.0)

    def __neg__(self) -> Affine:
        return Affine(tuple((n, -k) for n, k in self.terms), -self.const)

    def __mul__(self, k: Number) -> Affine:
        if not _is_number(k):
            raise STLError(f"parameters can only be scaled by numbers, got {k!r}")
        k = float(k)
        return Affine(tuple((n, c * k) for n, c in self.terms if c * k != 0.0), self.const * k)

    __rmul__ = __mul__

    def params(self) -> frozenset[str]:
        return frozenset(n for n, _ in self.terms)

    @property
    def is_constant(self) -> bool:
        return not self.terms

    def __str__(self) -> str:
        parts: list[str] = []
        for name, k in self.terms:
            if k == 1.0:
                parts.append(f"+ {name}")
            elif k == -1.0:
                parts.append(f"- {name}")
            else:
                parts.append(f"{'+' if k > 0 else '-'} {_fmt_num(abs(k))}*{name}")
        if self.const != 0.0 or not parts:
            parts.append(f"{'+' if self.const >= 0 else '-'} {_fmt_num(abs(self.const))}")
        text = " ".join(parts)
        return text[2:] if text.startswith("+ ") else "-" + text[2:]


@dataclass(frozen=True)
class Param:
    """A named parameter symbol (``Param("vmax")``); its value is given at evaluation time."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise STLError(f"a parameter name must be a non-empty string, got {self.name!r}")

    def __neg__(self) -> Affine:
        return -Affine.of(self)

    def __add__(self, other: Affine | Param | Number) -> Affine:
        return Affine.of(self) + other

    __radd__ = __add__

    def __sub__(self, other: Affine | Param | Number) -> Affine:
        return Affine.of(self) - other

    def __rsub__(self, other: Affine | Param | Number) -> Affine:
        return Affine.of(other) - self

    def __mul__(self, other: object) -> Affine | LinearExpr:
        if isinstance(other, (Signal, LinearExpr)):
            return LinearExpr.of(other) * self
        return Affine.of(self) * other  # type: ignore[arg-type]

    __rmul__ = __mul__

    def __str__(self) -> str:
        return self.name


# ---------------------------------------------------------------------------
# Signals: linear expressions sum_i c_i * signal_i + offset (offset may hold params)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearExpr:
    """``sum_i c_i * signal_i + offset`` with coefficients and offset :class:`Affine`; comparing builds a Predicate."""

    terms: tuple[tuple[str, Affine], ...] = ()
    offset: Affine = Affine()

    @staticmethod
    def of(x: LinearExpr | Signal | Param | Affine | Number) -> LinearExpr:
        if isinstance(x, LinearExpr):
            return x
        if isinstance(x, Signal):
            return LinearExpr(((x.name, Affine((), 1.0)),), Affine())
        return LinearExpr((), Affine.of(x))  # type: ignore[arg-type]

    def _combine(self, other: LinearExpr, sign: float) -> LinearExpr:
        acc: dict[str, Affine] = dict(self.terms)
        for name, c in other.terms:
            acc[name] = acc.get(name, Affine()) + c * sign
        terms = tuple((n, c) for n, c in acc.items() if c.terms or c.const != 0.0)
        return LinearExpr(terms, self.offset + other.offset * sign)

    def __add__(self, other: object) -> LinearExpr:
        return self._combine(LinearExpr.of(other), 1.0)  # type: ignore[arg-type]

    __radd__ = __add__

    def __sub__(self, other: object) -> LinearExpr:
        return self._combine(LinearExpr.of(other), -1.0)  # type: ignore[arg-type]

    def __rsub__(self, other: object) -> LinearExpr:
        return LinearExpr.of(other)._combine(self, -1.0)  # type: ignore[arg-type]

    def __neg__(self) -> LinearExpr:
        return LinearExpr(tuple((n, -c) for n, c in self.terms), -self.offset)

    def __mul__(self, k: object) -> LinearExpr:
        if _is_number(k):
            return LinearExpr(tuple((n, c * k) for n, c in self.terms), self.offset * k)  # type: ignore[arg-type]
        if isinstance(k, Param):
            if any(not c.is_constant for _, c in self.terms) or not self.offset.is_constant:
                raise STLError(f"a parameter may scale a signal only once (linear in the parameters): {k} * ({self})")
            if self.offset.const != 0.0:
                raise STLError(f"a parameter may multiply signals, not constants: {k} * ({self})")
            return LinearExpr(tuple((n, Affine(((k.name, c.const),), 0.0)) for n, c in self.terms), Affine())
        raise STLError(f"signals can be scaled by numbers or Params, got {k!r}")

    __rmul__ = __mul__

    def __ge__(self, other: object) -> Predicate:  # type: ignore[override]
        diff = self - other
        return Predicate(diff.terms, -diff.offset)

    def __le__(self, other: object) -> Predicate:  # type: ignore[override]
        diff = LinearExpr.of(other) - self  # type: ignore[arg-type]
        return Predicate(diff.terms, -diff.offset)

    def __str__(self) -> str:
        return _fmt_terms(self.terms) + ("" if self.offset.is_constant and self.offset.const == 0 else f" + ({self.offset})")


@dataclass(frozen=True)
class Signal:
    """A named scalar signal (``Signal("speed")``); arithmetic and ``<=`` / ``>=`` build predicates."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise STLError(f"a signal name must be a non-empty string, got {self.name!r}")

    def _lin(self) -> LinearExpr:
        return LinearExpr.of(self)

    def __add__(self, o: object) -> LinearExpr:
        return self._lin() + o

    __radd__ = __add__

    def __sub__(self, o: object) -> LinearExpr:
        return self._lin() - o

    def __rsub__(self, o: object) -> LinearExpr:
        return LinearExpr.of(o) - self._lin()  # type: ignore[arg-type]

    def __neg__(self) -> LinearExpr:
        return -self._lin()

    def __mul__(self, k: object) -> LinearExpr:
        return self._lin() * k

    __rmul__ = __mul__

    def __ge__(self, o: object) -> Predicate:  # type: ignore[override]
        return self._lin() >= o

    def __le__(self, o: object) -> Predicate:  # type: ignore[override]
        return self._lin() <= o

    def __str__(self) -> str:
        return self.name


def _fmt_coef(c: Affine) -> str:
    if c.is_constant:
        k = c.const
        return "" if k == 1.0 else "-" if k == -1.0 else f"{_fmt_num(k)}*"
    if len(c.terms) == 1 and c.const == 0.0:
        name, k = c.terms[0]
        return f"{name}*" if k == 1.0 else f"-{name}*" if k == -1.0 else f"{_fmt_num(k)}*{name}*"
    return f"({c})*"


def _fmt_terms(terms: tuple[tuple[str, Affine], ...]) -> str:
    if not terms:
        return "0"
    out = ""
    for i, (name, c) in enumerate(terms):
        coef = _fmt_coef(c)
        if i and coef.startswith("-"):
            out += f" - {coef[1:]}{name}"
        else:
            out += (" + " if i else "") + f"{coef}{name}"
    return out


# ---------------------------------------------------------------------------
# Formula tree
# ---------------------------------------------------------------------------


class Formula:
    """Base of every STL formula node; immutable, hashable, combinable with ``&``, ``|``, ``~``."""

    def __and__(self, other: Formula) -> And:
        return And(*_flatten(And, self), *_flatten(And, _check_formula(other, "&")))

    def __or__(self, other: Formula) -> Or:
        return Or(*_flatten(Or, self), *_flatten(Or, _check_formula(other, "|")))

    def __invert__(self) -> Not:
        return Not(self)

    def always(self, a: int = 0, b: int | None = None) -> Always:
        return Always(self, a, b)

    def eventually(self, a: int = 0, b: int | None = None) -> Eventually:
        return Eventually(self, a, b)

    def until(self, other: Formula, a: int = 0, b: int | None = None) -> Until:
        return Until(self, other, a, b)

    def children(self) -> tuple[Formula, ...]:
        return ()

    def signals(self) -> frozenset[str]:
        """Names of every signal the formula reads."""
        out: frozenset[str] = frozenset()
        for c in self.children():
            out |= c.signals()
        return out

    def params(self) -> frozenset[str]:
        """Names of every parameter the formula needs a value for."""
        out: frozenset[str] = frozenset()
        for c in self.children():
            out |= c.params()
        return out

    def horizon(self) -> int | None:
        """Steps after ``t`` the formula reads at time ``t`` (None if some interval is unbounded)."""
        raise NotImplementedError

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children()), default=0)


def _check_formula(x: object, where: str) -> Formula:
    if not isinstance(x, Formula):
        raise STLError(f"operand of {where} must be a Formula, got {type(x).__name__} {x!r}")
    return x


def _flatten(kind: type, f: Formula) -> tuple[Formula, ...]:
    return f.args if isinstance(f, kind) else (f,)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Predicate(Formula):
    """``sum_i c_i * signal_i >= threshold``; coefficients and threshold may hold parameters.

    Build it with comparisons (``Signal("v") <= Param("vmax")``) or directly:
    ``Predicate((("v", -1.0),), -Param("vmax"))`` — a plain number or a
    :class:`Param` is accepted for every coefficient and the threshold.
    """

    terms: tuple[tuple[str, Affine], ...]
    threshold: Affine = Affine()

    def __init__(self, terms: object, threshold: Affine | Param | Number = 0.0) -> None:
        if isinstance(terms, dict):
            items = list(terms.items())
        else:
            try:
                items = [tuple(t) for t in terms]  # type: ignore[union-attr]
            except TypeError as e:
                raise STLError(f"predicate terms must be (signal, coefficient) pairs or a dict, got {terms!r}") from e
        norm: list[tuple[str, Affine]] = []
        for item in items:
            if len(item) != 2 or not isinstance(item[0], str) or not item[0]:
                raise STLError(f"predicate term {item!r} must be (signal name, coefficient)")
            norm.append((item[0], Affine.of(item[1])))
        if not norm:
            raise STLError(f"predicate '0 >= {threshold}' reads no signal; give at least one (signal, coefficient) term")
        names = [n for n, _ in norm]
        if len(set(names)) != len(names):
            raise STLError(f"predicate lists a signal twice: {names}; merge the coefficients")
        object.__setattr__(self, "terms", tuple(norm))
        object.__setattr__(self, "threshold", Affine.of(threshold))

    def signals(self) -> frozenset[str]:
        return frozenset(n for n, _ in self.terms)

    def params(self) -> frozenset[str]:
        out = self.threshold.params()
        for _, c in self.terms:
            out |= c.params()
        return out

    def horizon(self) -> int | None:
        return 0

    def __str__(self) -> str:
        return f"({_fmt_terms(self.terms)} >= {self.threshold})"


@dataclass(frozen=True)
class Not(Formula):
    """Negation: robustness ``-rho``."""

    arg: Formula

    def __post_init__(self) -> None:
        _check_formula(self.arg, "Not")

    def children(self) -> tuple[Formula, ...]:
        return (self.arg,)

    def horizon(self) -> int | None:
        return self.arg.horizon()

    def __str__(self) -> str:
        return f"~{self.arg}"


class _NAry(Formula):
    args: tuple[Formula, ...]
    _symbol = ""

    def __init__(self, *args: Formula) -> None:
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            args = tuple(args[0])
        if len(args) < 1:
            raise STLError(f"{type(self).__name__} needs at least one operand")
        for a in args:
            _check_formula(a, type(self).__name__)
        object.__setattr__(self, "args", tuple(args))

    def children(self) -> tuple[Formula, ...]:
        return self.args

    def horizon(self) -> int | None:
        hs = [a.horizon() for a in self.args]
        return None if any(h is None for h in hs) else max(hs)  # type: ignore[type-var]

    def __str__(self) -> str:
        if len(self.args) == 1:
            return f"{type(self).__name__}({self.args[0]})"
        return "(" + f" {self._symbol} ".join(str(a) for a in self.args) + ")"


@dataclass(frozen=True, init=False)
class And(_NAry):
    """Conjunction of one or more formulas: robustness is the minimum."""

    args: tuple[Formula, ...]
    _symbol = "&"


@dataclass(frozen=True, init=False)
class Or(_NAry):
    """Disjunction of one or more formulas: robustness is the maximum."""

    args: tuple[Formula, ...]
    _symbol = "|"


def _check_interval(owner: str, a: object, b: object) -> tuple[int, int | None]:
    def is_int(x: object) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not is_int(a):
        raise STLError(f"{owner}: interval start a={a!r} must be an integer number of steps")
    if b is not None and not is_int(b):
        raise STLError(f"{owner}: interval end b={b!r} must be an integer number of steps (or None for unbounded)")
    a = int(a)  # type: ignore[arg-type]
    if a < 0:
        raise STLError(f"{owner}: interval [{a}, {b}] starts before 0; intervals look forward, use a >= 0")
    if b is not None:
        b = int(b)  # type: ignore[arg-type]
        if b < a:
            raise STLError(f"{owner}: interval [{a}, {b}] is empty (a > b); give a <= b")
    return a, b  # type: ignore[return-value]


def _fmt_interval(a: int, b: int | None) -> str:
    return f"[{a},{'inf' if b is None else b}]"


@dataclass(frozen=True)
class _Temporal(Formula):
    """A unary temporal operator over the step window ``[t+a, t+b]`` (``b=None``: to the signal's end)."""

    arg: Formula
    a: int = 0
    b: int | None = None
    SYMBOL: ClassVar[str] = ""

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_formula(self.arg, name)
        a, b = _check_interval(f"{name} {self.arg}", self.a, self.b)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    def children(self) -> tuple[Formula, ...]:
        return (self.arg,)

    def horizon(self) -> int | None:
        h = self.arg.horizon()
        return None if h is None or self.b is None else self.b + h

    def __str__(self) -> str:
        return f"{self.SYMBOL}{_fmt_interval(self.a, self.b)} {self.arg}"


@dataclass(frozen=True)
class Always(_Temporal):
    """``G[a,b] arg``: ``arg`` holds at every step of ``[t+a, t+b]`` (min)."""

    SYMBOL: ClassVar[str] = "G"


@dataclass(frozen=True)
class Eventually(_Temporal):
    """``F[a,b] arg``: ``arg`` holds at some step of ``[t+a, t+b]`` (max)."""

    SYMBOL: ClassVar[str] = "F"


@dataclass(frozen=True)
class Until(Formula):
    """``left U[a,b] right``: ``right`` holds at some ``t'`` in ``[t+a, t+b]`` and ``left`` on ``[t, t')``."""

    left: Formula
    right: Formula
    a: int = 0
    b: int | None = None

    def __post_init__(self) -> None:
        _check_formula(self.left, "Until")
        _check_formula(self.right, "Until")
        a, b = _check_interval(f"Until ({self.left} U {self.right})", self.a, self.b)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    def children(self) -> tuple[Formula, ...]:
        return (self.left, self.right)

    def horizon(self) -> int | None:
        hl, hr = self.left.horizon(), self.right.horizon()
        if hl is None or hr is None or self.b is None:
            return None
        return max(self.b - 1 + hl, self.b + hr) if self.b > 0 else self.b + hr

    def __str__(self) -> str:
        return f"({self.left} U{_fmt_interval(self.a, self.b)} {self.right})"


def always(arg: Formula, a: int = 0, b: int | None = None) -> Always:
    """``G[a,b] arg`` (``b=None``: to the end of the signal)."""
    return Always(arg, a, b)


def eventually(arg: Formula, a: int = 0, b: int | None = None) -> Eventually:
    """``F[a,b] arg`` (``b=None``: to the end of the signal)."""
    return Eventually(arg, a, b)
