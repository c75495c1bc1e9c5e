"""A small, resumable training loop shared by the imitation policies.

Everything needed to resume (weights, EMA weights, optimizer moments, step,
both RNG states) is written as a safetensors + YAML checkpoint, so resuming
never unpickles and a run interrupted at any point continues from its last
checkpoint with the same batches it would have drawn.
"""

from __future__ import annotations

import copy
import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffpilot.fileio import atomic_path
from diffpilot.policy.checkpoint import CheckpointError, load_checkpoint, load_state_strict, save_checkpoint

STATE_KIND = "training_state"


class WindowSource(Protocol):
    def __len__(self) -> int: ...

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]: ...


class TrainablePolicy(Protocol):
    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor: ...

    def save(self, directory: Any) -> Any: ...


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    warmup_steps: int = 100
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    ckpt_every: int = 500
    log_every: int = 50
    seed: int = 0
    device: str = "cpu"


def _lr_lambda(cfg: TrainConfig):
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_p = [p for p in ema.parameters()]
    model_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def _state_tensors(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_sd = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in opt_sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt_sd["param_groups"]]
    return tensors, {"param_groups": groups, "optim_scalars": scalars}


def _restore(path: Path, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, dict[str, Any]]:
    tensors, meta = load_checkpoint(path, kind=STATE_KIND)
    load_state_strict(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    load_state_strict(ema, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, path)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["optim_scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), meta


def _write_log(path: Path, log: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
        writer.writeheader()
        writer.writerows(log)


def train(
    policy: nn.Module,
    windows: WindowSource,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
) -> nn.Module:
    """Train ``policy`` on ``windows``; returns the EMA policy, also saved to ``out_dir/policy``.

    ``out_dir/state`` holds the resumable training state and
    ``out_dir/train_log.csv`` the loss curve. With ``resume`` a run picks up
    from ``out_dir/state`` when it exists.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    policy.to(device).train()
    ema = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    step, log = 0, []
    state_dir = out / "state"
    if resume and state_dir.exists():
        try:
            step, meta = _restore(state_dir, policy, ema, opt)
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume from {state_dir}: {e}. Delete it to start over.") from e
        rng.bit_generator.state = meta["numpy_rng"]
        sched.load_state_dict(meta["scheduler"])
        log = meta.get("log", [])

    def checkpoint() -> None:
        tensors, meta = _state_tensors(policy, ema, opt)
        scheduler = sched.state_dict()  # lr_lambdas is [None] for a plain function: YAML-safe
        meta.update(step=step, numpy_rng=rng.bit_generator.state, scheduler=scheduler, log=log, train=asdict(cfg))
        save_checkpoint(state_dir, tensors, meta, kind=STATE_KIND)
        ema.save(out / "policy")
        _write_log(out / "train_log.csv", log)

    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not progress, dynamic_ncols=True)
    running = None
    while step < cfg.steps:
        rows = rng.integers(0, len(windows), size=cfg.batch_size)
        batch = {k: torch.from_numpy(v).to(device) for k, v in windows.batch(rows).items()}
        loss = policy.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        _ema_update(ema, policy, min(cfg.ema_decay, (1 + step) / (10 + step)))
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.append({"step": step, "loss": running, "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{running:.4f}")
        bar.update(1)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            checkpoint()
    bar.close()
    if not (out / "policy").exists():
        checkpoint()
    return ema.cpu()
