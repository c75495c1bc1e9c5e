"""Rule-based guards on a learned driving planner's candidates and kept plan.

Clearance: how long each candidate stays clear of the agents ahead under a
constant-velocity forecast (selection keeps to the clearest; the kept plan
brakes to a stop short of a forecast contact). Drivable area (off by default):
selection first keeps to the candidates whose box leaves the map's drivable
area least. Acceleration cap (off by default): the kept plan speeds up no faster than a
comfortable bound. Standstill hold: a plan that barely moves is held still.

A learned selection ranks candidates by what it has seen in training; it
has no hard notion of "this plan runs into the car in front". A car's
planner stack checks its chosen plan against a short forecast of the
traffic it can see now. This module does that check in torch (so it runs
inside the exported graph too): every agent valid at the present keeps
its heading and the velocity of its last observed step, the ego follows
the candidate (waypoints and the midpoints between them), and the first
step at which the ego's box, grown by a margin, overlaps the box of an
agent ends the candidate's clearance. An agent counts only if it is ahead
of the ego at first contact: a car closing in from behind is not one the
ego's plan can be blamed for. Oncoming traffic does not count either: its
straight-line forecast cuts across the ego's lane on every curve, and
keeping to its own lane is what the planner learned from the map. Nothing
after the present is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffpilot.data.scenario import DT, SampleSpec

__all__ = ["GuardConfig", "candidate_clearance", "candidate_offroad", "cap_acceleration", "check_guards",
           "clearance_steps", "clearest", "guard_kept", "hold_standstill", "moves", "obb_overlap", "offroad_corners",
           "pick", "reads_drivable", "stop_short"]


@dataclass
class GuardConfig:
    """The guard options a driving planner's config inherits (one meaning for every planner that has them)."""

    hold_below_m: float = 1.5  # a kept plan ending closer than this to the ego becomes standstill (0: off)
    clearance_check: bool = True  # keep to the candidates that stay clear longest of the agents ahead
    clearance_margin_m: float = 0.3  # the ego's box is grown by this on every side for that check
    clearance_horizon_s: float = 2.0  # forecast contacts later than this are not counted
    clearance_front_m: float = 0.0  # the ego's box also reaches this much further ahead: the gap a stop keeps
    drivable_check: bool = False  # keep first to the candidates whose box leaves the drivable-area raster least
    accel_limit: float = 0.0  # m/s^2: the kept plan speeds up no faster than this, re-timed along its path (0: off)
    ego_size: list[float] = field(default_factory=lambda: [4.084, 1.85])  # length, width (m) of the ego's box


ONCOMING_COS = -0.5
"""An agent whose heading is more than 120 degrees from the ego's (cosine below this) is oncoming."""
ONCOMING_MIN_SPEED = 1.0
"""m/s: a slower agent counts whatever its heading (a parked or queued car's heading says nothing of its lane)."""


def check_guards(cfg: GuardConfig) -> None:
    """A ValueError naming the first guard option out of range."""
    if not cfg.hold_below_m >= 0:
        raise ValueError(f"hold_below_m must be >= 0 (0 turns the standstill hold off), got {cfg.hold_below_m}")
    if not cfg.clearance_margin_m >= 0 or not cfg.clearance_horizon_s > 0 or not cfg.clearance_front_m >= 0:
        raise ValueError(f"clearance_margin_m and clearance_front_m must be >= 0 and clearance_horizon_s > 0, got "
                         f"{cfg.clearance_margin_m}, {cfg.clearance_front_m} and {cfg.clearance_horizon_s}")
    if not cfg.accel_limit >= 0:
        raise ValueError(f"accel_limit must be >= 0 m/s^2 (0 turns it off), got {cfg.accel_limit}")
    if len(cfg.ego_size) != 2 or not all(float(v) > 0 for v in cfg.ego_size):
        raise ValueError(f"ego_size must be [length, width] in metres, both > 0, got {cfg.ego_size}")


def candidate_clearance(cfg: GuardConfig, batch: Mapping[str, Tensor], cands: Tensor) -> Tensor | None:
    """:func:`clearance_steps` of ``cands`` (B, C, F, 3) in the scene ``batch`` with ``cfg``'s options (None: off)."""
    if not cfg.clearance_check:
        return None
    return clearance_steps(cands, batch["agents_pose"], batch["agents_valid"], batch["agents_size"],
                           (float(cfg.ego_size[0]), float(cfg.ego_size[1])), float(cfg.clearance_margin_m), DT,
                           float(cfg.clearance_horizon_s), float(cfg.clearance_front_m))


