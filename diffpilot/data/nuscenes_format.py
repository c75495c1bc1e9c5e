"""Write scenario logs in the nuScenes format, so real nuScenes and our own data go through one reader.

Layout written under ``root`` (what nuscenes-devkit 1.2 needs to load)::

    <root>/<version>/{13 tables}.json          all present, possibly []
    <root>/<version>/diffpilot_splits.json     our scene split (split name -> scene names)
    <root>/maps/<map token>.png                one tiny file per map record (checked for existence only)
    <root>/maps/expansion/<location>.json      map expansion 1.3 for all 4 official locations

Keyframes carry one LIDAR_TOP sample_data (identity calibration) whose
ego_pose is the logged ego pose; agents are instances with one
sample_annotation per keyframe where they are valid. Lane centerlines are
written as ``arcline_path_3`` chains of straight pieces (the devkit
discretizes straight pieces exactly), after dropping vertices that lie
within :data:`CENTERLINE_TOLERANCE_M` of a straight chord.

The whole root is built in a temporary folder and published in one rename;
an existing root is replaced only if this module wrote it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import CATEGORIES, LANE_HALF_WIDTH_M, MapGeometry, ScenarioLog
from diffpilot.fileio import publish_dir

__all__ = [
    "CATEGORY_NAMES",
    "EXPANSION_KEYS",
    "LANE_HALF_WIDTH_M",
    "OFFICIAL_LOCATIONS",
    "SPLITS_FILE",
    "TABLES",
    "write_nuscenes",
]

OFFICIAL_LOCATIONS = ("singapore-onenorth", "singapore-hollandvillage", "singapore-queenstown", "boston-seaport")
TABLES = (
    "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor",
    "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map",
)
EXPANSION_KEYS = (
    "version", "polygon", "line", "node", "drivable_area", "road_segment", "road_block", "lane",
    "ped_crossing", "walkway", "stop_line", "carpark_area", "road_divider", "lane_divider",
    "traffic_light", "canvas_edge", "connectivity", "arcline_path_3", "lane_connector",
)
EXPANSION_VERSION = "1.3"
SPLITS_FILE = "diffpilot_splits.json"
MARKER_FILE = ".diffpilot_nuscenes.json"
"""Marks a root this module wrote (so re-writing may replace it)."""
CENTERLINE_TOLERANCE_M = 0.02
CATEGORY_NAMES = {
    "vehicle": "vehicle.car",
    "pedestrian": "human.pedestrian.adult",
    "bicycle": "vehicle.bicycle",
    "other": "movable_object.barrier",
}
_HEIGHTS = {"vehicle": 1.6, "pedestrian": 1.75, "bicycle": 1.4, "other": 1.0}
_ATTRIBUTES = (
    "vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider", "cycle.without_rider",
    "pedestrian.moving", "pedestrian.standing", "pedestrian.sitting_lying_down",
)
_VISIBILITY = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))
_FIRST_TIMESTAMP_US = 1_533_000_000_000_000  # August 2018, like the nuScenes logs
_SCENE_GAP_US = 1_000_000_000  # scenes 1000 s apart


def _tok(*parts: Any) -> str:
    """A deterministic 32-hex token (the nuScenes token shape) from its parts."""
    return hashlib.md5("\x1f".join(map(str, parts)).encode()).hexdigest()


def _quat_z(yaw: float) -> list[float]:
    """Quaternion (w, x, y, z) of a rotation by ``yaw`` about z."""
    return [math.cos(yaw / 2.0), 0.0, 0.0, math.sin(yaw / 2.0)]


def _tiny_png() -> bytes:
    """A valid 1x1 grey PNG: the devkit only checks the map mask file exists."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- validation


