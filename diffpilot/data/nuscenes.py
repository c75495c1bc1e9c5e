"""Read nuScenes-format data (real nuScenes or our generated default) into ScenarioLogs and SceneSamples.

nuscenes-devkit does the loading (``NuScenes`` for the tables, ``NuScenesMap``
for the map expansion); this module checks the layout first so bad input
gets one :class:`DatasetError` naming the path and what is missing instead
of a devkit assertion, then turns each scene into a global-frame
:class:`ScenarioLog` and, via :func:`load_scene_samples`, into stacked
ego-frame samples cached in one HDF5 file per (root, version, split, spec).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import h5py
import numpy as np
import shapely

from diffpilot.data.errors import DatasetError
from diffpilot.data.nuscenes_format import OFFICIAL_LOCATIONS, SPLITS_FILE, TABLES
from diffpilot.data.scenario import CATEGORIES, EGO_SIZE, MapGeometry, SampleSpec, SceneSample, ScenarioLog
from diffpilot.data.recovery import RECOVERY_FORMAT, RecoverySpec, recovery_samples
from diffpilot.data.scene_sample import build_scene_sample, scene_samples_from_arrays, stack_samples
from diffpilot.fileio import atomic_path

__all__ = [
    "MAP_MARGIN_M",
    "NuScenesReader",
    "category_index",
    "check_nuscenes_root",
    "expansion_path",
    "load_scene_samples",
    "scene_samples_from_arrays",
]

MAP_MARGIN_M = 60.0
"""The map of a scenario log covers the ego route's bounding box plus this margin."""
LANE_RESOLUTION_M = 0.5
CACHE_FORMAT = 2
"""Bumped whenever SceneSample gains or changes a field (2: stop lines and zones), so older caches rebuild."""


def category_index(name: str) -> int:
    """Index into CATEGORIES of a nuScenes category name, by prefix (bicycles and motorcycles are 'bicycle')."""
    if name.startswith(("vehicle.bicycle", "vehicle.motorcycle")):
        return CATEGORIES.index("bicycle")
    if name.startswith("vehicle."):
        return CATEGORIES.index("vehicle")
    if name.startswith("human.pedestrian"):
        return CATEGORIES.index("pedestrian")
    return CATEGORIES.index("other")


def _quat_yaw(q: np.ndarray) -> np.ndarray:
    """Yaw of (w, x, y, z) quaternions (..., 4): heading of the rotated x axis in the x-y plane."""
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def _read_json(path: Path) -> object:
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); re-download or re-generate the data set") from e


def _check_root(root: Path, version: str) -> None:
    """Fail with one clear message on a missing root, version folder or table."""
    if not root.is_dir():
        raise DatasetError(
            f"nuScenes data root {root} does not exist; pass the folder that holds '<version>/' and 'maps/'"
        )
    table_root = root / version
    if not table_root.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "scene.json").is_file())
        if not found:
            raise DatasetError(
                f"{root} is not a nuScenes data root: no version folder with tables (e.g. {root}/v1.0-mini/scene.json); "
                "point it at the folder that holds the nuScenes version folders"
            )
        raise DatasetError(
            f"nuScenes version folder {table_root} does not exist; versions found in {root}: {found}; "
            "set data.version= to one of them"
        )
    missing = [t for t in TABLES if not (table_root / f"{t}.json").is_file()]
    if missing:
        raise DatasetError(
            f"nuScenes version folder {table_root} lacks the table(s) {missing} "
            f"(expected {table_root}/{missing[0]}.json); all 13 tables must be present"
        )


def _check_maps(root: Path, version: str) -> None:
    """Every log must be in some map record, and every map record's PNG must exist."""
    table_root = root / version
    maps = _read_json(table_root / "map.json")
    if not maps:
        raise DatasetError(f"{table_root}/map.json has no map records; every log must belong to a map")
    log_to_map: dict[str, str] = {}
    for rec in maps:
        if "log_tokens" not in rec:
            raise DatasetError(f"{table_root}/map.json: map record {rec.get('token')!r} has no 'log_tokens'")
        png = root / rec.get("filename", "")
        if not png.is_file():
            raise DatasetError(f"map mask file {png} of map record {rec.get('token')!r} is missing ({table_root}/map.json)")
        for tok in rec["log_tokens"]:
            log_to_map[tok] = rec["token"]
    logs = {rec["token"]: rec for rec in _read_json(table_root / "log.json")}
    scenes = _read_json(table_root / "scene.json")
    for scene in scenes:
        log_token = scene.get("log_token")
        if log_token not in logs:
            raise DatasetError(f"scene {scene.get('name')!r}: its log {log_token!r} is not in {table_root}/log.json")
        if log_token not in log_to_map:
            raise DatasetError(
                f"scene {scene.get('name')!r}: its log {log_token!r} has no map (it is in no map record's "
                f"log_tokens in {table_root}/map.json)"
            )
    for location in sorted({logs[scene["log_token"]].get("location", "") for scene in scenes}):
        _check_expansion(root, location)


