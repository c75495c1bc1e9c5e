"""NAVSIM's ego-status MLP baseline as a registered policy: ego status + command (+ ego past) -> future poses.

It sees no agents and no map, so it shows how much an open-loop metric can be
won without perception. Inputs and outputs are standardized inside the
module (buffers, saved with the weights); training masks waypoints where
``ego_future_valid`` is False. It trains through the one trainer like every
other kind (Adam at ``lr``, constant, no clipping, no EMA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from diffpilot.data.errors import DatasetError
from diffpilot.data.normalizer import Normalizer
from diffpilot.data.scenario import COMMANDS, SampleSpec, SceneSample, wrap_angle
from diffpilot.policy.base import OptimGroup, PolicyBase
from diffpilot.policy.generative import shard
from diffpilot.policy.kinds import register_policy

__all__ = ["EgoStatusMLPConfig", "EgoStatusMLPPlanner"]


@dataclass
class EgoStatusMLPConfig:
    """``conf/policy/ego_status_mlp.yaml``."""

    future_steps: int = SampleSpec.future_steps
    past_steps: int = SampleSpec.past_steps
    use_past: bool = False
    hidden: int = 256
    depth: int = 3
    lr: float = 1e-3
    seed: int = 0


@register_policy("ego_status_mlp")
class EgoStatusMLPPlanner(PolicyBase):
    """``[speed, accel, yaw rate, one-hot command (, ego past)] -> (F, 3)`` future poses in the ego frame."""

    Config = EgoStatusMLPConfig
    OWN_TRAIN_KEYS: ClassVar[dict[str, str]] = {
        "lr": "policy.lr", "weight_decay": "nothing (Adam without decay)", "warmup_steps": "nothing (constant lr)",
        "schedule": "nothing (constant lr)", "grad_clip": "nothing (no clipping)", "ema_decay": "nothing (no EMA)",
    }
    TINY: ClassVar[dict[str, Any]] = {"hidden": 16, "depth": 1, "use_past": True}

    def __init__(
        self,
        future_steps: int = SampleSpec.future_steps,
        past_steps: int = SampleSpec.past_steps,
        use_past: bool = False,
        hidden: int = 256,
        depth: int = 3,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if future_steps < 1 or past_steps < 0 or hidden < 1 or depth < 1:
            raise ValueError(
                f"need future_steps >= 1, past_steps >= 0, hidden >= 1, depth >= 1; got {future_steps}, "
                f"{past_steps}, {hidden}, {depth}"
            )
        self.future_steps, self.past_steps, self.use_past = int(future_steps), int(past_steps), bool(use_past)
        self.hidden, self.depth, self.lr, self.seed = int(hidden), int(depth), float(lr), int(seed)
        self.in_dim = 3 + len(COMMANDS) + (3 * self.past_steps if self.use_past else 0)
        self.out_dim = 3 * self.future_steps
        self.config = {"future_steps": self.future_steps, "past_steps": self.past_steps, "use_past": self.use_past,
                       "hidden": self.hidden, "depth": self.depth, "lr": self.lr, "seed": self.seed}
        self.in_norm = Normalizer(self.in_dim, "gaussian")
        self.out_norm = Normalizer(self.out_dim, "gaussian")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            layers: list[nn.Module] = []
            d = self.in_dim
            for _ in range(self.depth):
                layers += [nn.Linear(d, self.hidden), nn.ReLU()]
                d = self.hidden
            layers.append(nn.Linear(d, self.out_dim))
            self.net = nn.Sequential(*layers)
        self.eval()

    @classmethod
    def from_options(cls, options: dict[str, Any], obs_dim: int | None = None, action_dim: int | None = None) -> "EgoStatusMLPPlanner":
        """Its sizes come from the scene-sample spec in ``options``, not from a gym task."""
        return cls(**options)

    # -- features
    def features(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Input rows ``(B, in_dim)`` from stacked SceneSample arrays."""
        for key in ("ego_status", "command") + (("ego_past",) if self.use_past else ()):
            if key not in arrays:
                raise DatasetError(f"arrays lack {key!r} (have {sorted(arrays)}); pass stack_samples(...) output")
        status = np.asarray(arrays["ego_status"], dtype=np.float64)
        command = np.asarray(arrays["command"]).astype(np.int64).reshape(-1)
        if status.ndim != 2 or status.shape[1] != 3 or len(command) != len(status):
            raise DatasetError(f"ego_status must be (B, 3) and command (B,), got {status.shape} and {command.shape}")
        if ((command < 0) | (command >= len(COMMANDS))).any():
            raise DatasetError(f"command indices must lie in [0, {len(COMMANDS)}) (one of {COMMANDS})")
        parts = [status, np.eye(len(COMMANDS))[command]]
        if self.use_past:
            past = np.asarray(arrays["ego_past"], dtype=np.float64)
            if past.shape[1:] != (self.past_steps + 1, 3):
                raise DatasetError(
                    f"ego_past has shape {past.shape[1:]} per sample, this planner expects "
                    f"({self.past_steps + 1}, 3); build it with past_steps={past.shape[1] - 1} or match the data"
                )
            parts.append(past[:, :-1].reshape(len(past), -1))  # the last row is the origin
        x = np.concatenate(parts, axis=1)
        if not np.isfinite(x).all():
            raise DatasetError("non-finite values in ego_status / ego_past; clean the data set first")
        return x

    def _targets(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if "ego_future" not in arrays:
            raise DatasetError(f"arrays lack 'ego_future' (have {sorted(arrays)}); pass stack_samples(...) output")
        fut = np.asarray(arrays["ego_future"], dtype=np.float64)
        if fut.shape[1:] != (self.future_steps, 3):
            raise DatasetError(
                f"ego_future has shape {fut.shape[1:]} per sample, this planner predicts ({self.future_steps}, 3); "
                f"construct it with future_steps={fut.shape[1]}"
            )
        valid = np.asarray(arrays.get("ego_future_valid", np.ones(fut.shape[:2], bool)), dtype=bool)
        fut = np.where(valid[..., None], fut, 0.0)
        if not np.isfinite(fut).all():
            raise DatasetError("non-finite values in ego_future; clean the data set first")
        mask = np.repeat(valid[..., None], 3, axis=2).reshape(len(fut), -1)
        return fut.reshape(len(fut), -1), mask

    def training_rows(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The trainer's rows from stacked SceneSample arrays: ``x`` features, ``y`` flat future, ``mask``."""
        x = self.features(arrays)
        y, m = self._targets(arrays)
        if len(x) != len(y):
            raise DatasetError(f"{len(x)} input rows but {len(y)} ego_future rows")
        return {"x": x.astype(np.float32), "y": y.astype(np.float32), "mask": m.astype(np.float32)}

    def fit_to_batch(self, rows: dict[str, np.ndarray | Tensor]) -> None:
        """Fit both normalizers on training rows (outputs on rows whose whole future is valid)."""
        x, y, m = (np.asarray(rows[k], dtype=np.float64) for k in ("x", "y", "mask"))
        full = m.all(axis=1)
        self.in_norm.load_state_dict(Normalizer.fit(x, "gaussian").state_dict())
        self.out_norm.load_state_dict(Normalizer.fit(y[full] if full.any() else y, "gaussian").state_dict())

    # -- the contract
    def compute_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Masked squared error in the standardized output space."""
        pred = self.net(self.in_norm.normalize(batch["x"]))
        err = (pred - self.out_norm.normalize(batch["y"])) ** 2 * batch["mask"]
        loss = err.sum() / shard.shard_mean(batch["mask"].sum()).clamp_min(1.0)
        return loss, {"loss": float(loss.detach())}

    def optim_groups(self) -> dict[str, OptimGroup]:
        return {"net": OptimGroup(list(self.net.parameters()), lr=self.lr, weight_decay=0.0, grad_clip=0.0,
                                  schedule="constant")}

    def example_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        b = batch_size
        command = torch.randint(len(COMMANDS), (b,), generator=generator).numpy()
        arrays = {
            "ego_status": torch.randn((b, 3), generator=generator).double().numpy(),
            "command": command,
            "ego_past": torch.randn((b, self.past_steps + 1, 3), generator=generator).double().numpy(),
            "ego_future": torch.randn((b, self.future_steps, 3), generator=generator).double().numpy(),
        }
        return {k: torch.from_numpy(v) for k, v in self.training_rows(arrays).items()}

    def noise_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, 0)  # deterministic: no noise

    # -- inference
    @torch.no_grad()
    def plan_batch(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Batched plans ``(B, F, 3)`` from stacked SceneSample arrays."""
        x = torch.as_tensor(self.features(arrays), dtype=torch.float32)
        return self._poses(self.predict({"x": x}))

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """Flat future poses ``(B, 3F)`` for feature rows ``batch["x"]`` (``noise`` is ignored: deterministic)."""
        x = batch["x"] if "x" in batch else batch["obs"]
        return self.out_norm.unnormalize(self.net(self.in_norm.normalize(x.to(self.in_norm.scale))))

    def _poses(self, flat: Tensor) -> np.ndarray:
        out = flat.double().numpy().reshape(len(flat), self.future_steps, 3)
        out[..., 2] = wrap_angle(out[..., 2])
        return out

    def reset(self, seed: int | None = None) -> None:
        return None

    def plan(self, sample: SceneSample) -> np.ndarray:
        """Ego-frame poses ``(F, 3)`` from what the car knows now (ego status, command, ego past)."""
        arrays = {
            "ego_status": np.asarray(sample.ego_status)[None],
            "command": np.asarray([sample.command]),
            "ego_past": np.asarray(sample.ego_past)[None],
        }
        return self.plan_batch(arrays)[0]

    def act(self, observation: np.ndarray) -> np.ndarray:
        """One feature row -> flat future poses (the gym-style front-end over ``predict``)."""
        x = torch.as_tensor(np.asarray(observation, dtype=np.float32))[None]
        return self.predict({"x": x})[0].numpy()
