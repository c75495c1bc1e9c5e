"""Offline-RL training step: the project's trainer against lean single-file steps of the same math.

The lean references are what one would write in one file for one paper: plain
3 x 256 Mish MLPs (``nn.Mish``), a 16-wide sinusoidal time embedding, twin
critics as two MLPs, ``torch.optim.Adam``, an EMA actor, no framework.

- ``lean_dql``: Diffusion-QL: VP schedule over 5 steps, epsilon loss, the
  action for the Q term drawn through the whole 5-step ancestral chain with
  gradients, TD target from the EMA actor's 5-step sample and the min of the
  target twins, actor loss ``BC - Q1(s, a_pi) / E|Q2|.detach()``.
- ``lean_ofql``: One-Step Flow Q-Learning: MeanFlow average velocity with the
  ``torch.func.jvp`` target (tangent ``(v, 0, 1)``, half the batch at
  ``r = t``), the action one jump from noise, the same critic and Q term.

Every row trains on the same random transitions (uniform rows out of 100k,
batch 256) for ``--steps`` steps after ``--warmup`` untimed ones, on one torch
thread; ``ours`` runs the project's ``Trainer`` (row gather, policy step,
schedules, metric bookkeeping), so the ratio includes every overhead a real
run pays. ``vs_lean`` = our ms per step / the lean step's.

Run: python benchmarks/offline_rl_step.py [--steps 200] [--envs hopper walker2d]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from results_io import write_results

from diffpilot.policy.registry import build_policy
from diffpilot.train import TrainerConfig
from diffpilot.train.offline_rl import load_policy_yaml
from diffpilot.train.trainer import Trainer, TensorRows

NAME = "offline_rl_step"
DIMS = {"hopper": (11, 3), "walker2d": (17, 6), "halfcheetah": (17, 6), "maze2d": (4, 2)}
BATCH, ROWS, HIDDEN = 256, 100_000, 256


def mlp(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, HIDDEN), nn.Mish(), nn.Linear(HIDDEN, HIDDEN), nn.Mish(),
                         nn.Linear(HIDDEN, HIDDEN), nn.Mish(), nn.Linear(HIDDEN, out))


class TimeEmb(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2) / (dim // 2 - 1))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.Mish(), nn.Linear(2 * dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        a = t[:, None] * self.freqs[None]
        return self.mlp(torch.cat([a.sin(), a.cos()], -1))


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, use_r: bool) -> None:
        super().__init__()
        self.t_emb = TimeEmb()
        self.r_emb = TimeEmb() if use_r else None
        self.net = mlp(act_dim + obs_dim + (32 if use_r else 16), act_dim)

    def forward(self, a: Tensor, t: Tensor, s: Tensor, r: Tensor | None = None) -> Tensor:
        parts = [a, self.t_emb(t), s] + ([self.r_emb(t - r)] if self.r_emb is not None else [])
        return self.net(torch.cat(parts, -1))


class Twin(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int) -> None:
        super().__init__()
        self.q1, self.q2 = mlp(obs_dim + act_dim, 1), mlp(obs_dim + act_dim, 1)

    def forward(self, s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([s, a], -1)
        return self.q1(x), self.q2(x)


class LeanStep:
    """One lean actor-critic: ``step(batch)`` is one critic update, one actor update, the target and EMA updates."""

    def __init__(self, algo: str, obs_dim: int, act_dim: int) -> None:
        self.algo, self.act_dim = algo, act_dim
        self.actor = Actor(obs_dim, act_dim, use_r=algo == "ofql")
        self.actor_ema = copy.deepcopy(self.actor)
        self.critic = Twin(obs_dim, act_dim)
        self.critic_target = copy.deepcopy(self.critic)
        self.a_opt = torch.optim.Adam(self.actor.parameters(), lr=3e-4)
        self.c_opt = torch.optim.Adam(self.critic.parameters(), lr=3e-4)
        t = torch.arange(1, 6, dtype=torch.float64)
        alpha = torch.exp(-0.1 / 5 - 0.5 * (10.0 - 0.1) * (2 * t - 1) / 25)  # VP schedule, 5 steps
        self.betas = (1 - alpha).float()
        self.abar = torch.cumprod(alpha, 0).float()
        self.steps = 0

    def sample(self, actor: nn.Module, s: Tensor) -> Tensor:
        b = s.shape[0]
        x = torch.randn(b, self.act_dim)
        if self.algo == "ofql":
            return (x - actor(x, torch.ones(b), s, torch.zeros(b))).clamp(-1, 1)
        for k in range(4, -1, -1):
            ab, beta = self.abar[k], self.betas[k]
            ab_prev = self.abar[k - 1] if k > 0 else torch.tensor(1.0)
            eps = actor(x, torch.full((b,), float(k + 1)), s)
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x
            x = mean + (((1 - ab_prev) / (1 - ab) * beta).sqrt() * torch.randn_like(x) if k > 0 else 0.0)
        return x

    def bc(self, s: Tensor, a: Tensor) -> Tensor:
        b = s.shape[0]
        noise = torch.randn_like(a)
        if self.algo == "dql":
            k = torch.randint(0, 5, (b,))
            ab = self.abar[k][:, None]
            return F.mse_loss(self.actor(ab.sqrt() * a + (1 - ab).sqrt() * noise, (k + 1).float(), s), noise)
        u1, u2 = torch.sigmoid(torch.randn(b) - 0.4), torch.sigmoid(torch.randn(b) - 0.4)
        t, r = torch.maximum(u1, u2), torch.minimum(u1, u2)
        r = torch.where(torch.arange(b) < b // 2, t, r)
        z = (1 - t[:, None]) * a + t[:, None] * noise
        v = noise - a
        u, dudt = torch.func.jvp(lambda z_, r_, t_: self.actor(z_, t_, s, r_), (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        return (u - (v - (t - r)[:, None] * dudt).detach()).pow(2).sum(1).mean()

    def step(self, batch: dict[str, Tensor]) -> None:
        s, a, rew, s2, done = batch["obs"], batch["action"], batch["reward"], batch["next_obs"], batch["done"]
        with torch.no_grad():
            q1t, q2t = self.critic_target(s2, self.sample(self.actor_ema, s2))
            target = rew[:, None] + 0.99 * (1 - done[:, None]) * torch.minimum(q1t, q2t)
        q1, q2 = self.critic(s, a)
        c_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.c_opt.zero_grad()
        c_loss.backward()
        nn.utils.clip_grad_norm_(self.critic.parameters(), 1.0)
        self.c_opt.step()
        q1, q2 = self.critic(s, self.sample(self.actor, s))
        a_loss = self.bc(s, a) - q1.mean() / q2.abs().mean().detach()
        self.a_opt.zero_grad()
        a_loss.backward()
        self.a_opt.step()
        with torch.no_grad():
            for p, tp in zip(self.critic.parameters(), self.critic_target.parameters()):
                tp.lerp_(p, 0.005)
            if self.steps % 5 == 0:
                for p, ep in zip(self.actor.parameters(), self.actor_ema.parameters()):
                    ep.lerp_(p, 0.005)
        self.steps += 1


def transitions(obs_dim: int, act_dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "obs": rng.standard_normal((ROWS, obs_dim), dtype=np.float32),
        "action": rng.uniform(-1, 1, (ROWS, act_dim)).astype(np.float32),
        "reward": rng.standard_normal(ROWS, dtype=np.float32),
        "next_obs": rng.standard_normal((ROWS, obs_dim), dtype=np.float32),
        "done": (rng.random(ROWS) < 0.01).astype(np.float32),
    }


def time_lean(algo: str, data: dict[str, np.ndarray], steps: int, warmup: int) -> float:
    """Milliseconds per lean step, the batch gathered from the same rows as the trainer's."""
    obs_dim, act_dim = data["obs"].shape[1], data["action"].shape[1]
    lean = LeanStep(algo, obs_dim, act_dim)
    rows = TensorRows(data)
    rng = np.random.default_rng(0)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        lean.step(rows.batch(rng.integers(0, ROWS, BATCH)))
    return 1000.0 * (time.perf_counter() - t0) / steps