def check_nuscenes_root(root: str | Path, version: str) -> Path:
    """Everything a reader checks before loading: root, version folder, the 13 tables, maps and map expansions."""
    root = Path(root).expanduser()
    _check_root(root, version)
    _check_maps(root, version)
    return root


def expansion_path(root: str | Path, location: str) -> Path:
    """Where the devkit looks for the map expansion of ``location``."""
    return Path(root) / "maps" / "expansion" / f"{location}.json"


def _check_expansion(root: Path, location: str) -> Path:
    path = expansion_path(root, location)
    if location not in OFFICIAL_LOCATIONS:
        raise DatasetError(f"location {location!r} is not a nuScenes map; expected one of {OFFICIAL_LOCATIONS}")
    if not path.is_file():
        raise DatasetError(
            f"map expansion for location {location!r} is missing: expected {path} "
            "(install the nuScenes map expansion v1.3 into <root>/maps/expansion/)"
        )
    return path


@dataclass
class _LocationMap:
    """One location's map, discretized once and indexed for cropping."""

    lane_tokens: list[str]
    lanes: list[np.ndarray]
    is_connector: np.ndarray
    points: np.ndarray  # all lane points (M, 2)
    owner: np.ndarray  # (M,) lane index of each point
    successors: dict[str, list[str]]
    drivable: list[shapely.Polygon]
    drivable_tree: shapely.STRtree
    stop_lines: list[shapely.Polygon]
    crosswalks: list[shapely.Polygon]


def _clean_centerline(poses: list[tuple[float, float, float]]) -> np.ndarray:
    """Devkit poses without the duplicated joints between arcline paths, heading from the tangent."""
    arr = np.asarray(poses, dtype=np.float64).reshape(-1, 3)
    if len(arr) < 2:
        return arr
    keep = np.concatenate([[True], np.linalg.norm(np.diff(arr[:, :2], axis=0), axis=1) > 1e-3])
    arr = arr[keep]
    if len(arr) >= 2:
        dx = np.gradient(arr[:, 0])
        dy = np.gradient(arr[:, 1])
        arr[:, 2] = np.arctan2(dy, dx)
    return arr


def _load_location_map(root: Path, location: str) -> _LocationMap:
    from nuscenes.map_expansion.map_api import NuScenesMap

    path = _check_expansion(root, location)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            nmap = NuScenesMap(dataroot=str(root), map_name=location)
    except json.JSONDecodeError as e:
        raise DatasetError(f"map expansion {path} is not valid JSON ({e})") from e
    except KeyError as e:
        raise DatasetError(f"map expansion {path} lacks the key {e}; it needs all 19 layers of version >= 1.3") from e
    except Exception as e:  # the devkit raises a bare Exception for outdated maps
        raise DatasetError(f"nuscenes-devkit could not load the map expansion {path}: {e}") from e

    tokens = [r["token"] for r in nmap.lane] + [r["token"] for r in nmap.lane_connector]
    conn = [False] * len(nmap.lane) + [True] * len(nmap.lane_connector)
    disc = nmap.discretize_lanes(tokens, LANE_RESOLUTION_M)
    lane_tokens, lanes, is_conn = [], [], []
    for tok, c in zip(tokens, conn):
        cl = _clean_centerline(disc.get(tok, []))
        if len(cl) >= 2:
            lane_tokens.append(tok)
            lanes.append(cl)
            is_conn.append(c)
    successors = {}
    for tok in lane_tokens:
        try:
            successors[tok] = list(nmap.get_outgoing_lane_ids(tok))
        except ValueError:
            successors[tok] = []
    if lanes:
        points = np.concatenate([cl[:, :2] for cl in lanes])
        owner = np.repeat(np.arange(len(lanes)), [len(cl) for cl in lanes])
    else:
        points, owner = np.zeros((0, 2)), np.zeros(0, dtype=np.int64)

    def valid(p: shapely.Geometry) -> shapely.Geometry:
        return p if p.is_valid else shapely.make_valid(p)

    drivable = [valid(nmap.extract_polygon(t)) for rec in nmap.drivable_area for t in rec["polygon_tokens"]]
    return _LocationMap(
        lane_tokens=lane_tokens, lanes=lanes, is_connector=np.array(is_conn, dtype=bool), points=points,
        owner=owner, successors=successors, drivable=drivable, drivable_tree=shapely.STRtree(drivable),
        stop_lines=[valid(nmap.extract_polygon(r["polygon_token"])) for r in nmap.stop_line],
        crosswalks=[valid(nmap.extract_polygon(r["polygon_token"])) for r in nmap.ped_crossing],
    )


