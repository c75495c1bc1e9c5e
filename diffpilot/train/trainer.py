"""The one training loop: every registered policy kind trains, evaluates and resumes through it.

Per step it draws a batch of rows from the data source with its own numpy
generator, hands it to ``policy.train_step`` with the optimizers built from
``policy.optim_groups()`` and an explicit torch generator for the
objective's noise, steps each group's learning-rate schedule and the EMA of
the policy's ``EMA_PART``. Every ``log_every`` steps it logs the mean of the
metrics the policy returned (any columns), every ``eval_every`` steps (and at
the end) it evaluates the acting policy through the evaluator passed in and
keeps the best. Everything needed to resume is written to ``out/state``:
a run interrupted after a checkpoint and resumed ends with exactly the
weights of an uninterrupted one.

Outputs in ``out``: ``policy/`` (the acting policy, last), ``best/`` (with an
evaluator), ``state/``, ``train_log.csv``, ``curves.png``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffpilot.policy.base import OptimGroup, PolicyBase
from diffpilot.policy.checkpoint import CheckpointError
from diffpilot.train import distributed
from diffpilot.train.log import plot_log, write_log
from diffpilot.train.state import restore_state, save_state

__all__ = ["BatchSource", "Evaluator", "check_settings", "fit", "TensorRows", "TrainResult", "Trainer", "TrainerConfig", "train"]

# Defaults of the settings a policy may instead fix per optimizer group (OptimGroup / OWN_TRAIN_KEYS).
GROUP_DEFAULTS: dict[str, float] = {"lr": 1e-3, "weight_decay": 1e-6, "warmup_steps": 100, "ema_decay": 0.995, "grad_clip": 1.0}
SCHEDULES = ("cosine", "constant")


class BatchSource(Protocol):
    """Training rows: a length and a gather of rows into named arrays.

    A source may also carry ``weights``: per-row sampling probabilities (e.g. equal mass per task), which the
    trainer then draws rows by instead of uniformly.
    """

    def __len__(self) -> int: ...

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray | Tensor]: ...


class TensorRows:
    """A :class:`BatchSource` over named arrays of equal length (e.g. offline-RL transitions).

    ``weights`` (optional, one non-negative number per row) makes the trainer draw rows in proportion to them.
    """

    def __init__(self, arrays: dict[str, np.ndarray | Tensor], weights: np.ndarray | None = None) -> None:
        self.arrays = {k: torch.as_tensor(v) for k, v in arrays.items()}
        sizes = {k: int(v.shape[0]) for k, v in self.arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"training arrays differ in length: {sizes}")
        self._n = next(iter(sizes.values()))
        self.weights: np.ndarray | None = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64).reshape(-1)
            if w.shape[0] != self._n or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"row weights must be {self._n} finite non-negative numbers with a positive sum")
            self.weights = w / w.sum()

    def __len__(self) -> int:
        return self._n

    def batch(self, rows: np.ndarray) -> dict[str, Tensor]:
        idx = torch.from_numpy(np.asarray(rows))
        return {k: v[idx] for k, v in self.arrays.items()}


Evaluator = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainerConfig:
    """Trainer settings. ``None`` means the default, or the policy's own value where it fixes one."""

    steps: int = 2000
    batch_size: int = 256
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    schedule: str | None = None  # for groups that do not fix their own: "cosine" (after warmup, default) or "constant"
    ema_decay: float | None = None  # EMA of the policy's EMA_PART (0: none)
    grad_clip: float | None = None  # 0: no clipping
    ckpt_every: int = 500
    log_every: int = 50
    eval_every: int = 0  # with an evaluator: every this many steps (0: only at the end)
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def check(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.eval_every) < 0:
            raise ValueError(f"train.eval_every must be >= 0, got {self.eval_every}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def setting(self, name: str) -> float:
        value = getattr(self, name)
        return GROUP_DEFAULTS[name] if value is None else float(value)


@dataclass
class TrainResult:
    """What a finished run leaves: the acting policy, where it is saved, the scores and the speed."""

    policy: nn.Module
    steps: int
    out: Path | None
    best_score: float | None = None
    best_step: int | None = None
    final_eval: dict[str, float] | None = None
    train_s_per_1k_steps: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def last(self) -> Path | None:
        return self.out / "policy" if self.out is not None else None

    @property
    def best(self) -> Path | None:
        return self.out / "best" if self.out is not None and (self.out / "best").exists() else None


def _lr_lambda(schedule: str, warmup: int, steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def check_settings(policy_cls: type[PolicyBase], cfg: TrainerConfig) -> None:
    """Refuse, before any work, trainer settings the policy kind fixes itself (naming where to set them)."""
    cfg.check()
    for key, where in policy_cls.OWN_TRAIN_KEYS.items():
        if getattr(cfg, key, None) is not None:
            raise ValueError(f"train.{key} does not apply to policy {policy_cls.KIND!r}; set {where} instead")


class Trainer:
    """Trains one policy on one data source; ``run()`` resumes from ``out/state`` when asked and present."""

    def __init__(
        self,
        policy: PolicyBase,
        data: BatchSource,
        config: TrainerConfig,
        out: str | Path | None,
        *,
        evaluator: Evaluator | None = None,
        select_metric: str = "normalized_score",
        fingerprint: dict[str, Any] | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        on_log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        check_settings(type(policy), config)
        if len(data) < 1:
            raise ValueError("the training data has no rows")
        self.policy, self.data, self.cfg = policy, data, config
        self.out = Path(out) if out is not None else None  # None: in memory only (no checkpoints, not resumable)
        self.evaluator, self.select_metric, self.on_step, self.on_log = evaluator, select_metric, on_step, on_log
        self.fingerprint = {"kind": policy.KIND, **(fingerprint or {})}
        self.dist = distributed.setup(config.device)  # one process, or this process's place in a torchrun run
        self.local_batch = self.dist.local_batch(int(config.batch_size))
        self.device = self.dist.device
        policy.to(self.device).train()
        self.dist.broadcast_module(policy)
        self.groups = self._resolve_groups(policy.optim_groups())
        self.optimizers = {
            # foreach: one multi-tensor update instead of a Python loop per parameter (also on CPU)
            name: torch.optim.AdamW(g.params, lr=float(g.lr), weight_decay=float(g.weight_decay), foreach=True)
            for name, g in self.groups.items()
        }
        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(
                g.schedule or config.schedule or "cosine", int(g.warmup_steps or 0), config.steps, g.min_lr_ratio))
            for (name, opt), g in zip(self.optimizers.items(), self.groups.values())
        }
        self.ema_decay = config.setting("ema_decay") if policy.EMA_PART else 0.0
        self.ema: nn.Module | None = copy.deepcopy(policy).eval().requires_grad_(False) if self.ema_decay > 0 else None
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.rng = np.random.default_rng(int(config.seed))
        self.step, self.log, self.best = 0, [], {"score": None, "step": None}
        self.train_s = 0.0
        self._acc: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ setup
    def _resolve_groups(self, groups: dict[str, OptimGroup]) -> dict[str, OptimGroup]:
        out = {}
        for name, g in groups.items():
            out[name] = OptimGroup(
                g.params,
                lr=self.cfg.setting("lr") if g.lr is None else float(g.lr),
                weight_decay=self.cfg.setting("weight_decay") if g.weight_decay is None else float(g.weight_decay),
                grad_clip=self.cfg.setting("grad_clip") if g.grad_clip is None else float(g.grad_clip),
                schedule=g.schedule,
                warmup_steps=int(self.cfg.setting("warmup_steps")) if g.warmup_steps is None else int(g.warmup_steps),
                min_lr_ratio=float(g.min_lr_ratio),
            )
        return out

    @property
    def acting(self) -> nn.Module:
        """The policy that acts and is saved: the EMA copy when there is one."""
        return self.ema if self.ema is not None else self.policy

    @torch.no_grad()
    def _ema_update(self) -> None:
        assert self.ema is not None and self.policy.EMA_PART
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
        part = self.policy.EMA_PART
        src = dict(self.policy.named_parameters())
        ema_params, model_params = [], []
        for name, p in self.ema.named_parameters():
            if name.startswith(part + "."):
                ema_params.append(p)
                model_params.append(src[name].detach())
            else:
                p.copy_(src[name])
        torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.policy.buffers()):
            b_ema.copy_(b)

    # ----------------------------------------------------------------- state
    def _modules(self) -> dict[str, nn.Module]:
        return {"policy": self.policy, **({"ema": self.ema} if self.ema is not None else {})}

    def _checkpoint(self) -> None:
        if self.out is None or not self.dist.main:  # rank 0 alone writes
            return
        meta = {
            "step": self.step, "numpy_rng": self.rng.bit_generator.state, "log": self.log, "best": self.best,
            "accumulators": self._acc, "train_s": self.train_s, "fingerprint": self.fingerprint,
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "train": asdict(self.cfg), "world_size": self.dist.world,
        }
        save_state(self.out / "state", self._modules(), self.optimizers, {"train": self.generator}, meta)
        self.acting.save(self.out / "policy")
        write_log(self.out / "train_log.csv", self.log)
        plot_log(self.log, self.out / "curves.png")

    def _resume(self) -> None:
        state_dir = self.out / "state"
        try:
            meta = restore_state(state_dir, self._modules(), self.optimizers, {"train": self.generator})
        except (CheckpointError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot resume from {state_dir}: {err}. Delete it to start over.") from err
        if meta.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"{state_dir} belongs to a different run ({meta.get('fingerprint')} vs {self.fingerprint}); "
                "use another out folder or delete it to start over"
            )
        self.step, self.log, self.best = int(meta["step"]), list(meta["log"]), dict(meta["best"])
        self.rng.bit_generator.state = meta["numpy_rng"]
        self._acc = {k: list(v) for k, v in (meta.get("accumulators") or {}).items()}
        self.train_s = float(meta.get("train_s", 0.0))
        for name, sched in self.schedulers.items():
            sched.load_state_dict(meta["schedulers"][name])

    # ------------------------------------------------------------------- loop
    def _global_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """A step's metrics averaged over the processes (the global batch's, for per-sample means)."""
        if not self.dist.active or not metrics:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        self.dist.average_(values)
        return dict(zip(keys, values.tolist()))

    def _batch(self) -> dict[str, Tensor]:
        # Every process draws the same global rows and keeps its shard: N processes see the batches of one.
        weights = getattr(self.data, "weights", None)
        if weights is None:
            rows = self.rng.integers(0, len(self.data), size=self.cfg.batch_size)
        else:
            rows = self.rng.choice(len(self.data), size=self.cfg.batch_size, p=weights)
        if self.dist.active:
            rows = rows[self.dist.rank * self.local_batch:(self.dist.rank + 1) * self.local_batch]
        return {k: torch.as_tensor(v).to(self.device) for k, v in self.data.batch(rows).items()}

    def _evaluate(self) -> dict[str, float]:
        assert self.evaluator is not None
        acting = self.acting
        was_training = acting.training
        acting.eval()
        try:
            summary = self.evaluator(acting)
        finally:
            acting.train(was_training)
        return summary

    def run(self, resume: bool = True) -> TrainResult:
        """Train to ``config.steps``; with ``resume`` continue from ``out/state`` when it exists.

        Under torchrun every process runs this; rank 0 alone writes and evaluates.
        A checkpoint resumes under any number of processes.
        """
        main = self.dist.main
        if self.out is not None and main:
            self.out.mkdir(parents=True, exist_ok=True)
        if resume and self.out is not None and (self.out / "state").exists():
            self._resume()
        cfg = self.cfg
        final_eval: dict[str, float] | None = None
        if main and (cfg.progress or self.dist.active):
            lrs = ", ".join(f"{name} {g.lr:g}" for name, g in self.groups.items())
            tqdm.write(f"train {self.policy.KIND}: global batch {cfg.batch_size} = {self.dist.world} process(es) x "
                       f"{self.local_batch} on {self.device}; lr {lrs}; from step {self.step} of {cfg.steps}")
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.policy.KIND}", disable=not (cfg.progress and main),
                   dynamic_ncols=True)
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            with self.dist.shard():
                metrics = self.policy.train_step(self._batch(), self.optimizers, self.groups, self.step, self.generator)
            for sched in self.schedulers.values():
                sched.step()
            self.train_s += time.perf_counter() - t0
            metrics = self._global_metrics(metrics)
            if self.dist.active and self.step == 0:
                self.dist.check_in_sync(self.policy, f"policy {self.policy.KIND!r} after its first step")
            bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
            if bad:
                raise FloatingPointError(
                    f"{bad} became non-finite at step {self.step}; lower the learning rate (or the policy's loss weights)"
                )
            self.step += 1
            if self.ema is not None:
                self._ema_update()
            for key, value in metrics.items():
                self._acc.setdefault(key, []).append(float(value))
            if self.on_step is not None:
                self.on_step(self.step, metrics)
            due_eval = self.evaluator is not None and (
                (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps
            )
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or due_eval:
                row: dict[str, Any] = {"step": self.step, **{k: float(np.mean(v)) for k, v in self._acc.items()}}
                row["train_s"] = round(self.train_s, 3)  # training seconds so far (evaluation excluded; resumed runs add up)
                lrs = {name: s.get_last_lr()[0] for name, s in self.schedulers.items()}
                row.update({"lr": next(iter(lrs.values()))} if len(lrs) == 1 else {f"lr_{k}": v for k, v in lrs.items()})
                self._acc = {}
                if due_eval and not main:  # rank 0 evaluates; the others go on (the next collective waits for it)
                    due_eval = False
                if due_eval:
                    final_eval = self._evaluate()
                    score = float(final_eval.get(self.select_metric, final_eval.get("return_mean", float("nan"))))
                    row.update({f"eval_{k}": float(v) for k, v in final_eval.items() if isinstance(v, (int, float))})
                    if self.best["score"] is None or score >= self.best["score"]:
                        self.best = {"score": score, "step": self.step}
                        if self.out is not None:
                            self.acting.save(self.out / "best")
                    bar.set_postfix(score=f"{score:.2f}")
                else:
                    first = next(iter(metrics), None)
                    if first is not None:
                        bar.set_postfix({first: f"{row[first]:.4f}"})
                self.log.append(row)
            bar.update(1)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or due_eval:
                self._checkpoint()
            if self.on_log is not None and self.log and self.log[-1]["step"] == self.step:
                self.on_log(self.log[-1])  # each log row (mean metrics, lr, eval_*), after any checkpoint of its step
        bar.close()
        if self.out is not None and main and not (self.out / "policy").exists():
            self._checkpoint()
        self.dist.barrier()  # the outputs are complete before any process returns
        return TrainResult(
            policy=self.acting, steps=self.step, out=self.out, best_score=self.best["score"], best_step=self.best["step"],
            final_eval=final_eval, train_s_per_1k_steps=1000.0 * self.train_s / max(self.step, 1),
        )


def train(
    policy: PolicyBase, data: BatchSource, config: TrainerConfig, out: str | Path | None, *, resume: bool = True, **kwargs: Any
) -> TrainResult:
    """Build a :class:`Trainer` and run it (``kwargs``: evaluator, select_metric, fingerprint, on_step, on_log)."""
    return Trainer(policy, data, config, out, **kwargs).run(resume=resume)


def fit(
    policy: PolicyBase, data: Any, steps: int, batch_size: int = 256, seed: int | None = None,
    out: str | Path | None = None, **settings: Any,
) -> list[float]:
    """Fit the normalizers, then train ``policy`` in place on its ``training_rows(data)``; returns every step's loss.

    The short form for library use and the driving jobs: ``out`` makes the run
    checkpointed and resumable (None: in memory); ``settings`` are further
    :class:`TrainerConfig` fields; ``seed`` defaults to the policy's own.
    """
    seed = int(policy.config.get("seed", 0)) if seed is None else int(seed)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    rows = policy.training_rows(data)
    source = TensorRows(rows) if isinstance(rows, dict) else rows
    policy.fit_to_batch(rows)
    losses: list[float] = []
    cfg = TrainerConfig(**{"steps": int(steps), "batch_size": min(int(batch_size), len(source)), "seed": int(seed),
                           "log_every": max(1, int(steps) // 50), "ckpt_every": max(1, int(steps) // 4),
                           "progress": False, **settings})
    result = train(policy, source, cfg, out, on_step=lambda step, metrics: losses.append(float(metrics["loss"])))
    if result.policy is not policy:  # a kind with an EMA part acts with the EMA weights: ``policy`` takes them
        policy.load_state_dict(result.policy.state_dict())
    policy.eval()
    return losses
