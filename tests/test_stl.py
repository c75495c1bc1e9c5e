"""STL formulas and robustness: hand-computed values, stlpy agreement, smooth semantics, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpilot.stl.formula import (
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
)
from diffpilot.stl.robustness import robustness, robustness_trace
from diffpilot.stl.stlpy_bridge import signals_to_stlpy, to_stlpy

X, Y = Signal("x"), Signal("y")
SIG = {
    "x": torch.tensor([1.0, 3.0, -2.0, 4.0, 0.5, 2.0], dtype=torch.float64),
    "y": torch.tensor([0.0, -1.0, 2.0, 5.0, 1.0, -3.0], dtype=torch.float64),
}


def _tr(f: Formula, sig: dict = SIG, params: dict | None = None, smooth: float | None = None) -> list[float]:
    return robustness_trace(f, sig, params, smooth=smooth).tolist()


# ---------------------------------------------------------------------------
# hand-computed robustness per operator
# ---------------------------------------------------------------------------


def test_predicate_linear_form_with_params() -> None:
    f = 2.0 * X - Y >= Param("c")
    assert _tr(f, params={"c": 1.0}) == [1.0, 6.0, -7.0, 2.0, -1.0, 6.0]
    g = Predicate({"x": Param("k")}, 0.5)  # k*x >= 0.5
    assert _tr(g, params={"k": -1.0}) == [-1.5, -3.5, 1.5, -4.5, -1.0, -2.5]
    assert f.params() == {"c"} and f.signals() == {"x", "y"}


def test_not_and_or() -> None:
    px, py = X >= 0.0, Y >= 0.0
    assert _tr(~px) == [-1.0, -3.0, 2.0, -4.0, -0.5, -2.0]
    assert _tr(px & py) == [0.0, -1.0, -2.0, 4.0, 0.5, -3.0]
    assert _tr(px | py) == [1.0, 3.0, 2.0, 5.0, 1.0, 2.0]
    assert _tr(And(px, py, X >= 2.0)) == [-1.0, -1.0, -4.0, 2.0, -1.5, -3.0]
    assert isinstance(px & py & px, And) and len((px & py & px).args) == 3  # flattened


def test_always_and_eventually_windows() -> None:
    px = X >= 0.0
    # G[1,2] x>=0 at t: min(x[t+1], x[t+2]); defined for t = 0..3
    assert _tr(Always(px, 1, 2)) == [-2.0, -2.0, 0.5, 0.5]
    assert _tr(Eventually(px, 0, 2)) == [3.0, 4.0, 4.0, 4.0]
    # unbounded: to the end of the signal
    assert _tr(Always(px, 0, None)) == [-2.0, -2.0, -2.0, 0.5, 0.5, 2.0]
    assert _tr(Eventually(px, 2, None)) == [4.0, 4.0, 2.0, 2.0]


def test_until_bounded_and_unbounded() -> None:
    # x >= 0 U[1,3] y >= 2, with rho_psi = y - 2 = [-2, -3, 0, 3, -1, -5]:
    # t=0: t'=1 -> min(-3, x0=1) = -3; t'=2 -> min(0, min(1, 3)) = 0; t'=3 -> min(3, min(1, 3, -2)) = -2  => 0
    # t=1: t'=2 -> min(0, 3) = 0; t'=3 -> min(3, -2); t'=4 -> min(-1, -2)  => 0
    # t=2: t'=3 -> min(3, -2); t'=4 -> min(-1, -2); t'=5 -> -5  => -2
    f = Until(X >= 0.0, Y >= 2.0, 1, 3)
    tr = _tr(f)
    assert tr == [0.0, 0.0, -2.0]
    assert len(tr) == 3
    # b = 0: the right operand now, left never read
    assert _tr(Until(X >= 100.0, Y >= 0.0, 0, 0)) == _tr(Y >= 0.0)
    # unbounded until equals the bounded one reaching the last step, at t = 0
    T = 6
    unb = robustness(Until(X >= -1.0, Y >= 4.0, 0, None), SIG)
    bnd = robustness(Until(X >= -1.0, Y >= 4.0, 0, T - 1), SIG)
    assert float(unb) == float(bnd) == pytest.approx(-1.0)


def test_str_is_readable() -> None:
    f = Always((Signal("speed") <= Param("vmax")) & ~(X >= 1.5), 0, 4) | Eventually(Y >= 0.0, 2, None)
    s = str(f)
    assert "G[0,4]" in s and "F[2,inf]" in s and "vmax" in s and "speed" in s and "~" in s


# ---------------------------------------------------------------------------
# stlpy agreement on random formulas
# ---------------------------------------------------------------------------


def _random_formula(rng: np.random.Generator, depth: int, names: list[str]) -> Formula:
    if depth == 0 or rng.random() < 0.2:
        k = int(rng.integers(1, len(names) + 1))
        chosen = rng.choice(names, size=k, replace=False)
        return Predicate({str(n): float(rng.normal()) for n in chosen}, float(rng.normal()))
    a = int(rng.integers(0, 3))
    b = a + int(rng.integers(0, 4))
    kind = int(rng.integers(0, 6))
    sub = lambda: _random_formula(rng, depth - 1, names)  # noqa: E731
    if kind == 0:
        return Not(sub())
    if kind == 1:
        return And(*[sub() for _ in range(int(rng.integers(1, 4)))])
    if kind == 2:
        return Or(*[sub() for _ in range(int(rng.integers(1, 4)))])
    if kind == 3:
        return Always(sub(), a, b)
    if kind == 4:
        return Eventually(sub(), a, b)
    return Until(sub(), sub(), a, b)


def test_exact_robustness_matches_stlpy_on_random_formulas() -> None:
    rng = np.random.default_rng(7)
    kinds_seen: set[str] = set()
    for _ in range(200):
        names = ["a", "b", "c"][: int(rng.integers(2, 4))]
        f = _random_formula(rng, 3, names)
        stack = [f]
        while stack:
            g = stack.pop()
            kinds_seen.add(type(g).__name__)
            stack.extend(g.children())
        T = f.horizon() + 1 + int(rng.integers(0, 4))
        sig = {n: rng.normal(size=T) * 2.0 for n in names}
        ours = robustness_trace(f, {k: torch.as_tensor(v) for k, v in sig.items()}).numpy()
        assert ours.shape == (T - f.horizon(),)
        sp = to_stlpy(f, names)
        y = signals_to_stlpy(sig, names)
        ref = np.array([float(np.squeeze(sp.robustness(y, t))) for t in range(len(ours))])
        np.testing.assert_allclose(ours, ref, atol=1e-6, err_msg=str(f))
    assert kinds_seen >= {"Predicate", "Not", "And", "Or", "Always", "Eventually", "Until"}


def test_stlpy_bridge_rejects_unbounded_and_missing_params() -> None:
    with pytest.raises(STLError, match="bounded"):
        to_stlpy(Always(X >= 0.0), ["x"])
    with pytest.raises(STLError, match="vmax"):
        to_stlpy(X <= Param("vmax"), ["x"], {})
    with pytest.raises(STLError, match="signal_order"):
        to_stlpy(Y >= 0.0, ["x"])


# ---------------------------------------------------------------------------
# smooth semantics
# ---------------------------------------------------------------------------


def test_smooth_converges_to_exact() -> None:
    rng = np.random.default_rng(3)
    f = Always((X >= 0.0) | Eventually(Y >= 1.0, 0, 2), 0, 3) & Until(X >= -3.0, Y >= 0.0, 0, 2)
    sig = {"x": torch.as_tensor(rng.normal(size=(16, 12))), "y": torch.as_tensor(rng.normal(size=(16, 12)))}
    exact = robustness(f, sig)
    errors = [float((robustness(f, sig, smooth=tau) - exact).abs().max()) for tau in (1.0, 0.1, 0.01, 0.001)]
    assert errors[-1] < 0.01
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:]))
    # soft min is a lower bound within tau*log(n): G[0,5] over 6 values
    g = Always(X >= 0.0, 0, 5)
    tau = 0.2
    soft, hard = robustness(g, sig, smooth=tau), robustness(g, sig)
    assert bool((soft <= hard + 1e-12).all()) and bool((soft >= hard - tau * np.log(6) - 1e-12).all())


def test_smooth_gradients_flow_and_match_finite_differences() -> None:
    f = Always((X >= Param("c")) | (Y <= 1.0), 0, 2) & Until(X >= -1.0, Y >= 0.0, 0, 2)
    x = torch.tensor([0.3, -0.2, 0.8, 0.1, 0.5], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([-0.5, 0.4, 1.3, 0.2, -0.1], dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    fn = lambda x, y, c: robustness(f, {"x": x, "y": y}, {"c": c}, smooth=0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y, c))
    fn(x, y, c).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0 and float(c.grad) != 0.0
    # unbounded operators (reverse cumulative / masked until) are differentiable too
    g = Always(X >= 0.0, 1, None) | Until(X >= 0.0, Y >= 1.0, 0, None)
    assert torch.autograd.gradcheck(lambda x, y: robustness(g, {"x": x, "y": y}, smooth=0.3), (x, y))


# ---------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------


def test_broadcast_trajectories_by_parameter_sets() -> None:
    rng = np.random.default_rng(0)
    N, M, T = 5, 4, 10
    speed = torch.as_tensor(rng.uniform(0, 20, size=(N, 1, T)))
    vmax = torch.as_tensor(rng.uniform(5, 25, size=(1, M)))
    vmin = torch.as_tensor(rng.uniform(-1, 3, size=(1, M)))
    v = Signal("speed")
    f = Always((v >= Param("vmin")) & (v <= Param("vmax")), 0, T - 1)
    out = robustness(f, {"speed": speed}, {"vmax": vmax, "vmin": vmin})
    assert out.shape == (N, M)
    for n in range(N):
        for m in range(M):
            s = speed[n, 0]
            expect = min(float((s - vmin[0, m]).min()), float((vmax[0, m] - s).min()))
            assert float(out[n, m]) == pytest.approx(expect, abs=1e-12)
    assert robustness(f, {"speed": speed}, {"vmax": vmax, "vmin": vmin}, smooth=0.05).shape == (N, M)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_unknown_signal_lists_known_ones() -> None:
    with pytest.raises(STLError, match=r"\['z'\].*known signals: \['x', 'y'\]"):
        robustness(Signal("z") >= 0.0, SIG)


@pytest.mark.parametrize(
    ("a", "b", "msg"),
    [(3, 1, "a > b"), (-1, 2, "starts before 0"), (0.5, 2, "integer"), (0, 2.5, "integer"), (True, 2, "integer")],
)
def test_malformed_interval(a: object, b: object, msg: str) -> None:
    for op in (Always, Eventually):
        with pytest.raises(STLError, match=msg) as e:
            op(X >= 0.0, a, b)
        assert "(x >= 0)" in str(e.value)
    with pytest.raises(STLError, match=msg):
        Until(X >= 0.0, Y >= 0.0, a, b)


def test_missing_parameter_names_it() -> None:
    with pytest.raises(STLError, match=r"parameter\(s\) \['vmax'\].*given: \['vmin'\]"):
        robustness(X <= Param("vmax"), SIG, {"vmin": 1.0})


def test_nan_signal_names_signal_and_index() -> None:
    bad = dict(SIG)
    y = SIG["y"].clone()[None].repeat(2, 1)
    y[1, 4] = float("nan")
    bad["y"] = y
    bad["x"] = SIG["x"][None].repeat(2, 1)
    with pytest.raises(STLError, match=r"signal 'y'.*NaN at index \(1, 4\)"):
        robustness(Always(Y >= 0.0, 0, 2), bad)


def test_horizon_and_other_errors() -> None:
    with pytest.raises(STLError, match="reads past the end"):
        robustness(Always(X >= 0.0, 0, 6), SIG)
    with pytest.raises(STLError, match="last evaluable step is 3"):
        robustness(Always(X >= 0.0, 0, 2), SIG, t=4)
    with pytest.raises(STLError, match="temperature"):
        robustness(X >= 0.0, SIG, smooth=0.0)
    with pytest.raises(STLError, match="share one time axis"):
        robustness(X >= Y, {"x": SIG["x"], "y": SIG["y"][:4]})
    with pytest.raises(STLError, match="Formula"):
        _ = (X >= 0.0) & 3  # type: ignore[operator]
    with pytest.raises(STLError, match="finite"):
        _ = X >= float("inf")
    with pytest.raises(STLError, match="NaN"):
        robustness(X >= Param("c"), SIG, {"c": float("nan")})
