"""The default driving data set: simulated scenes written in the nuScenes format.

Every scene has its own seed derived from (data-set seed, scene index), so a
scene is the same whether it is simulated alone, in order, or on another
worker (a Ray task, :func:`diffpilot.parallel.ordered_map`); ``workers=2`` or a
cluster (``ray_address``) gives exactly the logs, and the files, of ``workers=1``.
The split into train / val is by scene, never by window.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import MapGeometry, ScenarioLog
from diffpilot.data.traffic.roads import RoadNetwork, build_network
from diffpilot.data.traffic.simulate import SceneStats, simulate_scene
from diffpilot.parallel import ordered_map

__all__ = [
    "LOCATION_WEIGHTS",
    "generate_driving_dataset",
    "scene_plan",
    "simulate_scenes",
    "simulate_scenes_with_stats",
    "split_scenes",
]

LOCATION_WEIGHTS = {"boston-seaport": 0.35, "singapore-queenstown": 0.25, "singapore-onenorth": 0.40}
"""How often each built-in map hosts a scene."""

_NETWORKS: dict[tuple[str, int], tuple[RoadNetwork, MapGeometry]] = {}


def _network(location: str, seed: int) -> tuple[RoadNetwork, MapGeometry]:
    key = (location, seed)
    if key not in _NETWORKS:
        net = build_network(location, seed)
        _NETWORKS[key] = (net, net.to_map_geometry())
    return _NETWORKS[key]


def scene_plan(index: int, seed: int = 0) -> tuple[str, int, str]:
    """(location, scene seed, scene name) of scene ``index`` of the data set with ``seed``."""
    ss = np.random.SeedSequence([seed, index])
    scene_seed = int(ss.generate_state(1, dtype=np.uint32)[0])
    rng = np.random.default_rng(ss.spawn(1)[0])
    locs = list(LOCATION_WEIGHTS)
    p = np.array([LOCATION_WEIGHTS[k] for k in locs])
    location = locs[int(rng.choice(len(locs), p=p / p.sum()))]
    return location, scene_seed, f"dp-{index:06d}"


def _scene_job(args: tuple[int, int]) -> tuple[int, ScenarioLog, SceneStats]:
    """Simulate one scene; the map is detached so that it is not pickled back once per scene."""
    index, seed = args
    location, scene_seed, name = scene_plan(index, seed)
    net, geom = _network(location, seed)
    log, stats = simulate_scene(net, scene_seed, name, geom)
    log.map = None  # type: ignore[assignment]  # re-attached by the caller
    return index, log, stats


def _check(num_scenes: int, workers: int) -> None:
    if not isinstance(num_scenes, (int, np.integer)) or num_scenes < 1:
        raise DatasetError(f"num_scenes must be a positive integer, got {num_scenes!r}")
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise DatasetError(f"workers must be a positive integer, got {workers!r}")


def simulate_scenes_with_stats(
    num_scenes: int, seed: int = 0, progress: bool = True, workers: int = 1, ray_address: str | None = None
) -> tuple[dict[str, MapGeometry], list[ScenarioLog], list[SceneStats]]:
    """Like :func:`simulate_scenes`, also returning what each ego did (:class:`SceneStats`)."""
    _check(num_scenes, workers)
    jobs = [(i, seed) for i in range(num_scenes)]
    results = ordered_map(_scene_job, jobs, workers=int(workers), ray_address=ray_address, progress=progress,
                          desc="simulating scenes", unit="scene")
    results.sort(key=lambda r: r[0])
    maps: dict[str, MapGeometry] = {}
    logs, stats = [], []
    for _, log, st in results:
        if log.location not in maps:
            maps[log.location] = _network(log.location, seed)[1]
        log.map = maps[log.location]
        logs.append(log)
        stats.append(st)
    return maps, logs, stats


def simulate_scenes(
    num_scenes: int, seed: int = 0, progress: bool = True, workers: int = 1, ray_address: str | None = None
) -> tuple[dict[str, MapGeometry], list[ScenarioLog]]:
    """Simulate ``num_scenes`` scenes; returns one map per location used and the logs in scene order."""
    maps, logs, _ = simulate_scenes_with_stats(num_scenes, seed, progress, workers, ray_address)
    return maps, logs


def split_scenes(names: list[str], val_fraction: float, seed: int = 0) -> dict[str, list[str]]:
    """Train / val split by scene: a shuffled ``val_fraction`` of the scenes go to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * len(names)))
    if val_fraction > 0 and len(names) >= 2:
        n_val = min(max(n_val, 1), len(names) - 1)
    order = np.random.default_rng([seed, 0x5B117]).permutation(len(names))
    val = sorted(names[k] for k in order[:n_val])
    train = sorted(names[k] for k in order[n_val:])
    return {"train": train, "val": val}


def generate_driving_dataset(
    root: str | Path,
    num_scenes: int = 300,
    seed: int = 0,
    version: str = "v1.0-diffpilot",
    val_fraction: float = 0.2,
    workers: int = 1,
    ray_address: str | None = None,
) -> Path:
    """Simulate the default driving data set and write it as nuScenes at ``root``; returns ``root``.

    Read it back with the nuScenes reader like real nuScenes. The split
    (``train`` / ``val``, by scene) is stored with the data set.
    """
    from diffpilot.data.nuscenes_format import write_nuscenes

    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    start = time.perf_counter()
    maps, logs = simulate_scenes(num_scenes, seed, progress=True, workers=workers, ray_address=ray_address)
    splits = split_scenes([log.scene_name for log in logs], val_fraction, seed)
    out = write_nuscenes(root, version, maps, logs, splits)
    tqdm.write(f"wrote {len(logs)} scenes ({len(splits['train'])} train / {len(splits['val'])} val) "
               f"to {out} in {time.perf_counter() - start:.0f} s")
    return out

