"""DiffusionVLA: a language-instructed policy whose own reasoning steers a diffusion action head.

The structure follows DiffusionVLA (Wen et al., ICML 2025) with the injection
path of its public successor DexVLA, at a size that trains on a CPU:

1. A causal transformer (:class:`~diffpilot.policy.networks.reasoner.CausalReasoner`,
   trained from scratch) reads a prefix of image tokens (a small strided CNN),
   a proprio token and the instruction's words, then writes reasoning text
   (the current sub-goal and where the object is) greedily with a KV cache.
2. Its last-layer states are mean-pooled over the prompt (prefix) and over
   the reasoning tokens; each pool goes through its own Linear-GELU-Linear.
3. Zero-initialized FiLM joins them: ``prompt * (1 + scale(reasoning)) +
   shift(reasoning) + mean(raw prompt states)``; that vector, with the
   normalized proprio, is the global condition of a ConditionalUnet1D
   action head (chunk 16, DDPM 100 steps, squared-cosine, epsilon; DDIM 10
   at inference), or of a one-step MeanFlow head.
4. Loss = action loss + ``alpha`` x next-token cross-entropy on the
   teacher-forced annotated reasoning; both are logged.

Variants are config switches on the same class: ``reasoning: false`` (the
pooled prompt only, TinyVLA-style), ``instruction: onehot`` (a task id
replaces the words), ``use_image: false`` with ``low_dim: state`` (state only).
Reasoning is generated at an episode's start and every ``reason_every``
replans; in between, the kept reasoning is re-read under the new observation.
The tokenizer is a fixed word vocabulary (:mod:`diffpilot.policy.text`) built
from the training text and stored in the config; unknown words map to ``<unk>``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffpilot.data.normalizer import Normalizer
from diffpilot.policy.base import OptimGroup, PolicyBase
from diffpilot.policy.export_spec import ExportSpec
from diffpilot.policy.generative import build_objective, build_sampler
from diffpilot.policy.kinds import register_policy
from diffpilot.policy.networks import build_network
from diffpilot.policy.networks.reasoner import CausalReasoner
from diffpilot.policy.text import WordVocab
from diffpilot.policy.vla_observation import observation_arrays

__all__ = ["DiffusionVLAConfig", "DiffusionVLAPolicy", "ImageEncoder", "ReasoningInjection"]

LOW_DIM_SIZES = {"proprio": 7, "state": 39}  # hand xyz + gripper + goal xyz | the full Meta-World state
DEFAULT_NETWORK: dict[str, Any] = {"name": "unet1d", "down_dims": [32, 64, 128], "kernel_size": 5}
DEFAULT_OBJECTIVE: dict[str, Any] = {"name": "ddpm", "num_train_steps": 100, "schedule": "squaredcos_cap_v2",
                                     "prediction": "epsilon", "clip_sample": 1.0}
DEFAULT_SAMPLER: dict[str, Any] = {"name": "ddim", "num_steps": 10}
# A vocabulary for builds without data (tests, smoke runs); a trained policy stores the one built from its data.
FALLBACK_TEXT = ("pick place push reach open close the a to puck goal gripper ; , move above lower left right "
                 "ahead behind of is near far at")


@dataclass
class DiffusionVLAConfig:
    """``conf/policy/diffusion_vla.yaml``. ``vocab`` and ``tasks`` are filled from the training data."""

    vocab: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    image_size: int = 64
    use_image: bool = True
    keypoints: int = 0
    low_dim: str = "proprio"
    instruction: str = "text"
    reasoning: bool = True
    alpha: float = 1.0
    object_loss: float = 0.0
    object_input: bool = False
    object_noise: float = 0.0
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_instruction: int = 16
    max_reasoning: int = 32
    action_dim: int = 4
    action_horizon: int = 16
    exec_horizon: int = 8
    reason_every: int = 8
    image_shift: int = 4
    network: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_NETWORK))
    objective: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OBJECTIVE))
    sampler: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SAMPLER))


class SpatialSoftmax(nn.Module):
    """(B, C, H, W) features -> (B, K, 2) expected image coordinates in [-1, 1] of K learned keypoints.

    A 1x1 conv makes K attention maps; a softmax over the pixels (with a learned temperature per
    keypoint) turns each into a distribution whose mean is the keypoint's position. Positions come
    out as numbers, which an average pool of the same features would blur away (Levine et al. 2016).
    """

    def __init__(self, channels: int, keypoints: int) -> None:
        super().__init__()
        self.maps = nn.Conv2d(channels, keypoints, 1)
        self.log_temperature = nn.Parameter(torch.zeros(keypoints))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        logits = self.maps(x).flatten(2) * self.log_temperature.exp()[None, :, None]
        attention = logits.softmax(-1)  # (B, K, H*W)
        ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device)
        xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(h * w, 2)
        return attention @ grid


class ImageEncoder(nn.Module):
    """uint8 (B, S, S, 3) -> image tokens: four stride-2 convs with GroupNorm + Mish, a 4x4 grid of tokens.

    With ``keypoints > 0`` a spatial-softmax head on the 1/4-resolution features (after one more
    3x3 conv) adds a last token: the K keypoint positions, projected to ``d_model``. The policy also
    hands that token straight to the action head, so object positions reach it unpooled.
    """

    def __init__(self, image_size: int, d_model: int, keypoints: int = 0) -> None:
        super().__init__()
        if image_size % 16 or image_size < 32:
            raise ValueError(f"image_size must be a multiple of 16 and >= 32, got {image_size}")
        if keypoints < 0:
            raise ValueError(f"keypoints must be >= 0 (0: no keypoint token), got {keypoints}")

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.Mish()]

        self.net = nn.Sequential(*block(3, 32, 2), *block(32, 64, 2), *block(64, 128, 2),
                                 nn.Conv2d(128, d_model, 3, stride=2, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.keypoints = None
        if keypoints:
            self.keypoints = nn.Sequential(*block(64, 64, 1), SpatialSoftmax(64, keypoints), nn.Flatten(1),
                                           nn.Linear(2 * keypoints, d_model))
        self.n_tokens = 16 + (1 if keypoints else 0)

    def forward(self, image: Tensor) -> Tensor:
        x = self.net[:6](image.permute(0, 3, 1, 2).to(self.net[0].weight.dtype) / 255.0 - 0.5)  # 1/4 resolution
        tokens = self.pool(self.net[6:](x)).flatten(2).transpose(1, 2)
        if self.keypoints is None:
            return tokens
        return torch.cat([tokens, self.keypoints(x)[:, None]], dim=1)


def _mlp(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))


class ReasoningInjection(nn.Module):
    """Pooled prompt and reasoning states -> one condition vector (zero-initialized FiLM, DexVLA-style)."""

    def __init__(self, d_model: int, reasoning: bool) -> None:
        super().__init__()
        self.reasoning = reasoning
        self.prompt_mlp = _mlp(d_model)
        if reasoning:
            self.reasoning_mlp = _mlp(d_model)
            self.scale = nn.Linear(d_model, d_model)
            self.shift = nn.Linear(d_model, d_model)
            for layer in (self.scale, self.shift):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, prompt_pool: Tensor, reasoning_pool: Tensor | None) -> Tensor:
        prompt = self.prompt_mlp(prompt_pool)
        if not self.reasoning:
            return prompt + prompt_pool
        r = self.reasoning_mlp(reasoning_pool)
        return prompt * (1 + self.scale(r)) + self.shift(r) + prompt_pool


def _masked_mean(h: Tensor, keep: Tensor) -> Tensor:
    w = keep.to(h.dtype)[..., None]
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)


@register_policy("diffusion_vla")
class DiffusionVLAPolicy(PolicyBase):
    """Image + proprio + instruction -> reasoning text -> injected condition -> diffusion action chunk."""

    Config = DiffusionVLAConfig
    EMA_PART = None  # the reasoner and the head train jointly; a separate EMA of one part would split them
    EXPORTABLE = True
    TINY = {"image_size": 32, "d_model": 16, "n_layers": 1, "n_heads": 2, "max_instruction": 6, "max_reasoning": 6,
            "action_horizon": 8, "exec_horizon": 4, "reason_every": 2,
            "network": {"name": "unet1d", "down_dims": [8, 16], "kernel_size": 3, "n_groups": 4},
            "objective": {"name": "ddpm", "num_train_steps": 10}, "sampler": {"name": "ddim", "num_steps": 2}}

    def __init__(self, vocab: list[str] | None = None, tasks: list[str] | None = None, image_size: int = 64,
                 use_image: bool = True, keypoints: int = 0, low_dim: str = "proprio", instruction: str = "text",
                 reasoning: bool = True, alpha: float = 1.0, object_loss: float = 0.0, object_input: bool = False,
                 object_noise: float = 0.0, d_model: int = 128,
                 n_layers: int = 2, n_heads: int = 4, max_instruction: int = 16, max_reasoning: int = 32,
                 action_dim: int = 4, action_horizon: int = 16, exec_horizon: int = 8, reason_every: int = 8,
                 image_shift: int = 4,
                 network: dict[str, Any] | None = None, objective: dict[str, Any] | None = None,
                 sampler: dict[str, Any] | None = None) -> None:
        super().__init__()
        if low_dim not in LOW_DIM_SIZES:
            raise ValueError(f"low_dim must be one of {sorted(LOW_DIM_SIZES)}, got {low_dim!r}")
        if instruction not in ("text", "onehot"):
            raise ValueError(f"instruction must be 'text' or 'onehot', got {instruction!r}")
        if not use_image and low_dim != "state":
            raise ValueError("use_image=false needs low_dim=state: without the image only the state shows the objects")
        if not 1 <= exec_horizon <= action_horizon or reason_every < 1 or alpha < 0 or object_loss < 0:
            raise ValueError("need 1 <= exec_horizon <= action_horizon, reason_every >= 1, alpha >= 0 and "
                             "object_loss >= 0")
        if object_input and (not use_image or object_loss <= 0):
            raise ValueError("object_input=true estimates the object position from the image: it needs use_image=true "
                             "and object_loss > 0 (the estimate's training signal)")
        if object_noise < 0:
            raise ValueError(f"object_noise is a standard deviation in metres, >= 0; got {object_noise}")
        vocab = list(vocab) if vocab else WordVocab.build([FALLBACK_TEXT]).tokens
        tasks = list(tasks) if tasks else ["task"]
        network = dict(network or DEFAULT_NETWORK)
        objective = dict(objective or DEFAULT_OBJECTIVE)
        sampler = dict(sampler or DEFAULT_SAMPLER)
        self.config: dict[str, Any] = {
            "vocab": vocab, "tasks": tasks, "image_size": image_size, "use_image": use_image, "keypoints": keypoints,
            "low_dim": low_dim, "instruction": instruction, "reasoning": reasoning, "alpha": float(alpha),
            "object_loss": float(object_loss), "object_input": bool(object_input), "object_noise": float(object_noise),
            "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
            "max_instruction": max_instruction, "max_reasoning": max_reasoning, "action_dim": action_dim,
            "action_horizon": action_horizon, "exec_horizon": exec_horizon, "reason_every": reason_every, "image_shift": image_shift,
            "network": network, "objective": objective, "sampler": sampler,
        }
        self.vocab = WordVocab(vocab)
        self.tasks = tasks
        self.low_dim_size = LOW_DIM_SIZES[low_dim]
        self.action_dim, self.action_horizon, self.exec_horizon = action_dim, action_horizon, exec_horizon
        self.image = ImageEncoder(image_size, d_model, keypoints) if use_image else None
        self.low_dim_token = nn.Linear(self.low_dim_size, d_model)
        self.task_token = nn.Embedding(len(tasks), d_model) if instruction == "onehot" else None
        n_image = self.image.n_tokens if self.image is not None else 0
        # the keypoint token (the last image token) also joins the head's condition, unpooled
        self.keypoint_index = n_image - 1 if use_image and keypoints else None
        self.prefix_len = n_image + 1 + (1 if instruction == "onehot" else max_instruction)
        self.reasoner = CausalReasoner(len(self.vocab), d_model, n_layers, n_heads,
                                       max_len=self.prefix_len + max_reasoning + 1)
        self.inject = ReasoningInjection(d_model, reasoning)
        self.low_dim_normalizer = Normalizer(self.low_dim_size, "limits")
        self.action_normalizer = Normalizer(action_dim, "limits")
        cond_dim = d_model * (2 if self.keypoint_index is not None else 1) + self.low_dim_size + (3 if object_input else 0)
        self.head = build_network(network["name"], action_dim=action_dim, cond_dim=cond_dim,
                                  use_r=objective["name"] == "meanflow",
                                  **{k: v for k, v in network.items() if k != "name"})
        # the object position (state[4:7] of the demonstrations), regressed by object_loss: without object_input a
        # training-only linear probe on the head's condition; with it an estimate from the image tokens alone, which
        # the head reads (detached), so the position cannot be guessed from the hand's path instead of seen
        self.n_image_tokens = n_image
        if object_input:
            self.object_head = nn.Sequential(nn.Flatten(1), nn.Linear(n_image * d_model, 256), nn.Mish(),
                                             nn.Linear(256, 3))
        else:
            self.object_head = nn.Linear(cond_dim, 3) if object_loss > 0 else None
        self.object_normalizer = Normalizer(3, "limits") if object_loss > 0 else None
        self.objective = build_objective(objective["name"], **{k: v for k, v in objective.items() if k != "name"})
        self.sampler = build_sampler(sampler["name"], self.objective, **{k: v for k, v in sampler.items() if k != "name"})
        self._generator = torch.Generator().manual_seed(0)
        self._queue: deque[np.ndarray] = deque()
        self._replans = 0
        self._text: Tensor | None = None
        self.given_reasoning = False  # evaluation switch: read observation["reasoning"] instead of generating
        self.last_reasoning = ""
        self.last_timing: dict[str, float] = {}

    @classmethod
    def from_options(cls, options: dict[str, Any], obs_dim: int | None = None, action_dim: int | None = None) -> "DiffusionVLAPolicy":
        return cls(**options)

    # ------------------------------------------------------------------ inputs
    def tokenize_instruction(self, text: str) -> list[int]:
        """Instruction ids, cut to ``max_instruction`` (unknown words -> ``<unk>``)."""
        return self.vocab.encode(text)[: self.config["max_instruction"]]

    def tokenize_reasoning(self, text: str) -> list[int]:
        """``[<sep>, words..., <eos>]`` padded to ``max_reasoning + 1`` (long text is cut before ``<eos>``)."""
        n = self.config["max_reasoning"]
        ids = [self.vocab.sep, *self.vocab.encode(text)[: n - 1], self.vocab.eos]
        return ids + [self.vocab.pad] * (n + 1 - len(ids))

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this policy was trained on {self.tasks}")
        return self.tasks.index(task)

    def encode_batch(self, instructions: list[str], reasoning: list[str] | None, tasks: list[str] | None) -> dict[str, Tensor]:
        """Token tensors for a batch of texts: ``prompt`` (B, Li), ``text`` (B, Lr+1) and ``task`` (B,)."""
        li = self.config["max_instruction"]
        prompt = torch.full((len(instructions), li), self.vocab.pad, dtype=torch.long)
        for i, text in enumerate(instructions):
            ids = self.tokenize_instruction(text)
            prompt[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        out = {"prompt": prompt}
        if reasoning is not None:
            out["text"] = torch.tensor([self.tokenize_reasoning(r) for r in reasoning], dtype=torch.long)
        out["task"] = torch.tensor([self.task_index(t) for t in tasks] if tasks else [0] * len(instructions))
        return out

    def prefix(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B, P, d) prefix embeddings and (B, P) padding mask from image, low_dim and prompt/task."""
        low = self.low_dim_normalizer.normalize(batch["low_dim"].to(self.low_dim_token.weight.dtype))
        parts = [self.low_dim_token(low)[:, None]]
        if self.image is not None:
            parts.insert(0, self.image(batch["image"]))
        b = low.shape[0]
        ignore = [torch.zeros(b, sum(p.shape[1] for p in parts), dtype=torch.bool, device=low.device)]
        if self.task_token is not None:
            parts.append(self.task_token(batch["task"].long())[:, None])
            ignore.append(torch.zeros(b, 1, dtype=torch.bool, device=low.device))
        else:
            prompt = batch["prompt"].long()
            parts.append(self.reasoner.embed(prompt))
            ignore.append(prompt == self.vocab.pad)
        return torch.cat(parts, dim=1), torch.cat(ignore, dim=1)

    def condition(self, prefix: Tensor, prefix_ignore: Tensor, text: Tensor | None,
                  low_dim: Tensor) -> tuple[Tensor, Tensor | None]:
        """The action head's global condition and, with reasoning text, the reasoner's hidden states."""
        if text is None:
            text = torch.zeros(prefix.shape[0], 0, dtype=torch.long, device=prefix.device)
        text_ignore = text == self.vocab.pad
        hidden = self.reasoner(prefix, prefix_ignore, text, text_ignore)
        p = prefix.shape[1]
        prompt_pool = _masked_mean(hidden[:, :p], ~prefix_ignore)
        reasoning_pool = None
        if self.config["reasoning"]:
            keep = ~text_ignore & (text != self.vocab.sep)
            reasoning_pool = _masked_mean(hidden[:, p:], keep)
        cond = self.inject(prompt_pool, reasoning_pool)
        parts = [cond, self.low_dim_normalizer.normalize(low_dim.to(cond.dtype))]
        if self.keypoint_index is not None:
            parts.append(prefix[:, self.keypoint_index])
        if self.config["object_input"]:
            parts.append(self.object_condition(prefix))
        return torch.cat(parts, dim=-1), hidden

    def object_readout(self, prefix: Tensor, cond: Tensor) -> Tensor:
        """(B, 3) normalized object position that ``object_loss`` trains: the image estimate, else the probe on ``cond``."""
        return self.object_estimate(prefix) if self.config["object_input"] else self.object_head(cond)

    def object_estimate(self, prefix: Tensor) -> Tensor:
        """(B, 3) normalized object position read off the image tokens alone (``object_input=true``)."""
        return self.object_head(prefix[:, : self.n_image_tokens])

    def object_condition(self, prefix: Tensor) -> Tensor:
        """The estimate as the head sees it: detached, and in training jittered by ``object_noise`` metres."""
        estimate = self.object_estimate(prefix).detach()
        sigma = self.config["object_noise"]
        if self.training and sigma > 0:
            estimate = self.object_normalizer.normalize(
                self.object_normalizer.unnormalize(estimate) + sigma * torch.randn_like(estimate))
        return estimate

    # ----------------------------------------------------------------- training
    def fit_to_batch(self, batch: dict[str, Any]) -> None:
        """Fit the proprio, action (and object-position) normalizers on training rows."""
        low = np.asarray(batch["low_dim"], dtype=np.float32)
        if self.object_head is not None:
            if "object" not in batch:
                raise ValueError("object_loss > 0 needs the rows' object positions ('object', state[4:7])")
            obj = np.asarray(batch["object"], dtype=np.float32)
            self.object_normalizer.load_state_dict(Normalizer.fit(obj, "limits").state_dict())
        act = np.asarray(batch["action"], dtype=np.float32).reshape(-1, self.action_dim)
        self.low_dim_normalizer.load_state_dict(Normalizer.fit(low, "limits").state_dict())
        self.action_normalizer.load_state_dict(Normalizer.fit(act, "limits").state_dict())

    def _shift_images(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        """Random +-``image_shift`` pixel translations (edge-padded), the augmentation image policies need."""
        s = self.config["image_shift"]
        if s <= 0:
            return image
        b, h, w, _ = image.shape
        padded = F.pad(image.permute(0, 3, 1, 2).float(), (s, s, s, s), mode="replicate").permute(0, 2, 3, 1)
        dx = torch.randint(0, 2 * s + 1, (b,), generator=generator)
        dy = torch.randint(0, 2 * s + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]
        return padded[torch.arange(b)[:, None, None], rows, cols]

    def compute_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Diffusion loss on the action chunk + ``alpha`` x next-token CE on the annotated reasoning."""
        action = batch["action"].float()
        if action.shape[1:] != (self.action_horizon, self.action_dim):
            raise ValueError(f"expected action chunks (B, {self.action_horizon}, {self.action_dim}), got {tuple(action.shape)}")
        inputs = dict(batch)
        if self.image is not None:
            inputs["image"] = self._shift_images(batch["image"], generator) if self.training else batch["image"]
        prefix, ignore = self.prefix(inputs)
        text = batch["text"].long() if self.config["reasoning"] else None
        cond, hidden = self.condition(prefix, ignore, text, batch["low_dim"])
        target = self.action_normalizer.normalize(action)
        action_loss = self.objective.loss(self.head, target, cond, generator=generator)
        metrics = {"action_loss": float(action_loss.detach())}
        loss = action_loss
        if self.object_head is not None:
            target_obj = self.object_normalizer.normalize(batch["object"].to(cond.dtype))
            obj_loss = F.mse_loss(self.object_readout(prefix, cond), target_obj)
            loss = loss + self.config["object_loss"] * obj_loss
            metrics["object_loss"] = float(obj_loss.detach())
        if text is not None:
            p = prefix.shape[1]
            logits = self.reasoner.logits(hidden[:, p: p + text.shape[1] - 1])
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), text[:, 1:].reshape(-1),
                                 ignore_index=self.vocab.pad)
            loss = loss + self.config["alpha"] * ce
            metrics["reasoning_ce"] = float(ce.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def optim_groups(self) -> dict[str, OptimGroup]:
        return {"main": OptimGroup([p for p in self.parameters() if p.requires_grad])}

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        s, li, lr = self.config["image_size"], self.config["max_instruction"], self.config["max_reasoning"]
        n_vocab = len(self.vocab)
        prompt = torch.randint(5, n_vocab, (batch_size, li), generator=generator)
        prompt[:, li // 2 + 1:] = self.vocab.pad
        text = torch.randint(5, n_vocab, (batch_size, lr + 1), generator=generator)
        text[:, 0] = self.vocab.sep
        text[:, lr // 2] = self.vocab.eos
        text[:, lr // 2 + 1:] = self.vocab.pad
        out = {
            "low_dim": torch.randn(batch_size, self.low_dim_size, generator=generator),
            "prompt": prompt, "text": text,
            "task": torch.randint(0, len(self.tasks), (batch_size,), generator=generator),
            "action": torch.rand(batch_size, self.action_horizon, self.action_dim, generator=generator) * 2 - 1,
            "object": torch.rand(batch_size, 3, generator=generator) * 2 - 1,
        }
        if self.image is not None:
            out["image"] = torch.randint(0, 256, (batch_size, s, s, 3), generator=generator, dtype=torch.uint8)
        return out

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def generate(self, prefix: Tensor, prefix_ignore: Tensor) -> Tensor:
        """Greedy reasoning ``[<sep>, ..., <eos>, <pad>...]`` (B, Lr+1), decoded with the KV cache."""
        b, n = prefix.shape[0], self.config["max_reasoning"]
        sep = torch.full((b,), self.vocab.sep, dtype=torch.long, device=prefix.device)
        seq = torch.cat([prefix, self.reasoner.embed(sep)[:, None]], dim=1)
        ignore = torch.cat([prefix_ignore, torch.zeros(b, 1, dtype=torch.bool, device=prefix.device)], dim=1)
        hidden, keys, values = self.reasoner.prefill(seq, ignore)
        token = self.reasoner.logits(hidden[:, -1]).argmax(-1)
        out = [sep]
        done = torch.zeros(b, dtype=torch.bool, device=prefix.device)
        for i in range(n):
            token = torch.where(done, torch.full_like(token, self.vocab.pad), token)
            if i == n - 1:  # the last slot can only close the text
                token = torch.where(done, token, torch.full_like(token, self.vocab.eos))
            out.append(token)
            done = done | (token == self.vocab.eos)
            if bool(done.all()) or i == n - 1:
                break
            position = torch.tensor(seq.shape[1] + i, dtype=torch.long)
            logits, _, keys, values = self.reasoner.step(token, position, keys, values, ignore)
            ignore = torch.cat([ignore, torch.zeros(b, 1, dtype=torch.bool, device=prefix.device)], dim=1)
            token = logits.argmax(-1)
        text = torch.stack(out, dim=1)
        pad = torch.full((b, n + 1 - text.shape[1]), self.vocab.pad, dtype=torch.long, device=prefix.device)
        return torch.cat([text, pad], dim=1)

    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.action_horizon, self.action_dim)

    @torch.no_grad()
    def sample_actions(self, cond: Tensor, noise: Tensor) -> Tensor:
        """Denoise a chunk for ``cond`` from ``noise``; actions in environment units."""
        return self.action_normalizer.unnormalize(self.sampler.sample(self.head, noise, cond).sample)

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """Action chunks (B, H, A): generate the reasoning (unless ``batch["text"]`` is given), then sample."""
        prefix, ignore = self.prefix(batch)
        text = None
        if self.config["reasoning"]:
            text = batch["text"].long() if "text" in batch else self.generate(prefix, ignore)
        cond, _ = self.condition(prefix, ignore, text, batch["low_dim"])
        if noise is None:
            noise = torch.randn(self.noise_shape(cond.shape[0]), generator=self._generator)
        return self.sample_actions(cond, noise.to(cond))

    def reset(self, seed: int | None = None) -> None:
        self._queue.clear()
        self._replans = 0
        self._text = None
        self.last_reasoning = ""
        if seed is not None:
            self._generator.manual_seed(seed)

    def observation_batch(self, observation: Mapping[str, Any]) -> dict[str, Tensor]:
        """One observation dict (image, proprio, goal, state, instruction, task) -> a batch of one, checked."""
        low, image = observation_arrays(
            observation, low_dim=self.config["low_dim"], low_dim_size=self.low_dim_size,
            image_size=self.config["image_size"] if self.image is not None else None, onehot=self.task_token is not None)
        task = observation.get("task")
        batch = self.encode_batch([str(observation.get("instruction", ""))], None,
                                  [str(task)] if self.task_token is not None else None)
        batch["low_dim"] = torch.from_numpy(low)[None]
        if self.image is not None:
            batch["image"] = torch.from_numpy(image)[None]
        return batch

    @torch.no_grad()
    def act(self, observation: Mapping[str, Any]) -> np.ndarray:
        """One action; replans a chunk when the last one's ``exec_horizon`` actions are spent."""
        if not self._queue:
            self._queue.extend(self.plan_chunk(observation)[: self.exec_horizon])
        return self._queue.popleft()

    @torch.no_grad()
    def plan_chunk(self, observation: Mapping[str, Any]) -> np.ndarray:
        """A fresh (H, A) chunk; regenerates the reasoning on every ``reason_every``-th replan."""
        batch = self.observation_batch(observation)
        t0 = time.perf_counter()
        prefix, ignore = self.prefix(batch)
        reason_ms = 0.0
        if self.config["reasoning"]:
            if self.given_reasoning:
                self._text = torch.tensor([self.tokenize_reasoning(str(observation.get("reasoning", "")))])
            elif self._text is None or self._replans % self.config["reason_every"] == 0:
                self._text = self.generate(prefix, ignore)
                reason_ms = (time.perf_counter() - t0) * 1000
            self.last_reasoning = self.vocab.decode(self._text[0, 1:].tolist())
        cond, _ = self.condition(prefix, ignore, self._text, batch["low_dim"])
        noise = torch.randn(self.noise_shape(1), generator=self._generator)
        chunk = self.sample_actions(cond, noise)[0].numpy()
        total_ms = (time.perf_counter() - t0) * 1000
        self.last_timing = {"reason_ms": reason_ms, "action_ms": total_ms - reason_ms}
        self._replans += 1
        return chunk

    # ------------------------------------------------------------------ export
    def export_spec(self, sampler: dict[str, Any] | None = None, *, part: str = "action") -> ExportSpec:
        """ONNX forms: ``action`` (observation + prompt + reasoning ids + noise -> actions, with the
        injection and the unrolled sampler inside), ``prefill`` and ``step`` (the reasoner's cached decoding)."""
        from diffpilot.policy import vla_export

        return vla_export.export_spec(self, sampler, part)

    def example_observation(self, rng: np.random.Generator) -> dict[str, Any]:
        """A random observation dict in ``act``'s format (tests, tracing)."""
        s = self.config["image_size"]
        return {"image": rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
                "proprio": rng.normal(size=4).astype(np.float32), "goal": rng.normal(size=3).astype(np.float32),
                "state": rng.normal(size=39).astype(np.float32), "instruction": "pick the puck",
                "task": self.tasks[0]}
