"""Run an exported DiffusionVLA policy with numpy and onnxruntime only.

Three files (see :mod:`diffpilot.policy.vla_export`): ``<stem>.onnx`` (the
action path), ``<stem>.prefill.onnx`` and ``<stem>.step.onnx`` (the
reasoner's cached greedy decoding). The vocabulary, task list and sizes are
in the main file's metadata, so tokenizing needs nothing else. ``act`` keeps
the torch policy's schedule: reasoning at the first replan and every
``reason_every`` replans, a chunk at every replan, ``exec_horizon`` actions
of it executed.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffpilot.export.runtime import KIND_VLA, ExportedModelError, open_session
from diffpilot.policy.text import WordVocab

__all__ = ["OnnxVLAPolicy"]


class OnnxVLAPolicy:
    """Closed-loop DiffusionVLA from its exported graphs."""

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
        if self.cfg["low_dim"] == "state":
            low = np.asarray(observation["state"], np.float32).reshape(-1)
        else:
            low = np.concatenate([np.asarray(observation["proprio"], np.float32).reshape(-1),
                                  np.asarray(observation["goal"], np.float32).reshape(-1)])
        if low.shape != (self.low_dim_size,) or not np.isfinite(low).all():
            raise ValueError(f"the observation's {self.cfg['low_dim']} vector must be {self.low_dim_size} finite numbers")
        feeds: dict[str, np.ndarray] = {"low_dim": low[None]}
        if self.cfg["use_image"]:
            s = self.cfg["image_size"]
            image = np.asarray(observation["image"])
            if image.shape != (s, s, 3):
                raise ValueError(f"expected an RGB image of shape ({s}, {s}, 3), got {image.shape}")
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
