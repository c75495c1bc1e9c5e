"""Convex trajectory optimization for the driving rules: sequential QPs with linearized unicycle dynamics.

Why this formulation (and not a mixed-integer big-M encoding): every rule
the augmentation uses is an *always* (G) of linear predicates once the
geometry is linearized (speed box, lane-offset box, heading box, comfort
bounds on acceleration and jerk, distance to each agent as a separating
half-plane), and the lane change ``F[0,T/2] G |offset| <= w`` is implied by
its conjunctive strengthening ``G[T/2, T] |offset| <= w``. So one QP per
window (Clarabel or OSQP, milliseconds) does what a MILP would need binaries
for, and a sufficient encoding keeps every accepted answer sound: each QP
solution is rolled out through the exact nonlinear unicycle and scored with
the exact STL robustness; only that verdict counts.

The program, per window (step ``k = 1..T``, controls ``omega_k, a_k``):

* speed and heading are exactly linear: ``v = v0 + dt·cumsum(a)``,
  ``theta = dt·cumsum(omega)``; only the position is bilinear and is
  linearized around a reference rollout (first-order in ``v`` and the
  mid-step heading);
* lane offset / heading error / target-lane offset are linearized at the
  reference's projection onto the lane polyline (exact on straight segments);
* ego–agent gaps: for every (step, agent, ego disc, agent disc) the
  constraint ``n·(c_ego - c_agent) >= r_ego + r_agent + dsafe`` with ``n``
  the reference direction between the discs (a half-plane, so it implies the
  true centre distance);
* the objective maximizes the smallest normalized slack ``rho`` (capped),
  with small control-effort and diversity (target speed) terms;
* a trust region on the heading keeps the linearization honest; the
  reference is re-linearized at the rollout of each solution (sequential
  convex programming) until the exact robustness is positive or the
  iteration budget is spent.

The QP is built once per (rules, mode, horizon, agent slots) with cvxpy
parameters (DPP), so a re-solve costs the solver time plus a little cvxpy
overhead. ``stop_at_line`` and ``yield`` are not encoded (they need
disjunctions); asking for them raises.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import cvxpy as cp
import numpy as np
import torch

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import EGO_SIZE, FUTURE_STEPS
from diffpilot.planning.dynamics import DEFAULT_LIMITS, UnicycleLimits, rollout_numpy
from diffpilot.planning.gradient import RULE_SCALES, _check_modes, active_rules, mode_scenes, rule_union
from diffpilot.stl.rules import RuleSet
from diffpilot.stl.signals import DISCS, DrivingScene, agents_over_horizon, project_on_lane, driving_signals

__all__ = ["CONVEX_RULES", "ConvexPlanner", "ConvexResult", "solve_convex"]

CONVEX_RULES = ("speed_limit", "lane_keeping", "heading", "safe_distance", "comfort", "lane_change")
"""Rules the convex program encodes."""
SOLVERS = ("CLARABEL", "OSQP")
_INACTIVE = -1e4


@dataclass
class ConvexResult:
    """One window's answer. ``feasible``: the rolled-out trajectory satisfies every active rule exactly."""

    status: str  # "satisfied", "infeasible" (rules contradict / no trajectory found), "solver_error"
    feasible: bool
    controls: np.ndarray  # (T, 2)
    trajectory: np.ndarray  # (T, 4)
    robustness: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    solve_s: float = 0.0
    message: str = ""


def _disc_offsets(length: float) -> np.ndarray:
    return ((np.arange(DISCS) + 0.5) / DISCS - 0.5) * length


def _disc_radius(length: np.ndarray | float, width: np.ndarray | float) -> np.ndarray:
    return np.sqrt((np.asarray(length) / (2 * DISCS)) ** 2 + (np.asarray(width) / 2) ** 2)


