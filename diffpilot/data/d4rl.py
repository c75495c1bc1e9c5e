"""Offline RL data in the D4RL HDF5 layout: an in-memory data set, a writer and a validating reader.

One flat file holds parallel arrays, one row per environment step::

    observations (N, obs_dim)   actions (N, act_dim)   rewards (N,)
    terminals (N,)              timeouts (N,)          next_observations (N, obs_dim), optional
    infos/<key> (N, ...)        metadata/<key>         (scalars, strings, small arrays)

``terminals`` marks a true end of the task (no bootstrapping past it);
``timeouts`` marks an episode cut by a time limit, whose last row has no
real successor unless ``next_observations`` is stored. The reader refuses a
malformed file with one :class:`DatasetError` that names the key and the fix,
and never opens the file for writing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import h5py
import numpy as np

from diffpilot.data.errors import DatasetError
from diffpilot.fileio import atomic_path

__all__ = [
    "D4RL_REF_SCORES",
    "OfflineDataset",
    "Transitions",
    "normalized_score",
    "read_d4rl",
    "write_d4rl",
]

REQUIRED_KEYS: tuple[str, ...] = ("observations", "actions", "rewards", "terminals", "timeouts")
_MATRIX_KEYS = ("observations", "actions", "next_observations")  # (N, dim), real-valued
_FLAG_KEYS = ("terminals", "timeouts")  # (N,), 0/1 in any numeric or bool dtype

# (ref_min_score, ref_max_score) from the D4RL registry: the mean return of a
# random policy and of an expert (Fu et al. 2020, d4rl/infos.py and env registrations).
D4RL_REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "maze2d-umaze": (23.85, 161.86),
    "maze2d-medium": (13.13, 277.39),
    "maze2d-large": (6.7, 273.99),
}


def normalized_score(ret: float, ref_min: float, ref_max: float) -> float:
    """D4RL's normalized score ``100 * (ret - ref_min) / (ref_max - ref_min)``.

    0 is the random policy, 100 the expert; values outside [0, 100] are legal.
    """
    if not np.isfinite([ret, ref_min, ref_max]).all():
        raise DatasetError(f"normalized_score needs finite numbers, got ret={ret}, ref_min={ref_min}, ref_max={ref_max}")
    if ref_max == ref_min:
        raise DatasetError(f"normalized_score: ref_max equals ref_min ({ref_min}); the reference range must be non-empty")
    return float(100.0 * (ret - ref_min) / (ref_max - ref_min))


class Transitions(NamedTuple):
    """``(s, a, r, s', done)`` rows ready for TD learning; ``done`` is the terminal flag only."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    dones: np.ndarray


@dataclass
class OfflineDataset:
    """A whole offline data set in memory, validated on construction.

    Arrays are converted to float32 (``observations``, ``actions``, ``rewards``,
    ``next_observations``) and bool (``terminals``, ``timeouts``). ``infos``
    holds per-row side information (first axis N); ``metadata`` holds
    file-level facts such as reference scores.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    next_observations: np.ndarray | None = None
    infos: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arrays = {k: getattr(self, k) for k in (*REQUIRED_KEYS, "next_observations")}
        arrays = {k: v for k, v in arrays.items() if v is not None}
        checked = _validate_arrays(arrays, self.infos, source="OfflineDataset")
        for key in arrays:
            setattr(self, key, checked[key])
        self.infos = {k: checked[f"infos/{k}"] for k in self.infos}
        self.metadata = dict(self.metadata)

    def __len__(self) -> int:
        return int(self.observations.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    def episode_slices(self) -> list[tuple[int, int]]:
        """``(start, stop)`` row ranges, each ending at a terminal or timeout row.

        A trailing run of rows with neither flag (an unfinished episode) is
        included as the last slice.
        """
        ends = np.flatnonzero(self.terminals | self.timeouts) + 1
        bounds = [0, *ends.tolist()]
        if bounds[-1] != len(self):
            bounds.append(len(self))
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def iter_episodes(self) -> Iterator[slice]:
        for start, stop in self.episode_slices():
            yield slice(start, stop)

    def episode_returns(self) -> np.ndarray:
        """Sum of rewards of each episode of :meth:`episode_slices`, float64."""
        return np.array([self.rewards[s].sum(dtype=np.float64) for s in self.iter_episodes()])

    def transitions(self) -> Transitions:
        """``(s, a, r, s', done)`` for every row whose successor state is real.

        ``s'`` is ``next_observations`` when stored, else the next row. Rows where
        a timeout ends the episode are always left out (a time limit is not part
        of the task, and without ``next_observations`` their next row belongs to
        another episode). Without ``next_observations`` the last row of the data
        set is also left out unless it is terminal. For terminal rows ``s'`` is a
        placeholder that a TD target multiplies by ``1 - done``.
        """
        n = len(self)
        keep = ~self.timeouts
        if self.next_observations is not None:
            next_obs = self.next_observations
        else:
            next_obs = np.concatenate([self.observations[1:], self.observations[-1:]], axis=0)
            if n and not self.terminals[-1]:
                keep = keep.copy()
                keep[-1] = False
        idx = np.flatnonzero(keep)
        return Transitions(
            observations=self.observations[idx],
            actions=self.actions[idx],
            rewards=self.rewards[idx],
            next_observations=next_obs[idx],
            dones=self.terminals[idx],
        )


# ----------------------------------------------------------------------------- validation


def _first_bad_row(arr: np.ndarray) -> int | None:
    bad = ~np.isfinite(arr)
    if bad.ndim > 1:
        bad = bad.reshape(bad.shape[0], -1).any(axis=1)
    rows = np.flatnonzero(bad)
    return int(rows[0]) if rows.size else None


def _check_dtype(key: str, arr: np.ndarray, kinds: str, source: str, expected: str) -> None:
    if arr.dtype.kind not in kinds:
        raise DatasetError(
            f"{source}: key {key!r} has dtype {arr.dtype} ({arr.dtype.kind!r} kind); expected {expected}. "
            f"Rewrite the file with a numeric array for {key!r}."
        )


def _validate_arrays(arrays: dict[str, Any], infos: dict[str, Any], source: str) -> dict[str, np.ndarray]:
    """Check presence, dtype, rank, length and finiteness; return converted arrays."""
    out: dict[str, np.ndarray] = {}
    for key in REQUIRED_KEYS:
        if key not in arrays or arrays[key] is None:
            raise DatasetError(f"{source}: required key {key!r} is missing; a D4RL file needs {list(REQUIRED_KEYS)}")
    for key, value in arrays.items():
        arr = np.asarray(value)
        if key in _FLAG_KEYS:
            _check_dtype(key, arr, "biuf", source, "bool, integer or float 0/1 flags")
            want_ndim = 1
        else:
            _check_dtype(key, arr, "iuf", source, "a real-valued (float) array")
            want_ndim = 2 if key in _MATRIX_KEYS else 1
        if arr.ndim != want_ndim:
            shape = "(N, dim)" if want_ndim == 2 else "(N,)"
            raise DatasetError(f"{source}: key {key!r} has shape {arr.shape}; expected {shape}")
        out[key] = arr

    n = out["observations"].shape[0]
    for key, arr in out.items():
        if arr.shape[0] != n:
            raise DatasetError(
                f"{source}: length mismatch: key {key!r} has {arr.shape[0]} rows but 'observations' has {n}; "
                "all per-step arrays must have the same first dimension"
            )
    if "next_observations" in out and out["next_observations"].shape[1] != out["observations"].shape[1]:
        raise DatasetError(
            f"{source}: key 'next_observations' has shape {out['next_observations'].shape} but 'observations' "
            f"has {out['observations'].shape}; both must have the same width"
        )

    for key, arr in out.items():
        if arr.dtype.kind == "f":
            row = _first_bad_row(arr)
            if row is not None:
                raise DatasetError(
                    f"{source}: key {key!r} holds a non-finite value (NaN or inf) at row {row}; "
                    "drop or repair that row before using the data"
                )
        if key in _FLAG_KEYS:
            bad = np.flatnonzero((arr != 0) & (arr != 1))
            if bad.size:
                raise DatasetError(
                    f"{source}: key {key!r} must hold 0/1 flags but row {int(bad[0])} is {arr[bad[0]]!r}"
                )
            out[key] = arr.astype(bool)
        else:
            out[key] = np.ascontiguousarray(arr, dtype=np.float32)

    for key, value in infos.items():
        arr = np.asarray(value)
        name = f"infos/{key}"
        _check_dtype(name, arr, "biuf", source, "a numeric array")
        if arr.ndim == 0 or arr.shape[0] != n:
            raise DatasetError(
                f"{source}: length mismatch: key {name!r} has shape {arr.shape} but 'observations' has {n} rows"
            )
        out[name] = arr
    return out


# ----------------------------------------------------------------------------- writing


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat


def _metadata_value(key: str, value: Any) -> Any:
    """Convert one metadata value to something h5py stores faithfully."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype.kind == "U":
            return arr.astype(h5py.string_dtype())
        if arr.dtype.kind in "biuf":
            return arr
    raise DatasetError(
        f"metadata key {key!r} has unsupported type {type(value).__name__}; "
        "use a str, number, bool, (nested) dict or small numeric/str array"
    )


def write_d4rl(path: str | os.PathLike[str], dataset: OfflineDataset) -> Path:
    """Write ``dataset`` to an HDF5 file in the D4RL layout, atomically.

    The file is built under a temporary name in the target folder and renamed
    into place, so an interrupted write never leaves a half-written file.
    Nested metadata dicts are flattened with ``/`` (and read back flat).
    """
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"write_d4rl: {path} is a directory; pass a file path such as {path / 'data.hdf5'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: _metadata_value(k, v) for k, v in _flatten(dataset.metadata).items()}
    infos = _flatten(dataset.infos)

    with atomic_path(path) as tmp_name, h5py.File(tmp_name, "w") as f:
        for key in REQUIRED_KEYS:
            f.create_dataset(key, data=getattr(dataset, key), compression="gzip", compression_opts=1)
        if dataset.next_observations is not None:
            f.create_dataset("next_observations", data=dataset.next_observations, compression="gzip", compression_opts=1)
        for key, arr in infos.items():
            f.create_dataset(f"infos/{key}", data=np.asarray(arr), compression="gzip", compression_opts=1)
        meta = f.require_group("metadata")
        for key, value in metadata.items():
            meta.create_dataset(key, data=value)
    return path


# ----------------------------------------------------------------------------- reading


def _read_metadata_value(ds: h5py.Dataset) -> Any:
    if h5py.check_string_dtype(ds.dtype) is not None:
        value = ds.asstr()[()]
        return value.tolist() if isinstance(value, np.ndarray) else value
    value = ds[()]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.dtype.kind == "S":
        return [v.decode("utf-8", errors="replace") for v in value.ravel()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_group(group: h5py.Group) -> dict[str, h5py.Dataset]:
    """All datasets below ``group``, keyed by their path relative to it."""
    found: dict[str, h5py.Dataset] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found[name] = obj

    group.visititems(visit)
    return found


def read_d4rl(path: str | os.PathLike[str]) -> OfflineDataset:
    """Read and validate a D4RL-layout HDF5 file (opened read-only).

    Accepts what the published D4RL files contain: float32 arrays, bool or
    float32 ``terminals``/``timeouts``, byte-string metadata. Any problem raises
    one :class:`DatasetError` naming the file, the key and what was found.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"D4RL file not found: {path}; check the path or generate the data set first")
    if not path.is_file():
        raise DatasetError(f"{path} is not a file; pass the path of a D4RL .hdf5 file")
    if not h5py.is_hdf5(path):
        raise DatasetError(f"{path} is not an HDF5 file; expected a D4RL .hdf5 file")
    source = str(path)
    try:
        with h5py.File(path, "r") as f:
            arrays: dict[str, np.ndarray] = {}
            for key in (*REQUIRED_KEYS, "next_observations"):
                if key not in f:
                    if key in REQUIRED_KEYS:
                        raise DatasetError(
                            f"{source}: required key {key!r} is missing; a D4RL file needs {list(REQUIRED_KEYS)}"
                        )
                    continue
                obj = f[key]
                if not isinstance(obj, h5py.Dataset):
                    raise DatasetError(f"{source}: key {key!r} is a group; expected an array")
                arrays[key] = obj[()]
            infos: dict[str, np.ndarray] = {}
            if "infos" in f and isinstance(f["infos"], h5py.Group):
                infos = {k: ds[()] for k, ds in _read_group(f["infos"]).items()}
            metadata: dict[str, Any] = {}
            if "metadata" in f and isinstance(f["metadata"], h5py.Group):
                metadata = {k: _read_metadata_value(ds) for k, ds in _read_group(f["metadata"]).items()}
    except OSError as err:
        raise DatasetError(f"{source}: cannot read the HDF5 file ({err}); the file may be truncated or corrupt") from err

    checked = _validate_arrays(arrays, infos, source=source)
    return OfflineDataset(
        observations=checked["observations"],
        actions=checked["actions"],
        rewards=checked["rewards"],
        terminals=checked["terminals"],
        timeouts=checked["timeouts"],
        next_observations=checked.get("next_observations"),
        infos={k: checked[f"infos/{k}"] for k in infos},
        metadata=metadata,
    )
