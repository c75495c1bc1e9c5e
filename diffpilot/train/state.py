"""The trainer's resumable state as one safetensors + YAML checkpoint (never pickled).

Tensors (weights, optimizer moments, generator states) go to safetensors;
everything else (step, schedules, log, numpy generator state, scalars of the
optimizers) to YAML. Optimizers are stored by group name, so a policy with
an actor and a critic optimizer resumes each from its own moments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffpilot.policy.checkpoint import load_checkpoint, load_state_strict, save_checkpoint

STATE_KIND = "training_state"


def _yaml_safe(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _yaml_safe(v) for k, v in value.items()}
    return value


def save_state(
    directory: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator], meta: dict[str, Any],
) -> Path:
    """Write the modules' weights, every optimizer, the torch generators and ``meta`` to ``directory``."""
    tensors: dict[str, Tensor] = {}
    for prefix, module in modules.items():
        tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    scalars: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{name}.{pid}.{key}"] = value
                else:
                    scalars[f"{name}.{pid}.{key}"] = value
        groups[name] = [_yaml_safe(g) for g in sd["param_groups"]]
    for name, gen in generators.items():
        tensors[f"rng.{name}"] = gen.get_state()
    return save_checkpoint(directory, tensors, {**meta, "param_groups": groups, "optim_scalars": scalars}, kind=STATE_KIND)


def restore_state(
    directory: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
) -> dict[str, Any]:
    """Load what :func:`save_state` wrote into the given objects; returns the YAML metadata."""
    tensors, meta = load_checkpoint(directory, kind=STATE_KIND)
    for prefix, module in modules.items():
        p = prefix + "."
        load_state_strict(module, {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}, directory)
    if set(meta.get("param_groups", {})) != set(optimizers):
        raise ValueError(f"the state holds optimizers {sorted(meta.get('param_groups', {}))}, the policy has {sorted(optimizers)}")
    for name, opt in optimizers.items():
        state: dict[int, dict[str, Any]] = {}
        prefix = f"optim.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                pid, sub = key[len(prefix):].split(".", 1)
                state.setdefault(int(pid), {})[sub] = value
        for key, value in meta["optim_scalars"].items():
            gname, pid, sub = key.split(".", 2)
            if gname == name:
                state.setdefault(int(pid), {})[sub] = value
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"][name]})
    for name, gen in generators.items():
        gen.set_state(tensors[f"rng.{name}"])
    return meta
