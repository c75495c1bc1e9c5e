"""Built-in road networks for the traffic simulator.

Each network is built from reference paths made of straight pieces and
constant-radius arcs, so the geometry is exact and testable (an arc of
radius R really has curvature 1/R). Lanes are offsets of a reference path,
cut into pieces of a few tens of metres so that a route is a meaningful
sequence of lane tokens, and resampled at about 0.5 m like nuScenes
centerlines.

Three locations (official nuScenes names, so the real devkit accepts them):

* ``boston-seaport``: a closed multi-lane road (3 lanes one way, 2 the
  other) with a long straight, arcs of several radii and an S-bend;
* ``singapore-queenstown``: a winding two-lane road (one lane each way) with
  tight and wide curves, an S-bend and a mid-block crosswalk;
* ``singapore-onenorth``: a 2 x 2 grid of 4-way intersections, two
  signalized and two all-way stops, with left / straight / right lane
  connectors, stop lines and crosswalks on every arm.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import shapely

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import MapGeometry

__all__ = [
    "LANE_WIDTH",
    "LOCATIONS",
    "POINT_SPACING",
    "Intersection",
    "Lane",
    "RoadNetwork",
    "build_network",
    "build_networks",
]

LANE_WIDTH = 3.5
POINT_SPACING = 0.5
INTERSECTION_HALF = 14.0  # centre of a junction to its stop lines, metres
STOP_LINE_DEPTH = 0.6
_DENSE = 0.05  # tracing step before resampling; chord error < 1e-4 m at R = 10 m

LOCATIONS = ("boston-seaport", "singapore-queenstown", "singapore-onenorth")


@dataclass
class Lane:
    """One lane or lane connector: centerline poses, design curvature and topology.

    ``curvature`` is the curvature the piece was designed with (signed, 1/m),
    ``ref_u`` the station along the road's reference path (the same for all
    parallel lanes of a road, so a lane change maps a position onto the
    neighbour exactly). ``control`` is ``"stop"`` or ``"signal"`` where the
    lane ends at a controlled stop line.
    """

    name: str
    token: str
    points: np.ndarray  # (N, 3)
    curvature: np.ndarray  # (N,)
    is_connector: bool
    speed_limit: float
    ref_u: np.ndarray | None = None
    successors: list[int] = field(default_factory=list)
    predecessors: list[int] = field(default_factory=list)
    left: int | None = None
    right: int | None = None
    control: str | None = None
    intersection: int | None = None  # junction at the lane end (approaches) or inside (connectors)
    approach_axis: int = 0  # 0 = east-west, 1 = north-south (signal phase of an approach)
    turn: str | None = None  # connectors: "left" / "straight" / "right"
    lane_index: int = 0  # position across a multi-lane road, 0 next to the centre line
    source: bool = False  # starts at the map boundary (traffic enters)
    sink: bool = False  # ends at the map boundary (traffic leaves)
    crossings: list[tuple[int, float, float]] = field(default_factory=list)  # (crosswalk, s0, s1)

    @property
    def length(self) -> float:
        return float(np.hypot(*np.diff(self.points[:, :2], axis=0).T).sum())

    @property
    def spacing(self) -> float:
        return self.length / (len(self.points) - 1)


@dataclass
class Intersection:
    """A 4-way junction: its control, connectors and which connectors cross."""

    center: tuple[float, float]
    control: str  # "stop" or "signal"
    connectors: list[int] = field(default_factory=list)
    conflicts: dict[int, set[int]] = field(default_factory=dict)


@dataclass
class RoadNetwork:
    """A built-in map: lanes with topology, junctions, crosswalks, drivable area."""

    location: str
    lanes: list[Lane]
    intersections: list[Intersection]
    crosswalks: list[shapely.Polygon]
    stop_lines: list[shapely.Polygon]
    stop_line_lane: list[int]  # the lane each stop line ends
    drivable: shapely.Geometry
    multi_lane: bool

    def token_index(self) -> dict[str, int]:
        return {lane.token: i for i, lane in enumerate(self.lanes)}

    def to_map_geometry(self) -> MapGeometry:
        """The network as the writer's :class:`MapGeometry` (global frame)."""
        return MapGeometry(
            lanes=[lane.points.copy() for lane in self.lanes],
            lane_tokens=[lane.token for lane in self.lanes],
            lane_is_connector=np.array([lane.is_connector for lane in self.lanes], dtype=bool),
            drivable=self.drivable,
            stop_lines=list(self.stop_lines),
            crosswalks=list(self.crosswalks),
            lane_successors={
                lane.token: [self.lanes[j].token for j in lane.successors] for lane in self.lanes
            },
        )