def reads_drivable(cfg: GuardConfig) -> bool:
    """Whether a planner with ``cfg`` reads the drivable-area raster: its encoder's (``use_raster``) or the guard's."""
    return bool(getattr(cfg, "use_raster", False) or cfg.drivable_check)


def candidate_offroad(cfg: GuardConfig, batch: Mapping[str, Tensor], cands: Tensor) -> Tensor | None:
    """:func:`offroad_corners` of ``cands`` (B, C, F, 3) on the scene's ``drivable`` raster (None: check off)."""
    if not cfg.drivable_check:
        return None
    return offroad_corners(cands, batch["drivable"], (float(cfg.ego_size[0]), float(cfg.ego_size[1])),
                           SampleSpec.raster_m_per_px)


def offroad_corners(cands: Tensor, drivable: Tensor, ego_size: tuple[float, float], m_per_px: float) -> Tensor:
    """How many corners of the ego's box, over every waypoint of each candidate, fall on a cell off the drivable
    area (B, C). ``drivable`` (B, R, R): row 0 most forward, column 0 most left, the ego at the centre, ``m_per_px``
    per cell. A corner beyond the raster counts as on the drivable area: the map says nothing of it."""
    B, C = cands.shape[:2]
    R = drivable.shape[-1]
    c, s = torch.cos(cands[..., 2:3]), torch.sin(cands[..., 2:3])  # (B, C, F, 1)
    along = cands.new_tensor([1.0, 1.0, -1.0, -1.0]) * (ego_size[0] / 2)
    across = cands.new_tensor([1.0, -1.0, 1.0, -1.0]) * (ego_size[1] / 2)
    x = cands[..., 0:1] + c * along - s * across  # (B, C, F, 4)
    y = cands[..., 1:2] + s * along + c * across
    # A border of drivable cells round the raster: every corner beyond it lands on that border once clamped.
    row = (torch.floor(R / 2 - x / m_per_px) + 1).clamp(0, R + 1)
    col = (torch.floor(R / 2 - y / m_per_px) + 1).clamp(0, R + 1)
    cell = (row * (R + 2) + col).to(torch.int64).reshape(B, -1)
    padded = torch.nn.functional.pad(drivable.to(cands.dtype), (1, 1, 1, 1), value=1.0).reshape(B, -1)
    off = torch.gather(padded, 1, cell) <= 0.5
    return off.reshape(B, C, -1).sum(-1)


def pick(cands: Tensor, idx: Tensor) -> Tensor:
    """The candidate ``(B, F, 3)`` of each row of ``cands`` (B, C, F, 3) at ``idx`` (B,)."""
    return torch.gather(cands, 1, idx[:, None, None, None].expand(-1, 1, *cands.shape[2:]))[:, 0]


def guard_kept(cfg: GuardConfig, cands: Tensor, idx: Tensor, clear: Tensor | None, speed: Tensor | None = None) -> Tensor:
    """The plans ``(B, F, 3)`` kept from ``cands`` (B, C, F, 3) at ``idx`` (B,), stopped short of a forecast
    contact (``clear`` from :func:`candidate_clearance`), speeding up no faster than ``cfg.accel_limit`` from the
    car's ``speed`` now (B,), and held still when they barely move."""
    chosen = pick(cands, idx)
    if clear is not None:
        chosen = stop_short(chosen, torch.gather(clear, 1, idx[:, None])[:, 0])
    if cfg.accel_limit > 0:
        if speed is None:
            raise ValueError("accel_limit needs the car's speed now (ego_status[:, 0])")
        chosen = cap_acceleration(chosen, speed, float(cfg.accel_limit))
    return hold_standstill(chosen, float(cfg.hold_below_m))


def obb_overlap(pa: Tensor, ha: Tensor, pb: Tensor, hb: Tensor) -> Tensor:
    """Whether oriented boxes overlap (separating-axis test), broadcast over leading dims.

    ``pa``/``pb``: (..., 3) centre and yaw; ``ha``/``hb``: (..., 2) half length and half width.
    """
    d = pb[..., :2] - pa[..., :2]
    ha, hb = torch.broadcast_tensors(ha, hb)
    gap, _, _ = _box_gap(d[..., :1], d[..., 1:], torch.cos(pa[..., 2:]), torch.sin(pa[..., 2:]), torch.cos(pb[..., 2:]),
                         torch.sin(pb[..., 2:]), ha[..., :1], ha[..., 1:], hb[..., :1], hb[..., 1:])
    return gap[..., 0] <= 0