class ConvexPlanner:
    """A parametrized QP for one mode and rule set; :meth:`solve` runs the sequential convex loop on one window."""

    def __init__(
        self,
        rules: RuleSet,
        mode: str = "keep_lane",
        horizon: int = FUTURE_STEPS,
        limits: UnicycleLimits = DEFAULT_LIMITS,
        *,
        solver: str = "CLARABEL",
        max_agents: int = 8,
        iterations: int = 5,
        rho_cap: float = 1.0,
        heading_trust: float = 0.3,
    ) -> None:
        _check_modes((mode,))
        if solver not in SOLVERS:
            raise DatasetError(f"solver {solver!r} is not supported for the convex planner; use one of {SOLVERS}")
        if horizon < 2 or max_agents < 0 or iterations < 1:
            raise DatasetError(f"need horizon >= 2, max_agents >= 0, iterations >= 1; got {horizon}, {max_agents}, {iterations}")
        self.union = rule_union(rules, (mode,))
        self.active = active_rules(rules, mode)
        bad = [r for r in self.active if r not in CONVEX_RULES]
        if bad:
            raise DatasetError(f"the convex planner cannot encode rule(s) {bad} (they need disjunctions); "
                               f"it supports {list(CONVEX_RULES)} — use solver='gradient' for these")
        self.mode, self.T, self.limits, self.solver = mode, int(horizon), limits, solver
        self.K, self.iterations, self.rho_cap, self.heading_trust = int(max_agents), int(iterations), rho_cap, heading_trust
        self._build()

    # ------------------------------------------------------------------ QP
    def _build(self) -> None:
        T, dt, lim = self.T, self.limits.dt, self.limits
        L = np.tril(np.ones((T, T)))
        Mid = 0.5 * (np.eye(T) + np.eye(T, k=-1))  # mid-step heading, theta_0 = 0
        D = np.eye(T) - np.eye(T, k=-1)
        e0 = np.zeros(T)
        e0[0] = 1.0
        P = self.p = {
            "v0": cp.Parameter(), "a0": cp.Parameter(),
            "cphi": cp.Parameter(T), "sphi": cp.Parameter(T), "vsphi": cp.Parameter(T), "vcphi": cp.Parameter(T),
            "bx": cp.Parameter(T), "by": cp.Parameter(T), "th_ref": cp.Parameter(T), "v_target": cp.Parameter(T),
        }
        a, om, rho = cp.Variable(T), cp.Variable(T), cp.Variable()
        self.a, self.om, self.rho = a, om, rho
        dv = dt * (L @ a)  # speed change; kept parameter-free so products with parameters stay DPP
        v = P["v0"] + dv
        th = dt * (L @ om)
        mid = Mid @ th
        # bx / by carry the v0 terms and the linearization constants
        # positions are variables tied by equalities, so later products with parameters stay DPP
        px, py = cp.Variable(T), cp.Variable(T)
        cons = [px == dt * (L @ (cp.multiply(P["cphi"], dv) - cp.multiply(P["vsphi"], mid) + P["bx"])),
                py == dt * (L @ (cp.multiply(P["sphi"], dv) + cp.multiply(P["vcphi"], mid) + P["by"]))]
        cons += [cp.abs(om) <= lim.omega_max, a >= lim.accel_min, a <= lim.accel_max, v >= 0.0,
                cp.abs(th - P["th_ref"]) <= self.heading_trust, rho <= self.rho_cap]
        act = set(self.active)
        if "speed_limit" in act:
            s = RULE_SCALES["speed_limit"]
            P["vmin"], P["vmax"] = cp.Parameter(), cp.Parameter()
            cons += [v >= P["vmin"] + s * rho, v <= P["vmax"] - s * rho]
        if "lane_keeping" in act or "heading" in act:
            P["nx"], P["ny"], P["c_off"], P["lane_yaw"] = (cp.Parameter(T) for _ in range(4))
            off = cp.multiply(P["nx"], px) + cp.multiply(P["ny"], py) + P["c_off"]
            if "lane_keeping" in act:
                s = RULE_SCALES["lane_keeping"]
                P["dmin"], P["dmax"] = cp.Parameter(), cp.Parameter()
                cons += [off >= P["dmin"] + s * rho, off <= P["dmax"] - s * rho]
            if "heading" in act:
                s = RULE_SCALES["heading"]
                P["theta_max"] = cp.Parameter()
                cons += [cp.abs(th - P["lane_yaw"]) <= P["theta_max"] - s * rho]
        if "lane_change" in act:
            s = RULE_SCALES["lane_change"]
            k0 = T // 2  # G over [T/2, T] implies F[0, T/2] G
            P["tnx"], P["tny"], P["c_t"] = (cp.Parameter(T - k0) for _ in range(3))
            P["w_target"] = cp.Parameter()
            toff = cp.multiply(P["tnx"], px[k0:]) + cp.multiply(P["tny"], py[k0:]) + P["c_t"]
            cons += [cp.abs(toff) <= P["w_target"] - s * rho]
        if "comfort" in act:
            s = RULE_SCALES["comfort"]
            P["amax"], P["jmax"] = cp.Parameter(), cp.Parameter()
            jerk = (D @ a - P["a0"] * e0) / dt
            cons += [cp.abs(a) <= P["amax"] - s * rho, cp.abs(jerk) <= P["jmax"] - s * rho]
        if "safe_distance" in act and self.K > 0:
            s = RULE_SCALES["safe_distance"]
            R = T * self.K * DISCS * DISCS
            self._kidx = np.repeat(np.arange(T), self.K * DISCS * DISCS)
            P["gnx"], P["gny"], P["gth"], P["grhs"] = (cp.Parameter(R) for _ in range(4))
            P["dsafe"] = cp.Parameter()
            gap = cp.multiply(P["gnx"], px[self._kidx]) + cp.multiply(P["gny"], py[self._kidx]) \
                + cp.multiply(P["gth"], th[self._kidx])
            cons += [gap >= P["grhs"] + P["dsafe"] + s * rho]
        effort = cp.sum_squares(a / lim.accel_max) + cp.sum_squares(om / lim.omega_max)
        track = cp.sum_squares(v - P["v_target"])
        self.problem = cp.Problem(cp.Maximize(rho - 1e-3 * effort - 1e-3 * track), cons)
        self._v_expr, self._th_expr = v, th

    # ------------------------------------------------------------------ linearization
    def _linearize(self, scene: DrivingScene, ref: np.ndarray, params: Mapping[str, float], v_target: np.ndarray) -> None:
        T, P = self.T, self.p
        x, y, th, v = ref[:, 0], ref[:, 1], ref[:, 2], ref[:, 3]
        th_prev = np.concatenate([[0.0], th[:-1]])
        phi = 0.5 * (th + th_prev)
        P["v0"].value = float(scene.speed0[0])
        P["a0"].value = float(scene.accel0[0])
        P["cphi"].value, P["sphi"].value = np.cos(phi), np.sin(phi)
        P["vsphi"].value, P["vcphi"].value = v * np.sin(phi), v * np.cos(phi)
        v0 = float(scene.speed0[0])
        P["bx"].value = v * np.sin(phi) * phi + v0 * np.cos(phi)
        P["by"].value = -v * np.cos(phi) * phi + v0 * np.sin(phi)
        P["th_ref"].value = th
        P["v_target"].value = v_target
        for k in ("vmin", "vmax", "dmin", "dmax", "theta_max", "w_target", "amax", "jmax", "dsafe"):
            if k in P:
                P[k].value = float(params[k])
        pts = torch.as_tensor(ref[None, :, :2], dtype=scene.lanes.dtype)

        def lane_lin(lane_idx: int) -> tuple[np.ndarray, ...]:
            lane = scene.lanes[0, max(lane_idx, 0)][None]
            lat, head, _, _ = (t[0].numpy() for t in project_on_lane(pts, lane))
            nx, ny = -np.sin(head), np.cos(head)
            return nx, ny, lat - nx * x - ny * y, head

        if "nx" in P:
            nx, ny, c, head = lane_lin(int(scene.ref_lane[0]))
            P["nx"].value, P["ny"].value, P["c_off"].value = nx, ny, c
            P["lane_yaw"].value = th - ((th - head + np.pi) % (2 * np.pi) - np.pi)
        if "tnx" in P:
            nx, ny, c, _ = lane_lin(int(scene.target_lane[0]))
            k0 = T // 2
            P["tnx"].value, P["tny"].value, P["c_t"].value = nx[k0:], ny[k0:], c[k0:]
        if "gnx" in P:
            self._agent_rows(scene, ref)

    def _agent_rows(self, scene: DrivingScene, ref: np.ndarray) -> None:
        T, K, P = self.T, self.K, self.p
        pose, valid = (t[0].numpy() for t in agents_over_horizon(scene, T))  # (A, T, 3), (A, T)
        size = scene.agents_size[0].numpy()
        ego_off = _disc_offsets(EGO_SIZE[0])
        r_ego = float(_disc_radius(*EGO_SIZE))
        c, s = np.cos(ref[:, 2]), np.sin(ref[:, 2])
        ego_c = ref[:, None, :2] + ego_off[None, :, None] * np.stack([c, s], -1)[:, None]  # (T, n, 2)
        gnx = np.zeros((T, K, DISCS, DISCS))
        gny, gth = np.zeros_like(gnx), np.zeros_like(gnx)
        grhs = np.full_like(gnx, _INACTIVE)
        A = pose.shape[0]
        if A:
            frac = (np.arange(DISCS) + 0.5) / DISCS - 0.5
            ag_off = frac[None, :] * size[:, :1]  # (A, n)
            ag_c = pose[:, :, None, :2] + ag_off[:, None, :, None] * np.stack(
                [np.cos(pose[..., 2]), np.sin(pose[..., 2])], -1)[:, :, None]  # (A, T, n, 2)
            r_ag = _disc_radius(size[:, 0], size[:, 1])  # (A,)
            diff = ego_c[None, :, :, None] - ag_c[:, :, None]  # (A, T, n_e, n_a, 2)
            dist = np.linalg.norm(diff, axis=-1)
            gapmin = np.where(valid, (dist.min(axis=(-1, -2)) - r_ego - r_ag[:, None]), np.inf).min(axis=1)
            order = [int(i) for i in np.argsort(gapmin) if np.isfinite(gapmin[i])][:K]
            for slot, j in enumerate(order):
                n = diff[j] / np.maximum(dist[j], 1e-6)[..., None]  # (T, n_e, n_a, 2)
                perp = np.stack([-s, c], -1)[:, None, None]  # d c_ego / d theta direction / offset
                head = np.stack([c, s], -1)[:, None, None]
                off = ego_off[None, :, None]
                g_th = off * (n * perp).sum(-1)
                rhs = (r_ego + r_ag[j]) + (n * ag_c[j][:, None]).sum(-1) - off * (n * head).sum(-1) \
                    + g_th * ref[:, 2][:, None, None]
                ok = valid[j][:, None, None]
                gnx[:, slot] = np.where(ok, n[..., 0], 0.0)
                gny[:, slot] = np.where(ok, n[..., 1], 0.0)
                gth[:, slot] = np.where(ok, g_th, 0.0)
                grhs[:, slot] = np.where(ok, rhs, _INACTIVE)
        P["gnx"].value, P["gny"].value = gnx.reshape(-1), gny.reshape(-1)
        P["gth"].value, P["grhs"].value = gth.reshape(-1), grhs.reshape(-1)

    # ------------------------------------------------------------------ loop
    def _score(self, scene: DrivingScene, traj: np.ndarray, params: Mapping[str, float]) -> dict[str, float]:
        sig = driving_signals(torch.as_tensor(traj[None, None], dtype=scene.lanes.dtype), scene)
        vals = {k: float(v) for k, v in params.items() if k in self.union.defaults()}
        rho = self.union.evaluate(sig, vals)
        return {k: float(rho[k].reshape(-1)[0]) for k in self.active}

    def solve(self, scene: DrivingScene, params: Mapping[str, float], *, v_target: float | np.ndarray | None = None,
              init_controls: np.ndarray | None = None) -> ConvexResult:
        """Plan one window (``scene`` of batch 1 whose target lane matches the mode, see :func:`solve_convex`)."""
        if scene.batch != 1:
            raise DatasetError(f"ConvexPlanner.solve plans one window; got a scene batch of {scene.batch}")
        T, lim = self.T, self.limits
        vals = {**self.union.defaults(), **{k: float(v) for k, v in params.items()}}
        bad = [k for k, v in vals.items() if not np.isfinite(v)]
        if bad:
            raise DatasetError(f"parameter(s) {bad} are not finite")
        v0 = float(scene.speed0[0])
        vt = np.full(T, v0) if v_target is None else np.broadcast_to(np.asarray(v_target, dtype=float), (T,)).copy()
        ctrl = np.zeros((T, 2)) if init_controls is None else np.asarray(init_controls, dtype=float).reshape(T, 2)
        ref = rollout_numpy(ctrl, v0, lim)
        start = time.perf_counter()
        best: ConvexResult | None = None
        for it in range(1, self.iterations + 1):
            self._linearize(scene, ref, vals, vt)
            try:
                self.problem.solve(solver=self.solver, warm_start=self.solver == "OSQP")
            except cp.error.SolverError as e:
                return ConvexResult("solver_error", False, ctrl, ref, {}, it, time.perf_counter() - start,
                                    f"{self.solver} failed: {e}")
            if self.a.value is None or self.problem.status not in ("optimal", "optimal_inaccurate"):
                return ConvexResult("solver_error", False, ctrl, ref, {}, it, time.perf_counter() - start,
                                    f"{self.solver} returned status {self.problem.status!r}")
            ctrl = np.stack([self.om.value, self.a.value], -1)
            ref = rollout_numpy(ctrl, v0, lim)
            ctrl = _applied(ctrl, v0, lim)
            rob = self._score(scene, ref, vals)
            ok = min(rob.values()) > 0
            cand = ConvexResult("satisfied" if ok else "infeasible", ok, ctrl, ref, rob, it, 0.0)
            if best is None or min(rob.values()) > min(best.robustness.values()):
                best = cand
            if ok:
                break
        assert best is not None
        best.iterations = it
        best.solve_s = time.perf_counter() - start
        if not best.feasible:
            worst = sorted((v, k) for k, v in best.robustness.items() if v <= 0)
            best.message = (f"no trajectory satisfies every rule (QP slack rho = {float(self.rho.value):.3f} "
                            f"after {it} iteration(s)); violated: " + ", ".join(f"{k} ({v:.3f})" for v, k in worst)
                            + ("; the parameters contradict each other (e.g. vmin > vmax)" if _contradict(vals) else ""))
        return best