def _check_inputs(maps: dict[str, MapGeometry], logs: list[ScenarioLog], splits: dict[str, list[str]]) -> None:
    for loc in maps:
        if loc not in OFFICIAL_LOCATIONS:
            raise DatasetError(f"map location {loc!r} is not a nuScenes location; use one of {OFFICIAL_LOCATIONS}")
    names: set[str] = set()
    tokens: dict[str, str] = {}
    for log in logs:
        where = f"scenario log {log.scene_name!r}"
        if log.location not in OFFICIAL_LOCATIONS:
            raise DatasetError(f"{where} has location {log.location!r}; use one of {OFFICIAL_LOCATIONS}")
        if log.location not in maps:
            raise DatasetError(f"{where} is at {log.location!r} but no map was given for it; add maps[{log.location!r}]")
        if log.scene_name in names:
            raise DatasetError(f"two scenario logs are named {log.scene_name!r}; scene names must be unique")
        names.add(log.scene_name)
        T = log.num_frames
        if T < 1:
            raise DatasetError(f"{where} has no keyframes")
        if np.asarray(log.ego_pose).shape != (T, 3):
            raise DatasetError(f"{where}: ego_pose has shape {np.asarray(log.ego_pose).shape}, expected ({T}, 3)")
        if len(log.sample_tokens) != T:
            raise DatasetError(f"{where}: {len(log.sample_tokens)} sample tokens for {T} keyframes")
        A = len(log.agents_token)
        for field, shape in (("agents_pose", (A, T, 3)), ("agents_valid", (A, T)), ("agents_size", (A, 2)),
                             ("agents_category", (A,))):
            got = np.asarray(getattr(log, field)).shape
            if A and got != shape:
                raise DatasetError(f"{where}: {field} has shape {got}, expected {shape}")
        if not np.all(np.isfinite(log.ego_pose)) or not np.all(np.isfinite(log.times)):
            raise DatasetError(f"{where}: ego_pose or times contain NaN/inf")
        if T > 1 and np.any(np.diff(log.times) <= 0):
            raise DatasetError(f"{where}: times must increase strictly")
        if A:
            valid = np.asarray(log.agents_valid, dtype=bool)
            if not np.all(np.isfinite(np.asarray(log.agents_pose)[valid])):
                raise DatasetError(f"{where}: valid agent poses contain NaN/inf")
            cats = np.asarray(log.agents_category)
            if cats.min() < 0 or cats.max() >= len(CATEGORIES):
                raise DatasetError(f"{where}: agents_category must index CATEGORIES {CATEGORIES}")
        for kind, toks in (("scene", [log.scene_token]), ("sample", log.sample_tokens), ("agent", log.agents_token)):
            for t in toks:
                if not t:
                    raise DatasetError(f"{where} has an empty {kind} token")
                if t in tokens:
                    raise DatasetError(
                        f"{kind} token {t!r} of {where} is also used by {tokens[t]}; tokens must be unique across logs"
                    )
                tokens[t] = where
    for split, scenes in splits.items():
        unknown = [s for s in scenes if s not in names]
        if unknown:
            raise DatasetError(f"split {split!r} names scenes that are not among the logs: {unknown[:5]}")


# ----------------------------------------------------------------------------- tables


