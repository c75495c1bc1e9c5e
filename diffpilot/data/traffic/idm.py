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
from typing import Any

import numpy as np

__all__ = [
    "DRIVER_STYLES",
    "DriverStyle",
    "GAP_FLOOR",
    "IDMParams",
    "MAX_DECEL",
    "idm_accel",
    "idm_accel_scalar",
    "mobil_gain",
]

MAX_DECEL = 8.0
"""Physical braking limit, m/s² (dry road); IDM's emergency term is clipped here."""

DELTA = 4.0  # IDM's free-road exponent

GAP_FLOOR = 0.1
"""Smallest gap (m) IDM divides by; with any realistic ``min_gap`` (>= 1 m) a gap this small means full braking."""


@dataclass(frozen=True)
class IDMParams:
    """Intelligent Driver Model parameters.

    Each field is a float or an array that broadcasts against the speeds
    given to :func:`idm_accel` (one value per vehicle).
    """

    max_accel: float | np.ndarray = 1.5  # m/s², a
    comfort_decel: float | np.ndarray = 2.0  # m/s², b
    time_headway: float | np.ndarray = 1.2  # s, T
    min_gap: float | np.ndarray = 2.0  # m, s0
    max_decel: float | np.ndarray = MAX_DECEL  # m/s², the result's lower bound
    exponent: float = DELTA  # delta


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

    @property
    def idm(self) -> IDMParams:
        """This driver's car-following parameters."""
        return IDMParams(max_accel=self.max_accel, comfort_decel=self.comfort_decel, time_headway=self.headway_s,
                         min_gap=self.min_gap_m)


DRIVER_STYLES: dict[str, DriverStyle] = {
    "cautious": DriverStyle("cautious", 0.85, 1.8, 2.5, 1.0, 1.5, 0.5, 0.35, 2.0),
    "normal": DriverStyle("normal", 1.0, 1.4, 2.0, 1.5, 2.0, 0.3, 0.2, 2.5),
    "aggressive": DriverStyle("aggressive", 1.12, 1.0, 1.5, 2.2, 2.8, 0.1, 0.08, 3.2),
}


def _where(cond: bool, a: float, b: float) -> float:
    return a if cond else b


def idm_accel(v: Any, v0: Any, gap: Any, dv: Any, params: IDMParams = IDMParams()) -> Any:
    """IDM acceleration, for all vehicles at once (arrays) or for one (floats).

    ``v`` own speed, ``v0`` desired speed (floored at 0.1 m/s), ``gap``
    bumper to bumper (``inf`` or NaN: free road; floored at :data:`GAP_FLOOR`),
    ``dv`` the closing speed (own minus leader's); ``params`` fields may be
    per-vehicle arrays. The result ``a (1 - (v / v0)^delta - (s* / gap)^2)``,
    ``s* = s0 + max(0, v T + v dv / (2 sqrt(a b)))``, is clipped to
    ``[-max_decel, a]``.

    Arrays in, an array out. When every input is a float the same formula
    runs on Python floats with ``math`` (a numpy ufunc costs microseconds
    on a float, and the traffic simulator's MOBIL checks call this per
    vehicle) and a float comes out.
    """
    p = params
    if all(isinstance(x, (float, int)) for x in (v, v0, gap, dv, p.max_accel, p.comfort_decel, p.time_headway,
                                                  p.min_gap, p.max_decel)):
        fmax, fmin, sqrt, finite, where = max, min, math.sqrt, math.isfinite, _where
    else:
        v = np.asarray(v, dtype=float)
        fmax, fmin, sqrt, finite, where = np.maximum, np.minimum, np.sqrt, np.isfinite, np.where
    free = 1.0 - (v / fmax(v0, 0.1)) ** p.exponent
    s_star = p.min_gap + fmax(0.0, v * p.time_headway + v * dv / (2.0 * sqrt(p.max_accel * p.comfort_decel)))
    inter = where(finite(gap), (s_star / fmax(gap, GAP_FLOOR)) ** 2, 0.0)
    return fmin(fmax(p.max_accel * (free - inter), -p.max_decel), p.max_accel)


def idm_accel_scalar(v: float, v0: float, gap: float, dv: float, params: IDMParams = IDMParams()) -> float:
    """One vehicle's IDM acceleration: :func:`idm_accel` on floats, as a float."""
    return float(idm_accel(v, v0, gap, dv, params))


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
