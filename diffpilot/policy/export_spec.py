"""What an exportable policy tells the exporter: its inference graph, inputs, outputs and metadata.

A policy kind that can run outside torch implements ``export_spec(sampler=None,
**options) -> ExportSpec`` (see :class:`~diffpilot.policy.base.PolicyBase`);
:func:`diffpilot.export.onnx.export_by_kind` writes any spec to ONNX and
checks it against torch, so the exporter knows nothing about kinds. A
configuration that cannot be exported (candidate selection by a critic, a
sampler that draws fresh noise at every step, guidance that needs autograd)
raises ``ValueError`` with the reason from ``export_spec``.

The graph takes every random draw as an input (``noise``, ``step_noise``), so
the exported file is deterministic given its inputs and the runtime seeds it.
The ``kind`` strings below are the metadata values the torch-free runtime
(:mod:`diffpilot.export.runtime`, which cannot import this module) dispatches on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diffpilot.data.scenario import COMMANDS, DT, SampleSpec
from diffpilot.policy.generative import DDIMSampler, DDPMSampler

__all__ = ["RUNTIME_CHUNK", "RUNTIME_DENOISER", "RUNTIME_PLANNER", "ExportSpec", "ExportSwitch", "chunk_metadata",
           "poses_metadata", "scene_export_sizes", "stochastic_sampler"]

RUNTIME_CHUNK = "chunk_policy"
"""Metadata ``kind`` of a chunk policy (obs + noise -> actions), run by ``OnnxChunkPolicy``; also single-step actors."""
RUNTIME_PLANNER = "planner"
"""Metadata ``kind`` of a driving planner (scene + rule parameters + mode + noise -> states), run by ``OnnxPlanner``."""
RUNTIME_DENOISER = "denoiser"
"""Metadata ``kind`` of a bare network (one call), for hand-written loops."""

Feeds = Callable[[int, torch.Generator], dict[str, Tensor]]


@dataclass
class ExportSwitch:
    """Two graphs in one file, picked by the bool scalar input ``flag`` (one ONNX ``If``).

    ``on`` runs when the flag is true and reads every input but the flag;
    ``off`` runs when it is false and reads ``off_inputs``. Both return the
    spec's outputs. ``on_nfe`` is the network evaluations of the ``on``
    branch (the spec's ``nfe`` is that of ``off``).
    """

    flag: str
    on: nn.Module
    off: nn.Module
    off_inputs: tuple[str, ...]
    on_nfe: int


@dataclass
class ExportSpec:
    """One exportable inference path.

    Attributes:
        graph: the eager reference, called with the inputs as keywords (with a
            ``switch``, also with the flag); what ``export_by_kind`` exports and
            compares onnxruntime against.
        feeds: ``feeds(batch, generator)`` -> realistic inputs at that batch
            size, keyed by input name in graph-input order (without the flag).
        outputs: output names, in order.
        metadata: what the runtime reads (``kind``, ``form``, sizes, ...); the
            exporter adds the format version, ``inputs``, ``outputs``, ``nfe``
            and the measured check error.
        nfe: network evaluations per call; the check tolerance scales with it.
        batch_axes: the batch axis of each input that does not have it first.
        switch: two graphs behind a bool input (e.g. cold vs warm-started plans).
        extra_axes: further dynamic axes by input name, ``{axis: dim name}``
            (a decoding cache's length); an input whose ``batch_axes`` entry
            is ``None`` has no batch axis (a scalar position).
        companions: more graphs the runtime needs beside this one, written
            next to it as ``<stem>.<name>.onnx`` before it (so the main file's
            presence means the set is complete).
    """

    graph: nn.Module
    feeds: Feeds
    outputs: tuple[str, ...]
    metadata: dict[str, str]
    nfe: int
    batch_axes: Mapping[str, int | None] = field(default_factory=dict)
    switch: ExportSwitch | None = None
    extra_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    companions: Mapping[str, "ExportSpec"] = field(default_factory=dict)

    def example_inputs(self, batch: int = 2, seed: int = 0) -> dict[str, Tensor]:
        """The inputs at ``batch`` (with a switch, without its flag)."""
        return self.feeds(batch, torch.Generator().manual_seed(seed))

    @property
    def inputs(self) -> tuple[str, ...]:
        """Graph input names in order (the switch's flag last)."""
        names = tuple(self.example_inputs(1))
        return names + ((self.switch.flag,) if self.switch is not None else ())


def stochastic_sampler(sampler: Any) -> bool:
    """Samplers that draw fresh noise at each step (DDPM ancestral, DDIM with eta > 0)."""
    return isinstance(sampler, DDPMSampler) or (isinstance(sampler, DDIMSampler) and sampler.eta > 0)


def scene_export_sizes(num_agents: int | None, num_lanes: int | None, lane_points: int | None,
                       raster_size: int | None, use_raster: bool) -> tuple[int, int, int, int]:
    """The padded scene sizes ``(K, L, N, R)`` a planner graph takes (``SampleSpec`` defaults; ``R = 0`` without a raster)."""
    spec = SampleSpec()
    K = spec.num_agents if num_agents is None else int(num_agents)
    L = spec.num_lanes if num_lanes is None else int(num_lanes)
    N = spec.lane_points if lane_points is None else int(lane_points)
    R = (spec.raster_size if raster_size is None else int(raster_size)) if use_raster else 0
    if min(K, L, N) < 1 or (use_raster and R < 1):
        raise ValueError(f"export sizes must be >= 1, got num_agents={K}, num_lanes={L}, lane_points={N}, raster_size={R}")
    return K, L, N, R


def poses_metadata(kind: str, noise_shape: tuple[int, ...], horizon: int, past_steps: int,
                   sizes: tuple[int, int, int, int], sampler: Mapping[str, Any], **extra: str) -> dict[str, str]:
    """What the runtime reads of a planner export of form ``poses`` (scene [+ map elements] + noise -> kept plan).

    The rule-parameter keys of the ``states`` form are written empty, so one planner runtime reads both forms.
    """
    K, L, N, R = sizes
    return {
        "kind": RUNTIME_PLANNER, "form": "poses", "policy_kind": kind,
        "rules": "[]", "param_names": "[]", "plan_params": "{}", "relative_params": "[]", "plan_mode": "null",
        "modes": "[]", "command_modes": json.dumps([0] * len(COMMANDS)),
        "noise_shape": json.dumps(list(noise_shape)), "dt": str(DT), "horizon": str(horizon),
        "past_steps": str(past_steps), "num_agents": str(K), "num_lanes": str(L), "lane_points": str(N),
        "raster_size": str(R), "sampler": json.dumps(dict(sampler)), **extra,
    }


def chunk_metadata(kind: str, cfg: Mapping[str, Any], obs_horizon: int, action_horizon: int,
                   exec_horizon: int) -> dict[str, str]:
    """The sizes and model description every chunk-shaped export carries (see diffpilot.export.runtime)."""
    return {
        "policy_kind": kind,
        "obs_dim": str(cfg["obs_dim"]),
        "action_dim": str(cfg["action_dim"]),
        "obs_horizon": str(obs_horizon),
        "action_horizon": str(action_horizon),
        "exec_horizon": str(exec_horizon),
        "network": json.dumps(cfg["network"], sort_keys=True),
        "objective": json.dumps(cfg["objective"], sort_keys=True),
    }
