"""Atomic file writes: a file is either the old one or the complete new one, never half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On any error the temporary file is removed and ``path`` is untouched. The
    result gets the usual permissions (0666 less the umask), not the
    owner-only mode of a fresh temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write a matplotlib figure atomically (format from the suffix, PNG if none) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix[1:] or "png", dpi=dpi)
    plt.close(fig)
    return path


def publish_dir(tmp_dir: Path, directory: Path) -> None:
    """Make a finished temporary folder ``tmp_dir`` become ``directory``, replacing any old one."""
    os.chmod(tmp_dir, 0o777 & ~_umask())
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp_dir, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, directory)


def cache_dir() -> Path:
    """Where generated data sets and built artefacts live: ``$DIFFPILOT_CACHE`` or ``~/.cache/diffpilot``."""
    return Path(os.environ.get("DIFFPILOT_CACHE", Path.home() / ".cache" / "diffpilot"))


def hdf5_shard_done(path: str | os.PathLike[str], config_hash: str) -> bool:
    """Whether ``path`` is a finished HDF5 shard of the run keyed by ``config_hash``.

    A shard writer sets the attributes ``config_hash`` and, last, ``complete``;
    a missing, unreadable, unfinished or foreign shard is not done.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as h5:
            return bool(h5.attrs.get("complete", False)) and h5.attrs.get("config_hash") == config_hash
    except OSError:
        return False
