"""Driving data types shared by the nuScenes reader, the scenario generator,
the driving simulator, the scorers and every driving planner.

Two levels:

* :class:`ScenarioLog` — one scene in the **global** map frame at the log
  rate (nuScenes keyframes, 2 Hz): the ego's logged poses, every agent's
  track, and the map geometry around the route. The simulator replays it.
* :class:`SceneSample` — what a planner sees at one keyframe, in the **ego
  frame** (x forward, y left, yaw counter-clockwise, metres / radians /
  seconds): ego status, ego past and future, the K nearest agents, lane
  centerlines, a drivable-area raster and a driving command. Training data
  is a stack of these; the simulator builds one at every replanning step.

Poses are ``(x, y, yaw)``. Trajectories a planner returns are ego-frame poses
at :data:`DT` spacing starting one step after now (``(H, 3)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import shapely

from diffpilot.data.frames import to_ego_frame, to_global_frame, wrap_angle  # noqa: F401  (re-exported)

DT = 0.5
"""Seconds between keyframes (nuScenes 2 Hz) and between planned waypoints."""

COMMANDS = ("keep_lane", "left", "right", "stop")
"""Driving-command labels; a sample stores the index."""

MODES = ("keep_lane", "left", "right")
"""Driving modes of the STL planners and the augmentation (index = mode id); left / right are lane changes."""

MODE_COMMAND = {i: COMMANDS.index(m) for i, m in enumerate(MODES)}
"""Mode id -> the COMMANDS index that makes the signals pick its target lane (keep_lane, left, right)."""

PAST_STEPS = 4
"""Keyframes of history in a sample (2 s at 2 Hz)."""

FUTURE_STEPS = 8
"""Keyframes of future in a sample (4 s at 2 Hz): the planners' default horizon."""

LANE_HALF_WIDTH_M = 1.8
"""Half the lane width: written lane polygons are centerlines buffered by it, and the ego leaves its lane past it."""

CATEGORIES = ("vehicle", "pedestrian", "bicycle", "other")
"""Agent classes; nuScenes categories map onto these by prefix."""

EGO_SIZE = (4.084, 1.85)
"""Length and width of the nuScenes ego car (Renault Zoe), metres."""


@dataclass
class MapGeometry:
    """Map elements around one scene, global frame.

    ``lanes`` are centerlines discretized at about 0.5 m (lanes and lane
    connectors alike, ``(N_i, 3)`` poses each); ``lane_is_connector`` marks
    the lane connectors (intersections). ``drivable`` is the union of the
    drivable-area polygons. ``stop_lines`` are polygons where traffic must
    stop (stop signs, signals); ``crosswalks`` are polygons.
    """

    lanes: list[np.ndarray]
    lane_tokens: list[str]
    lane_is_connector: np.ndarray
    drivable: shapely.Geometry
    stop_lines: list[shapely.Polygon] = field(default_factory=list)
    crosswalks: list[shapely.Polygon] = field(default_factory=list)
    lane_successors: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ScenarioLog:
    """One scene in the global frame, sampled at the keyframes.

    ``agents_pose[a, t]`` is agent ``a``'s pose at ``times[t]``; where the
    agent is not annotated ``agents_valid[a, t]`` is False and the pose is
    undefined (zeros). ``route`` is the sequence of lane tokens the logged
    ego drives through; progress is measured along it.
    """

    scene_token: str
    scene_name: str
    location: str
    sample_tokens: list[str]
    times: np.ndarray  # (T,) seconds from the first keyframe
    ego_pose: np.ndarray  # (T, 3)
    ego_size: tuple[float, float]
    agents_token: list[str]
    agents_category: np.ndarray  # (A,) int index into CATEGORIES
    agents_size: np.ndarray  # (A, 2) length, width
    agents_pose: np.ndarray  # (A, T, 3)
    agents_valid: np.ndarray  # (A, T) bool
    map: MapGeometry
    route: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.times)