def _scene_tables(logs: list[ScenarioLog]) -> dict[str, list[dict[str, Any]]]:
    """All 13 tables except ``map`` (filled in later), from the logs."""
    sensor_token = _tok("sensor", "LIDAR_TOP")
    calib_token = _tok("calibrated_sensor", "LIDAR_TOP")
    t: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
    t["sensor"].append({"token": sensor_token, "channel": "LIDAR_TOP", "modality": "lidar"})
    t["calibrated_sensor"].append({
        "token": calib_token, "sensor_token": sensor_token, "translation": [0.0, 0.0, 0.0],
        "rotation": [1.0, 0.0, 0.0, 0.0], "camera_intrinsic": [],
    })
    cat_tokens = {c: _tok("category", CATEGORY_NAMES[c]) for c in CATEGORIES}
    t["category"] = [
        {"token": cat_tokens[c], "name": CATEGORY_NAMES[c], "description": f"diffpilot class {c!r}"}
        for c in CATEGORIES
    ]
    attr_tokens = {a: _tok("attribute", a) for a in _ATTRIBUTES}
    t["attribute"] = [{"token": attr_tokens[a], "name": a, "description": a} for a in _ATTRIBUTES]
    t["visibility"] = [{"token": tok, "level": lvl, "description": f"visibility {lvl}"} for tok, lvl in _VISIBILITY]
    visible = _VISIBILITY[-1][0]

    for i, log in enumerate(logs):
        scene_token = log.scene_token
        log_token = _tok("log", scene_token)
        T = log.num_frames
        stamps = [_FIRST_TIMESTAMP_US + i * _SCENE_GAP_US + int(round(float(x) * 1e6)) for x in log.times]
        samples = list(log.sample_tokens)
        ego = np.asarray(log.ego_pose, dtype=np.float64)
        t["log"].append({
            "token": log_token, "logfile": log.scene_name, "vehicle": "diffpilot-sim",
            "date_captured": "2018-08-01", "location": log.location,
        })
        t["scene"].append({
            "token": scene_token, "log_token": log_token, "nbr_samples": T, "first_sample_token": samples[0],
            "last_sample_token": samples[-1], "name": log.scene_name, "description": f"diffpilot scene at {log.location}",
        })
        sd_tokens = [_tok("sample_data", s) for s in samples]
        for f in range(T):
            prev = samples[f - 1] if f > 0 else ""
            nxt = samples[f + 1] if f + 1 < T else ""
            t["sample"].append({"token": samples[f], "timestamp": stamps[f], "prev": prev, "next": nxt,
                                "scene_token": scene_token})
            x, y, yaw = (float(v) for v in ego[f])
            t["ego_pose"].append({"token": sd_tokens[f], "timestamp": stamps[f], "rotation": _quat_z(yaw),
                                  "translation": [x, y, 0.0]})
            t["sample_data"].append({
                "token": sd_tokens[f], "sample_token": samples[f], "ego_pose_token": sd_tokens[f],
                "calibrated_sensor_token": calib_token, "timestamp": stamps[f], "fileformat": "pcd",
                "is_key_frame": True, "height": 0, "width": 0,
                "filename": f"samples/LIDAR_TOP/{log.scene_name}__LIDAR_TOP__{stamps[f]}.pcd.bin",
                "prev": sd_tokens[f - 1] if f > 0 else "", "next": sd_tokens[f + 1] if f + 1 < T else "",
            })
        A = len(log.agents_token)
        if not A:
            continue
        apose = np.asarray(log.agents_pose, dtype=np.float64)
        avalid = np.asarray(log.agents_valid, dtype=bool)
        asize = np.asarray(log.agents_size, dtype=np.float64)
        acat = np.asarray(log.agents_category, dtype=np.int64)
        # Speeds for the moving/stopped attribute; distance to the ego for a plausible lidar point count.
        step = np.zeros((A, T))
        if T > 1:
            d = np.linalg.norm(np.diff(apose[:, :, :2], axis=1), axis=2) / np.diff(np.asarray(log.times, float))
            both = avalid[:, 1:] & avalid[:, :-1]
            step[:, 1:] = np.where(both, d, 0.0)
            step[:, 0] = step[:, 1]
        dist = np.linalg.norm(apose[:, :, :2] - ego[None, :, :2], axis=2)
        pts = np.maximum(1, (4000.0 / np.maximum(dist, 1.0) ** 1.5).astype(int))
        half = apose[:, :, 2] / 2.0
        qw, qz = np.cos(half).tolist(), np.sin(half).tolist()
        xs, ys = apose[:, :, 0].tolist(), apose[:, :, 1].tolist()
        moving = (step > 0.3).tolist()
        lidar = pts.tolist()
        attr_of = {
            "vehicle": ([attr_tokens["vehicle.stopped"]], [attr_tokens["vehicle.moving"]]),
            "pedestrian": ([attr_tokens["pedestrian.standing"]], [attr_tokens["pedestrian.moving"]]),
            "bicycle": ([attr_tokens["cycle.with_rider"]], [attr_tokens["cycle.with_rider"]]),
            "other": ([], []),
        }
        anns = t["sample_annotation"]
        for a in range(A):
            frames = np.flatnonzero(avalid[a]).tolist()
            if not frames:
                continue
            inst = log.agents_token[a]
            cat = CATEGORIES[int(acat[a])]
            length, width = (float(v) for v in asize[a])
            height = _HEIGHTS[cat]
            size = [width, length, height]
            z = height / 2.0
            ann = [_tok("sample_annotation", inst, f) for f in frames]
            t["instance"].append({
                "token": inst, "category_token": cat_tokens[cat], "nbr_annotations": len(frames),
                "first_annotation_token": ann[0], "last_annotation_token": ann[-1],
            })
            prevs = ["", *ann[:-1]]
            nexts = [*ann[1:], ""]
            xa, ya, qwa, qza, mva, lda = xs[a], ys[a], qw[a], qz[a], moving[a], lidar[a]
            attrs = attr_of[cat]
            for k, f in enumerate(frames):
                anns.append({
                    "token": ann[k], "sample_token": samples[f], "instance_token": inst,
                    "visibility_token": visible, "attribute_tokens": list(attrs[mva[f]]),
                    "translation": [xa[f], ya[f], z], "size": size,
                    "rotation": [qwa[f], 0.0, 0.0, qza[f]], "prev": prevs[k], "next": nexts[k],
                    "num_lidar_pts": lda[f], "num_radar_pts": 0,
                })
    return t


