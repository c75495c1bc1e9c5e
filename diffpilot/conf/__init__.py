"""The hydra configs (groups ``policy``, ``data``, ``sim``; one file per command) and the one merge they share.

The CLI composes a command's config with hydra; a job called from Python
gets the same defaults and the same refusal of unknown keys through
:func:`with_defaults`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

CONF_DIR = Path(__file__).resolve().parent

__all__ = ["CONF_DIR", "with_defaults"]


def _merge(base: dict[str, Any], over: dict[str, Any], open_keys: tuple[str, ...], source: Path, where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in base:
            raise ValueError(f"unknown setting {where + k!r}; known settings: {sorted(base)} (see {source})")
        if isinstance(base[k], dict) and isinstance(v, dict) and k not in open_keys:
            out[k] = _merge(base[k], v, open_keys, source, f"{where}{k}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


def with_defaults(name: str, cfg: dict[str, Any] | None = None, open_keys: Iterable[str] = ()) -> dict[str, Any]:
    """``cfg`` over the defaults of ``conf/<name>.yaml``, nested mappings merged key by key.

    A key the YAML does not have is refused by name; ``open_keys`` are
    mappings whose keys the user chooses (e.g. rule parameters).
    """
    source = CONF_DIR / f"{name}.yaml"
    return _merge(yaml.safe_load(source.read_text()), dict(cfg or {}), tuple(open_keys), source, "")
