"""Rule-based guards on a learned driving planner's candidates and kept plan.

Clearance: how long each candidate stays clear of the agents ahead under a
constant-velocity forecast (selection keeps to the clearest; the kept plan
brakes to a stop short of a forecast contact). Drivable area (off by default):
selection first keeps to the candidates whose box leaves the map's drivable
area least. Standstill hold: a plan that barely moves is held still.

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

__all__ = ["GuardConfig", "candidate_clearance", "candidate_offroad", "check_guards", "clearance_steps", "clearest",
           "guard_kept", "hold_standstill", "moves", "obb_overlap", "offroad_corners", "pick", "reads_drivable",
           "stop_short"]


@dataclass
class GuardConfig:
    """The guard options a driving planner's config inherits (one meaning for every planner that has them)."""

    hold_below_m: float = 1.5  # a kept plan ending closer than this to the ego becomes standstill (0: off)
    clearance_check: bool = True  # keep to the candidates that stay clear longest of the agents ahead
    clearance_margin_m: float = 0.3  # the ego's box is grown by this on every side for that check
    clearance_horizon_s: float = 2.0  # forecast contacts later than this are not counted
    clearance_front_m: float = 0.0  # the ego's box also reaches this much further ahead: the gap a stop keeps
    drivable_check: bool = False  # keep first to the candidates whose box leaves the drivable-area raster least
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
    row = torch.floor(R / 2 - x / m_per_px)
    col = torch.floor(R / 2 - y / m_per_px)
    inside = (row >= 0) & (row < R) & (col >= 0) & (col < R)
    cell = (row.clamp(0, R - 1) * R + col.clamp(0, R - 1)).to(torch.int64).reshape(B, -1)
    on = torch.gather(drivable.reshape(B, -1).to(cands.dtype), 1, cell).reshape(x.shape) > 0.5
    return (inside & ~on).reshape(B, C, -1).sum(-1)


def pick(cands: Tensor, idx: Tensor) -> Tensor:
    """The candidate ``(B, F, 3)`` of each row of ``cands`` (B, C, F, 3) at ``idx`` (B,)."""
    return torch.gather(cands, 1, idx[:, None, None, None].expand(-1, 1, *cands.shape[2:]))[:, 0]


def guard_kept(cfg: GuardConfig, cands: Tensor, idx: Tensor, clear: Tensor | None) -> Tensor:
    """The plans ``(B, F, 3)`` kept from ``cands`` (B, C, F, 3) at ``idx`` (B,), stopped short of a forecast
    contact (``clear`` from :func:`candidate_clearance`) and held still when they barely move."""
    chosen = pick(cands, idx)
    if clear is not None:
        chosen = stop_short(chosen, torch.gather(clear, 1, idx[:, None])[:, 0])
    return hold_standstill(chosen, float(cfg.hold_below_m))


def obb_overlap(pa: Tensor, ha: Tensor, pb: Tensor, hb: Tensor) -> Tensor:
    """Whether oriented boxes overlap (separating-axis test), broadcast over leading dims.

    ``pa``/``pb``: (..., 3) centre and yaw; ``ha``/``hb``: (..., 2) half length and half width.
    """
    dx, dy = pb[..., 0] - pa[..., 0], pb[..., 1] - pa[..., 1]
    ca, sa, cb, sb = torch.cos(pa[..., 2]), torch.sin(pa[..., 2]), torch.cos(pb[..., 2]), torch.sin(pb[..., 2])
    return _overlap(dx, dy, ca, sa, cb, sb, ha, hb)