# ----------------------------------------------------------------------------- map expansion


class _Expansion:
    """Accumulates the records of one map-expansion file."""

    def __init__(self, location: str):
        self.location = location
        self.layers: dict[str, Any] = {k: [] for k in EXPANSION_KEYS}
        self.layers["version"] = EXPANSION_VERSION
        self.layers["connectivity"] = {}
        self.layers["arcline_path_3"] = {}
        self._n = 0
        self.max_xy = np.zeros(2)

    def _token(self, kind: str) -> str:
        self._n += 1
        return _tok(self.location, kind, self._n)

    def _nodes(self, coords: np.ndarray) -> list[str]:
        toks = []
        for x, y in np.round(np.asarray(coords, dtype=np.float64)[:, :2], 3):
            tok = self._token("node")
            self.layers["node"].append({"token": tok, "x": float(x), "y": float(y)})
            toks.append(tok)
        if len(coords):
            self.max_xy = np.maximum(self.max_xy, np.asarray(coords)[:, :2].max(axis=0))
        return toks

    def polygon(self, poly: shapely.Polygon) -> str:
        tok = self._token("polygon")
        ext = np.asarray(poly.exterior.coords)[:-1]
        holes = [{"node_tokens": self._nodes(np.asarray(r.coords)[:-1])} for r in poly.interiors]
        self.layers["polygon"].append({"token": tok, "exterior_node_tokens": self._nodes(ext), "holes": holes})
        return tok

    def line(self, coords: np.ndarray) -> str:
        tok = self._token("line")
        self.layers["line"].append({"token": tok, "node_tokens": self._nodes(coords)})
        return tok


def _polygons(geom: shapely.Geometry | None) -> list[shapely.Polygon]:
    """The polygon parts of any geometry (Polygon, MultiPolygon, collection)."""
    if geom is None or geom.is_empty:
        return []
    out: list[shapely.Polygon] = []
    for part in shapely.get_parts(geom):
        if isinstance(part, shapely.Polygon):
            if not part.is_empty:
                out.append(part)
        elif isinstance(part, (shapely.MultiPolygon, shapely.GeometryCollection)):
            out.extend(_polygons(part))
    return out


