"""Run an exported policy or planner with numpy and onnxruntime only.

This module is what ships to the robot: it imports the standard library,
numpy and onnxruntime and nothing else (no torch, nothing from diffpilot that
pulls torch in). The exported graph holds the normalizers and the unrolled
sampler, so everything the runtime needs besides the graph is a handful of
values in the model's ``metadata_props``, read and checked here.
:func:`load_runtime` reads the ``kind`` and returns the object that runs it:
:class:`OnnxChunkPolicy` (``chunk_policy``), :class:`OnnxPlanner` (``planner``) or
:class:`OnnxVLAPolicy` (``vla_policy``, a DiffusionVLA's three graphs).

Metadata schema (``EXPORT_FORMAT = 1``), all values strings. Every file:

- ``diffpilot_format``: the schema version, ``"1"``; ``diffpilot_version``.
- ``kind``: ``"chunk_policy"`` (obs -> actions), ``"planner"`` (scene ->
  states) or ``"denoiser"`` (one network call); ``policy_kind``: the
  registered policy kind it came from.
- ``form``: how the file is run (below).
- ``inputs`` / ``outputs``: comma-separated graph input/output names, in order.
- ``nfe``: network evaluations per call; ``sampler``: JSON of the sampler config.

``chunk_policy`` and ``denoiser``:

- ``form``: ``"multi_step"``, ``"one_step"`` (nfe == 1) or ``"warm_start"``
  (inputs obs, noise, previous, warm; outputs actions, chunk: a full denoise
  when ``warm`` is false, the first plan of an episode; with ``warm`` true the
  previous chunk is shifted and denoised from ``t_start`` in ``warm_nfe``
  network calls); ``"network"`` for a denoiser.
- ``obs_dim``, ``action_dim``, ``obs_horizon``, ``action_horizon``, ``exec_horizon``.
- ``t_start`` (``"1.0"`` for a cold start), ``warm_nfe`` and ``warm_start`` (JSON) for the ``warm_start`` form.
- ``step_noise_steps``: leading size K of the ``step_noise`` input (0 when absent).

``planner`` (form ``"states"``): inputs are the scene tensors (``ego_status``
(B, 3), ``command`` (B,) int64, ``ego_past`` (B, P+1, 3), ``agents_pose``
(B, K, P+1, 3), ``agents_valid`` (B, K, P+1) bool, ``agents_size`` (B, K, 2),
``agents_category`` (B, K) int64 (-1 = padding), ``lanes`` (B, L, N, 3),
``lanes_valid`` (B, L) bool, ``drivable`` (B, R, R) with a raster), ``params``
(B, len(param_names)) raw rule-parameter features, ``modes`` (B,) int64 and
``noise`` (B, horizon, 2); the output ``states`` (B, horizon, 4) is x, y,
theta, v in the ego frame every ``dt`` seconds.

- ``horizon``, ``past_steps`` (P), ``num_agents`` (K), ``num_lanes`` (L),
  ``lane_points`` (N), ``raster_size`` (R, 0 without a raster), ``dt``.
- ``param_names`` (JSON list), ``plan_params`` (JSON: the defaults ``plan``
  conditions on), ``relative_params`` (JSON list of the speed bounds fed as
  offsets from the ego's current speed), ``plan_mode`` (JSON int or null),
  ``modes`` (JSON names), ``command_modes`` (JSON: mode id per command).
- ``rules``, ``network``, ``cfg_scale``, ``guidance`` (descriptive: the graph is
  one unguided draw; robustness guidance needs autograd and stays in torch).
"""

from __future__ import annotations

import json
import time
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from diffpilot.policy.replan import PlanMemory  # numpy only
from diffpilot.policy.text import WordVocab  # the plain-Python word vocabulary (no torch)
from diffpilot.policy.vla_observation import observation_arrays  # numpy only

EXPORT_FORMAT = 1
"""Version of the metadata schema above; bump it when a reader of the old one would misread a new file."""

