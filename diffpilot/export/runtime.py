"""Run an exported chunk policy with numpy and onnxruntime only.

This module is what ships to the robot: it imports the standard library,
numpy and onnxruntime and nothing else (no torch, nothing from diffpilot that
pulls torch in). The exported graph holds the normalizers and the unrolled
sampler, so everything the runtime needs besides the graph is a handful of
integers in the model's ``metadata_props``, read and checked here.

Metadata schema (``EXPORT_FORMAT = 1``), all values strings:

- ``diffpilot_format``: the schema version, ``"1"``.
- ``kind``: ``"chunk_policy"`` (obs -> actions) or ``"denoiser"`` (one network call).
- ``form``: how a ``chunk_policy`` is run: ``"multi_step"``, ``"one_step"``
  (nfe == 1) or ``"warm_start"`` (inputs obs, noise, previous, warm;
  outputs actions, chunk: a full denoise when ``warm`` is false, the first
  plan of an episode; with ``warm`` true the previous chunk is shifted and
  denoised from ``t_start`` in ``warm_nfe`` network calls).
- ``inputs`` / ``outputs``: comma-separated graph input/output names, in order.
- ``obs_dim``, ``action_dim``, ``obs_horizon``, ``action_horizon``, ``exec_horizon``.
- ``sampler`` (JSON of the sampler config), ``nfe``, ``t_start`` (``"1.0"`` for a cold start),
  ``warm_nfe`` and ``warm_start`` (JSON) for the ``warm_start`` form.
- ``step_noise_steps``: leading size K of the ``step_noise`` input (0 when absent).
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

EXPORT_FORMAT = 1
"""Version of the metadata schema above; bump it when a reader of the old one would misread a new file."""

KIND_POLICY = "chunk_policy"
KIND_DENOISER = "denoiser"
POLICY_FORMS = ("multi_step", "one_step", "warm_start")
"""Forms this runtime can drive closed loop."""
WARM_INPUTS = ("obs", "noise", "previous", "warm")

_INT_KEYS = ("obs_dim", "action_dim", "obs_horizon", "action_horizon", "exec_horizon", "nfe", "step_noise_steps")
_OPT_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


class ExportedModelError(ValueError):
    """An ONNX file that this runtime cannot run as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """The parsed ``metadata_props`` of an exported diffpilot model."""

    kind: str
    form: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    obs_dim: int
    action_dim: int
    obs_horizon: int
    action_horizon: int
    exec_horizon: int
    sampler: dict[str, Any]
    nfe: int
    t_start: float
    step_noise_steps: int
    raw: dict[str, str]


def parse_metadata(props: dict[str, str], source: str = "model") -> ModelInfo:
    """Validate and parse a model's ``metadata_props``; raise ``ExportedModelError`` naming what is off."""
    if "diffpilot_format" not in props:
        raise ExportedModelError(
            f"{source} has no 'diffpilot_format' metadata: it was not written by diffpilot's exporter; "
            "export it with diffpilot.export.onnx.export_policy"
        )
    found = props["diffpilot_format"]
    if found != str(EXPORT_FORMAT):
        raise ExportedModelError(
            f"{source} has export format {found!r}, but this runtime reads format {EXPORT_FORMAT}; "
            "re-export the policy with this diffpilot version or run it with the diffpilot version that wrote it"
        )
    missing = [k for k in ("kind", "form", "inputs", "outputs", "sampler", "t_start", *_INT_KEYS) if k not in props]
    if missing:
        raise ExportedModelError(f"{source} lacks metadata keys {missing}; re-export it")
    try:
        ints = {k: int(props[k]) for k in _INT_KEYS}
        sampler = json.loads(props["sampler"])
        t_start = float(props["t_start"])
    except ValueError as err:
        raise ExportedModelError(f"{source} has malformed metadata ({err}); re-export it") from None
    return ModelInfo(
        kind=props["kind"],
        form=props["form"],
        inputs=tuple(n for n in props["inputs"].split(",") if n),
        outputs=tuple(n for n in props["outputs"].split(",") if n),
        sampler=sampler,
        t_start=t_start,
        raw=dict(props),
        **ints,
    )


def open_session(
    path: str | os.PathLike[str], *, threads: int = 1, graph_optimization: str = "all"
) -> tuple[ort.InferenceSession, ModelInfo]:
    """Open ``path`` on the CPU and parse its metadata, with clear errors for a missing or non-ONNX file."""
    path = Path(path)
    if graph_optimization not in _OPT_LEVELS:
        raise ValueError(f"graph_optimization must be one of {sorted(_OPT_LEVELS)}, got {graph_optimization!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}; export one with diffpilot.export.onnx.export_policy")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = _OPT_LEVELS[graph_optimization]
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's pybind errors share no base class but Exception
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportedModelError(
            f"{path} is not a loadable ONNX model ({first_line}); pass a file written by "
            "diffpilot.export.onnx.export_policy"
        ) from None
    info = parse_metadata(session.get_modelmeta().custom_metadata_map, source=str(path))
    names = tuple(i.name for i in session.get_inputs())
    if names != info.inputs:
        raise ExportedModelError(f"{path}: graph inputs {names} do not match its metadata {info.inputs}; re-export it")
    return session, info