def _arclines(centerline: np.ndarray) -> list[dict[str, Any]]:
    """A chain of straight arcline paths whose discretization follows ``centerline`` within the tolerance."""
    xy = np.asarray(centerline, dtype=np.float64)[:, :2]
    keep = np.concatenate([[True], np.linalg.norm(np.diff(xy, axis=0), axis=1) > 1e-6])
    xy = xy[keep]
    if len(xy) < 2:
        return []
    simple = np.asarray(shapely.simplify(shapely.LineString(xy), CENTERLINE_TOLERANCE_M, preserve_topology=False).coords)
    if len(simple) < 2:
        simple = xy[[0, -1]]
    paths = []
    for (x0, y0), (x1, y1) in zip(simple[:-1], simple[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        if length < 1e-6:
            continue
        yaw = math.atan2(y1 - y0, x1 - x0)
        paths.append({
            "start_pose": [float(x0), float(y0), yaw], "end_pose": [float(x1), float(y1), yaw],
            "shape": "LSL", "radius": 999.0, "segment_length": [0.0, length, 0.0],
        })
    return paths


def _expansion(location: str, geom: MapGeometry | None, extra_xy: np.ndarray) -> dict[str, Any]:
    """The map-expansion document of one location (empty but valid without a map)."""
    ex = _Expansion(location)
    L = ex.layers
    if geom is not None:
        tokens = list(geom.lane_tokens)
        if len(tokens) != len(geom.lanes) or len(set(tokens)) != len(tokens):
            raise DatasetError(f"map of {location!r}: lane_tokens must be unique and one per lane")
        is_conn = np.asarray(geom.lane_is_connector, dtype=bool).reshape(-1)
        if len(is_conn) != len(tokens):
            raise DatasetError(f"map of {location!r}: lane_is_connector has {len(is_conn)} entries for {len(tokens)} lanes")
        known = set(tokens)
        for lane_tok, succ in geom.lane_successors.items():
            bad = [s for s in [lane_tok, *succ] if s not in known]
            if bad:
                raise DatasetError(f"map of {location!r}: lane_successors names unknown lanes {bad[:3]}")
        incoming: dict[str, list[str]] = {tok: [] for tok in tokens}
        for lane_tok, succ in geom.lane_successors.items():
            for s in succ:
                incoming[s].append(lane_tok)
        for tok, centerline, conn in zip(tokens, geom.lanes, is_conn):
            paths = _arclines(centerline)
            if not paths:
                raise DatasetError(f"map of {location!r}: lane {tok!r} has fewer than 2 distinct centerline points")
            xy = np.asarray(centerline, dtype=np.float64)[:, :2]
            outline = shapely.LineString(xy).buffer(LANE_HALF_WIDTH_M, cap_style="flat").simplify(0.05)
            polys = _polygons(outline)
            poly_tok = ex.polygon(max(polys, key=lambda p: p.area))
            L["arcline_path_3"][tok] = paths
            L["connectivity"][tok] = {"incoming": incoming[tok], "outgoing": list(geom.lane_successors.get(tok, []))}
            if conn:
                L["lane_connector"].append({"token": tok, "polygon_token": poly_tok})
            else:
                n = np.array([-np.sin(paths[0]["start_pose"][2]), np.cos(paths[0]["start_pose"][2])])
                m = np.array([-np.sin(paths[-1]["end_pose"][2]), np.cos(paths[-1]["end_pose"][2])])
                a, b = xy[0], xy[-1]
                from_edge = ex.line(np.stack([a + LANE_HALF_WIDTH_M * n, a - LANE_HALF_WIDTH_M * n]))
                to_edge = ex.line(np.stack([b + LANE_HALF_WIDTH_M * m, b - LANE_HALF_WIDTH_M * m]))
                L["lane"].append({
                    "token": tok, "polygon_token": poly_tok, "lane_type": "CAR",
                    "from_edge_line_token": from_edge, "to_edge_line_token": to_edge,
                    "left_lane_divider_segments": [], "right_lane_divider_segments": [],
                })
        drivable = [ex.polygon(p) for p in _polygons(geom.drivable)]
        if drivable:
            L["drivable_area"].append({"token": _tok(location, "drivable_area"), "polygon_tokens": drivable})
        for i, poly in enumerate(geom.crosswalks):
            for p in _polygons(poly):
                L["ped_crossing"].append({"token": _tok(location, "ped_crossing", i, len(L["ped_crossing"])),
                                          "polygon_token": ex.polygon(p), "road_segment_token": ""})
        for i, poly in enumerate(geom.stop_lines):
            for p in _polygons(poly):
                L["stop_line"].append({
                    "token": _tok(location, "stop_line", i, len(L["stop_line"])), "polygon_token": ex.polygon(p),
                    "stop_line_type": "STOP_SIGN", "ped_crossing_tokens": [], "traffic_light_tokens": [],
                    "road_block_token": "",
                })
    if len(extra_xy):
        ex.max_xy = np.maximum(ex.max_xy, extra_xy.max(axis=0))
    L["canvas_edge"] = [float(math.ceil(ex.max_xy[0] + 50.0)), float(math.ceil(ex.max_xy[1] + 50.0))]
    return L


# ----------------------------------------------------------------------------- entry point


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # json.dumps runs the C encoder; json.dump to a file streams through the pure-Python one (~10x slower).
    path.write_text(json.dumps(obj, separators=(",", ":")))


def write_nuscenes(
    root: str | Path,
    version: str,
    maps: dict[str, MapGeometry],
    logs: list[ScenarioLog],
    splits: dict[str, list[str]],
) -> Path:
    """Write ``logs`` (and the per-location ``maps``) as a nuScenes data set at ``root``; return ``root``.

    ``maps`` is keyed by official location; locations not given get an empty
    map expansion. ``splits`` (split name -> scene names) is written as
    ``<root>/<version>/diffpilot_splits.json``. Raises DatasetError on
    inconsistent input or when ``root`` holds data this module did not write.
    """
    root = Path(root)
    if not version or "/" in version:
        raise DatasetError(f"version {version!r} must be a plain folder name such as 'v1.0-mini'")
    if root.exists() and any(root.iterdir()) and not (root / MARKER_FILE).is_file():
        raise DatasetError(
            f"{root} exists and was not written by diffpilot (no {MARKER_FILE}); refusing to replace it: "
            "choose an empty or new folder"
        )
    _check_inputs(maps, logs, splits)
    # Hundreds of thousands of small dicts: the cyclic GC would rescan them over and over.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        tables = _scene_tables(logs)
    finally:
        if gc_was_enabled:
            gc.enable()

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        png = _tiny_png()
        for loc in OFFICIAL_LOCATIONS:
            map_token = _tok("map", loc)
            filename = f"maps/{map_token}.png"
            (tmp / "maps").mkdir(parents=True, exist_ok=True)
            (tmp / filename).write_bytes(png)
            log_tokens = [rec["token"] for rec in tables["log"] if rec["location"] == loc]
            tables["map"].append({"token": map_token, "log_tokens": log_tokens, "category": "semantic_prior",
                                  "filename": filename})
            ego_xy = [np.asarray(lg.ego_pose)[:, :2] for lg in logs if lg.location == loc]
            extra = np.concatenate(ego_xy) if ego_xy else np.zeros((0, 2))
            _dump(tmp / "maps" / "expansion" / f"{loc}.json", _expansion(loc, maps.get(loc), extra))
        for name in TABLES:
            _dump(tmp / version / f"{name}.json", tables[name])
        _dump(tmp / version / SPLITS_FILE, {k: list(v) for k, v in splits.items()})
        _dump(tmp / MARKER_FILE, {"format": 1, "version": version, "scenes": len(logs)})
        publish_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