KIND_POLICY = "chunk_policy"
KIND_DENOISER = "denoiser"
KIND_PLANNER = "planner"
KIND_VLA = "vla_policy"
KINDS = (KIND_POLICY, KIND_PLANNER, KIND_DENOISER, KIND_VLA)
POLICY_FORMS = ("multi_step", "one_step", "warm_start")
"""Forms this runtime can drive closed loop."""
PLANNER_FORMS = ("states", "poses")
"""Planner forms this runtime can run: ``states`` (scene + rule parameters + mode + noise -> unicycle states) and
``poses`` (scene [+ map elements] + noise -> the selected plan's poses; candidates and selection inside the graph)."""
WARM_INPUTS = ("obs", "noise", "previous", "warm")
SCENE_INPUTS = ("ego_status", "command", "ego_past", "agents_pose", "agents_valid", "agents_size", "agents_category",
                "lanes", "lanes_valid")
"""The scene tensors a planner export reads (plus ``drivable`` with a raster), in input order."""
MAP_ELEMENT_INPUTS = ("stop_lines", "stop_lines_valid", "zones", "zones_valid")
CONSISTENCY_INPUTS = ("previous", "previous_covered")
"""A planner exported with plan consistency also reads its last plan, shifted into the current ego frame."""
"""Stop lines and crosswalks, read by a ``poses`` export whose metadata says ``map_elements: true``."""