def _overlap(dx: Tensor, dy: Tensor, ca: Tensor, sa: Tensor, cb: Tensor, sb: Tensor, ha: Tensor, hb: Tensor,
             along_a: Tensor | None = None) -> Tensor:
    """:func:`obb_overlap` from the centre offset ``(dx, dy)`` of box b from box a and each box's heading as cosine
    and sine. Each box's extent along the other's axes needs only the cosine and sine of the yaw difference,
    so the four axis tests are a few elementwise ops (a plan graph pays per op). ``along_a``: ``dx*ca + dy*sa``
    when the caller has it already."""
    c, s = (ca * cb + sa * sb).abs(), (ca * sb - sa * cb).abs()  # |cos|, |sin| of the yaw difference
    la, wa, lb, wb = ha[..., 0], ha[..., 1], hb[..., 0], hb[..., 1]
    along_a = dx * ca + dy * sa if along_a is None else along_a
    return ((along_a.abs() <= la + lb * c + wb * s) & ((dy * ca - dx * sa).abs() <= wa + lb * s + wb * c)
            & ((dx * cb + dy * sb).abs() <= lb + la * c + wa * s) & ((dy * cb - dx * sb).abs() <= wb + la * s + wa * c))


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
    B, C, F, _ = cands.shape
    dtype = cands.dtype
    # The ego at every half step (0.5 dt, dt, 1.5 dt, ...): midpoints and waypoints, headings as cosine and sine. A
    # midpoint's heading is the circular mean of its ends': the direction of the sum of their unit vectors.
    cw, sw = torch.cos(cands[..., 2]), torch.sin(cands[..., 2])  # (B, C, F)
    first = torch.zeros_like(cw[:, :, :1])
    cp, sp = torch.cat([first + 1.0, cw[:, :, :-1]], dim=2), torch.cat([first, sw[:, :, :-1]], dim=2)
    cm, sm = cp + cw, sp + sw
    norm = (cm * cm + sm * sm).sqrt()
    turned = norm > 0  # ends facing opposite ways: heading 0, as atan2(0, 0)
    cm = torch.where(turned, cm / norm.clamp_min(1e-30), torch.ones_like(cm))
    sm = torch.where(turned, sm / norm.clamp_min(1e-30), torch.zeros_like(sm))
    xy = cands[..., :2]
    mid_xy = 0.5 * (torch.cat([torch.zeros_like(xy[:, :, :1]), xy[:, :, :-1]], dim=2) + xy)
    ego_xy = torch.stack([mid_xy, xy], dim=3).reshape(B, C, 2 * F, 1, 2)  # (B, C, T, 1, 2)
    ca = torch.stack([cm, cw], dim=3).reshape(B, C, 2 * F, 1)
    sa = torch.stack([sm, sw], dim=3).reshape(B, C, 2 * F, 1)
    times = (0.5 * dt) * torch.arange(1, 2 * F + 1, dtype=dtype, device=cands.device)

    now = agents_pose[:, :, -1].to(dtype)  # (B, K, 3)
    seen_now = agents_valid[:, :, -1]
    before = agents_pose[:, :, -2].to(dtype) if agents_pose.shape[2] > 1 else now
    seen_before = agents_valid[:, :, -2] if agents_pose.shape[2] > 1 else seen_now
    vel = torch.where(seen_before[..., None], (now[..., :2] - before[..., :2]) / dt, torch.zeros_like(now[..., :2]))
    agent_xy = now[:, None, :, :2] + vel[:, None] * times[None, :, None, None]  # (B, T, K, 2)
    cb, sb = torch.cos(now[..., 2])[:, None, None], torch.sin(now[..., 2])[:, None, None]  # (B, 1, 1, K): headings kept

    ego_half = torch.tensor([0.5 * (ego_size[0] + front_m) + margin_m, 0.5 * ego_size[1] + margin_m], dtype=dtype,
                            device=cands.device)
    offset = agent_xy[:, None] - ego_xy  # (B, C, T, K, 2): each agent from the ego's centre
    dx, dy = offset[..., 0], offset[..., 1]
    along = dx * ca + dy * sa  # how far ahead of the ego's centre, along its heading
    agent_half = (0.5 * agents_size.to(dtype))[:, None, None]
    if front_m:  # the box reaching front_m further ahead has its centre half that further forward
        hit = _overlap(dx - (0.5 * front_m) * ca, dy - (0.5 * front_m) * sa, ca, sa, cb, sb, ego_half, agent_half)
    else:
        hit = _overlap(dx, dy, ca, sa, cb, sb, ego_half, agent_half, along)
    # Oncoming traffic (moving, heading more than 120 degrees from the ego's) is left to the map: a straight-line
    # forecast of a car in the opposite lane of a curve sweeps across the ego's lane and would stop it for nothing.
    moving = vel.norm(dim=-1) > ONCOMING_MIN_SPEED  # (B, K)
    oncoming = (ca * cb + sa * sb < ONCOMING_COS) & moving[:, None, None, :]
    hit = hit & seen_now[:, None, None, :] & ~oncoming  # (B, C, T, K)
    ahead = along > 0
    # An agent counts when it is ahead of the ego at its first contact (it overtaking from behind does not).
    first_hit = _first_true(hit.transpose(2, 3))  # (B, C, K), T when never
    ahead_then = torch.gather(torch.cat([ahead, torch.zeros_like(ahead[:, :, :1])], dim=2).transpose(2, 3), 3,
                              first_hit[..., None]).squeeze(-1)
    any_hit = (hit & ahead_then[:, :, None, :]).any(dim=-1)  # (B, C, T)
    steps = _first_true(any_hit)
    if horizon_s is None:
        return steps
    within = int(round(horizon_s / (0.5 * dt)))
    return torch.where(steps < within, steps, torch.full_like(steps, 2 * F))