def _route(ego: np.ndarray, lanes: list[np.ndarray], tokens: list[str]) -> list[str]:
    """Lane tokens the ego passes: the nearest heading-compatible lane per keyframe, deduplicated in order."""
    if not lanes:
        return []
    pts = np.concatenate(lanes)
    counts = [len(cl) for cl in lanes]
    owner = np.repeat(np.arange(len(lanes)), counts)
    # At a joint the ego belongs to the lane it enters, not the one it leaves.
    is_last = np.zeros(len(pts), dtype=bool)
    is_last[np.cumsum(counts) - 1] = True
    route: list[str] = []
    for x, y, yaw in ego:
        d = np.hypot(pts[:, 0] - x, pts[:, 1] - y) + 1e-3 * is_last
        # A lane running against the ego's heading is a poor match even if near.
        d = d + 10.0 * (np.cos(pts[:, 2] - yaw) < 0.0)
        tok = tokens[int(owner[int(np.argmin(d))])]
        if tok not in route:
            route.append(tok)
    return route


class NuScenesReader:
    """One nuScenes version at ``root`` (real or generated), loaded with nuscenes-devkit."""

    def __init__(self, root: str | Path, version: str = "v1.0-mini", verbose: bool = False):
        from nuscenes.nuscenes import NuScenes

        self.root = Path(root).expanduser()
        self.version = version
        _check_root(self.root, version)
        _check_maps(self.root, version)
        try:
            out = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
            with out:
                self.nusc = NuScenes(version=version, dataroot=str(self.root), verbose=verbose)
        except json.JSONDecodeError as e:
            for table in TABLES:  # name the damaged table (only on this error path: tables can be large)
                _read_json(self.root / version / f"{table}.json")
            raise DatasetError(f"nuscenes-devkit could not load {self.root / version}: {e!r}") from e
        except (AssertionError, KeyError, IndexError, TypeError) as e:
            raise DatasetError(f"nuscenes-devkit could not load {self.root / version}: {e!r}") from e
        self._scenes = {rec["name"]: rec for rec in self.nusc.scene}
        self._maps: dict[str, _LocationMap] = {}

    # ------------------------------------------------------------------ splits

    def scene_names(self, split: str) -> list[str]:
        """Scene names of ``split``: our ``diffpilot_splits.json`` if present, else the devkit's official splits."""
        ours = self.root / self.version / SPLITS_FILE
        if ours.is_file():
            splits = _read_json(ours)
            if split not in splits:
                raise DatasetError(f"split {split!r} is not in {ours}; it has {sorted(splits)}")
            names = list(splits[split])
            missing = [n for n in names if n not in self._scenes]
            if missing:
                raise DatasetError(f"{ours}: split {split!r} names scenes not in the data: {missing[:5]}")
            return names
        from nuscenes.utils.splits import create_splits_scenes

        official = create_splits_scenes()
        if split not in official:
            raise DatasetError(f"unknown nuScenes split {split!r}; use one of {sorted(official)}")
        names = [n for n in official[split] if n in self._scenes]
        if not names:
            raise DatasetError(f"split {split!r} has no scenes in {self.root / self.version} (try the mini_* splits)")
        return names

    # ------------------------------------------------------------------ maps

    def location_map(self, location: str) -> _LocationMap:
        if location not in self._maps:
            self._maps[location] = _load_location_map(self.root, location)
        return self._maps[location]

    def _crop(self, lm: _LocationMap, ego: np.ndarray) -> MapGeometry:
        lo = ego[:, :2].min(axis=0) - MAP_MARGIN_M
        hi = ego[:, :2].max(axis=0) + MAP_MARGIN_M
        inside = np.all((lm.points >= lo) & (lm.points <= hi), axis=1)
        keep = np.unique(lm.owner[inside])
        tokens = [lm.lane_tokens[i] for i in keep]
        kept = set(tokens)
        box = shapely.box(lo[0], lo[1], hi[0], hi[1])
        near = lm.drivable_tree.query(box, predicate="intersects")
        pieces = [shapely.clip_by_rect(lm.drivable[i], lo[0], lo[1], hi[0], hi[1]) for i in near]
        drivable = shapely.union_all(pieces) if pieces else shapely.Polygon()
        return MapGeometry(
            lanes=[lm.lanes[i] for i in keep],
            lane_tokens=tokens,
            lane_is_connector=lm.is_connector[keep] if len(keep) else np.zeros(0, dtype=bool),
            drivable=drivable,
            stop_lines=[p for p in lm.stop_lines if p.intersects(box)],
            crosswalks=[p for p in lm.crosswalks if p.intersects(box)],
            lane_successors={t: [s for s in lm.successors.get(t, []) if s in kept] for t in tokens},
        )

    # ------------------------------------------------------------------ scenes

    def scenario_log(self, scene_name: str) -> ScenarioLog:
        """Scene ``scene_name`` as a global-frame ScenarioLog at the keyframes."""
        if scene_name not in self._scenes:
            some = sorted(self._scenes)[:5]
            raise DatasetError(f"scene {scene_name!r} is not in {self.root / self.version} (scenes include {some})")
        nusc = self.nusc
        scene = self._scenes[scene_name]
        location = nusc.get("log", scene["log_token"])["location"]
        samples = []
        tok = scene["first_sample_token"]
        while tok:
            rec = nusc.get("sample", tok)
            samples.append(rec)
            tok = rec["next"]
        T = len(samples)
        times = np.array([(s["timestamp"] - samples[0]["timestamp"]) * 1e-6 for s in samples])
        ego = np.zeros((T, 3))
        for f, s in enumerate(samples):
            if not s["data"]:
                raise DatasetError(f"sample {s['token']} of scene {scene_name!r} has no sample_data")
            sd_tok = s["data"].get("LIDAR_TOP") or next(iter(s["data"].values()))
            pose = nusc.get("ego_pose", nusc.get("sample_data", sd_tok)["ego_pose_token"])
            ego[f, :2] = pose["translation"][:2]
            ego[f, 2] = _quat_yaw(np.asarray(pose["rotation"], dtype=np.float64))

        index: dict[str, int] = {}
        cats: list[int] = []
        sizes: list[tuple[float, float]] = []
        entries: list[tuple[int, int, float, float, list[float]]] = []
        for f, s in enumerate(samples):
            for ann_tok in s["anns"]:
                ann = nusc.get("sample_annotation", ann_tok)
                inst = ann["instance_token"]
                if inst not in index:
                    index[inst] = len(index)
                    cats.append(category_index(ann["category_name"]))
                    w, length = ann["size"][0], ann["size"][1]
                    sizes.append((float(length), float(w)))
                entries.append((index[inst], f, ann["translation"][0], ann["translation"][1], ann["rotation"]))
        A = len(index)
        agents_pose = np.zeros((A, T, 3))
        agents_valid = np.zeros((A, T), dtype=bool)
        if entries:
            a_idx = np.array([e[0] for e in entries])
            f_idx = np.array([e[1] for e in entries])
            agents_pose[a_idx, f_idx, 0] = [e[2] for e in entries]
            agents_pose[a_idx, f_idx, 1] = [e[3] for e in entries]
            agents_pose[a_idx, f_idx, 2] = _quat_yaw(np.array([e[4] for e in entries], dtype=np.float64))
            agents_valid[a_idx, f_idx] = True

        geom = self._crop(self.location_map(location), ego)
        return ScenarioLog(
            scene_token=scene["token"],
            scene_name=scene_name,
            location=location,
            sample_tokens=[s["token"] for s in samples],
            times=times,
            ego_pose=ego,
            ego_size=EGO_SIZE,
            agents_token=list(index),
            agents_category=np.array(cats, dtype=np.int64),
            agents_size=np.array(sizes, dtype=np.float64).reshape(A, 2),
            agents_pose=agents_pose,
            agents_valid=agents_valid,
            map=geom,
            route=_route(ego, geom.lanes, geom.lane_tokens),
        )

    def scenario_logs(self, split: str) -> list[ScenarioLog]:
        """Every scene of ``split`` as a ScenarioLog."""
        return [self.scenario_log(name) for name in self.scene_names(split)]


