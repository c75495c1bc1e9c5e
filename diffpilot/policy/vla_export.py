"""The ONNX forms of a DiffusionVLA policy: the action path and the reasoner's cached decoding.

Three graphs, so the torch-free runtime runs the whole policy:

- ``action`` (the main file): image (B, S, S, 3) float 0..255, ``low_dim``,
  ``prompt`` ids (or ``task`` ids for a one-hot policy), ``text`` (the
  reasoning ids, with reasoning) and ``noise`` -> ``actions`` (B, H, A). The
  image encoder, the reasoner's re-read of the kept reasoning, the injection
  and the unrolled sampler are inside.
- ``prefill``: the observation prefix + ``<sep>`` -> first-token ``logits``
  and the cache ``keys``/``values`` (layers, B, heads, L, head_dim).
- ``step``: ``token``, ``position``, cache ``keys``/``values``, ``ignore``
  (B, L) -> ``logits`` and ``next_keys``/``next_values`` (the cache grown by one).

Greedy decoding is a short loop over ``step`` in the runtime
(:mod:`diffpilot.export.runtime`); the files sit next to each other as
``<stem>.onnx``, ``<stem>.prefill.onnx`` and ``<stem>.step.onnx``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from diffpilot.policy.export_spec import ExportSpec, stochastic_sampler
from diffpilot.policy.generative import build_sampler

__all__ = ["RUNTIME_VLA", "VLA_PARTS", "export_spec"]

RUNTIME_VLA = "vla_policy"
"""Metadata ``kind`` of every DiffusionVLA graph, run by ``diffpilot.export.runtime.OnnxVLAPolicy``."""
VLA_PARTS = ("action", "prefill", "step")


class _ActionGraph(nn.Module):
    def __init__(self, policy: Any, sampler: Any) -> None:
        super().__init__()
        self.policy, self.sampler = policy, sampler

    def forward(self, noise: Tensor, low_dim: Tensor, image: Tensor | None = None, prompt: Tensor | None = None,
                task: Tensor | None = None, text: Tensor | None = None) -> Tensor:
        p = self.policy
        prefix, ignore = p.prefix({"image": image, "low_dim": low_dim, "prompt": prompt, "task": task})
        cond, _ = p.condition(prefix, ignore, text, low_dim)
        return p.action_normalizer.unnormalize(self.sampler.sample(p.head, noise, cond).sample)


class _PrefillGraph(nn.Module):
    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, low_dim: Tensor, image: Tensor | None = None, prompt: Tensor | None = None,
                task: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        p = self.policy
        prefix, ignore = p.prefix({"image": image, "low_dim": low_dim, "prompt": prompt, "task": task})
        sep = torch.full_like(low_dim[:, 0], p.vocab.sep, dtype=torch.long)
        seq = torch.cat([prefix, p.reasoner.embed(sep)[:, None]], dim=1)
        ignore = torch.cat([ignore, torch.zeros_like(ignore[:, :1])], dim=1)
        hidden, keys, values = p.reasoner.prefill(seq, ignore)
        return p.reasoner.logits(hidden[:, -1]), keys, values


class _StepGraph(nn.Module):
    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, token: Tensor, position: Tensor, keys: Tensor, values: Tensor,
                ignore: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, _, keys, values = self.policy.reasoner.step(token, position, keys, values, ignore)
        return logits, keys, values


def _observation_feeds(policy: Any, b: int, g: torch.Generator) -> dict[str, Tensor]:
    ex = policy.example_batch(b, g)
    # low_dim in the data's range, so the normalizer sees realistic values
    low = policy.low_dim_normalizer.unnormalize(torch.rand(b, policy.low_dim_size, generator=g) * 2 - 1)
    out: dict[str, Tensor] = {"low_dim": low}
    if policy.image is not None:
        out["image"] = ex["image"].float()
    if policy.task_token is not None:
        out["task"] = ex["task"]
    else:
        out["prompt"] = ex["prompt"]
    return out


def export_spec(policy: Any, sampler: dict[str, Any] | None, part: str) -> ExportSpec:
    """The :class:`ExportSpec` of one part; ``action`` carries the other two as companions."""
    if part not in VLA_PARTS:
        raise ValueError(f"part must be one of {VLA_PARTS}, got {part!r}")
    cfg = policy.config
    meta = {"kind": RUNTIME_VLA, "form": part, "policy_kind": policy.KIND,
            **{k: v for k, v in _metadata(policy).items()}}
    if part == "prefill":
        if not cfg["reasoning"]:
            raise ValueError("this policy has no reasoning to decode (reasoning=false)")
        return ExportSpec(_PrefillGraph(policy), lambda b, g: _observation_feeds(policy, b, g),
                          ("logits", "keys", "values"), meta | {"sampler": "{}"}, 1)
    if part == "step":
        if not cfg["reasoning"]:
            raise ValueError("this policy has no reasoning to decode (reasoning=false)")
        return ExportSpec(_StepGraph(policy), lambda b, g: _step_feeds(policy, b, g), ("logits", "next_keys", "next_values"),
                          meta | {"sampler": "{}"}, 1, batch_axes={"keys": 1, "values": 1, "position": None},
                          extra_axes={"keys": {3: "cache"}, "values": {3: "cache"}, "ignore": {1: "cache"}})
    sampler_cfg = dict(sampler) if sampler else dict(cfg["sampler"])
    built = build_sampler(sampler_cfg["name"], policy.objective, **{k: v for k, v in sampler_cfg.items() if k != "name"})
    if stochastic_sampler(built):
        raise ValueError(f"the VLA export needs a deterministic sampler (ddim, euler, heun, meanflow); got "
                         f"{sampler_cfg['name']!r} which draws fresh noise at each step")
    h, a = policy.action_horizon, policy.action_dim

    def feeds(b: int, g: torch.Generator) -> dict[str, Tensor]:
        out = {"noise": torch.randn(b, h, a, generator=g)} | _observation_feeds(policy, b, g)
        if cfg["reasoning"]:
            out["text"] = policy.example_batch(b, g)["text"]
        return out

    with torch.no_grad():
        probe = feeds(1, torch.Generator().manual_seed(0))
        prefix, ignore = policy.prefix(probe)
        cond, _ = policy.condition(prefix, ignore, probe.get("text"), probe["low_dim"])
        nfe = built.sample(policy.head, probe["noise"], cond).nfe
    companions = {}
    if cfg["reasoning"]:
        companions = {name: export_spec(policy, None, name) for name in ("prefill", "step")}
    meta |= {"sampler": json.dumps(sampler_cfg, sort_keys=True), "companions": json.dumps(sorted(companions))}
    return ExportSpec(_ActionGraph(policy, built), feeds, ("actions",), meta, nfe, companions=companions)


def _step_feeds(policy: Any, b: int, g: torch.Generator) -> dict[str, Tensor]:
    """A realistic cache: the prefill of a random observation, then one decoded position."""
    obs = _observation_feeds(policy, b, g)
    with torch.no_grad():
        logits, keys, values = _PrefillGraph(policy)(**obs)
    ignore = torch.zeros(b, keys.shape[3], dtype=torch.bool)
    if "prompt" in obs:
        n_fixed = keys.shape[3] - 1 - obs["prompt"].shape[1]
        ignore[:, n_fixed: n_fixed + obs["prompt"].shape[1]] = obs["prompt"] == policy.vocab.pad
    return {"token": logits.argmax(-1), "position": torch.tensor(keys.shape[3], dtype=torch.long),
            "keys": keys, "values": values, "ignore": ignore}


def _metadata(policy: Any) -> dict[str, str]:
    cfg = policy.config
    sizes = {k: cfg[k] for k in ("image_size", "use_image", "low_dim", "instruction", "reasoning", "max_instruction",
                                 "max_reasoning", "action_dim", "action_horizon", "exec_horizon", "reason_every")}
    return {"vocab": json.dumps(cfg["vocab"]), "tasks": json.dumps(cfg["tasks"]), "vla": json.dumps(sizes),
            "prefix_len": str(policy.prefix_len), "low_dim_size": str(policy.low_dim_size)}
