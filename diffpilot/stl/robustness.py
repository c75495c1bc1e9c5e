"""Batched STL robustness in torch: exact (min/max) and smooth (log-sum-exp), differentiable.

Signals are ``(..., T)`` tensors keyed by name; parameter values are tensors
(or numbers) that broadcast against the signals' leading dimensions, so one
call scores trajectories × parameter sets: signals ``(N, 1, T)`` with
parameters ``(1, M)`` give robustness ``(N, M)``.

Horizon convention (as stlpy, which refuses to read past the end of the
signal): a formula evaluated at step ``t`` must find every step it reads
inside the signal. :func:`robustness_trace` therefore returns the robustness
at the steps ``0 .. T-1-horizon`` only, and :func:`robustness` raises
:class:`STLError` when ``t`` is too late. An unbounded interval (``b=None``)
reaches to the last step where its operand is defined.

Smooth semantics replace ``min`` by ``-tau * logsumexp(-x / tau)`` and
``max`` by ``tau * logsumexp(x / tau)``; each soft min/max over ``n`` values
is within ``tau * log(n)`` of the exact one (below a min, above a max), so
the result converges to the exact robustness as ``tau -> 0``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

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

__all__ = ["prepare_inputs", "robustness", "robustness_trace"]

ArrayLike = Tensor | np.ndarray | float | int


def _as_tensor(x: ArrayLike, dtype: torch.dtype | None, what: str) -> Tensor:
    try:
        # a number or array converts straight to ``dtype``: through torch's default float32 first, 0.3 would not stay 0.3
        t = torch.as_tensor(x) if dtype is None or isinstance(x, Tensor) else torch.as_tensor(x, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as e:
        raise STLError(f"{what} must be a tensor or array of numbers, got {type(x).__name__}") from e
    if dtype is not None:
        return t.to(dtype)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _first_nan(x: Tensor) -> tuple[int, ...] | None:
    bad = torch.isnan(x.detach())
    if not bool(bad.any()):
        return None
    flat = int(torch.nonzero(bad.reshape(-1), as_tuple=False)[0, 0])
    return tuple(int(i) for i in np.unravel_index(flat, tuple(x.shape)))


def prepare_inputs(
    formula: Formula,
    signals: Mapping[str, ArrayLike],
    params: Mapping[str, ArrayLike] | None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Check and convert the signals and parameter values a formula needs (shared float dtype)."""
    if not isinstance(formula, Formula):
        raise STLError(f"expected a Formula, got {type(formula).__name__}")
    if not isinstance(signals, Mapping):
        raise STLError(f"signals must be a dict name -> (..., T) tensor, got {type(signals).__name__}")
    params = {} if params is None else params
    needed = sorted(formula.signals())
    missing = [n for n in needed if n not in signals]
    if missing:
        raise STLError(
            f"formula {formula} reads signal(s) {missing} that are not given; known signals: {sorted(signals)}"
        )
    needed_p = sorted(formula.params())
    missing_p = [n for n in needed_p if n not in params]
    if missing_p:
        raise STLError(
            f"formula {formula} needs parameter(s) {missing_p} with no value given; given: {sorted(params)}"
        )
    first = signals[needed[0]]
    dtype = _as_tensor(first, None, f"signal {needed[0]!r}").dtype
    sig: dict[str, Tensor] = {}
    length = None
    for name in needed:
        x = _as_tensor(signals[name], dtype, f"signal {name!r}")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise STLError(f"signal {name!r} must have shape (..., T) with T >= 1, got {tuple(x.shape)}")
        if length is None:
            length = x.shape[-1]
        elif x.shape[-1] != length:
            raise STLError(
                f"signal {name!r} has {x.shape[-1]} steps but {needed[0]!r} has {length}; all signals share one time axis"
            )
        bad = _first_nan(x)
        if bad is not None:
            raise STLError(f"signal {name!r} of formula {formula} is NaN at index {bad}; clean or mask it first")
        sig[name] = x
    par: dict[str, Tensor] = {}
    for name in needed_p:
        v = _as_tensor(params[name], dtype, f"parameter {name!r}")
        bad = _first_nan(v)
        if bad is not None:
            raise STLError(f"parameter {name!r} of formula {formula} is NaN at index {bad}")
        par[name] = v
    return sig, par


