"""Batched gradient trajectory optimization on smooth STL robustness (the pSTL augmentation optimizer).

Every trajectory is a unicycle rollout of bounded controls
(:mod:`diffpilot.planning.dynamics`); Adam ascends a soft minimum over the
active rules of each rule's smooth (log-sum-exp) robustness, normalized by a
per-rule scale so metres, m/s and radians weigh alike, with a hinge at
``margin`` (once a trajectory clears every rule by the margin it is left
alone, which keeps the random initial controls' diversity) and a small
control-effort term. One call optimizes windows × modes × parameter samples
at once. The verdict is always the *exact* robustness: a trajectory counts
as satisfying only if every active rule's exact robustness is > 0.

The signals come from :func:`rule_signals` (only those the rules read, the closest disc pair
found without gradient), the scenes of a batch of windows from :func:`window_scene` (one batched
lane projection); both give exactly the values of :mod:`diffpilot.stl.signals`.

Modes: ``keep_lane`` uses the given rules without ``lane_change``;
``left`` / ``right`` replace ``lane_keeping`` by ``lane_change`` towards the
neighbouring lane on that side. A window without such a lane has that mode
marked invalid (nothing from it is kept).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import DT, EGO_SIZE, FUTURE_STEPS, MODES
from diffpilot.planning.dynamics import DEFAULT_LIMITS, UnicycleLimits, controls_from_raw, raw_from_controls, rollout
from diffpilot.stl.robustness import robustness
from diffpilot.stl.rules import RuleSet, make_rule
from diffpilot.stl.signals import (
    DIST_CAP_M,
    DISCS,
    TARGET_LANE_OFFSET_M,
    DrivingScene,
    agents_over_horizon,
    driving_signals,
    lane_choice,
    project_on_lane,
    scene_from_arrays,
)

__all__ = [
    "MODES",
    "RULE_SCALES",
    "TrajOptResult",
    "active_rules",
    "lane_choices",
    "mode_scenes",
    "normalized_rule_robustness",
    "optimize_controls",
    "prune_agents",
    "rule_signals",
    "rule_union",
    "take_scene",
    "window_scene",
]

_EGO = EGO_SIZE
MODE_SIDE = {"keep_lane": 0, "left": 1, "right": -1}

RULE_SCALES: dict[str, float] = {
    "speed_limit": 1.0,
    "lane_keeping": 0.5,
    "heading": 0.1,
    "safe_distance": 1.0,
    "lane_change": 0.5,
    "stop_at_line": 1.0,
    "yield": 1.0,
    "comfort": 1.0,
}
"""Robustness per rule is divided by this (its unit's typical slack) before rules are compared."""


def _check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = (modes,)
    modes = tuple(modes)
    if not modes:
        raise DatasetError(f"give at least one mode out of {MODES}")
    bad = [m for m in modes if m not in MODE_SIDE]
    if bad:
        raise DatasetError(f"unknown mode(s) {bad}; known modes: {list(MODES)}")
    if len(set(modes)) != len(modes):
        raise DatasetError(f"modes repeat in {list(modes)}")
    return modes


def active_rules(rules: RuleSet, mode: str) -> list[str]:
    """Names of the rules that apply in ``mode`` (lane changes swap lane keeping for the lane-change rule)."""
    _check_modes((mode,))
    names = [n for n in rules.names if n != "lane_change"]
    if mode == "keep_lane":
        return names
    return [n for n in names if n != "lane_keeping"] + ["lane_change"]


def rule_union(rules: RuleSet, modes: Sequence[str]) -> RuleSet:
    """One RuleSet holding every rule any of ``modes`` needs."""
    modes = _check_modes(modes)
    built = list(rules.rules)
    if any(m != "keep_lane" for m in modes) and "lane_change" not in rules.names:
        built.append(make_rule("lane_change"))
    return RuleSet(built)


def _repeat_scene(scene: DrivingScene, times: int) -> DrivingScene:
    return DrivingScene(**{f.name: getattr(scene, f.name).repeat_interleave(times, dim=0)
                           for f in dataclasses.fields(scene)})


def mode_scenes(scene: DrivingScene, modes: Sequence[str]) -> tuple[DrivingScene, Tensor]:
    """The ``B`` scenes repeated per mode (row ``b * M + m``) with each mode's target lane, and validity (B, M)."""
    modes = _check_modes(modes)
    B, M = scene.batch, len(modes)
    rep = _repeat_scene(scene, M)
    lanes = scene.lanes.detach().cpu().numpy().astype(np.float64)
    valid_l = scene.lanes_valid.cpu().numpy()
    target = np.empty((B, M), dtype=np.int64)
    ok = np.ones((B, M), dtype=bool)
    for b in range(B):
        ref = int(scene.ref_lane[b])
        for m, mode in enumerate(modes):
            side = MODE_SIDE[mode]
            if side == 0:
                target[b, m] = ref
                ok[b, m] = ref >= 0
            else:
                t = lane_choice(lanes[b], valid_l[b], side)
                target[b, m] = t
                ok[b, m] = t >= 0 and ref >= 0
    rep.target_lane = torch.as_tensor(target.reshape(-1), dtype=torch.long)
    return rep, torch.as_tensor(ok)


def take_scene(scene: DrivingScene, rows: Tensor) -> DrivingScene:
    return DrivingScene(**{f.name: getattr(scene, f.name)[rows] for f in dataclasses.fields(scene)})


def lane_choices(lanes: np.ndarray, lanes_valid: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """Batched :func:`~diffpilot.stl.signals.lane_choice`: per row, the lane under the ego (side 0) or its
    neighbour on the left (+1) / right (-1), -1 if none; ``lanes`` (B, L, N, 3), ``sides`` (B,).

    One projection call for every lane of every row instead of one per row: building the scenes of a
    planner's batch is then a small share of its guidance cost. Same scores and tie-breaking as the
    per-row function, so both pick the same lane.
    """
    lanes = np.asarray(lanes, dtype=np.float64)
    valid = np.asarray(lanes_valid, dtype=bool)
    B, L = valid.shape
    if B == 0 or L == 0:
        return np.full(B, -1, dtype=np.int64)
    flat = torch.as_tensor(lanes.reshape(B * L, *lanes.shape[2:]))
    lat, heading, _, _ = project_on_lane(torch.zeros(B * L, 2, dtype=torch.float64), flat)
    lane_y = -lat.numpy().reshape(B, L)
    aligned = np.abs(((heading.numpy() + np.pi) % (2 * np.pi) - np.pi).reshape(B, L)) < np.pi / 2
    side = np.asarray(sides, dtype=np.float64).reshape(B, 1)
    score = np.where(side == 0, np.abs(lane_y), np.abs(lane_y - side * TARGET_LANE_OFFSET_M))
    ok = valid & aligned & ((side == 0) | ((side * lane_y > 1.5) & (side * lane_y < 6.0)))
    score = np.where(ok, score, np.inf)
    best = np.argmin(score, axis=1)
    return np.where(np.isfinite(score).any(axis=1), best, -1).astype(np.int64)


def window_scene(arrays: Mapping[str, np.ndarray], index: np.ndarray | Sequence[int], modes: np.ndarray | Sequence[int],
                 dtype: torch.dtype = torch.float32) -> DrivingScene:
    """The scenes of windows ``arrays[index]`` with each row's mode (an index into :data:`MODES`) picking the target lane.

    What :func:`diffpilot.stl.metrics.rule_robustness` evaluates (its ``scene_from_arrays`` with the
    mode's command), built with :func:`lane_choices` so a sampler can afford it once per call.
    """
    idx = np.asarray(index, dtype=np.int64).reshape(-1)
    m = np.asarray(modes, dtype=np.int64).reshape(-1)
    if len(m) != len(idx):
        raise DatasetError(f"{len(m)} modes for {len(idx)} windows; give one mode per window")
    if len(m) and (m.min() < 0 or m.max() >= len(MODES)):
        raise DatasetError(f"modes must index {MODES}, got {sorted(set(m.tolist()))}")
    total = len(np.asarray(arrays["command"]))
    sub = {k: np.asarray(v)[idx] for k, v in arrays.items() if np.ndim(v) >= 1 and len(v) == total}
    blank = dict(sub)
    blank["lanes_valid"] = np.zeros_like(np.asarray(sub["lanes_valid"], dtype=bool))  # skips the per-row lane choice
    blank["command"] = np.zeros(len(idx), dtype=np.int64)
    scene = scene_from_arrays(blank, dtype=dtype)
    valid = np.asarray(sub["lanes_valid"], dtype=bool)
    ref = lane_choices(sub["lanes"], valid, np.zeros(len(idx)))
    side = np.array([MODE_SIDE[MODES[int(x)]] for x in m], dtype=np.int64)
    tgt = np.where(side == 0, ref, lane_choices(sub["lanes"], valid, side))
    return dataclasses.replace(scene, lanes_valid=torch.as_tensor(valid), ref_lane=torch.as_tensor(ref),
                               target_lane=torch.as_tensor(tgt))


LEAN_SIGNALS = frozenset({"speed", "accel_long", "jerk_long", "lane_offset", "heading_error", "target_offset",
                          "min_distance"})
"""Signals :func:`rule_signals` computes itself; rules reading any other get the full signal set."""


def _wrap(a: Tensor) -> Tensor:
    return torch.remainder(a + torch.pi, 2 * torch.pi) - torch.pi


def _disc_cover(pose: Tensor, length: Tensor, width: Tensor) -> tuple[Tensor, Tensor]:
    n = DISCS
    frac = (torch.arange(n, dtype=pose.dtype) + 0.5) / n - 0.5
    along = frac * length[..., None]
    c, s = torch.cos(pose[..., 2:3]), torch.sin(pose[..., 2:3])
    centres = torch.stack([pose[..., 0:1] + along * c, pose[..., 1:2] + along * s], dim=-1)
    return centres, torch.sqrt((length / (2 * n)) ** 2 + (width / 2) ** 2)


def rule_signals(states: Tensor, scene: DrivingScene, needed: Sequence[str] | frozenset[str]) -> dict[str, Tensor]:
    """The signals ``needed`` by a rule set, for states ``(B, N, T, 4)`` (x, y, yaw, speed) of a rollout.

    The same formulas as :func:`~diffpilot.stl.signals.driving_signals` (so the same values), but
    only the ones asked for: an optimizer or a guided sampler evaluates them many times, and stop
    lines and conflict zones cost as much as the rest when no rule reads them. Falls back to
    ``driving_signals`` when a rule needs a signal outside :data:`LEAN_SIGNALS`.
    """
    needed = frozenset(needed)
    if not needed <= LEAN_SIGNALS or states.dim() != 4 or states.shape[-1] != 4 or states.shape[0] != scene.batch:
        return driving_signals(states, scene)
    states = states.to(scene.lanes.dtype)
    B, N, T, _ = states.shape
    xy, yaw, speed = states[..., :2], states[..., 2], states[..., 3]
    out: dict[str, Tensor] = {"speed": speed}
    if needed & {"accel_long", "jerk_long"}:
        v0 = scene.speed0.view(-1, 1, 1).expand(B, N, 1)
        a0 = scene.accel0.view(-1, 1, 1).expand(B, N, 1)
        accel = (speed - torch.cat([v0, speed[:, :, :-1]], dim=2)) / DT
        out["accel_long"] = accel
        out["jerk_long"] = (accel - torch.cat([a0, accel[:, :, :-1]], dim=2)) / DT
    rows = torch.arange(B)
    if needed & {"lane_offset", "heading_error", "target_offset"}:
        has_ref = scene.ref_lane >= 0
        lat, lane_yaw, _, _ = project_on_lane(xy, scene.lanes[rows, scene.ref_lane.clamp_min(0)])
        hr = has_ref.view(-1, 1, 1)
        out["lane_offset"] = torch.where(hr, lat, torch.zeros_like(lat))
        out["heading_error"] = torch.where(hr, _wrap(yaw - lane_yaw), _wrap(yaw))
        if "target_offset" in needed:
            same = bool(torch.equal(scene.target_lane, scene.ref_lane))
            tlat = lat if same else project_on_lane(xy, scene.lanes[rows, scene.target_lane.clamp_min(0)])[0]
            out["target_offset"] = torch.where((scene.target_lane >= 0).view(-1, 1, 1), tlat, out["lane_offset"])
    if "min_distance" in needed:
        apose, avalid = agents_over_horizon(scene, T)
        if apose.shape[1] == 0:
            out["min_distance"] = torch.full_like(speed, DIST_CAP_M)
        else:
            size = scene.agents_size
            ego_c, ego_r = _disc_cover(states[..., :3], torch.full_like(yaw, EGO_SIZE[0]), torch.full_like(yaw, EGO_SIZE[1]))
            ag_c, ag_r = _disc_cover(apose, size[:, :, None, 0].expand_as(apose[..., 0]),
                                     size[:, :, None, 1].expand_as(apose[..., 0]))
            n = ego_c.shape[-2]
            K = ag_c.shape[1]
            g_all = ag_c.permute(0, 2, 1, 3, 4)  # (B, T, K, n, 2)
            with torch.no_grad():  # which disc pair is closest; only that pair carries a gradient anyway
                d2 = (ego_c.detach()[:, :, :, None, :, None, :] - g_all.detach()[:, None, :, :, None, :, :]).pow(2).sum(-1)
                pair = d2.flatten(-2).argmin(dim=-1)  # (B, N, T, K)
            ei = (pair // n)[..., None, None].expand(-1, -1, -1, -1, 1, 2)
            gi = (pair % n)[..., None, None].expand(-1, -1, -1, -1, 1, 2)
            e_sel = torch.gather(ego_c[:, :, :, None].expand(-1, -1, -1, K, -1, -1), 4, ei)[..., 0, :]
            g_sel = torch.gather(g_all[:, None].expand(-1, N, -1, -1, -1, -1), 4, gi)[..., 0, :]
            centre = (e_sel - g_sel).norm(dim=-1)  # (B, N, T, K)
            gap = centre - ego_r[..., None] - ag_r.permute(0, 2, 1)[:, None]
            gap = torch.where(avalid.permute(0, 2, 1)[:, None], gap, torch.full_like(gap, DIST_CAP_M))
            out["min_distance"] = gap.amin(dim=-1).clamp(max=DIST_CAP_M)
    return out


def _cast_scene(scene: DrivingScene, dtype: torch.dtype) -> DrivingScene:
    return DrivingScene(**{f.name: (v.to(dtype) if v.is_floating_point() else v)
                           for f in dataclasses.fields(scene) for v in [getattr(scene, f.name)]})


def prune_agents(scene: DrivingScene, horizon: int, limits: UnicycleLimits = DEFAULT_LIMITS,
                 clearance: float = 10.0) -> DrivingScene:
    """Drop agents no trajectory of ``horizon`` steps can come within ``clearance`` metres of.

    The reach is what the ego covers at full acceleration from its speed;
    a dropped agent's gap to any reachable pose exceeds ``clearance``, so
    it can only decide the distance robustness when that robustness is
    at least ``clearance - dsafe`` anyway. Cuts the optimizer's cost, which
    is dominated by ego-agent disc distances.
    """
    T = int(horizon)
    t_end = T * limits.dt
    reach = scene.speed0 * t_end + 0.5 * limits.accel_max * t_end**2  # (B,)
    pose, valid = agents_over_horizon(scene, T)
    if pose.shape[1] == 0 or scene.batch == 0:
        return scene
    size = scene.agents_size.norm(dim=-1)  # agent diagonal
    dist = pose[..., :2].norm(dim=-1) - size[..., None] / 2  # (B, K, T)
    dist = torch.where(valid, dist, torch.full_like(dist, float("inf")))
    near = dist.amin(dim=-1) <= (reach[:, None] + clearance + float(np.hypot(*_EGO)) / 2)  # (B, K)
    keep = max(int(near.sum(dim=1).max()), 1)
    order = torch.argsort((~near).to(torch.int8), dim=1, stable=True)[:, :keep]  # near agents first
    take = lambda x: torch.gather(x, 1, order.view(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))  # noqa: E731
    kept_valid = take(scene.agents_valid) & torch.gather(near, 1, order)[:, :, None]
    return dataclasses.replace(scene, agents_pose=take(scene.agents_pose), agents_valid=kept_valid,
                               agents_size=take(scene.agents_size))


@dataclass
class TrajOptResult:
    """What :func:`optimize_controls` returns; leading dims ``(B, M, N)`` = windows, modes, samples.

    ``robustness[rule]`` is the exact robustness, NaN where the rule does not
    apply in that mode; ``satisfied`` = mode valid and every active rule > 0.
    """

    controls: Tensor  # (B, M, N, T, 2) applied (omega, a)
    trajectories: Tensor  # (B, M, N, T, 4) ego-frame (x, y, yaw, v)
    robustness: dict[str, Tensor]  # rule -> (B, M, N)
    satisfied: Tensor  # (B, M, N) bool
    mode_valid: Tensor  # (B, M) bool
    modes: tuple[str, ...]
    rules: list[str]
    steps_run: int

    @property
    def min_robustness(self) -> Tensor:
        """Smallest exact robustness over the active rules, (B, M, N)."""
        stack = torch.stack([torch.nan_to_num(v, nan=float("inf")) for v in self.robustness.values()], dim=-1)
        return stack.amin(dim=-1)


def _broadcast_params(params: Mapping[str, Tensor | float | np.ndarray], B: int, M: int, N: int,
                      dtype: torch.dtype) -> dict[str, Tensor]:
    out = {}
    for k, v in params.items():
        t = torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v, dtype=dtype)
        if t.dim() == 2:  # (B, N): the same samples in every mode
            t = t[:, None, :]
        try:
            out[k] = t.expand(B, M, N).reshape(B * M, N)
        except RuntimeError as e:
            raise DatasetError(
                f"parameter {k!r} has shape {tuple(t.shape)}; give a number, (B, N) or (B, M, N) "
                f"with B={B} windows, M={M} modes, N={N} samples") from e
        if bool(torch.isnan(out[k]).any()):
            raise DatasetError(f"parameter {k!r} contains NaN (an incomplete window?); drop those windows first")
    return out


def _smooth_random_controls(scene: DrivingScene, shape: tuple[int, int, int], scale: float,
                            limits: UnicycleLimits, gen: torch.Generator) -> Tensor:
    """Random but comfortable controls: each trajectory ramps from the current acceleration to a random
    one and turns at a random, slowly drifting yaw rate. I.i.d. random controls would start every
    sample far outside any jerk bound; these start diverse in speed profile and lateral drift."""
    R, N, T = shape
    dtype = scene.lanes.dtype
    a_target = scale * (2 * torch.rand((R, N, 1), generator=gen, dtype=dtype) - 1) * 1.5
    ramp = torch.clamp(torch.arange(1, T + 1, dtype=dtype) / 3.0, max=1.0)
    a0 = scene.accel0.view(-1, 1, 1).clamp(limits.accel_min, limits.accel_max)
    accel = a0 + (a_target - a0) * ramp
    w = scale * 0.1 * (2 * torch.rand((R, N, 1), generator=gen, dtype=dtype) - 1)
    drift = scale * 0.02 * torch.randn((R, N, T), generator=gen, dtype=dtype).cumsum(dim=-1)
    omega = (w + drift).clamp(-0.9 * limits.omega_max, 0.9 * limits.omega_max)
    return torch.stack([omega, accel], dim=-1)


def _max_param(params: Mapping[str, Tensor | float | np.ndarray], name: str) -> float:
    if name not in params:
        return 0.0
    return max(float(torch.as_tensor(np.asarray(params[name]) if not isinstance(params[name], Tensor)
                                     else params[name]).max()), 0.0)


def normalized_rule_robustness(union: RuleSet, signals: Mapping[str, Tensor], params: Mapping[str, Tensor | float],
                               smooth: float | None) -> Tensor:
    """Robustness ``(B, N, R)`` of every rule in ``union``, each divided by its :data:`RULE_SCALES` entry.

    ``smooth`` (in scaled units) gives the log-sum-exp robustness, None the exact one. Parameters are
    numbers or tensors broadcasting against ``(B, N)``; missing ones take the rule defaults.
    """
    values = {**union.defaults(), **params}
    cols = []
    for r in union.rules:
        scale = RULE_SCALES.get(r.name, 1.0)
        T = int(next(iter(signals.values())).shape[-1])
        tau = None if smooth is None else smooth * scale
        rho = robustness(r.formula(T), signals, {k: values[k] for k in r.params}, smooth=tau)
        cols.append(rho / scale)
    shape = torch.broadcast_shapes(*[c.shape for c in cols])
    return torch.stack([c.expand(shape) for c in cols], dim=-1)


def optimize_controls(
    scene: DrivingScene,
    rules: RuleSet,
    params: Mapping[str, Tensor | float | np.ndarray],
    modes: Sequence[str] = ("keep_lane",),
    init: str | Tensor = "random",
    steps: int = 100,
    lr: float = 0.05,
    smooth: float = 0.05,
    *,
    samples: int | None = None,
    horizon: int = FUTURE_STEPS,
    limits: UnicycleLimits = DEFAULT_LIMITS,
    margin: float = 0.1,
    effort: float = 1e-3,
    init_scale: float = 0.7,
    check_every: int = 10,
    seed: int = 0,
) -> TrajOptResult:
    """Optimize controls for ``B`` windows × ``modes`` × ``N`` parameter samples; returns exact verdicts.

    ``params`` maps rule parameters to numbers or ``(B, N)`` / ``(B, M, N)``
    tensors (missing ones take the rule defaults). ``init`` is ``"random"``
    (smooth random controls, the source of diversity), ``"zero"`` (no turning,
    no acceleration) or physical controls ``(B, M, K, T, 2)``: the first ``K``
    samples start from them, the other ``N - K`` at random (a warm start). Every
    ``check_every`` steps the exact robustness is computed and each
    trajectory keeps its best iterate so far; the loop stops once every valid
    trajectory satisfies all its rules.
    """
    modes = _check_modes(modes)
    if steps < 0 or lr <= 0 or smooth <= 0 or horizon < 1 or check_every < 1:
        raise DatasetError(f"need steps >= 0, lr > 0, smooth > 0, horizon >= 1, check_every >= 1; got "
                           f"steps={steps}, lr={lr}, smooth={smooth}, horizon={horizon}, check_every={check_every}")
    union = rule_union(rules, modes)
    B, M, T = scene.batch, len(modes), int(horizon)
    needed = frozenset().union(*[r.signals(T) for r in union.rules])
    shapes = [tuple(torch.as_tensor(v).shape) for v in params.values()]
    N = samples if samples is not None else max([s[-1] for s in shapes if len(s) >= 2] + [1])
    if N < 1:
        raise DatasetError(f"samples must be >= 1, got {N}")
    work = torch.float32
    rep_all, mode_ok = mode_scenes(scene, modes)
    active = torch.tensor([[r in active_rules(rules, m) for r in union.names] for m in modes])  # (M, R)
    dtype = scene.lanes.dtype
    p_all = _broadcast_params(params, B, M, N, dtype)
    # only (window, mode) rows whose mode exists are optimized
    rows = torch.nonzero(mode_ok.reshape(-1), as_tuple=False)[:, 0]
    rep = take_scene(rep_all, rows)
    p64 = {k: v[rows] for k, v in p_all.items()}
    p32 = {k: v.to(work) for k, v in p64.items()}
    act_rows = active.repeat(B, 1)[rows][:, None, :]  # (R', 1, rules)
    rep32 = _cast_scene(prune_agents(rep, T, limits, 10.0 + _max_param(params, "dsafe")), work)
    v0 = rep32.speed0.view(-1, 1)
    Rn = int(rows.numel())

    gen = torch.Generator().manual_seed(int(seed))
    if isinstance(init, Tensor):
        c0 = init.to(work)
        K = int(c0.shape[-3]) if c0.dim() == 5 else N
        if not 1 <= K <= N or c0.shape[-2:] != (T, 2):
            raise DatasetError(f"init controls must be (B, M, K, T, 2) with 1 <= K <= N = {N} and T = {T}, "
                               f"got {tuple(c0.shape)}")
        c0 = c0.expand(B, M, K, T, 2).reshape(B * M, K, T, 2)[rows]
        if K < N:  # a warm start: the given plans first, random ones for the rest
            c0 = torch.cat([c0, _smooth_random_controls(rep32, (Rn, N - K, T), init_scale, limits, gen)], dim=1)
        raw0 = raw_from_controls(c0, v0, limits)
    elif init == "random":
        raw0 = raw_from_controls(_smooth_random_controls(rep32, (Rn, N, T), init_scale, limits, gen), v0, limits)
    elif init == "zero":
        raw0 = raw_from_controls(torch.zeros((Rn, N, T, 2), dtype=work), v0, limits)
    else:
        raise DatasetError(f"init must be 'random', 'zero' or a (B, M, N, T, 2) control tensor, got {init!r}")
    raw = raw0.clone().requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=lr)
    big = torch.tensor(1e3, dtype=work)
    best_raw = raw0.clone()
    best = torch.full((Rn, N), -float("inf"), dtype=work)

    def exact_score(r: Tensor) -> Tensor:
        with torch.no_grad():
            _, states = controls_from_raw(r, v0, limits)
            rho = normalized_rule_robustness(union, rule_signals(states, rep32, needed), p32, None)
            return torch.where(act_rows, rho, big).amin(dim=-1)

    ran = 0
    for it in range(steps + 1 if Rn else 0):
        if it % check_every == 0 or it == steps:
            score = exact_score(raw.detach())
            better = score > best
            best = torch.where(better, score, best)
            best_raw = torch.where(better[..., None, None], raw.detach(), best_raw)
            if bool((best > 0).all()) or it == steps:
                break
        controls, states = controls_from_raw(raw, v0, limits)
        rho = normalized_rule_robustness(union, rule_signals(states, rep32, needed), p32, smooth)
        rho = torch.where(act_rows, rho, big)
        soft = -smooth * torch.logsumexp(-rho / smooth, dim=-1)  # (R', N)
        eff = (controls[..., 0] / limits.omega_max) ** 2 + (controls[..., 1] / limits.accel_max) ** 2
        loss = torch.relu(margin - soft).sum() + effort * eff.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ran = it + 1

    # the verdict: exact robustness in the scene's own precision, on the full (unpruned) scene
    v0d = rep.speed0.view(-1, 1).to(dtype)
    controls, _ = controls_from_raw(best_raw.to(dtype), v0d, limits)
    controls, states = rollout(controls, v0d, limits)
    rho = normalized_rule_robustness(union, driving_signals(states, rep), p64, None) if Rn else \
        torch.zeros((0, N, len(union.names)), dtype=dtype)
    rho = rho * torch.tensor([RULE_SCALES.get(n, 1.0) for n in union.names], dtype=dtype)
    rho = torch.where(act_rows, rho, torch.tensor(float("nan"), dtype=dtype))
    sat = torch.where(act_rows, rho > 0, torch.ones_like(rho, dtype=torch.bool)).all(dim=-1)

    def scatter(x: Tensor, fill: float | bool) -> Tensor:
        out = torch.full((B * M, *x.shape[1:]), fill, dtype=x.dtype)
        out[rows] = x.detach()
        return out.reshape(B, M, *x.shape[1:])

    nan = float("nan")
    return TrajOptResult(
        controls=scatter(controls, nan),
        trajectories=scatter(states, nan),
        robustness={n: scatter(rho[..., i], nan) for i, n in enumerate(union.names)},
        satisfied=scatter(sat, False),
        mode_valid=mode_ok,
        modes=modes,
        rules=union.names,
        steps_run=ran,
    )