def time_ours(kind: str, data: dict[str, np.ndarray], steps: int, warmup: int) -> float:
    """Milliseconds per step of the project's trainer (its own clock: gather, step, schedules)."""
    policy = build_policy({"name": kind, **load_policy_yaml(kind)}, data["obs"].shape[1], data["action"].shape[1])
    policy.fit_normalizers(data["obs"], data["action"])
    cfg = TrainerConfig(steps=warmup, batch_size=BATCH, log_every=10**9, ckpt_every=10**9, progress=False)
    trainer = Trainer(policy, TensorRows(data), cfg, None)
    trainer.run(resume=False)
    before = trainer.train_s
    trainer.cfg.steps = warmup + steps
    trainer.run(resume=False)
    return 1000.0 * (trainer.train_s - before) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--envs", nargs="+", default=["hopper", "walker2d"], choices=sorted(DIMS))
    ap.add_argument("--steps", type=int, default=200, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for env in args.envs:
        data = transitions(*DIMS[env])
        lean = {algo: time_lean(algo, data, args.steps, args.warmup) for algo in ("dql", "ofql")}
        for kind in ("dql", "ofql", "flow_bc", "diffusion_bc"):
            ms = time_ours(kind, data, args.steps, args.warmup)
            row = {"env_dims": env, "obs_dim": DIMS[env][0], "act_dim": DIMS[env][1], "method": kind, "ms_per_step": round(ms, 1)}
            if kind in lean:
                row.update(lean_ms_per_step=round(lean[kind], 1), vs_lean=round(ms / lean[kind], 2))
            rows.append(row)
            print(row, flush=True)
        for row in rows[-4:]:
            row["vs_dql"] = round(row["ms_per_step"] / rows[-4]["ms_per_step"], 2)
    notes = (
        f"Batch {BATCH}, one torch thread, {args.steps} timed steps after {args.warmup}; random transitions of each "
        "environment's sizes. ours = the project's Trainer (row gather, policy step, schedules, metrics); lean = one-file "
        "steps of the same math with plain nn.Mish MLPs and torch.optim.Adam (see the module docstring). "
        "Target: ours <= 1.2x lean for DQL and OFQL; OFQL <= 0.6x DQL.\n"
    )
    write_results(NAME, "python benchmarks/" + " ".join(a if i else "offline_rl_step.py" for i, a in enumerate(sys.argv)),
                  rows, notes, steps=args.steps)
    print((Path(__file__).parent / "results" / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
