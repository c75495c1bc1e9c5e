"""Car-following (IDM) and lane-change (MOBIL) models, and the driver styles.

IDM (Treiber, Hennecke & Helbing 2000) gives a longitudinal acceleration
from the own speed, the gap to the leader and the closing speed; it is
collision-free for a leader that brakes within the model's assumptions and
converges to the desired speed on a free road. MOBIL (Kesting, Treiber &
Helbing 2007) decides lane changes from IDM accelerations: go when the own
gain plus a politeness share of the neighbours' gains exceeds a threshold,
and only when the new follower need not brake harder than a safe limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DRIVER_STYLES", "DriverStyle", "MAX_DECEL", "idm_accel", "idm_accel_scalar", "mobil_gain"]

MAX_DECEL = 8.0
"""Physical braking limit, m/s² (dry road); IDM's emergency term is clipped here."""

DELTA = 4.0  # IDM's free-road exponent


@dataclass(frozen=True)
class DriverStyle:
    """Parameters of one driver type; ``speed_factor`` scales the lane's speed limit."""

    name: str
    speed_factor: float
    headway_s: float
    min_gap_m: float
    max_accel: float
    comfort_decel: float
    politeness: float
    lane_change_threshold: float
    max_lat_accel: float


DRIVER_STYLES: dict[str, DriverStyle] = {
    "cautious": DriverStyle("cautious", 0.85, 1.8, 2.5, 1.0, 1.5, 0.5, 0.35, 2.0),
    "normal": DriverStyle("normal", 1.0, 1.4, 2.0, 1.5, 2.0, 0.3, 0.2, 2.5),
    "aggressive": DriverStyle("aggressive", 1.12, 1.0, 1.5, 2.2, 2.8, 0.1, 0.08, 3.2),
}


def idm_accel(
    v: np.ndarray,
    v0: np.ndarray,
    gap: np.ndarray,
    dv: np.ndarray,
    headway: np.ndarray,
    min_gap: np.ndarray,
    a_max: np.ndarray,
    b: np.ndarray,
) -> np.ndarray:
    """IDM acceleration for all vehicles at once.

    ``gap`` is bumper to bumper (``inf`` on a free road), ``dv`` the closing
    speed (own minus leader's). The result is clipped to [-MAX_DECEL, a_max].
    """
    v = np.asarray(v, dtype=float)
    free = 1.0 - (v / np.maximum(v0, 0.1)) ** DELTA
    s_star = min_gap + np.maximum(0.0, v * headway + v * dv / (2.0 * np.sqrt(a_max * b)))
    with np.errstate(divide="ignore", invalid="ignore"):
        inter = np.where(np.isfinite(gap), (s_star / np.maximum(gap, 0.05)) ** 2, 0.0)
    return np.clip(a_max * (free - inter), -MAX_DECEL, a_max)


def idm_accel_scalar(v: float, v0: float, gap: float, dv: float, style_params: tuple[float, float, float, float]) -> float:
    """One vehicle's IDM acceleration; ``style_params`` = (headway, min_gap, a_max, b)."""
    headway, min_gap, a_max, b = style_params
    free = 1.0 - (v / max(v0, 0.1)) ** DELTA
    inter = 0.0
    if math.isfinite(gap):
        s_star = min_gap + max(0.0, v * headway + v * dv / (2.0 * math.sqrt(a_max * b)))
        inter = (s_star / max(gap, 0.05)) ** 2
    return min(max(a_max * (free - inter), -MAX_DECEL), a_max)


def mobil_gain(
    own_new: float,
    own_old: float,
    new_follower_new: float,
    new_follower_old: float,
    old_follower_new: float,
    old_follower_old: float,
    politeness: float,
) -> float:
    """MOBIL's incentive: own gain plus politeness times the followers' summed gain."""
    return (own_new - own_old) + politeness * (
        (new_follower_new - new_follower_old) + (old_follower_new - old_follower_old)
    )
