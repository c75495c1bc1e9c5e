"""Read Minari data sets from local disk into an :class:`OfflineDataset`, without the minari package.

Minari keeps one data set per folder::

    <root>/<namespace>/<env>/<name>-vN/data/metadata.json
    <root>/<namespace>/<env>/<name>-vN/data/main_data.hdf5

``main_data.hdf5`` has one group ``episode_<i>`` per episode with
``observations`` (N+1 rows: the reset observation, then one per step),
``actions``, ``rewards``, ``terminations``, ``truncations`` (N rows each) and
an optional ``infos`` group. Reading it directly keeps our dependency set
free of minari's numpy>=2 requirement.

Dictionary observations (an HDF5 group of arrays, e.g. PointMaze's
``observation`` / ``achieved_goal`` / ``desired_goal``) are flattened into one
vector: the ``observation`` entry first when present, then the other entries
in sorted key order, recursively for nested groups. The resulting layout is
stored as ``metadata["observation_layout"]``, e.g.
``"observation[0:4],achieved_goal[4:6],desired_goal[6:8]"``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from diffpilot.data.d4rl import OfflineDataset
from diffpilot.data.errors import DatasetError
from diffpilot.fileio import atomic_path

__all__ = ["default_minari_root", "minari_dataset_dir", "read_minari", "write_minari"]

_ID_PATTERN = re.compile(r"^(?:(?P<namespace>[\w.-]+(?:/[\w.-]+)*)/)?(?P<name>[\w.-]+)-v(?P<version>\d+)$")


def default_minari_root() -> Path:
    """Minari's own default: ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``."""
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))


def minari_dataset_dir(root: str | os.PathLike[str] | None, dataset_id: str | None = None) -> Path:
    """The ``data`` folder of a data set, from a root plus id or from a direct folder path.

    ``root`` may itself be the data set's folder (``.../umaze-v2``) or its
    ``data`` folder, in which case ``dataset_id`` is not needed.
    """
    base = Path(root) if root is not None else default_minari_root()
    if dataset_id is None:
        candidates = [base, base / "data"]
    else:
        if not _ID_PATTERN.match(dataset_id):
            raise DatasetError(
                f"malformed Minari dataset id {dataset_id!r}; expected '<namespace>/<env>/<name>-v<N>', "
                "e.g. 'D4RL/pointmaze/umaze-v2'"
            )
        if not base.is_dir():
            raise DatasetError(f"Minari root {base} does not exist; pass the folder that holds your data sets")
        candidates = [base / dataset_id / "data"]
    for folder in candidates:
        if (folder / "main_data.hdf5").is_file():
            return folder
    where = candidates[-1]
    raise DatasetError(
        f"no Minari data set at {where}: expected {where / 'main_data.hdf5'} and {where / 'metadata.json'}; "
        "check the root and dataset id"
    )


def _flatten_space(node: h5py.Group | h5py.Dataset, name: str, layout: list[tuple[str, int]]) -> list[np.ndarray]:
    """Arrays of a (possibly nested dict) space in documented order, each as (rows, dim)."""
    if isinstance(node, h5py.Dataset):
        arr = node[()]
        if arr.dtype.kind not in "biuf":
            raise DatasetError(f"Minari key {node.name!r} has dtype {arr.dtype}; only numeric arrays can be read")
        arr = arr.reshape(arr.shape[0], -1) if arr.ndim != 1 else arr[:, None]
        layout.append((name, arr.shape[1]))
        return [arr]
    keys = sorted(node.keys(), key=lambda k: (k != "observation", k))
    parts: list[np.ndarray] = []
    for key in keys:
        parts += _flatten_space(node[key], f"{name}/{key}" if name else key, layout)
    return parts


def _read_space(group: h5py.Group, key: str, episode: str) -> tuple[np.ndarray, list[tuple[str, int]]]:
    if key not in group:
        raise DatasetError(f"Minari episode {episode!r} has no {key!r}; the file does not follow the Minari layout")
    layout: list[tuple[str, int]] = []
    parts = _flatten_space(group[key], "" if isinstance(group[key], h5py.Group) else key, layout)
    rows = {p.shape[0] for p in parts}
    if len(rows) != 1:
        raise DatasetError(f"Minari episode {episode!r}: the entries of {key!r} have different lengths {sorted(rows)}")
    return np.concatenate(parts, axis=1).astype(np.float32), layout


def _layout_string(layout: list[tuple[str, int]]) -> str:
    out, start = [], 0
    for name, dim in layout:
        out.append(f"{name}[{start}:{start + dim}]")
        start += dim
    return ",".join(out)


def _read_step_array(group: h5py.Group, key: str, episode: str, n: int) -> np.ndarray:
    if key not in group:
        raise DatasetError(f"Minari episode {episode!r} has no {key!r}; the file does not follow the Minari layout")
    arr = group[key][()]
    if arr.shape[0] != n:
        raise DatasetError(
            f"Minari episode {episode!r}: {key!r} has {arr.shape[0]} rows but 'actions' has {n}"
        )
    return arr


def _read_infos(group: h5py.Group, n: int) -> dict[str, np.ndarray]:
    """Numeric infos aligned with steps: Minari stores reset + step infos (N+1 rows); keep the step ones."""
    infos: dict[str, np.ndarray] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "biuf" and obj.ndim >= 1:
            arr = obj[()]
            if arr.shape[0] == n + 1:
                infos[name] = arr[1:]
            elif arr.shape[0] == n:
                infos[name] = arr

    group.visititems(visit)
    return infos


def _json_metadata(folder: Path) -> dict[str, Any]:
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        return {}
    try:
        raw = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{meta_path} is not valid JSON ({err}); restore the file from the data set's source") from err
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, (str, bool, int, float)):
            meta[f"minari/{key}"] = value
        elif value is not None:
            meta[f"minari/{key}"] = json.dumps(value)
    return meta


