"""The DiffusionVLA jobs behind ``diffpilot train policy=diffusion_vla data=mt10`` and ``diffpilot eval``.

Training rows are the demonstrations' observed steps (the ones with a frame):
the frame, the proprio + goal (or the full state), the episode's instruction,
the step's annotated reasoning and the next ``action_horizon`` expert actions
(the episode's last action repeats past its end). The word vocabulary is built
from the training phrasings and the reasoning text, so held-out phrasings
meet it with ``<unk>`` for words it never saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from diffpilot.data.mt10 import HELDOUT_INSTRUCTIONS, TRAIN_INSTRUCTIONS, MT10Demos, load_instructions, load_mt10
from diffpilot.fileio import atomic_write_text
from diffpilot.policy.registry import build_policy, load_policy
from diffpilot.policy.text import WordVocab
from diffpilot.sim.mt10_runner import run_mt10, summarize_mt10
from diffpilot.sim.report import markdown_table, write_report
from diffpilot.train.trainer import TensorRows, Trainer, TrainerConfig

__all__ = ["eval_vla_job", "train_vla", "vla_rows", "vla_vocabulary"]


def vla_vocabulary(demos: MT10Demos, instructions: dict[str, list[str]]) -> WordVocab:
    """Every word of the training phrasings, the demonstrations' instructions and their reasoning text."""
    texts = [p for ps in instructions.values() for p in ps] + list(demos.episode_instruction) + list(demos.reasoning)
    return WordVocab.build(texts)


def vla_rows(demos: MT10Demos, policy: Any) -> dict[str, torch.Tensor]:
    """The training rows (observed steps) in the policy's batch format."""
    rows = demos.observed_rows
    if len(rows) == 0:
        raise ValueError("the demonstration file has no frames (image_index is -1 everywhere); regenerate it")
    h = policy.action_horizon
    starts, lengths = demos.episode_start, demos.episode_length
    ep = demos.episode[rows]
    end = starts[ep] + lengths[ep] - 1  # last row of each row's episode
    idx = np.minimum(rows[:, None] + np.arange(h)[None], end[:, None])
    actions = demos.actions[idx].astype(np.float32)
    if policy.config["low_dim"] == "state":
        low = demos.state[rows]
    else:
        low = np.concatenate([demos.proprio[rows], demos.goal[rows]], axis=1)
    texts = policy.encode_batch([demos.episode_instruction[e] for e in ep], [demos.reasoning[r] for r in rows],
                                [demos.tasks[t] for t in demos.task[rows]])
    out = {"low_dim": torch.from_numpy(low.astype(np.float32)), "action": torch.from_numpy(actions), **texts}
    if policy.config["object_loss"] > 0:  # the target of the object probe or image estimate
        out["object"] = torch.from_numpy(demos.state[rows][:, 4:7].astype(np.float32))
    if policy.image is not None:
        out["image"] = torch.from_numpy(demos.images[demos.image_index[rows]])
    return out


def task_balanced_weights(demos: MT10Demos) -> np.ndarray:
    """Per training row, 1 / (rows of its task): every task is drawn equally often.

    Short-episode tasks (reach, pick-place) have about half the rows of the long ones (drawers, peg), so a uniform
    draw trains them least.
    """
    task = demos.task[demos.observed_rows]
    counts = np.bincount(task, minlength=len(demos.tasks)).astype(np.float64)
    return 1.0 / counts[task]


def train_vla(cfg: dict[str, Any], data_path: Path, options: dict[str, Any], tcfg: TrainerConfig, out: Path) -> Path:
    """Build the policy for the demonstration file, fit its normalizers, train it through the one trainer."""
    balance = cfg["data"].get("balance_tasks", False)
    if not isinstance(balance, bool):
        raise ValueError(f"data.balance_tasks must be true or false, got {balance!r}")
    demos = load_mt10(data_path)
    instructions_path = cfg["data"].get("instructions") or TRAIN_INSTRUCTIONS
    vocab = vla_vocabulary(demos, load_instructions(instructions_path))
    if demos.image_size != int(options["image_size"]) and options.get("use_image", True):
        raise ValueError(f"the demonstrations have {demos.image_size} px frames but policy.image_size="
                         f"{options['image_size']}; set policy.image_size={demos.image_size}")
    torch.manual_seed(tcfg.seed)
    policy = build_policy({"name": "diffusion_vla", **options, "vocab": vocab.tokens, "tasks": list(demos.tasks)})
    rows = vla_rows(demos, policy)
    policy.fit_to_batch(rows)
    weights = task_balanced_weights(demos) if balance else None
    trainer = Trainer(policy, TensorRows(rows, weights), tcfg, out,
                      fingerprint={"rows": len(rows["action"]), "data": str(data_path), "vocab": len(vocab),
                                   **({"balance_tasks": True} if balance else {})})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "run.yaml", yaml.safe_dump({**cfg, "data_path": str(data_path)}, sort_keys=False))
    trainer.run(resume=bool(cfg.get("resume", True)))
    return out / "policy"


def eval_vla_job(cfg: dict[str, Any], ckpt: Path) -> Path:
    """Closed-loop MT10 success of a saved DiffusionVLA with the phrasings of ``sim.instructions``."""
    policy = load_policy(ckpt, kind="diffusion_vla")
    sim = dict(cfg.get("sim") or {})
    if sim.get("task") != "mt10":  # evaluated without sim=mt10: its defaults
        sim = yaml.safe_load((Path(__file__).resolve().parent / "conf" / "sim" / "mt10.yaml").read_text())
    source = sim.get("instructions") or "train"
    named = {"train": TRAIN_INSTRUCTIONS, "heldout": HELDOUT_INSTRUCTIONS}
    instructions = load_instructions(named.get(str(source), source))
    tasks = [t for t in policy.tasks if t in instructions] if sim.get("tasks") is None else list(sim["tasks"])
    unknown = [t for t in tasks if t not in policy.tasks]
    if unknown or not tasks:
        raise ValueError(f"task(s) {unknown or tasks} are not among the policy's tasks {policy.tasks}; "
                         "pass sim.tasks from that list (or an instructions file that names them)")
    if sim.get("given_reasoning") and not policy.config["reasoning"]:
        raise ValueError("sim.given_reasoning needs a policy that reads reasoning (reasoning=true)")
    out = Path(cfg["out"]) if cfg.get("out") else ckpt.parent / "eval"
    policy.given_reasoning = bool(sim.get("given_reasoning"))
    workers, address = int(cfg.get("workers") or 1), cfg.get("ray_address")
    records = run_mt10(ckpt if workers > 1 or address else policy, tasks, instructions,
                       episodes=int(sim.get("episodes", 20)), seed=int(sim.get("seed", 1000)),
                       max_steps=int(sim.get("max_steps", 200)), exec_horizon=policy.exec_horizon,
                       image_size=policy.config["image_size"], given_reasoning=policy.given_reasoning,
                       progress=bool(cfg.get("progress", True)), workers=workers, ray_address=address)
    summary = summarize_mt10(records)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps({"summary": summary, "instructions": str(source),
                                                     "episodes": [r.row() for r in records]}, indent=2))
    per_task = [{"task": t, "success": s} for t, s in summary["per_task"].items()]
    head = {k: v for k, v in summary.items() if k != "per_task"}
    write_report(out, "MT10 closed-loop evaluation", [
        ("Summary", markdown_table([head]) + f"\nInstructions: {source}.\n"),
        ("Per task", markdown_table(per_task)),
        ("Episodes", markdown_table([r.row() for r in records], ["task", "seed", "instruction", "success", "steps",
                                                                 "last_reasoning"])),
    ])
    return out