def _affine(c: Affine, params: dict[str, Tensor]) -> Tensor | float:
    value: Tensor | float = c.const
    for name, k in c.terms:
        value = value + k * params[name]
    return value


def _expand(v: Tensor | float) -> Tensor | float:
    return v.unsqueeze(-1) if isinstance(v, Tensor) else v


class _Evaluator:
    """One pass over the tree; shared sub-formulas are evaluated once."""

    def __init__(self, signals: dict[str, Tensor], params: dict[str, Tensor], smooth: float | None, T: int):
        self.signals = signals
        self.params = params
        self.tau = smooth
        self.T = T
        self.cache: dict[int, Tensor] = {}

    # soft/exact reductions --------------------------------------------------
    def _min(self, x: Tensor, dim: int = -1) -> Tensor:
        if self.tau is None:
            return x.amin(dim=dim)
        return -self.tau * torch.logsumexp(-x / self.tau, dim=dim)

    def _max(self, x: Tensor, dim: int = -1) -> Tensor:
        if self.tau is None:
            return x.amax(dim=dim)
        return self.tau * torch.logsumexp(x / self.tau, dim=dim)

    def _cummin(self, x: Tensor) -> Tensor:
        if self.tau is None:
            return torch.cummin(x, dim=-1).values
        return -self.tau * torch.logcumsumexp(-x / self.tau, dim=-1)

    def _cummax(self, x: Tensor) -> Tensor:
        if self.tau is None:
            return torch.cummax(x, dim=-1).values
        return self.tau * torch.logcumsumexp(x / self.tau, dim=-1)

    def _too_short(self, f: Formula, length: int) -> STLError:
        h = f.horizon()
        need = f"{h + 1} steps" if h is not None else "more steps"
        return STLError(
            f"formula {f} reads past the end of the signals: it needs at least {need} from the evaluation step, "
            f"the signals have {self.T} (operand defined on {length} steps); use longer signals or a shorter interval"
        )

    # evaluation -------------------------------------------------------------
    def trace(self, f: Formula) -> Tensor:
        key = id(f)
        if key not in self.cache:
            self.cache[key] = self._trace(f)
        return self.cache[key]

    def _trace(self, f: Formula) -> Tensor:
        if isinstance(f, Predicate):
            out: Tensor | float = 0.0
            for name, c in f.terms:
                out = out + _expand(_affine(c, self.params)) * self.signals[name]
            return out - _expand(_affine(f.threshold, self.params))  # type: ignore[return-value]
        if isinstance(f, Not):
            return -self.trace(f.arg)
        if isinstance(f, (And, Or)):
            parts = [self.trace(a) for a in f.args]
            if len(parts) == 1:
                return parts[0]
            L = min(p.shape[-1] for p in parts)
            parts = torch.broadcast_tensors(*[p[..., :L] for p in parts])
            stacked = torch.stack(parts, dim=-1)
            return self._min(stacked) if isinstance(f, And) else self._max(stacked)
        if isinstance(f, (Always, Eventually)):
            x = self.trace(f.arg)
            L = x.shape[-1]
            use_min = isinstance(f, Always)
            if f.b is None:
                if L - f.a <= 0:
                    raise self._too_short(f, L)
                tail = x[..., f.a :].flip(-1)
                cum = self._cummin(tail) if use_min else self._cummax(tail)
                return cum.flip(-1)
            n = L - f.b
            if n <= 0:
                raise self._too_short(f, L)
            win = x[..., f.a :].unfold(-1, f.b - f.a + 1, 1)
            return self._min(win) if use_min else self._max(win)
        if isinstance(f, Until):
            return self._until(f)
        raise STLError(f"unknown formula node {type(f).__name__}: {f}")

    def _until(self, f: Until) -> Tensor:
        psi = self.trace(f.right)
        if f.b == 0:  # right must hold now; left is never read
            return psi
        phi = self.trace(f.left)
        Lphi, Lpsi = phi.shape[-1], psi.shape[-1]
        a = f.a
        if f.b is None:
            end = min(Lpsi - 1, Lphi)  # last step where psi can hold with phi known before it
            n = end - a + 1
            B = end
        else:
            B = f.b
            n = min(Lpsi - B, Lphi - B + 1) if B >= 1 else Lpsi
        if n <= 0:
            raise self._too_short(f, min(Lphi, Lpsi))
        W = B - a + 1
        psi_p = _pad_edge(psi, n + B)
        psi_w = psi_p[..., a : a + n + W - 1].unfold(-1, W, 1)  # psi[t + a + j]
        if B >= 1:
            phi_p = _pad_edge(phi, n + B - 1)
            phi_w = phi_p[..., : n + B - 1].unfold(-1, B, 1)  # phi[t + k], k < B
            prefix = self._cummin(phi_w)  # min phi[t .. t + k]
            inf = torch.full_like(prefix[..., :1], float("inf"))
            guard = torch.cat([inf, prefix], dim=-1)[..., a : B + 1]  # min phi[t .. t + a + j - 1]
        else:
            guard = torch.full_like(psi_w, float("inf"))
        psi_w, guard = torch.broadcast_tensors(psi_w, guard)
        val = self._min(torch.stack([psi_w, guard], dim=-1))
        if f.b is None:
            t = torch.arange(n).unsqueeze(-1)
            j = torch.arange(W).unsqueeze(0)
            mask = (t + a + j) <= end
            val = torch.where(mask, val, torch.full_like(val, float("-inf")))
        return self._max(val)