def _box_gap(dx: Tensor, dy: Tensor, ca: Tensor, sa: Tensor, cb: Tensor, sb: Tensor, la: Tensor, wa: Tensor,
             lb: Tensor, wb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The largest gap between boxes a and b over the four separating axes (<= 0: they overlap), b's centre
    ``(dx, dy)`` ahead of a's along a's heading, and the cosine of b's yaw less a's; all broadcast together.

    ``(dx, dy)``: b's centre from a's; ``(ca, sa)``, ``(cb, sb)``: each box's heading as cosine and sine;
    ``la``/``wa``, ``lb``/``wb``: half length and width. The last axis indexes the box pairs, so the four
    axis tests stack along it and run as one set of ops: a plan graph pays per op, and a long last axis keeps
    onnxruntime's broadcasts fast. On each axis, |the offset| is checked against both boxes' reach: a box's own
    half size along its own axes, and along the other's its half length and width times |cos| and |sin| of the
    yaw difference (|sin| and |cos| on a short axis).
    """
    along = dx * ca + dy * sa
    cos, sin = ca * cb + sa * sb, ca * sb - sa * cb
    proj = torch.cat([along, dy * ca - dx * sa, dx * cb + dy * sb, dy * cb - dx * sb], dim=-1).abs()
    own, lengths, widths = (torch.cat(v, dim=-1) for v in ((la, wa, lb, wb), (lb, lb, la, la), (wb, wb, wa, wa)))
    gap = (proj - own - torch.cat([cos, sin, cos, sin], dim=-1).abs() * lengths
           - torch.cat([sin, cos, sin, cos], dim=-1).abs() * widths)
    return gap.unflatten(-1, (4, -1)).amax(dim=-2), along, cos


def _half_steps(F: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(2F, F + 1)``: the ego's poses at every half step (midpoint, waypoint, ...) from the origin and ``F`` waypoints."""
    rows = [[0.0] * (F + 1) for _ in range(2 * F)]
    for j in range(F):
        rows[2 * j][j] = rows[2 * j][j + 1] = 0.5
        rows[2 * j + 1][j + 1] = 1.0
    return torch.tensor(rows, dtype=dtype, device=device)


def clearance_steps(cands: Tensor, agents_pose: Tensor, agents_valid: Tensor, agents_size: Tensor,
                    ego_size: tuple[float, float], margin_m: float, dt: float, horizon_s: float | None = None,
                    front_m: float = 0.0) -> Tensor:
    """Half-steps ``(B, C)`` each candidate stays clear of the forecast agents ahead (2F: clear all the way).

    ``cands`` (B, C, F, 3): ego-frame poses at ``dt`` spacing; ``agents_pose`` (B, K, H, 3) and
    ``agents_valid`` (B, K, H): the agents' past and present (present last), ego frame;
    ``agents_size`` (B, K, 2) length and width. The ego's box is grown by ``margin_m`` on every side
    and by ``front_m`` more at its front: the gap a stop keeps to the car ahead.
    Contacts later than ``horizon_s`` count as clear: a constant-velocity forecast of a car on a curve
    or in a turn is wrong within seconds, and a distant false contact would only make the ego timid.
    """
    F, K = cands.shape[2], agents_pose.shape[1]
    T = 2 * F
    dtype = cands.dtype
    # The ego at every half step (0.5 dt, dt, 1.5 dt, ...): midpoints and waypoints. A midpoint's heading is the
    # circular mean of its ends': the direction of the sum of their unit vectors (heading 0 when they cancel).
    pts = torch.cat([torch.zeros_like(cands[:, :, :1]), cands], dim=2)  # (B, C, F + 1, 3), the ego now first
    ego = torch.matmul(_half_steps(F, dtype, cands.device),
                       torch.cat([pts[..., :2], torch.cos(pts[..., 2:]), torch.sin(pts[..., 2:])], dim=-1))  # (B, C, T, 4)
    xy, u = ego.split(2, dim=-1)
    norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    u = torch.where(norm > 0, u / norm.clamp_min(1e-30), torch.tensor([1.0, 0.0], dtype=dtype, device=cands.device))
    if front_m:  # the box reaching front_m further ahead has its centre half that further forward
        xy = xy + (0.5 * front_m) * u
    ex, ey = xy.split(1, dim=-1)  # (B, C, T, 1) each
    ec, es = u.split(1, dim=-1)

    # The agents valid now keep their heading and the velocity of their last observed step: (B, 1, 1, K) each.
    now = agents_pose[:, :, -1].to(dtype)  # (B, K, 3)
    before = agents_pose[:, :, -2].to(dtype) if agents_pose.shape[2] > 1 else now
    seen_before = agents_valid[:, :, -2] if agents_pose.shape[2] > 1 else agents_valid[:, :, -1]
    vel = torch.where(seen_before[..., None], (now - before)[..., :2] / dt, torch.zeros((), dtype=dtype))
    half = 0.5 * agents_size.to(dtype)
    px, py, ph, vx, vy, lb, wb = torch.cat([now, vel, half], dim=-1).transpose(1, 2).unsqueeze(2).split(1, dim=1)
    seen = agents_valid[:, :, -1].view(-1, 1, 1, K)
    slow = (vel.norm(dim=-1) <= ONCOMING_MIN_SPEED).view(-1, 1, 1, K)
    times = torch.tensor([[0.5 * dt * t] for t in range(1, T + 1)], dtype=dtype, device=cands.device)  # (T, 1)

    # Layout (B, C, T, K): candidate, half step, agent; the agent last keeps every broadcast a long inner run.
    la = torch.full_like(lb, 0.5 * (ego_size[0] + front_m) + margin_m)  # the ego's half sizes, grown by the margin
    wa = torch.full_like(wb, 0.5 * ego_size[1] + margin_m)
    gap, along, cos = _box_gap(px + vx * times - ex, py + vy * times - ey, ec, es, torch.cos(ph), torch.sin(ph),
                               la, wa, lb, wb)
    # Oncoming traffic (moving, heading more than 120 degrees from the ego's) is left to the map: a straight-line
    # forecast of a car in the opposite lane of a curve sweeps across the ego's lane and would stop it for nothing.
    hit = (gap <= 0) & seen & ((cos >= ONCOMING_COS) | slow)  # (B, C, T, K)
    # An agent counts when it is ahead of the ego at its first contact (it overtaking from behind does not). Each
    # contact scores 2 (T - t), plus 1 when the agent is ahead then: the largest score over t is the first contact,
    # odd when that one counts, and the largest odd score over the agents is the first contact that counts.
    ahead = along > -0.5 * front_m  # ahead of the ego's own centre
    score = torch.where(hit, _countdown(T, dtype, cands.device) + ahead.to(dtype), torch.zeros((), dtype=dtype))
    first = score.amax(dim=2, keepdim=True)  # (B, C, 1, K)
    counted = (first * torch.fmod(first, 2.0)).amax(dim=(2, 3))  # (B, C)
    steps = T - torch.floor(0.5 * counted).to(torch.int64)
    within = T if horizon_s is None else int(round(horizon_s / (0.5 * dt)))
    if within >= T:
        return steps
    return torch.where(steps < within, steps, torch.full_like(steps, T))


def _countdown(T: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(T, 1)``: 2 (T - t) for half step t, so an earlier contact scores higher and the low bit stays free."""
    return torch.tensor([[2.0 * (T - t)] for t in range(T)], dtype=dtype, device=device)


def hold_standstill(poses: Tensor, hold_below_m: float) -> Tensor:
    """Plans ``(B, F, 3)`` whose last waypoint lies within ``hold_below_m`` of the ego, replaced by standstill (zeros).

    A sampled stop is never exactly still: its waypoints scatter by a few
    decimetres, which the tracker follows as a creep of 0.2-0.3 m/s that
    closes the gap to a queue within seconds. A plan that moves less than
    ``hold_below_m`` over the whole horizon means "stay", and is held.
    Pulling away from standstill at 0.2 m/s² already moves 1.6 m in 4 s.
    """
    if hold_below_m <= 0:
        return poses
    return poses * moves(poses, hold_below_m).to(poses.dtype).view(-1, 1, 1)


def moves(poses: Tensor, hold_below_m: float) -> Tensor:
    """Whether each plan ``(B, F, 3)`` ends at least ``hold_below_m`` from the ego (B,): not a stop."""
    return poses[:, -1, :2].pow(2).sum(-1) >= hold_below_m * hold_below_m


def stop_short(plans: Tensor, steps: Tensor, dt: float = DT) -> Tensor:
    """Plans ``(B, F, 3)`` that brake along their path to a stop clear of a forecast contact; ``steps`` (B,) from :func:`clearance_steps`.

    The kept candidate may still run into something when every candidate
    does (the sampled set has no stop in it). Its path is kept and its
    progress ends at the last waypoint before the contact. The ego brakes
    there at one constant deceleration from the plan's first-step speed,
    beginning now, and never runs ahead of the candidate's own timing.
    Holding the path at that waypoint instead would ask for full speed
    until the stop and then an instant halt: a jerk no tracker follows and
    no comfort bound allows. With no clear waypoint the plan is standstill;
    a plan clear all the way (``steps == 2F``) is unchanged.
    """
    F = plans.shape[1]
    step, seg, arc = _path(plans)
    # Waypoint j lies at half step 2j + 1, so the last one clear at ``steps`` is waypoint steps // 2 (0: the ego now):
    # the arc lengths listed per half step, read at ``steps``.
    per_half_step = torch.tensor([i // 2 for i in range(2 * F + 1)], device=plans.device)
    s_stop = torch.gather(torch.cat([torch.zeros_like(arc[:, :1]), arc], dim=1)[:, per_half_step], 1, steps[:, None])
    v0 = (seg[:, :1] / dt).clamp_min(1e-3)
    brake_s = 2.0 * s_stop / v0  # time to stop at constant deceleration v0^2 / (2 s_stop)
    t = torch.tensor([[dt * (j + 1) for j in range(F)]], dtype=plans.dtype, device=plans.device)
    left = (1.0 - t / brake_s.clamp_min(1e-6)).clamp_min(0.0)
    s = torch.minimum(arc, s_stop * (1.0 - left * left))  # (B, F) arc length at each waypoint time
    return torch.where((steps >= 2 * F).view(-1, 1, 1), plans, _walk(step, seg, arc, s))


def cap_acceleration(plans: Tensor, speed: Tensor, accel: float, dt: float = DT) -> Tensor:
    """Plans ``(B, F, 3)`` re-timed along their path so they speed up by at most ``accel`` (m/s^2) per second from
    the car's ``speed`` now (B,) and from step to step; slower parts keep their own timing.

    A sampled plan may ask for a speed the car cannot reach comfortably
    (pulling away, or a gap opening ahead): the tracker then accelerates
    past the comfort bound. Capping only slows a plan, so the path stays
    the same and a stop stays where it was.
    """
    F = plans.shape[1]
    step, seg, arc = _path(plans)
    # The fastest each step may go: its own speed, every earlier step's plus what accel adds since, and the
    # speed now plus what accel adds by then (one min over a constant triangle instead of a loop over steps).
    gain = [[accel * dt * (j - i) if i <= j else math.inf for j in range(F)] for i in range(F)]
    reach = (seg[:, :, None] / dt + torch.tensor(gain, dtype=plans.dtype, device=plans.device)).amin(dim=1)
    start = speed.to(plans.dtype)[:, None] + torch.tensor([[accel * dt * (j + 1) for j in range(F)]],
                                                          dtype=plans.dtype, device=plans.device)
    s = torch.cumsum(torch.minimum(reach, start) * dt, dim=1)  # (B, F) arc length at each waypoint time
    return _walk(step, seg, arc, torch.minimum(s, arc))


def _path(plans: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each plan's steps from the ego now ``(B, F, 3)``, their lengths and the arc length at each waypoint ``(B, F)``."""
    step = plans - torch.cat([torch.zeros_like(plans[:, :1]), plans[:, :-1]], dim=1)
    seg = torch.linalg.vector_norm(step[..., :2], dim=-1)
    return step, seg, torch.cumsum(seg, dim=1)


def _walk(step: Tensor, seg: Tensor, arc: Tensor, s: Tensor) -> Tensor:
    """The poses ``(B, F, 3)`` at arc lengths ``s`` (B, F) along the paths of :func:`_path`.

    Each covers every segment up to it and the last one in part: one matmul of those fractions with the
    segments' steps (heading turns wrapped) gives every pose."""
    frac = ((s[:, :, None] - (arc - seg)[:, None]) / seg.clamp_min(1e-6)[:, None]).clamp(0.0, 1.0)  # (B, F, F)
    turn = step[..., 2:] - (2 * math.pi) * torch.floor((step[..., 2:] + math.pi) / (2 * math.pi))  # in [-pi, pi)
    return torch.matmul(frac, torch.cat([step[..., :2], turn], dim=-1))


def clearest(steps: Tensor | None, offroad: Tensor | None = None) -> Tensor | None:
    """The candidates ``(B, C)`` the guards allow: with ``offroad`` (B, C) those with the fewest off-road corners of
    their scene, then among them those whose clearance ``steps`` (B, C) is the longest (None: both checks off)."""
    ok = None if offroad is None else offroad == offroad.min(dim=1, keepdim=True).values
    if steps is None:
        return ok
    if ok is not None:
        steps = steps.masked_fill(~ok, -1)  # clearance counts from 0: a disallowed candidate never ties
    return steps == steps.max(dim=1, keepdim=True).values