def read_minari(root: str | os.PathLike[str] | None, dataset_id: str | None = None) -> OfflineDataset:
    """Load a local Minari data set as one flat :class:`OfflineDataset`.

    Episodes are concatenated in index order; ``next_observations`` come from
    the N+1 stored observations, ``terminals`` from ``terminations`` and
    ``timeouts`` from ``truncations``. The last row of an episode that ended
    with neither flag (a data set saved mid-episode) is marked as a timeout so
    that episodes stay separable.
    """
    folder = minari_dataset_dir(root, dataset_id)
    metadata = _json_metadata(folder)
    h5_path = folder / "main_data.hdf5"
    if not h5py.is_hdf5(h5_path):
        raise DatasetError(f"{h5_path} is not an HDF5 file; the Minari data set is corrupt")

    obs, next_obs, acts, rews, terms, truncs = [], [], [], [], [], []
    infos: list[dict[str, np.ndarray]] = []
    obs_layout: list[tuple[str, int]] | None = None
    with h5py.File(h5_path, "r") as f:
        names = sorted((k for k in f.keys() if re.fullmatch(r"episode_\d+", k)), key=lambda k: int(k.split("_")[1]))
        expected = metadata.get("minari/total_episodes", len(names))
        for i in range(int(expected)):
            if f"episode_{i}" not in f:
                raise DatasetError(
                    f"{h5_path}: episode key 'episode_{i}' is missing (metadata.json says {expected} episodes); "
                    "the data set is incomplete, download or write it again"
                )
        if not names:
            raise DatasetError(f"{h5_path} holds no 'episode_<i>' groups; it is not a Minari data set")
        for name in names:
            ep = f[name]
            act, act_layout = _read_space(ep, "actions", name)
            n = act.shape[0]
            o, layout = _read_space(ep, "observations", name)
            if o.shape[0] != n + 1:
                raise DatasetError(
                    f"{h5_path}: episode {name!r} has {o.shape[0]} observations for {n} actions; "
                    "Minari stores N+1 observations (reset + one per step)"
                )
            if obs_layout is None:
                obs_layout = layout
            elif layout != obs_layout:
                raise DatasetError(f"{h5_path}: episode {name!r} has observation layout {layout}, others {obs_layout}")
            term = _read_step_array(ep, "terminations", name, n).astype(bool)
            trunc = _read_step_array(ep, "truncations", name, n).astype(bool)
            if n and not (term[-1] or trunc[-1]):
                trunc[-1] = True
            obs.append(o[:-1])
            next_obs.append(o[1:])
            acts.append(act)
            rews.append(_read_step_array(ep, "rewards", name, n).astype(np.float32).reshape(n))
            terms.append(term)
            truncs.append(trunc)
            infos.append(_read_infos(ep["infos"], n) if "infos" in ep else {})

    shared = set.intersection(*(set(d) for d in infos)) if infos else set()
    metadata["source"] = "minari"
    metadata["observation_layout"] = _layout_string(obs_layout or [])
    if dataset_id is not None:
        metadata["dataset_id"] = dataset_id
    return OfflineDataset(
        observations=np.concatenate(obs),
        actions=np.concatenate(acts),
        rewards=np.concatenate(rews),
        terminals=np.concatenate(terms),
        timeouts=np.concatenate(truncs),
        next_observations=np.concatenate(next_obs),
        infos={k: np.concatenate([d[k] for d in infos]) for k in sorted(shared)},
        metadata=metadata,
    )


def _write_space(group: h5py.Group, key: str, value: np.ndarray | Mapping[str, Any]) -> None:
    if isinstance(value, Mapping):
        sub = group.create_group(key)
        for k, v in value.items():
            _write_space(sub, k, v)
    else:
        group.create_dataset(key, data=np.asarray(value))


def write_minari(
    root: str | os.PathLike[str],
    dataset_id: str,
    episodes: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write episodes in the same on-disk layout :func:`read_minari` reads.

    Each episode maps ``observations`` (N+1 rows, or a dict of such arrays),
    ``actions``, ``rewards``, ``terminations``, ``truncations`` (N rows) and an
    optional ``infos`` dict. Meant for fixtures and exports, not as a full
    replacement for minari (no space serialization beyond what is given in
    ``metadata``). Files are written under temporary names, then renamed.
    """
    if not _ID_PATTERN.match(dataset_id):
        raise DatasetError(f"malformed Minari dataset id {dataset_id!r}; expected '<namespace>/<env>/<name>-v<N>'")
    folder = Path(root) / dataset_id / "data"
    folder.mkdir(parents=True, exist_ok=True)
    total_steps = 0
    with atomic_path(folder / "main_data.hdf5") as tmp_h5, atomic_path(folder / "metadata.json") as tmp_json:
        with h5py.File(tmp_h5, "w") as f:
            for i, ep in enumerate(episodes):
                group = f.create_group(f"episode_{i}")
                n = len(np.asarray(ep["actions"]))
                group.attrs["id"] = i
                group.attrs["total_steps"] = n
                total_steps += n
                for key in ("observations", "actions"):
                    _write_space(group, key, ep[key])
                for key in ("rewards", "terminations", "truncations"):
                    group.create_dataset(key, data=np.asarray(ep[key]))
                if ep.get("infos"):
                    _write_space(group, "infos", ep["infos"])
        meta = {"dataset_id": dataset_id, "total_episodes": len(episodes), "total_steps": total_steps}
        meta.update(metadata or {})
        tmp_json.write_text(json.dumps(meta, indent=2))
    return folder
