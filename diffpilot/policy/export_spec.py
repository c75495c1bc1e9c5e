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

from diffpilot.policy.generative import DDIMSampler, DDPMSampler

__all__ = ["RUNTIME_CHUNK", "RUNTIME_DENOISER", "RUNTIME_PLANNER", "ExportSpec", "ExportSwitch", "chunk_metadata",
           "stochastic_sampler"]

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
    """

    graph: nn.Module
    feeds: Feeds
    outputs: tuple[str, ...]
    metadata: dict[str, str]
    nfe: int
    batch_axes: Mapping[str, int] = field(default_factory=dict)
    switch: ExportSwitch | None = None

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