def _applied(ctrl: np.ndarray, v0: float, lim: UnicycleLimits) -> np.ndarray:
    """The controls the rollout actually applies (clipped like :func:`rollout_numpy`)."""
    out = ctrl.copy()
    v = v0
    for k in range(len(ctrl)):
        out[k, 0] = np.clip(ctrl[k, 0], -lim.omega_max, lim.omega_max)
        out[k, 1] = np.clip(ctrl[k, 1], max(lim.accel_min, -v / lim.dt), lim.accel_max)
        v = max(v + out[k, 1] * lim.dt, 0.0)
    return out


def _contradict(vals: Mapping[str, float]) -> bool:
    return (vals.get("vmin", 0) > vals.get("vmax", 1)) or (vals.get("dmin", 0) > vals.get("dmax", 1)) or any(
        vals.get(k, 1) < 0 for k in ("theta_max", "w_target", "amax", "jmax"))


def solve_convex(
    scene: DrivingScene,
    rules: RuleSet,
    params: Mapping[str, float],
    mode: str = "keep_lane",
    *,
    horizon: int = FUTURE_STEPS,
    solver: str = "CLARABEL",
    planner: ConvexPlanner | None = None,
    v_target: float | np.ndarray | None = None,
) -> ConvexResult:
    """Plan window 0 of ``scene`` in ``mode`` (one-off helper; reuse a :class:`ConvexPlanner` for many windows)."""
    rep, ok = mode_scenes(scene, (mode,))
    if not bool(ok[0, 0]):
        T = horizon
        return ConvexResult("infeasible", False, np.full((T, 2), np.nan), np.full((T, 4), np.nan), {}, 0, 0.0,
                            f"mode {mode!r} has no lane to follow or change to in this window")
    pl = planner or ConvexPlanner(rules, mode, horizon, solver=solver)
    return pl.solve(_first(rep), params, v_target=v_target)


def _first(scene: DrivingScene) -> DrivingScene:
    import dataclasses

    return DrivingScene(**{f.name: getattr(scene, f.name)[:1] for f in dataclasses.fields(scene)})