# ---------------------------------------------------------------- geometry


@dataclass
class _Path:
    """A densely traced reference path: poses, curvature and station."""

    x: np.ndarray
    y: np.ndarray
    th: np.ndarray
    k: np.ndarray
    u: np.ndarray

    def reversed(self) -> _Path:
        return _Path(self.x[::-1], self.y[::-1], self.th[::-1] + np.pi, -self.k[::-1], self.u[-1] - self.u[::-1])

    def offset(self, left: float) -> _Path:
        """The parallel path ``left`` metres to the left (negative: right)."""
        nx, ny = -np.sin(self.th), np.cos(self.th)
        return _Path(self.x + left * nx, self.y + left * ny, self.th, self.k / (1.0 - left * self.k), self.u)

    def between(self, u0: float, u1: float) -> _Path:
        """The piece with station in [u0, u1], endpoints interpolated exactly."""
        inner = (self.u > u0 + 1e-9) & (self.u < u1 - 1e-9)
        u = np.concatenate([[u0], self.u[inner], [u1]])
        th = np.unwrap(self.th)
        return _Path(
            np.interp(u, self.u, self.x),
            np.interp(u, self.u, self.y),
            np.interp(u, self.u, th),
            np.interp(u, self.u, self.k),
            u,
        )


def _trace(x0: float, y0: float, th0: float, segments: list[tuple]) -> _Path:
    """Trace ``("straight", length)`` / ``("arc", radius, angle)`` segments from a pose."""
    xs, ys, ths, ks, us = [np.array([x0])], [np.array([y0])], [np.array([th0])], [], []
    x, y, th, u = x0, y0, th0, 0.0
    seg_k = []
    for seg in segments:
        if seg[0] == "straight":
            length, k = float(seg[1]), 0.0
        elif seg[0] == "arc":
            radius, angle = float(seg[1]), float(seg[2])
            if radius <= 0:
                raise DatasetError(f"road arc radius must be positive, got {radius}")
            length, k = radius * abs(angle), math.copysign(1.0 / radius, angle)
        else:
            raise DatasetError(f"unknown road segment kind {seg[0]!r}: use 'straight' or 'arc'")
        n = max(1, int(math.ceil(length / _DENSE)))
        t = np.linspace(0.0, length, n + 1)[1:]
        if k == 0.0:
            px, py, pth = x + t * math.cos(th), y + t * math.sin(th), np.full_like(t, th)
        else:
            pth = th + k * t
            px = x + (np.sin(pth) - math.sin(th)) / k
            py = y - (np.cos(pth) - math.cos(th)) / k
        xs.append(px)
        ys.append(py)
        ths.append(pth)
        seg_k.append(np.full_like(t, k))
        us.append(u + t)
        x, y, th, u = float(px[-1]), float(py[-1]), float(pth[-1]), u + length
    first_k = seg_k[0][:1] if seg_k else np.zeros(1)
    ks = [first_k] + seg_k
    return _Path(
        np.concatenate(xs), np.concatenate(ys), np.concatenate(ths), np.concatenate(ks), np.concatenate([[0.0]] + us)
    )


