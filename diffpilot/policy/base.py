"""The one policy contract: what the trainer, the runners, the exporter and the CLI rely on.

Every learned policy is a :class:`PolicyBase` registered under a kind (see
:mod:`diffpilot.policy.registry`). Training meets it at three points:
``optim_groups`` (which parameters each optimizer owns, with its settings),
``compute_loss`` (a scalar loss and the metrics to log) and ``train_step``
(one gradient step; the generic version serves every policy trained on one
loss, actor-critic methods override it). Acting and planning meet it at
``reset`` and a batched ``predict``; ``act`` (gym tasks) and ``plan``
(driving) are thin front-ends over ``predict``. ``save``/``load`` are written
here once: safetensors weights + the policy's plain config + its kind.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from diffpilot.policy.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from diffpilot.policy.export_spec import ExportSpec
from diffpilot.policy.generative import shard
from diffpilot.policy.kinds import POLICIES

__all__ = ["OptimGroup", "Policy", "PolicyBase"]


@dataclass
class OptimGroup:
    """The parameters one optimizer owns and its settings; ``None`` takes the trainer's value."""

    params: list[nn.Parameter]
    lr: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None  # 0: no clipping
    schedule: str | None = None  # "cosine" (with warmup) or "constant"
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0  # cosine decays to this fraction of lr


@runtime_checkable
class Policy(Protocol):
    """What a closed-loop runner needs: per-episode ``reset`` and one action per observation."""

    def reset(self, seed: int | None = None) -> None: ...

    def act(self, observation: np.ndarray) -> np.ndarray: ...


class PolicyBase(nn.Module):
    """A learned policy of one registered kind.

    Subclasses set ``KIND`` (by :func:`~diffpilot.policy.registry.register_policy`),
    ``Config`` (the dataclass their YAML maps onto), keep their full
    constructor arguments in ``self.config`` (so ``cls(**config)`` rebuilds
    them) and implement ``compute_loss`` and ``predict``.

    ``EMA_PART`` names the sub-module whose exponential moving average the
    trainer keeps and saves as the acting policy (``None``: the policy keeps
    any EMA it needs itself, e.g. an actor-critic's target actor).
    """

    KIND: ClassVar[str] = ""
    Config: ClassVar[type]
    EMA_PART: ClassVar[str | None] = None
    # Options for a tiny build of this kind (tests, smoke runs): a few thousand parameters.
    TINY: ClassVar[dict[str, Any]] = {}
    # Whether this kind describes an ONNX export (``export_spec``) that works with its TINY options.
    EXPORTABLE: ClassVar[bool] = False
    # Trainer settings this kind fixes itself (e.g. per-group learning rates); a user value for them is refused.
    OWN_TRAIN_KEYS: ClassVar[dict[str, str]] = {}

    config: dict[str, Any]

    @classmethod
    def from_options(cls, options: dict[str, Any], obs_dim: int | None = None, action_dim: int | None = None) -> "PolicyBase":
        """A new policy from its Config options; gym kinds also take the task's observation and action sizes."""
        return cls(obs_dim, action_dim, **options)

    # ----------------------------------------------------------------- training
    def fit_normalizers(self, observations: np.ndarray, actions: np.ndarray) -> None:
        """Fit the in-model normalizers on the training data (before training)."""
        raise NotImplementedError

    def fit_to_batch(self, batch: dict[str, Any]) -> None:
        """Fit the normalizers on rows in the training-batch format (gym kinds: ``obs`` and ``action``)."""
        obs, action = np.asarray(batch["obs"]), np.asarray(batch["action"])
        self.fit_normalizers(obs.reshape(-1, obs.shape[-1]), action.reshape(-1, action.shape[-1]))

    def compute_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """The training loss on a raw batch and the metrics to log (floats)."""
        raise NotImplementedError

    def optim_groups(self) -> dict[str, OptimGroup]:
        """One optimizer per group; the default is one group over every trainable parameter."""
        return {"main": OptimGroup([p for p in self.parameters() if p.requires_grad])}

    def train_step(
        self, batch: dict[str, Tensor], optimizers: dict[str, torch.optim.Optimizer], groups: dict[str, OptimGroup],
        step: int, generator: torch.Generator,
    ) -> dict[str, float]:
        """One gradient step on every optimizer from ``compute_loss``; the one override point for other updates."""
        loss, metrics = self.compute_loss(batch, generator)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, opt in optimizers.items():
            self.optimizer_step(opt, groups[name])
        return metrics

    @staticmethod
    def optimizer_step(opt: torch.optim.Optimizer, group: OptimGroup) -> None:
        """Step ``opt`` on the gradients already in ``group``: averaged over the processes of a
        data-parallel run (:mod:`~diffpilot.policy.generative.shard`), clipped to the group's norm.

        Every optimizer step of every kind goes through here, so gradients are
        synchronized however they were computed (``torch.func.jvp`` included).
        """
        shard.sync_gradients(group.params)
        if (group.grad_clip or 0.0) > 0:
            nn.utils.clip_grad_norm_(group.params, float(group.grad_clip))
        opt.step()

    @staticmethod
    def gradient_step(opt: torch.optim.Optimizer, loss: Tensor, group: OptimGroup) -> None:
        """Zero, backpropagate ``loss``, then :meth:`optimizer_step`."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        PolicyBase.optimizer_step(opt, group)

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        """A random training batch in this policy's input format (for tests, tracing and smoke runs)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ acting
    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        """Shape of the initial noise ``predict`` takes for a batch."""
        raise NotImplementedError

    def predict(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """Samples for a batch of conditions; ``noise`` fixes the initial noise (deterministic given it)."""
        raise NotImplementedError

    def reset(self, seed: int | None = None) -> None:
        """Clear per-episode state; ``seed`` reseeds the policy's own generator."""
        raise NotImplementedError

    # ------------------------------------------------------------------ export
    def export_spec(self, sampler: dict[str, Any] | None = None, **options: Any) -> ExportSpec:
        """The inference path to export (graph, inputs, outputs, metadata): see :mod:`diffpilot.policy.export_spec`.

        ``sampler`` overrides the policy's sampler for the export where the kind
        allows it. Raises ``ValueError`` naming the reason when this policy (or
        this configuration of it) has no ONNX form.
        """
        exportable = ", ".join(sorted(k for k, c in POLICIES.items() if getattr(c, "EXPORTABLE", False)))
        raise ValueError(f"a {self.KIND!r} policy has no ONNX export; exportable kinds: {exportable}")

    # ------------------------------------------------------------------ storage
    def save(self, directory: str | Path) -> Path:
        """Weights (safetensors) + config (YAML) + kind, written atomically."""
        return save_checkpoint(directory, self.state_dict(), copy.deepcopy(self.config), kind=self.KIND)

    @classmethod
    def load(cls, directory: str | Path) -> "PolicyBase":
        """The policy saved in ``directory``; refuses a checkpoint of another kind by name."""
        tensors, config = load_checkpoint(directory, kind=cls.KIND)
        policy = cls(**config)
        load_state_strict(policy, tensors, directory)
        return policy.eval()