@dataclass
class SceneSample:
    """A planner's view of one keyframe, in the ego frame.

    Shapes with the defaults of :class:`SampleSpec`: ``ego_past`` (P+1, 3),
    oldest first, the last row is (0, 0, 0); ``ego_future`` (F, 3) at
    DT, 2·DT, … with ``ego_future_valid`` (F,) where the log ends early;
    ``agents_pose`` (K, P+1+F, 3) past, present and future of the K agents
    nearest now, ``agents_valid`` (K, P+1+F); ``lanes`` (L, N, 3) resampled
    centerlines nearest the ego with ``lanes_valid`` (L,); ``drivable``
    (R, R) uint8 raster, row 0 = most forward, column 0 = most left, the ego
    at the centre; ``ego_status`` = (speed m/s, longitudinal acceleration
    m/s², yaw rate rad/s).

    Map elements the traffic rules need, nearest the ego first, within
    ``lane_radius_m``: ``stop_lines`` (S, 2) stop-line centres with
    ``stop_lines_valid`` (S,); ``zones`` (Z, V, 2) crosswalks as convex
    polygons (counter-clockwise hull vertices, padded by repeating the last
    vertex so a padded polygon is still the same polygon; a crosswalk whose
    hull has more than V vertices is replaced by its smallest enclosing
    rectangle, which still contains it) with ``zones_valid`` (Z,). They
    default to "none" in the :class:`SampleSpec` default sizes for sources
    without such a map (e.g. highway-env).
    """

    token: str
    scene_token: str
    frame: int
    ego_pose_global: np.ndarray  # (3,) to map ego-frame results back
    ego_status: np.ndarray  # (3,)
    ego_past: np.ndarray
    ego_future: np.ndarray
    ego_future_valid: np.ndarray
    agents_pose: np.ndarray
    agents_valid: np.ndarray
    agents_size: np.ndarray  # (K, 2)
    agents_category: np.ndarray  # (K,) int, -1 for padding
    lanes: np.ndarray
    lanes_valid: np.ndarray
    drivable: np.ndarray
    command: int
    stop_lines: np.ndarray = field(default_factory=lambda: _no_map_elements()[0])
    stop_lines_valid: np.ndarray = field(default_factory=lambda: _no_map_elements()[1])
    zones: np.ndarray = field(default_factory=lambda: _no_map_elements()[2])
    zones_valid: np.ndarray = field(default_factory=lambda: _no_map_elements()[3])


@dataclass(frozen=True)
class SampleSpec:
    """Sizes of a :class:`SceneSample` (one spec per data set, stored with it)."""

    past_steps: int = PAST_STEPS  # 2 s of history at 2 Hz
    future_steps: int = FUTURE_STEPS  # 4 s of future (8 waypoints)
    num_agents: int = 16
    num_lanes: int = 12
    lane_points: int = 20
    lane_radius_m: float = 50.0
    raster_size: int = 64
    raster_m_per_px: float = 1.0
    num_stop_lines: int = 4
    num_zones: int = 4
    zone_vertices: int = 8


def _no_map_elements(spec: SampleSpec | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All-invalid stop lines and zones in the sizes of ``spec`` (a sample without such map elements)."""
    spec = SampleSpec() if spec is None else spec
    S, Z, V = spec.num_stop_lines, spec.num_zones, spec.zone_vertices
    return np.zeros((S, 2)), np.zeros(S, dtype=bool), np.zeros((Z, V, 2)), np.zeros(Z, dtype=bool)


@runtime_checkable
class Planner(Protocol):
    """A driving planner: every baseline and every learned driving policy.

    ``plan`` returns the ego-frame trajectory ``(future_steps, 3)`` starting
    DT after now. ``reset`` is called at the start of every scenario.
    """

    def reset(self, seed: int | None = None) -> None: ...

    def plan(self, sample: SceneSample) -> np.ndarray: ...


def mode_from_command(command: np.ndarray) -> np.ndarray:
    """COMMANDS indices -> mode ids (keep_lane and stop -> keep_lane, left -> left, right -> right)."""
    c = np.asarray(command, dtype=np.int64)
    out = np.zeros_like(c)
    out[c == COMMANDS.index("left")] = MODES.index("left")
    out[c == COMMANDS.index("right")] = MODES.index("right")
    return out
