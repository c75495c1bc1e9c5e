"""One registry of policy kinds: name -> class, config -> policy, checkpoint folder -> policy.

A kind is registered with :func:`~diffpilot.policy.kinds.register_policy` on its class; its YAML in
``conf/policy/`` maps one to one onto the class's ``Config`` dataclass (plus
``name``, the kind, and for the offline-RL kinds ``per_task`` overrides), so
an unknown key is an error that lists the valid ones. :func:`load_policy`
returns the right class for any saved policy from the kind stored with it.
Adding a policy is one class, one YAML and the decorator; the contract test
(tests/test_policy_contract.py) then covers it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

# Every module that defines a kind is imported here, so the table is full once this module is loaded.
from diffpilot.policy import bc, chunk_diffusion, diffusion_vla, diffusiondrive, dql, driving_generative, ego_mlp, ofql, stl_flow, transdiffuser  # noqa: F401
from diffpilot.policy.checkpoint import CONFIG, CheckpointError
from diffpilot.policy.kinds import POLICIES, register_policy

__all__ = ["POLICIES", "build_policy", "load_policy", "policy_class", "policy_options", "register_policy", "stored_kind"]


def policy_class(kind: str) -> type:
    """The class registered as ``kind``; an unknown kind names the known ones."""
    if kind not in POLICIES:
        raise ValueError(f"unknown policy kind {kind!r}; registered kinds: {', '.join(sorted(POLICIES))}")
    return POLICIES[kind]


def apply_per_task(config: Mapping[str, Any], task: str | None, keep: Iterable[str] = ()) -> dict[str, Any]:
    """The policy config with ``per_task[task]`` merged in (nested mappings one level deep) and ``per_task`` dropped.

    ``keep`` are dotted keys relative to the policy (``eta``, ``critic.grad_clip``)
    that the user set explicitly: a task's value never overrides them, so
    ``policy.eta=0.3`` on the command line (or a sweep trial) means 0.3 on
    every task.
    """
    cfg = dict(copy.deepcopy(config))
    per_task = cfg.pop("per_task", None) or {}
    keep = set(keep)
    for key, value in ((per_task.get(task) or {}) if task is not None else {}).items():
        if key in keep:
            continue
        if isinstance(value, Mapping) and isinstance(cfg.get(key), Mapping):
            cfg[key] = {**cfg[key], **{k: v for k, v in value.items() if f"{key}.{k}" not in keep}}
        else:
            cfg[key] = value
    return cfg


def policy_options(config: Mapping[str, Any], task: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(kind, constructor options)`` from a policy config mapping (a ``conf/policy`` YAML).

    ``per_task[<task>]`` is merged over the options (nested mappings one level
    deep). A key the kind's ``Config`` does not have is refused by name.
    """
    cfg = apply_per_task(config, task)
    kind = cfg.pop("name", None)
    if kind is None:
        raise ValueError("the policy config has no 'name'; set it to a registered kind, e.g. name: chunk_diffusion")
    cls = policy_class(str(kind))
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(cfg) - fields - {"per_task"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for policy {kind!r}; valid keys: {sorted(fields | {'name'})}")
    options = dataclasses.asdict(cls.Config(**{k: v for k, v in cfg.items() if k in fields}))
    return str(kind), options


def build_policy(config: Mapping[str, Any], obs_dim: int | None = None, action_dim: int | None = None,
                 task: str | None = None) -> Any:
    """A new policy of the kind ``config['name']`` (gym kinds: for the given observation and action sizes)."""
    kind, options = policy_options(config, task)
    return policy_class(kind).from_options(options, obs_dim, action_dim)


def stored_kind(directory: str | Path) -> str:
    """The kind recorded in a checkpoint folder, with a clear error when it is not one."""
    directory = Path(directory)
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no saved policy at {directory} (no {CONFIG}); pass a folder such as <out>/policy or <out>/best")
    try:
        meta = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML ({e}); the checkpoint is damaged") from e
    return str(meta.get("kind")) if isinstance(meta, dict) else "None"


def load_policy(directory: str | Path, kind: str | None = None) -> Any:
    """The policy saved in ``directory``, of the class its stored kind names.

    With ``kind`` given, a checkpoint of another kind is refused by name.
    """
    found = stored_kind(directory)
    if found not in POLICIES:
        raise CheckpointError(
            f"{directory} holds a {found!r}, not a policy; pass a saved policy folder such as <out>/policy or <out>/best "
            f"(registered kinds: {', '.join(sorted(POLICIES))})"
        )
    if kind is not None and found != kind:
        raise CheckpointError(f"{directory} holds a {found!r} policy, but a {kind!r} is needed here")
    return POLICIES[found].load(directory)