_CHUNK_INTS = ("obs_dim", "action_dim", "obs_horizon", "action_horizon", "exec_horizon", "step_noise_steps")
_PLANNER_INTS = ("horizon", "past_steps", "num_agents", "num_lanes", "lane_points", "raster_size")
_PLANNER_JSON = ("param_names", "plan_params", "relative_params", "plan_mode", "command_modes")
_REQUIRED = {
    KIND_POLICY: ("t_start", *_CHUNK_INTS),
    KIND_DENOISER: ("t_start", *_CHUNK_INTS),
    KIND_PLANNER: ("dt", *_PLANNER_INTS, *_PLANNER_JSON),
    KIND_VLA: ("vocab", "tasks", "vla", "prefix_len", "low_dim_size"),
}
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
    """The parsed ``metadata_props`` of an exported diffpilot model (chunk sizes are 0 for a planner)."""

    kind: str
    form: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sampler: dict[str, Any]
    nfe: int
    raw: dict[str, str]
    obs_dim: int = 0
    action_dim: int = 0
    obs_horizon: int = 0
    action_horizon: int = 0
    exec_horizon: int = 0
    t_start: float = 1.0
    step_noise_steps: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # a planner's horizon, past_steps, num_agents, ...


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
    missing = [k for k in ("kind", "form", "inputs", "outputs", "sampler", "nfe") if k not in props]
    if missing:
        raise ExportedModelError(f"{source} lacks metadata keys {missing}; re-export it")
    kind = props["kind"]
    if kind not in _REQUIRED:
        raise ExportedModelError(
            f"{source} is a {kind!r} export; this runtime runs {list(KINDS)}: upgrade diffpilot to run it"
        )
    missing = [k for k in _REQUIRED[kind] if k not in props]
    if missing:
        raise ExportedModelError(f"{source} lacks metadata keys {missing} of a {kind!r} export; re-export it")
    try:
        common = {"sampler": json.loads(props["sampler"]), "nfe": int(props["nfe"])}
        if kind == KIND_PLANNER:
            for k in _PLANNER_JSON:
                json.loads(props[k])
            float(props["dt"])
            extra: dict[str, Any] = {"sizes": {k: int(props[k]) for k in _PLANNER_INTS}}
        elif kind == KIND_VLA:
            for k in ("vocab", "tasks", "vla"):
                json.loads(props[k])
            extra = {"sizes": {k: int(props[k]) for k in ("prefix_len", "low_dim_size")}}
        else:
            extra = {k: int(props[k]) for k in _CHUNK_INTS} | {"t_start": float(props["t_start"])}
    except ValueError as err:
        raise ExportedModelError(f"{source} has malformed metadata ({err}); re-export it") from None
    return ModelInfo(
        kind=kind,
        form=props["form"],
        inputs=tuple(n for n in props["inputs"].split(",") if n),
        outputs=tuple(n for n in props["outputs"].split(",") if n),
        raw=dict(props),
        **common,
        **extra,
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
        _opened: tuple[ort.InferenceSession, ModelInfo] | None = None,
    ) -> None:
        self.path = Path(path)
        self.session, self.info = _opened or open_session(path, threads=threads, graph_optimization=graph_optimization)
        if self.info.kind != KIND_POLICY:
            hint = "; load it with diffpilot.export.runtime.load_runtime" if self.info.kind == KIND_PLANNER else ""
            raise ExportedModelError(
                f"{self.path} is a {self.info.kind!r} export, but OnnxChunkPolicy runs {KIND_POLICY!r} exports; "
                f"export the whole policy with diffpilot.export.onnx.export_policy{hint}"
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
        self.batch = fixed_batch(self.session)
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
        check_batch(self.batch, b, self.path)
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


class OnnxPlanner:
    """A driving planner export (kind ``planner``) on onnxruntime: one unguided draw per plan, seeded.

    ``plan(sample)`` takes one scene sample (a ``SceneSample`` or a mapping of
    its per-sample arrays: ``ego_status``, ``command``, ``ego_past``,
    ``agents_*``, ``lanes``, ``lanes_valid``[, ``drivable``]) and returns
    ego-frame poses ``(horizon, 3)`` (x, y, heading wrapped to [-pi, pi)), as
    the torch planner's ``plan`` does, conditioned on the rule parameters
    ``plan_params`` (the exported defaults; ``set_rule_params`` changes them)
    and the mode (``set_mode``, or the sample's command). Agents and lanes are
    padded to the exported sizes; a sample with more is refused. Unlike the
    torch planner, which draws ``num_samples`` plans, may guide them with rule
    gradients and keeps the most robust, this draws one plan per call from
    its own generator (``reset(seed)``). ``predict`` is the batched graph itself.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int = 1,
        graph_optimization: str = "all",
        seed: int = 0,
        _opened: tuple[ort.InferenceSession, ModelInfo] | None = None,
    ) -> None:
        self.path = Path(path)
        self.session, self.info = _opened or open_session(path, threads=threads, graph_optimization=graph_optimization)
        info = self.info
        if info.kind != KIND_PLANNER:
            raise ExportedModelError(
                f"{self.path} is a {info.kind!r} export, but OnnxPlanner runs {KIND_PLANNER!r} exports; "
                "load it with diffpilot.export.runtime.load_runtime"
            )
        if info.form not in PLANNER_FORMS:
            raise ExportedModelError(
                f"{self.path} has planner form {info.form!r}; this runtime runs {list(PLANNER_FORMS)}: upgrade diffpilot"
            )
        raw, sizes = info.raw, info.sizes
        self.horizon, self.past_steps = sizes["horizon"], sizes["past_steps"]
        self.num_agents, self.num_lanes, self.lane_points = sizes["num_agents"], sizes["num_lanes"], sizes["lane_points"]
        self.raster_size = sizes["raster_size"]
        self.param_names: list[str] = list(json.loads(raw["param_names"]))
        self.relative_params: list[str] = list(json.loads(raw["relative_params"]))
        self.command_modes: list[int] = [int(m) for m in json.loads(raw["command_modes"])]
        self.modes: list[str] = list(json.loads(raw.get("modes", "[]")))
        self.plan_params: dict[str, float] = {k: float(v) for k, v in json.loads(raw["plan_params"]).items()}
        mode = json.loads(raw["plan_mode"])
        self.plan_mode: int | None = None if mode is None else int(mode)
        scene = SCENE_INPUTS + (("drivable",) if self.raster_size else ())
        self.map_elements = raw.get("map_elements", "false") == "true"
        if self.map_elements:
            try:
                self.map_sizes = {k: int(raw[k]) for k in ("num_stop_lines", "num_zones", "zone_vertices")}
            except (KeyError, ValueError):
                raise ExportedModelError(f"{self.path} reads map elements but lacks their sizes; re-export it") from None
            scene = scene + MAP_ELEMENT_INPUTS
        self.consistency = info.form == "poses" and raw.get("consistency", "false") == "true"
        if info.form == "states":
            expected, outputs = (*scene, "params", "modes", "noise"), ("states",)
            self.noise_shape: tuple[int, ...] = (self.horizon, 2)
        else:
            expected = (*scene, *(CONSISTENCY_INPUTS if self.consistency else ()), "noise")
            outputs = ("poses",)
            try:
                self.noise_shape = tuple(int(n) for n in json.loads(raw["noise_shape"]))
            except (KeyError, ValueError, TypeError):
                raise ExportedModelError(f"{self.path} has form 'poses' but no valid 'noise_shape' metadata; re-export it") from None
        if info.inputs != expected or info.outputs != outputs:
            raise ExportedModelError(
                f"{self.path} claims form {info.form!r} but has inputs {info.inputs} (expected {expected}) and outputs "
                f"{info.outputs} (expected {outputs}); re-export it"
            )
        missing = [k for k in self.param_names if k not in self.plan_params]
        if missing:
            raise ExportedModelError(f"{self.path} has no default for rule parameters {missing}; re-export it")
        self._dtypes = {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.batch = fixed_batch(self.session)
        self._rng = np.random.default_rng(seed)
        self.last_nfe = 0
        self._memory = PlanMemory(self.horizon)  # the last plan, for an export with plan consistency

    @property
    def nfe(self) -> int:
        """Network evaluations per plan (fixed by the exported sampler)."""
        return self.info.nfe

    def reset(self, seed: int | None = None) -> None:
        """Forget the last plan (a new episode); reseed the noise when ``seed`` is given."""
        self._memory.clear()
        if seed is not None:
            self._rng = np.random.default_rng(seed)

    def set_rule_params(self, **values: float) -> None:
        """Set the rule parameters ``plan`` conditions on (e.g. ``vmax=5.0``), as the torch planner's method."""
        unknown = sorted(set(values) - set(self.param_names))
        if unknown:
            raise ValueError(f"unknown rule parameter(s) {unknown}; this planner's parameters: {self.param_names}")
        for k, v in values.items():
            if not np.isfinite(float(v)):
                raise ValueError(f"rule parameter {k} must be finite, got {v!r}")
            self.plan_params[k] = float(v)

    def set_mode(self, mode: int | str | None) -> None:
        """Fix the driving mode (index or name), or None to follow each sample's command."""
        n = max(self.command_modes, default=0) + 1
        if mode is None or isinstance(mode, (int, np.integer)) and 0 <= int(mode) < n:
            self.plan_mode = None if mode is None else int(mode)
        elif isinstance(mode, str) and mode in self.modes:
            self.plan_mode = self.modes.index(mode)
        else:
            raise ValueError(f"mode must be one of {self.modes} (or its index) or None, got {mode!r}")

    def param_features(self, params: Mapping[str, float], speed: float) -> np.ndarray:
        """The graph's ``params`` row ``(P,)``: values in ``param_names`` order, speed bounds relative to ``speed``."""
        missing = [k for k in self.param_names if k not in params]
        if missing:
            raise ValueError(f"rule parameters {missing} are missing; this planner needs {self.param_names}")
        row = np.array([float(params[k]) for k in self.param_names], dtype=np.float64)
        for k in self.relative_params:
            row[self.param_names.index(k)] -= float(speed)
        return row.astype(np.float32)

    def feeds(self, sample: Any, params: Mapping[str, float] | None = None, mode: int | None = None,
              noise: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The graph inputs (batch 1) for one scene sample, padded to the exported sizes."""
        H, K, L, N = self.past_steps + 1, self.num_agents, self.num_lanes, self.lane_points
        get = _field_reader(sample)
        out: dict[str, np.ndarray] = {}
        status = _array(get("ego_status"), "ego_status", (3,))
        out["ego_status"] = status
        command = int(np.asarray(get("command")).reshape(()))
        if not 0 <= command < len(self.command_modes):
            raise ValueError(f"command must be in [0, {len(self.command_modes)}), got {command}")
        out["command"] = np.array(command)
        out["ego_past"] = _array(get("ego_past"), "ego_past", (H, 3))
        pose = np.asarray(get("agents_pose"), dtype=np.float64)
        if pose.ndim != 3 or pose.shape[1] < H or pose.shape[2] != 3:
            raise ValueError(f"agents_pose must be (K, W >= {H}, 3), got {pose.shape}")
        k = pose.shape[0]
        if k > K:
            raise ValueError(f"the sample has {k} agent slots, this export takes at most {K}; re-export with num_agents={k}")
        out["agents_pose"] = _pad(pose[:, :H], K, 0.0)
        valid = np.asarray(get("agents_valid"), dtype=bool)
        if valid.shape != pose.shape[:2]:
            raise ValueError(f"agents_valid must be {pose.shape[:2]} like agents_pose, got {valid.shape}")
        out["agents_valid"] = _pad(valid[:, :H], K, False)
        out["agents_size"] = _pad(_array(get("agents_size"), "agents_size", (k, 2)), K, 0.0)
        out["agents_category"] = _pad(np.asarray(get("agents_category"), dtype=np.int64).reshape(k), K, -1)
        lanes = np.asarray(get("lanes"), dtype=np.float64)
        if lanes.ndim != 3 or lanes.shape[1:] != (N, 3):
            raise ValueError(f"lanes must be (L, {N}, 3) for this export, got {lanes.shape}")
        if lanes.shape[0] > L:
            raise ValueError(f"the sample has {lanes.shape[0]} lanes, this export takes at most {L}; "
                             f"re-export with num_lanes={lanes.shape[0]}")
        out["lanes"] = _pad(lanes, L, 0.0)
        out["lanes_valid"] = _pad(np.asarray(get("lanes_valid"), dtype=bool).reshape(lanes.shape[0]), L, False)
        if self.raster_size:
            R = self.raster_size
            out["drivable"] = _array(get("drivable"), "drivable", (R, R))
        if self.map_elements:
            out.update(self._map_feeds(get))
        for name, value in out.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"non-finite values in scene field {name!r}; check the perception output")
        if self.info.form == "states":
            chosen = self.plan_params if params is None else {**self.plan_params, **params}
            out["params"] = self.param_features(chosen, float(status[0]))
            mode = self.plan_mode if mode is None else int(mode)
            out["modes"] = np.array(self.command_modes[command] if mode is None else mode)
        if self.consistency:
            out.update(self._previous_feeds(sample))
        shape = self.noise_shape
        if noise is None:
            out["noise"] = self._rng.standard_normal(shape, dtype=np.float32)
        else:
            arr = np.asarray(noise, dtype=np.float32)
            arr = arr[0] if arr.shape == (1, *shape) else arr
            if arr.shape != shape:
                raise ValueError(f"noise must have shape {shape} (or (1, *{shape})), got {arr.shape}")
            out["noise"] = arr
        return {name: value[None] for name, value in out.items()}

    def _previous_feeds(self, sample: Any) -> dict[str, np.ndarray]:
        """``previous`` / ``previous_covered`` from the last plan, when the sample says where and when it is."""
        where = _pose_and_frame(sample)
        last = None if where is None else self._memory.shifted(*where)
        if last is None:
            return {"previous": np.zeros((self.horizon, 3), np.float32), "previous_covered": np.zeros(self.horizon, bool)}
        return {"previous": last[0].astype(np.float32), "previous_covered": last[1] & self._memory.moving}

    def _map_feeds(self, get: Any) -> dict[str, np.ndarray]:
        """Stop lines and crosswalk polygons, padded to the exported sizes (more than exported is refused)."""
        S, Z, V = self.map_sizes["num_stop_lines"], self.map_sizes["num_zones"], self.map_sizes["zone_vertices"]
        stops = np.asarray(get("stop_lines"), dtype=np.float32).reshape(-1, 2)
        zones = np.asarray(get("zones"), dtype=np.float32)
        if zones.ndim != 3 or zones.shape[1:] != (V, 2):
            raise ValueError(f"zones must be (Z, {V}, 2) for this export, got {zones.shape}")
        if len(stops) > S or len(zones) > Z:
            raise ValueError(f"the sample has {len(stops)} stop lines and {len(zones)} zones, this export takes at most "
                             f"{S} and {Z}; re-export with larger num_stop_lines / num_zones")
        return {
            "stop_lines": _pad(stops, S, 0.0),
            "stop_lines_valid": _pad(np.asarray(get("stop_lines_valid"), dtype=bool).reshape(len(stops)), S, False),
            "zones": _pad(zones, Z, 0.0),
            "zones_valid": _pad(np.asarray(get("zones_valid"), dtype=bool).reshape(len(zones)), Z, False),
        }

    def predict(self, batch: Mapping[str, np.ndarray], noise: np.ndarray | None = None) -> np.ndarray:
        """The graph's output for batched inputs: states ``(B, horizon, 4)`` (form ``states``: scene tensors,
        ``params`` features, ``modes``) or poses ``(B, horizon, 3)`` (form ``poses``: scene tensors)."""
        names = [n for n in self.info.inputs if n != "noise"]
        b0 = len(np.asarray(batch["ego_status"])) if "ego_status" in batch else 0
        batch = {"previous": np.zeros((b0, self.horizon, 3)), "previous_covered": np.zeros((b0, self.horizon), bool),
                 **batch} if self.consistency else batch  # no last plan unless given
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(f"predict() needs the inputs {missing}; this planner reads {list(self.info.inputs)}")
        feeds = {n: np.asarray(batch[n], dtype=self._dtypes[n]) for n in names}
        b = feeds["ego_status"].shape[0]
        check_batch(self.batch, b, self.path)
        shape = (b, *self.noise_shape)
        if noise is None:
            feeds["noise"] = self._rng.standard_normal(shape, dtype=np.float32)
        else:
            feeds["noise"] = np.asarray(noise, dtype=np.float32)
            if feeds["noise"].shape != shape:
                raise ValueError(f"noise must have shape {shape}, got {feeds['noise'].shape}")
        (states,) = self.session.run(None, feeds)
        self.last_nfe = self.info.nfe
        return states

    def plan(self, sample: Any, noise: np.ndarray | None = None) -> np.ndarray:
        """Ego-frame poses ``(horizon, 3)`` for one scene sample: one draw (``noise`` of ``noise_shape`` fixes it)."""
        feeds = self.feeds(sample, noise=noise)
        (states,) = self.session.run(None, {n: v.astype(self._dtypes[n], copy=False) for n, v in feeds.items()})
        self.last_nfe = self.info.nfe
        poses = states[0, :, :3].astype(np.float64)
        poses[:, 2] = (poses[:, 2] + np.pi) % (2 * np.pi) - np.pi
        where = _pose_and_frame(sample) if self.consistency else None
        if where is not None:
            self._memory.remember(poses, *where)
        return poses


def load_runtime(
    path: str | os.PathLike[str], *, threads: int = 1, graph_optimization: str = "all", seed: int = 0
) -> Any:
    """The runtime object for an exported file, by the ``kind`` in its metadata.

    ``chunk_policy`` (chunk policies, the warm-start form, single-step actors)
    -> :class:`OnnxChunkPolicy`; ``planner`` -> :class:`OnnxPlanner`; ``vla_policy``
    -> :class:`OnnxVLAPolicy`. A bare
    ``denoiser`` has no closed loop to run and is refused.
    """
    opened = open_session(path, threads=threads, graph_optimization=graph_optimization)
    kind = opened[1].kind
    if kind == KIND_POLICY:
        return OnnxChunkPolicy(path, seed=seed, _opened=opened)
    if kind == KIND_PLANNER:
        return OnnxPlanner(path, seed=seed, _opened=opened)
    if kind == KIND_VLA:
        return OnnxVLAPolicy(path, threads=threads, seed=seed)
    raise ExportedModelError(
        f"{path} is a {kind!r} export (one network call); run it with onnxruntime directly "
        "(diffpilot.export.runtime.open_session) or export the whole policy with diffpilot export"
    )


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size an export fixed (its first input's first dim), or None for a dynamic batch axis."""
    shape = session.get_inputs()[0].shape
    return shape[0] if shape and isinstance(shape[0], int) else None


def check_batch(fixed: int | None, batch: int, path: Path) -> None:
    """A ValueError when an export with a fixed batch size gets another."""
    if fixed is not None and batch != fixed:
        raise ValueError(f"{path} was exported with its batch fixed at {fixed}, got a batch of {batch}; pass {fixed} "
                         "at a time or re-export with batch=null (a dynamic batch axis)")


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def _field_reader(sample: Any) -> Any:
    """``get(name)`` for a mapping of arrays or an object with array attributes (a SceneSample)."""
    def get(name: str) -> Any:
        value = sample.get(name) if isinstance(sample, Mapping) else getattr(sample, name, None)
        if value is None:
            raise ValueError(f"the scene sample has no {name!r}; pass a SceneSample or a mapping of its arrays")
        return value

    return get


def _pose_and_frame(sample: Any) -> tuple[np.ndarray, float] | None:
    """The sample's global ego pose and keyframe index, or None when it does not carry them."""
    get = (lambda k: sample.get(k)) if isinstance(sample, Mapping) else (lambda k: getattr(sample, k, None))
    pose, frame = get("ego_pose_global"), get("frame")
    if pose is None or frame is None:
        return None
    return np.asarray(pose, dtype=np.float64).reshape(3), float(np.asarray(frame).reshape(()))


def _array(value: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return arr


def _pad(arr: np.ndarray, size: int, fill: Any) -> np.ndarray:
    """``arr`` with its first axis padded to ``size`` entries of ``fill`` (padding slots are masked in the graph)."""
    if arr.shape[0] == size:
        return arr
    out = np.full((size, *arr.shape[1:]), fill, dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


# ------------------------------------------------------------------ DiffusionVLA
# Three files (see diffpilot.policy.vla_export): ``<stem>.onnx`` (the action
# path), ``<stem>.prefill.onnx`` and ``<stem>.step.onnx`` (the reasoner's cached
# greedy decoding). The vocabulary, task list and sizes are in the main file's
# metadata. ``act`` keeps the torch policy's schedule: reasoning at the first
# replan and every ``reason_every`` replans, a chunk at every replan,
# ``exec_horizon`` actions of it executed.
class OnnxVLAPolicy:
    """Closed-loop DiffusionVLA from its exported graphs (numpy + onnxruntime only)."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 1, seed: int = 0) -> None:
        path = Path(path)
        self.session, info = open_session(path, threads=threads)
        if info.kind != KIND_VLA or info.form != "action":
            raise ExportedModelError(f"{path} is a {info.kind!r}/{info.form!r} file; pass the main <stem>.onnx of a "
                                     "DiffusionVLA export")
        raw = info.raw
        self.vocab = WordVocab(json.loads(raw["vocab"]))
        self.tasks: list[str] = json.loads(raw["tasks"])
        self.cfg: dict[str, Any] = json.loads(raw["vla"])
        self.prefix_len = int(raw["prefix_len"])
        self.low_dim_size = int(raw["low_dim_size"])
        self.inputs = info.inputs
        self.decoders: dict[str, Any] = {}
        for name in json.loads(raw.get("companions", "[]")):
            part = path.with_name(f"{path.stem}.{name}.onnx")
            if not part.is_file():
                raise ExportedModelError(f"{part} is missing; a DiffusionVLA export is three files, re-export it")
            self.decoders[name] = open_session(part, threads=threads)[0]
        if self.cfg["reasoning"] and set(self.decoders) != {"prefill", "step"}:
            raise ExportedModelError(f"{path} names no reasoner graphs; re-export the policy")
        self._rng = np.random.default_rng(seed)
        self._queue: deque[np.ndarray] = deque()
        self._replans = 0
        self._text: np.ndarray | None = None
        self.last_reasoning = ""
        self.last_timing: dict[str, float] = {}

    def reset(self, seed: int | None = None) -> None:
        self._queue.clear()
        self._replans = 0
        self._text = None
        self.last_reasoning = ""
        if seed is not None:
            self._rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ inputs
    def observation_feeds(self, observation: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The graph inputs of one observation dict (as the torch policy's ``observation_batch``)."""
        low, image = observation_arrays(
            observation, low_dim=self.cfg["low_dim"], low_dim_size=self.low_dim_size,
            image_size=self.cfg["image_size"] if self.cfg["use_image"] else None,
            onehot=self.cfg["instruction"] == "onehot")
        feeds: dict[str, np.ndarray] = {"low_dim": low[None]}
        if image is not None:
            feeds["image"] = image.astype(np.float32)[None]
        if self.cfg["instruction"] == "onehot":
            task = str(observation["task"])
            if task not in self.tasks:
                raise ValueError(f"unknown task {task!r}; this policy was trained on {self.tasks}")
            feeds["task"] = np.array([self.tasks.index(task)], np.int64)
        else:
            ids = self.vocab.encode(str(observation["instruction"]))[: self.cfg["max_instruction"]]
            prompt = np.full((1, self.cfg["max_instruction"]), self.vocab.pad, np.int64)
            prompt[0, : len(ids)] = ids
            feeds["prompt"] = prompt
        return feeds

    def generate(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Greedy reasoning ids ``[<sep>, ..., <eos>, <pad>...]`` (1, Lr+1) with the cached step graph."""
        n = self.cfg["max_reasoning"]
        prefill = self.decoders["prefill"]
        names = [i.name for i in prefill.get_inputs()]
        logits, keys, values = prefill.run(None, {k: feeds[k] for k in names})
        ignore = np.zeros((1, keys.shape[3]), dtype=bool)
        if "prompt" in feeds:
            li = feeds["prompt"].shape[1]
            start = keys.shape[3] - 1 - li
            ignore[:, start: start + li] = feeds["prompt"] == self.vocab.pad
        out = [self.vocab.sep]
        for i in range(n):
            token = int(logits[0].argmax()) if i < n - 1 else self.vocab.eos
            out.append(token)
            if token == self.vocab.eos:
                break
            logits, keys, values = self.decoders["step"].run(None, {
                "token": np.array([token], np.int64), "position": np.array(keys.shape[3], np.int64),
                "keys": keys, "values": values, "ignore": ignore})
            ignore = np.concatenate([ignore, np.zeros((1, 1), bool)], axis=1)
        return np.array([out + [self.vocab.pad] * (n + 1 - len(out))], np.int64)

    # ------------------------------------------------------------------ acting
    def plan_chunk(self, observation: Mapping[str, Any], noise: np.ndarray | None = None) -> np.ndarray:
        """A fresh (H, A) chunk; reasoning regenerated on every ``reason_every``-th replan."""
        t0 = time.perf_counter()
        feeds = self.observation_feeds(observation)
        reason_ms = 0.0
        if self.cfg["reasoning"]:
            if self._text is None or self._replans % self.cfg["reason_every"] == 0:
                self._text = self.generate(feeds)
                reason_ms = (time.perf_counter() - t0) * 1000
            self.last_reasoning = self.vocab.decode(self._text[0, 1:].tolist())
            feeds["text"] = self._text
        h, a = self.cfg["action_horizon"], self.cfg["action_dim"]
        feeds["noise"] = (self._rng.standard_normal((1, h, a), dtype=np.float32) if noise is None
                          else np.asarray(noise, np.float32).reshape(1, h, a))
        chunk = self.session.run(None, {k: feeds[k] for k in self.inputs})[0][0]
        self.last_timing = {"reason_ms": reason_ms, "action_ms": (time.perf_counter() - t0) * 1000 - reason_ms}
        self._replans += 1
        return chunk

    def act(self, observation: Mapping[str, Any]) -> np.ndarray:
        if not self._queue:
            self._queue.extend(self.plan_chunk(observation)[: self.cfg["exec_horizon"]])
        return self._queue.popleft()