def _first_true(flags: Tensor) -> Tensor:
    """Index of the first True along the last dim, or its length when there is none (argmax with a sentinel)."""
    padded = torch.cat([flags, torch.ones_like(flags[..., :1])], dim=-1)
    return torch.argmax(padded.to(torch.float32), dim=-1)


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
    return poses * moves(poses, hold_below_m).to(poses.dtype)[:, None, None]


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
    count = steps // 2  # waypoint j lies at half step 2j + 1: clear iff 2j + 1 < steps
    pts = torch.cat([torch.zeros_like(plans[:, :1]), plans], dim=1)  # (B, F + 1, 3), the ego at the origin first
    seg = (pts[:, 1:, :2] - pts[:, :-1, :2]).norm(dim=-1)  # (B, F)
    arc = torch.cat([torch.zeros_like(seg[:, :1]), torch.cumsum(seg, dim=1)], dim=1)  # (B, F + 1)
    s_stop = torch.gather(arc, 1, count.clamp(0, F)[:, None])  # (B, 1): arc length of the last clear waypoint
    v0 = (seg[:, :1] / dt).clamp_min(1e-3)
    brake_s = 2.0 * s_stop / v0  # time to stop at constant deceleration v0^2 / (2 s_stop)
    t = dt * torch.arange(1, F + 1, dtype=plans.dtype, device=plans.device)[None]
    left = (1.0 - t / brake_s.clamp_min(1e-6)).clamp_min(0.0)
    s = torch.minimum(arc[:, 1:], s_stop * (1.0 - left * left))  # (B, F) arc length at each waypoint time
    k = (s[:, :, None] > arc[:, None, 1:]).sum(-1).clamp_max(F - 1)  # the path segment each one falls on
    a = torch.gather(pts, 1, k[..., None].expand(-1, -1, 3))
    b = torch.gather(pts, 1, (k + 1)[..., None].expand(-1, -1, 3))
    frac = ((s - torch.gather(arc, 1, k)) / torch.gather(seg, 1, k).clamp_min(1e-6)).clamp(0.0, 1.0)[..., None]
    d = b[..., 2:] - a[..., 2:]
    turn = d - (2 * math.pi) * torch.floor((d + math.pi) / (2 * math.pi))  # wrapped into [-pi, pi)
    braked = torch.cat([a[..., :2] + frac * (b[..., :2] - a[..., :2]), a[..., 2:] + frac * turn], dim=-1)
    return torch.where((steps >= 2 * F)[:, None, None], plans, braked)


def clearest(steps: Tensor | None, offroad: Tensor | None = None) -> Tensor | None:
    """The candidates ``(B, C)`` the guards allow: with ``offroad`` (B, C) those with the fewest off-road corners of
    their scene, then among them those whose clearance ``steps`` (B, C) is the longest (None: both checks off)."""
    ok = None if offroad is None else offroad == offroad.min(dim=1, keepdim=True).values
    if steps is None:
        return ok
    if ok is not None:
        steps = steps.masked_fill(~ok, -1)  # clearance counts from 0: a disallowed candidate never ties
    return steps == steps.max(dim=1, keepdim=True).values