class OnnxChunkPolicy:
    """Closed-loop chunk policy on onnxruntime, with the same logic as the torch policy.

    Keeps the last ``obs_horizon`` observations (the first one repeated after
    a reset), plans a chunk when the action queue is empty and executes
    ``chunk[obs_horizon - 1 : obs_horizon - 1 + exec_horizon]``: the first
    executed action is the one aligned with the newest observation.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int = 1,
        graph_optimization: str = "all",
        seed: int = 0,
    ) -> None:
        self.path = Path(path)
        self.session, self.info = open_session(path, threads=threads, graph_optimization=graph_optimization)
        if self.info.kind != KIND_POLICY:
            raise ExportedModelError(
                f"{self.path} is a {self.info.kind!r} export, but OnnxChunkPolicy runs {KIND_POLICY!r} exports; "
                "export the whole policy with diffpilot.export.onnx.export_policy"
            )
        if self.info.form not in POLICY_FORMS:
            raise ExportedModelError(
                f"{self.path} has form {self.info.form!r}; this runtime drives {list(POLICY_FORMS)}: "
                "upgrade diffpilot to run it"
            )
        info = self.info
        self.obs_dim, self.action_dim = info.obs_dim, info.action_dim
        self.obs_horizon, self.action_horizon = info.obs_horizon, info.action_horizon
        self.exec_horizon = info.exec_horizon
        self._output = self.session.get_outputs()[0].name
        self.warm = info.form == "warm_start"
        if self.warm:
            if info.inputs != WARM_INPUTS or len(info.outputs) != 2 or "warm_nfe" not in info.raw:
                raise ExportedModelError(
                    f"{self.path} claims form 'warm_start' but has inputs {info.inputs} (expected {WARM_INPUTS}), "
                    f"outputs {info.outputs} or no warm_nfe; re-export it with export_warm_start"
                )
            self.warm_nfe = int(info.raw["warm_nfe"])
        self._previous: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)
        self._obs_history: deque[np.ndarray] = deque(maxlen=self.obs_horizon)
        self._action_queue: deque[np.ndarray] = deque()
        self.last_nfe = 0

    @property
    def nfe(self) -> int:
        """Network evaluations per planned chunk (fixed by the exported sampler)."""
        return self.info.nfe

    def reset(self, seed: int | None = None) -> None:
        """Forget the episode's observations and queued actions; reseed the noise when ``seed`` is given."""
        self._obs_history.clear()
        self._action_queue.clear()
        self._previous = None
        if seed is not None:
            self._rng = np.random.default_rng(seed)

    def predict(
        self, obs: np.ndarray, noise: np.ndarray | None = None, step_noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Action chunks (B, H, action_dim) in environment units for observation histories (B, To, obs_dim).

        A ``warm_start`` model chains its calls: each starts from the previous
        call's chunk (the first after ``reset()`` is a full denoise).
        """
        obs = np.asarray(obs, dtype=np.float32)
        expected = (self.obs_horizon, self.obs_dim)
        if obs.ndim != 3 or obs.shape[1:] != expected or obs.shape[0] < 1:
            raise ValueError(
                f"predict() expects observations of shape (B, {expected[0]}, {expected[1]}), got {obs.shape}"
            )
        if not np.isfinite(obs).all():
            raise ValueError("predict() got non-finite observations (NaN or inf); check the sensor/simulator output")
        b = obs.shape[0]
        feeds = {"obs": obs, "noise": self._noise("noise", noise, (b, self.action_horizon, self.action_dim))}
        if "step_noise" in self.info.inputs:
            shape = (self.info.step_noise_steps, b, self.action_horizon, self.action_dim)
            feeds["step_noise"] = self._noise("step_noise", step_noise, shape)
        elif step_noise is not None:
            raise ValueError(f"this model's sampler {self.info.sampler} is deterministic; it takes no step_noise")
        if self.warm:
            return self._predict_warm(feeds)
        (actions,) = self.session.run([self._output], feeds)
        self.last_nfe = self.info.nfe
        return actions

    def _predict_warm(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Cold plan when there is no previous chunk (or its batch differs), warm plan otherwise."""
        previous = self._previous
        cold = previous is None or previous.shape != feeds["noise"].shape
        feeds["previous"] = np.zeros_like(feeds["noise"]) if cold else previous
        feeds["warm"] = np.array(not cold)
        actions, self._previous = self.session.run(None, feeds)
        self.last_nfe = self.info.nfe if cold else self.warm_nfe
        return actions

    def act(self, observation: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """One action for one observation; ``noise`` (H, A) or (1, H, A) is used when this call plans a chunk."""
        obs = np.asarray(observation, dtype=np.float32)
        if obs.shape != (self.obs_dim,):
            raise ValueError(f"act() expects an observation of shape ({self.obs_dim},), got {obs.shape}")
        if not np.isfinite(obs).all():
            raise ValueError(f"act() got a non-finite observation: {obs}; check the sensor/simulator output")
        if not self._obs_history:
            self._obs_history.extend([obs] * self.obs_horizon)
        else:
            self._obs_history.append(obs)
        if not self._action_queue:
            if noise is not None and np.ndim(noise) == 2:
                noise = np.asarray(noise)[None]
            chunk = self.predict(np.stack(self._obs_history)[None], noise)[0]
            start = self.obs_horizon - 1
            self._action_queue.extend(chunk[start : start + self.exec_horizon])
        return self._action_queue.popleft()

    def _noise(self, name: str, given: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        if given is None:
            return self._rng.standard_normal(shape, dtype=np.float32)
        arr = np.asarray(given, dtype=np.float32)
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
        return arr