def _resample(path: _Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniform ~0.5 m resampling: poses (N, 3), design curvature (N,), station (N,)."""
    seg = np.hypot(np.diff(path.x), np.diff(path.y))
    c = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(round(c[-1] / POINT_SPACING)) + 1)
    t = np.linspace(0.0, c[-1], n)
    th = np.unwrap(path.th)
    pts = np.stack([np.interp(t, c, path.x), np.interp(t, c, path.y), np.interp(t, c, th)], axis=1)
    pts[:, 2] = (pts[:, 2] + np.pi) % (2 * np.pi) - np.pi
    # a design-curvature switch between two samples is assigned to the nearer piece
    k = path.k[np.clip(np.searchsorted(c, t), 0, len(c) - 1)]
    return pts, k, np.interp(t, c, path.u)


def _token(location: str, name: str) -> str:
    return hashlib.md5(f"diffpilot/{location}/{name}".encode()).hexdigest()


def _closed_loop(segments: list[tuple], west_index: int, south_index: int) -> list[tuple]:
    """Fill the straight pieces heading west / south so the path closes on itself."""
    segs = list(segments)
    segs[west_index] = ("straight", 0.0)
    segs[south_index] = ("straight", 0.0)
    p = _trace(0.0, 0.0, 0.0, segs)
    a, b = float(p.x[-1]), float(p.y[-1])
    if a <= 1.0 or b <= 1.0:
        raise DatasetError("road loop parameters do not close with positive straights; change the radii")
    segs[west_index] = ("straight", a)
    segs[south_index] = ("straight", b)
    return segs


# ---------------------------------------------------------------- builders


class _Builder:
    def __init__(self, location: str) -> None:
        self.location = location
        self.lanes: list[Lane] = []
        self.crosswalks: list[shapely.Polygon] = []
        self.intersections: list[Intersection] = []
        self.extra_drivable: list[shapely.Geometry] = []

    def add(self, name: str, path: _Path, *, connector: bool, speed: float, **kw) -> int:
        pts, k, u = _resample(path)
        self.lanes.append(
            Lane(name, _token(self.location, name), pts, k, connector, speed, ref_u=u, **kw)
        )
        return len(self.lanes) - 1

    def link(self, a: int, b: int) -> None:
        self.lanes[a].successors.append(b)
        self.lanes[b].predecessors.append(a)

    def carriageway(self, name: str, ref: _Path, n_lanes: int, piece: float, speed: float) -> None:
        """Lanes right of a closed reference path, cut into pieces, with neighbours and successors."""
        total = float(ref.u[-1])
        n_pieces = max(1, int(round(total / piece)))
        cuts = np.linspace(0.0, total, n_pieces + 1)
        ids = np.zeros((n_lanes, n_pieces), dtype=int)
        for j in range(n_lanes):
            lane_path = ref.offset(-(j + 0.5) * LANE_WIDTH)
            for p in range(n_pieces):
                ids[j, p] = self.add(f"{name}-l{j}-p{p:02d}", lane_path.between(cuts[p], cuts[p + 1]),
                                     connector=False, speed=speed, lane_index=j)
        for j in range(n_lanes):
            for p in range(n_pieces):
                self.link(ids[j, p], ids[j, (p + 1) % n_pieces])
                # lane 0 is next to the centre line; higher indices are further right
                if j + 1 < n_lanes:
                    self.lanes[ids[j, p]].right = int(ids[j + 1, p])
                if j > 0:
                    self.lanes[ids[j, p]].left = int(ids[j - 1, p])

    def crosswalk_across(self, ref: _Path, u: float, half_road: float, width: float = 3.0) -> None:
        i = int(np.searchsorted(ref.u, u))
        x, y, th = ref.x[i], ref.y[i], ref.th[i]
        d = np.array([math.cos(th), math.sin(th)])
        n = np.array([-math.sin(th), math.cos(th)])
        c = np.array([x, y])
        h = half_road + 1.0
        corners = [c - d * width / 2 - n * h, c + d * width / 2 - n * h, c + d * width / 2 + n * h, c - d * width / 2 + n * h]
        self.crosswalks.append(shapely.Polygon(corners))

    def finish(self, multi_lane: bool) -> RoadNetwork:
        lines = [shapely.LineString(lane.points[:, :2]) for lane in self.lanes]
        polys = shapely.buffer(lines, LANE_WIDTH / 2, cap_style="flat")
        drivable = shapely.union_all(list(polys) + self.extra_drivable)
        drivable = shapely.make_valid(drivable.buffer(0.01).buffer(-0.01))
        stop_lines, stop_lane = [], []
        for i, lane in enumerate(self.lanes):
            for c, cw in enumerate(self.crosswalks):
                inter = lines[i].intersection(cw)
                if not inter.is_empty:
                    ss = [lines[i].project(shapely.Point(xy)) for xy in shapely.get_coordinates(inter)]
                    lane.crossings.append((c, float(min(ss)), float(max(ss))))
            if lane.control is not None:
                stop_lines.append(_stop_line(lane.points))
                stop_lane.append(i)
        for inter in self.intersections:
            geoms = {c: lines[c].buffer(1.6) for c in inter.connectors}
            for a in inter.connectors:
                inter.conflicts[a] = {
                    b for b in inter.connectors
                    if b != a and self.lanes[a].predecessors != self.lanes[b].predecessors
                    and geoms[a].intersects(geoms[b])
                }
        return RoadNetwork(self.location, self.lanes, self.intersections, self.crosswalks, stop_lines,
                           stop_lane, drivable, multi_lane)


def _stop_line(points: np.ndarray) -> shapely.Polygon:
    """A thin polygon across the lane over its last STOP_LINE_DEPTH metres."""
    x, y, th = points[-1]
    d = np.array([math.cos(th), math.sin(th)])
    n = np.array([-math.sin(th), math.cos(th)])
    end = np.array([x, y])
    start = end - d * STOP_LINE_DEPTH
    h = LANE_WIDTH / 2
    return shapely.Polygon([start - n * h, end - n * h, end + n * h, start + n * h])


def _jitter(rng: np.random.Generator, value: float, rel: float = 0.12) -> float:
    return float(value * (1.0 + rng.uniform(-rel, rel)))


def _boston(rng: np.random.Generator) -> RoadNetwork:
    b = _Builder("boston-seaport")
    s_bend = _jitter(rng, 90.0)
    segs = [
        ("straight", _jitter(rng, 320.0)),  # the long straight
        ("arc", _jitter(rng, 60.0), math.pi / 2),
        ("straight", _jitter(rng, 70.0)),
        ("arc", s_bend, math.radians(30)),  # S-bend
        ("arc", s_bend, -math.radians(30)),
        ("straight", _jitter(rng, 40.0)),
        ("arc", _jitter(rng, 95.0), math.pi / 2),
        ("straight", None),  # west, solved
        ("arc", _jitter(rng, 58.0, 0.05), math.pi / 2),
        ("straight", None),  # south, solved
        ("arc", _jitter(rng, 130.0), math.pi / 2),
    ]
    ref = _trace(0.0, 0.0, 0.0, _closed_loop(segs, 7, 9))
    b.carriageway("fwd", ref, 3, 70.0, 15.0)
    b.carriageway("rev", ref.reversed(), 2, 70.0, 14.0)
    return b.finish(multi_lane=True)


def _queenstown(rng: np.random.Generator) -> RoadNetwork:
    b = _Builder("singapore-queenstown")
    s_bend = _jitter(rng, 45.0)
    segs = [
        ("straight", _jitter(rng, 260.0)),
        ("arc", _jitter(rng, 30.0), math.pi / 2),
        ("straight", _jitter(rng, 50.0)),
        ("arc", s_bend, math.radians(60)),  # S-bend
        ("arc", s_bend, -math.radians(60)),
        ("straight", _jitter(rng, 40.0)),
        ("arc", _jitter(rng, 70.0), math.pi / 2),
        ("straight", None),
        ("arc", _jitter(rng, 25.0, 0.05), math.pi / 2),
        ("straight", None),
        ("arc", _jitter(rng, 150.0), math.pi / 2),
    ]
    ref = _trace(0.0, 0.0, 0.0, _closed_loop(segs, 7, 9))
    b.carriageway("east", ref, 1, 60.0, 12.5)
    b.carriageway("west", ref.reversed(), 1, 60.0, 12.5)
    b.crosswalk_across(ref, _jitter(rng, 130.0, 0.2), LANE_WIDTH)
    return b.finish(multi_lane=False)


_DIRS = {"E": (1, 0), "N": (0, 1), "W": (-1, 0), "S": (0, -1)}
_HEADING = {"E": 0.0, "N": math.pi / 2, "W": math.pi, "S": -math.pi / 2}
_LEFT_OF = {"E": "N", "N": "W", "W": "S", "S": "E"}
_RIGHT_OF = {v: k for k, v in _LEFT_OF.items()}


def _onenorth(rng: np.random.Generator) -> RoadNetwork:
    """A 2 x 2 grid of junctions; one lane each way on every arm."""
    b = _Builder("singapore-onenorth")
    block = _jitter(rng, 130.0, 0.1)
    arm = _jitter(rng, 110.0, 0.1)
    e = INTERSECTION_HALF
    h = LANE_WIDTH / 2
    nodes = {(0, 0): "signal", (1, 0): "stop", (0, 1): "stop", (1, 1): "signal"}
    centers = {k: (k[0] * block, k[1] * block) for k in nodes}
    # directed links: inbound[node][dir travelled] = lane ending at node; outbound[node][dir] = lane starting at node
    inbound: dict[tuple[int, int], dict[str, int]] = {k: {} for k in nodes}
    outbound: dict[tuple[int, int], dict[str, int]] = {k: {} for k in nodes}
    speed = 11.0
    for node, (cx, cy) in centers.items():
        for dname, (dx, dy) in _DIRS.items():
            nb = (node[0] + dx, node[1] + dy)
            th = _HEADING[dname]
            rx, ry = math.sin(th), -math.cos(th)  # right of the travel direction
            start = (cx + dx * e + rx * h, cy + dy * e + ry * h)
            if nb in nodes:
                length = block - 2 * e
            else:
                length = arm
            path = _trace(start[0], start[1], th, [("straight", length)])
            name = f"n{node[0]}{node[1]}-{dname}"
            i = b.add(name, path, connector=False, speed=speed)
            outbound[node][dname] = i
            if nb in nodes:
                inbound[nb][dname] = i
            else:
                b.lanes[i].sink = True
                # the matching lane coming in from the boundary
                bx, by = cx + dx * (e + arm), cy + dy * (e + arm)
                back = _HEADING[_opposite(dname)]
                rbx, rby = math.sin(back), -math.cos(back)
                path_in = _trace(bx + rbx * h, by + rby * h, back, [("straight", arm)])
                j = b.add(f"in-n{node[0]}{node[1]}-{_opposite(dname)}", path_in, connector=False, speed=speed, source=True)
                inbound[node][_opposite(dname)] = j
    for node, (cx, cy) in centers.items():
        inter = Intersection(center=(cx, cy), control=nodes[node])
        k = len(b.intersections)
        for dname, lane_in in inbound[node].items():
            lin = b.lanes[lane_in]
            lin.control, lin.intersection = nodes[node], k
            lin.approach_axis = 0 if dname in ("E", "W") else 1
            x0, y0, th0 = lin.points[-1]
            for turn, out_dir, segs in (
                ("straight", dname, [("straight", 2 * e)]),
                ("left", _LEFT_OF[dname], [("arc", e + h, math.pi / 2)]),
                ("right", _RIGHT_OF[dname], [("arc", e - h, -math.pi / 2)]),
            ):
                lane_out = outbound[node][out_dir]
                path = _trace(x0, y0, _HEADING[dname], segs)
                end = b.lanes[lane_out].points[0]
                if math.hypot(path.x[-1] - end[0], path.y[-1] - end[1]) > 1e-6:
                    raise AssertionError("junction connector does not meet its exit lane")
                c = b.add(f"n{node[0]}{node[1]}-{dname}-{turn}", path, connector=True, speed=speed,
                          intersection=k, turn=turn)
                b.link(lane_in, c)
                b.link(c, lane_out)
                inter.connectors.append(c)
            # crosswalk across the arm this approach comes from
            dx, dy = _DIRS[dname]
            mid = e - 2.5
            ccx, ccy = cx - dx * mid, cy - dy * mid
            half = LANE_WIDTH + 1.0
            if dx != 0:
                poly = shapely.box(ccx - 1.5, ccy - half, ccx + 1.5, ccy + half)
            else:
                poly = shapely.box(ccx - half, ccy - 1.5, ccx + half, ccy + 1.5)
            b.crosswalks.append(poly)
        b.extra_drivable.append(shapely.box(cx - e, cy - e, cx + e, cy + e))
        b.intersections.append(inter)
    return b.finish(multi_lane=False)


def _opposite(d: str) -> str:
    return {"E": "W", "W": "E", "N": "S", "S": "N"}[d]


_BUILDERS = {"boston-seaport": _boston, "singapore-queenstown": _queenstown, "singapore-onenorth": _onenorth}


def build_network(location: str, seed: int = 0) -> RoadNetwork:
    """The built-in network at ``location``; the seed varies lengths and radii slightly."""
    if location not in _BUILDERS:
        raise DatasetError(f"no built-in road network for location {location!r}; choose one of {sorted(_BUILDERS)}")
    rng = np.random.default_rng([seed, LOCATIONS.index(location)])
    return _BUILDERS[location](rng)


def build_networks(seed: int = 0) -> dict[str, RoadNetwork]:
    """All built-in networks, keyed by nuScenes location name."""
    return {loc: build_network(loc, seed) for loc in LOCATIONS}