# ---------------------------------------------------------------------------- samples + cache


def _fingerprint(root: Path, version: str) -> list[list[object]]:
    """Sizes and modification times of the files a data set is read from (a rewrite invalidates the cache)."""
    files = [root / version / f"{t}.json" for t in TABLES] + [root / version / SPLITS_FILE]
    files += [expansion_path(root, loc) for loc in OFFICIAL_LOCATIONS]
    out = []
    for p in files:
        if p.is_file():
            st = p.stat()
            out.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    return out


def _cache_file(root: Path, version: str, split: str, spec: SampleSpec, cache_dir: Path,
                recovery: RecoverySpec | None = None) -> Path:
    fields_ = {"format": CACHE_FORMAT, "root": str(root.resolve()), "version": version, "split": split, "spec": asdict(spec)}
    if recovery is not None:
        fields_["recovery"] = {**asdict(recovery), "format": RECOVERY_FORMAT}
    key = json.dumps(fields_, sort_keys=True)
    return cache_dir / "nuscenes" / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.h5"


def _cache_is_current(path: Path, fingerprint: str) -> bool:
    """The cache exists and was built from the files as they are now."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as h5:
            return h5.attrs.get("source_files") == fingerprint
    except OSError:
        return False


_STRINGS = ("token", "scene_token")


def _write_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, object], spec: SampleSpec) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            for name, arr in arrays.items():
                if name in _STRINGS:
                    h5.create_dataset(name, data=np.array(arr, dtype=object), dtype=h5py.string_dtype("utf-8"))
                else:
                    h5.create_dataset(name, data=arr, compression="gzip" if arr.ndim > 1 else None)
            h5.attrs["spec"] = json.dumps(asdict(spec))
            for k, v in asdict(spec).items():
                h5.attrs[f"spec_{k}"] = v
            for k, v in meta.items():
                h5.attrs[k] = v


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    try:
        with h5py.File(path, "r") as h5:
            out = {}
            for f in fields(SceneSample):
                ds = h5[f.name]
                out[f.name] = np.array(ds.asstr()[()], dtype=str) if f.name in _STRINGS else ds[()]
            return out
    except (OSError, KeyError) as e:
        raise DatasetError(f"sample cache {path} is unreadable ({e}); delete it to rebuild") from e


def load_scene_samples(
    root: str | Path,
    version: str,
    split: str,
    spec: SampleSpec = SampleSpec(),
    cache_dir: Path | None = None,
    progress: bool = True,
    recovery: RecoverySpec | None = None,
) -> dict[str, np.ndarray]:
    """Stacked SceneSample arrays of every keyframe in ``split`` with ``spec.past_steps`` of history.

    Keyframes need at least one future keyframe (the rest of the future may
    be missing: ``ego_future_valid``). With ``recovery`` (``copies >= 1``) the
    arrays hold that split's recovery windows instead
    (:func:`diffpilot.data.recovery.recovery_samples`). The result is cached in one HDF5 file
    per (root, version, split, spec) under ``<cache_dir>/nuscenes/``; a later
    call reads it back unless the data set's files changed since (then it is
    rebuilt in place).
    """
    root = Path(root).expanduser()
    _check_root(root, version)
    if cache_dir is None:
        from diffpilot.fileio import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    if recovery is not None and recovery.copies < 1:
        raise ValueError("recovery.copies must be >= 1 to load recovery windows; pass recovery=None for the logged ones")
    path = _cache_file(root, version, split, spec, Path(cache_dir), recovery)
    fingerprint = json.dumps(_fingerprint(root, version))
    if _cache_is_current(path, fingerprint):
        return _read_cache(path)

    from tqdm.auto import tqdm

    reader = NuScenesReader(root, version)
    samples: list[SceneSample] = []
    desc = f"nuScenes {split}" + (" recovery windows" if recovery is not None else "")
    for name in tqdm(reader.scene_names(split), desc=desc, disable=not progress, unit="scene"):
        log = reader.scenario_log(name)
        if recovery is not None:
            samples.extend(recovery_samples([log], spec, recovery))
            continue
        for frame in range(spec.past_steps, log.num_frames - 1):
            samples.append(build_scene_sample(log, frame, spec))
    if not samples:
        raise DatasetError(
            f"split {split!r} of {root / version} has no keyframe with {spec.past_steps} keyframes of history "
            "and a future; use longer scenes or a smaller past_steps"
        )
    arrays = stack_samples(samples)
    meta = {"root": str(root.resolve()), "version": version, "split": split, "num_samples": len(samples),
            "source_files": fingerprint}
    if recovery is not None:
        meta["recovery"] = json.dumps(asdict(recovery))
    _write_cache(path, arrays, meta, spec)
    return arrays