def _pad_edge(x: Tensor, length: int) -> Tensor:
    """``x`` extended to at least ``length`` steps by repeating its last value (masked out by the caller)."""
    extra = length - x.shape[-1]
    if extra <= 0:
        return x
    return torch.cat([x, x[..., -1:].expand(*x.shape[:-1], extra)], dim=-1)


def _check_smooth(smooth: float | None) -> float | None:
    if smooth is None:
        return None
    try:
        tau = float(smooth)
    except (TypeError, ValueError) as e:
        raise STLError(f"smooth must be a positive temperature or None, got {smooth!r}") from e
    if not tau > 0 or not np.isfinite(tau):
        raise STLError(f"smooth must be a positive finite temperature (or None for exact), got {smooth!r}")
    return tau


def robustness_trace(
    formula: Formula,
    signals: Mapping[str, ArrayLike],
    params: Mapping[str, ArrayLike] | None = None,
    *,
    smooth: float | None = None,
) -> Tensor:
    """Robustness at every step where the formula can be evaluated: ``(..., T - horizon)``.

    ``smooth=None`` gives the exact min/max semantics; a positive ``smooth``
    is the log-sum-exp temperature (smaller is closer to exact).
    """
    tau = _check_smooth(smooth)
    sig, par = prepare_inputs(formula, signals, params)
    T = next(iter(sig.values())).shape[-1]
    ev = _Evaluator(sig, par, tau, T)
    return ev.trace(formula)


def robustness(
    formula: Formula,
    signals: Mapping[str, ArrayLike],
    params: Mapping[str, ArrayLike] | None = None,
    *,
    smooth: float | None = None,
    t: int = 0,
) -> Tensor:
    """Robustness of ``formula`` at step ``t``, batched over the signals' and parameters' leading dims."""
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
        raise STLError(f"evaluation step t must be a non-negative integer, got {t!r}")
    trace = robustness_trace(formula, signals, params, smooth=smooth)
    L = trace.shape[-1]
    if t >= L:
        T = next(iter(prepare_inputs(formula, signals, params)[0].values())).shape[-1]
        raise STLError(
            f"formula {formula} cannot be evaluated at step {t}: with {T} signal steps and horizon "
            f"{formula.horizon()} the last evaluable step is {L - 1}; use longer signals or an earlier t"
        )
    return trace[..., int(t)]
