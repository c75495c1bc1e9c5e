"""DiffusionVLA on Meta-World MT10: success with training and held-out phrasings, reasoning accuracy, speed.

Trains (resumably, through ``diffpilot train policy=diffusion_vla``) on the
scripted-expert demonstrations of ``diffpilot data mt10`` (``--demos`` episodes
per task, 64 px frames every 4 steps): DiffusionVLA with injected reasoning, the
same without reasoning (pooled prompt only, TinyVLA-style), with a task
one-hot instead of the instruction (an oracle task id), state only (no image)
and a one-step head; and perception variants of DiffusionVLA: spatial-softmax
keypoints (``policy.keypoints=32``), a training-only object-position probe
(``policy.object_loss=1``) and an object position estimated from the image alone
that the head reads (``policy.object_input=true``, with and without the image shift,
1 or 3 cm of training jitter, with rows drawn uniformly or every task equally often
(``data.balance_tasks=true``); ``benchmarks/vla_perception.py`` measures where each
thinks the object is). Each is exported to ONNX and evaluated closed loop by the
torch-free runtime (batch 1, 1 thread, reasoning every ``reason_every`` replans):
``--episodes`` episodes per task with the training phrasings and with held-out
phrasings never seen in training; the ground-truth-reasoning row
feeds the expert's annotation to the torch policy (an upper bound). Speed:
decisions (replans) per second and time per replan split into reasoning and
action, in onnxruntime (from the evaluation) and in torch (one episode per
task). Results are written after every finished run; a rerun skips them.

Each trained model is keyed by its budget (gradient steps x demonstrations per task): a run with
another ``--steps`` or ``--demos`` trains new models beside the old ones, and the table lists every
(row, budget) it finds, with ``train_steps`` and ``demos_per_task`` columns.

Run: python benchmarks/vla.py [--steps 6000] [--demos 100] [--seeds 0 1] [--episodes 20] [--rows vla noreason ...]
(two invocations with disjoint ``--rows`` or ``--seeds`` run side by side on two cores; each writes the whole table).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from results_io import RESULTS, write_results

from diffpilot.cli import load_config
from diffpilot.data.mt10 import HELDOUT_INSTRUCTIONS, TRAIN_INSTRUCTIONS, load_instructions
from diffpilot.export.onnx import export_by_kind
from diffpilot.export.runtime import load_runtime
from diffpilot.jobs import generate_job, train_job
from diffpilot.policy.registry import load_policy
from diffpilot.sim.mt10_runner import run_mt10, summarize_mt10
from diffpilot.sim.report import markdown_table

NAME = "vla"
ROOT = Path("runs/bench/vla")
VARIANTS: dict[str, tuple[str, list[str]]] = {  # row -> (run slug, policy overrides)
    "DiffusionVLA (reasoning injected)": ("vla", []),
    "DiffusionVLA + spatial-softmax keypoints": ("keypoints", ["policy.keypoints=32"]),
    "DiffusionVLA + object-position probe loss (training only)": ("objprobe", ["policy.object_loss=1.0"]),
    "DiffusionVLA + image-only object estimate fed to the head": (
        "objinput", ["policy.object_loss=1.0", "policy.object_input=true", "policy.object_noise=0.01"]),
    "DiffusionVLA + image-only object estimate, no image shift": (
        "objinput-noshift", ["policy.object_loss=1.0", "policy.object_input=true", "policy.object_noise=0.01",
                             "policy.image_shift=0"]),
    "DiffusionVLA + image-only object estimate, no image shift, 3 cm jitter": (
        "objinput-noshift-j3", ["policy.object_loss=1.0", "policy.object_input=true", "policy.object_noise=0.03",
                                "policy.image_shift=0"]),
    "DiffusionVLA + image-only object estimate, no image shift, 3 cm jitter, tasks drawn equally": (
        "objinput-noshift-j3-bal", ["policy.object_loss=1.0", "policy.object_input=true", "policy.object_noise=0.03",
                                    "policy.image_shift=0", "data.balance_tasks=true"]),
    "no reasoning (pooled prompt, TinyVLA-style)": ("noreason", ["policy.reasoning=false"]),
    "task one-hot instead of the instruction (oracle id)": ("onehot", ["policy.instruction=onehot"]),
    "state only (no image)": ("state", ["policy.use_image=false", "policy.low_dim=state"]),
    "one-step head (flow, 1 Euler step)": ("onestep", ["~policy.objective", "+policy.objective={name: flow}",
                                                       "policy.sampler={name: euler, num_steps: 1}"]),
}
GT_ROW = "ground-truth reasoning at test time (upper bound)"


def run_name(slug: str, steps: int, demos: int, seed: int) -> str:
    """One trained model's name: row slug, budget (steps x demos per task) and seed (RESULT parses it back)."""
    return f"{slug}-{steps}st-{demos}ep-s{seed}"


def train(slug: str, overrides: list[str], seed: int, steps: int, demos: int, threads: int) -> Path:
    out = ROOT / run_name(slug, steps, demos, seed)
    if (out / "done").exists():
        return out / "policy"
    cfg = load_config("train", ["policy=diffusion_vla", "data=mt10", f"data.episodes_per_task={demos}", "sim=mt10",
                                *overrides, f"seed={seed}",
                                f"out={out}", f"train.steps={steps}", "train.batch_size=64", "train.lr=1e-3",
                                "train.log_every=50", "train.ckpt_every=200", "progress=false"])
    t0 = time.perf_counter()
    torch.set_num_threads(threads)  # evaluation timings are at 1 thread
    try:
        path = train_job(cfg)
    finally:
        torch.set_num_threads(1)
    (out / "done").write_text(json.dumps({"train_s": time.perf_counter() - t0, "steps": steps, "demos": demos}))
    return path


def evaluate(policy_dir: Path, phrasing: str, episodes: int, given_reasoning: bool = False) -> dict[str, Any]:
    """Closed loop with the onnxruntime policy (torch for given reasoning, which the runtime does not read)."""
    instructions = load_instructions(TRAIN_INSTRUCTIONS if phrasing == "train" else HELDOUT_INSTRUCTIONS)
    torch_policy = load_policy(policy_dir, kind="diffusion_vla")
    if given_reasoning:
        torch_policy.given_reasoning = True
        actor: Any = torch_policy
    else:
        onnx_path = policy_dir.parent / "onnx" / "policy.onnx"
        if not onnx_path.exists():
            export_by_kind(torch_policy, onnx_path)
        actor = load_runtime(onnx_path, threads=1)
    records = run_mt10(actor, torch_policy.tasks, instructions, episodes=episodes, seed=1000,
                       exec_horizon=torch_policy.exec_horizon, image_size=torch_policy.config["image_size"],
                       given_reasoning=given_reasoning, progress=False)
    return summarize_mt10(records)


def torch_speed(policy_dir: Path) -> dict[str, Any]:
    policy = load_policy(policy_dir, kind="diffusion_vla")
    records = run_mt10(policy, policy.tasks, load_instructions(TRAIN_INSTRUCTIONS), episodes=1, seed=2000,
                       exec_horizon=policy.exec_horizon, image_size=policy.config["image_size"], progress=False)
    return summarize_mt10(records)


def cached(path: Path, fn: Any) -> Any:
    if path.exists():
        return json.loads(path.read_text())
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--demos", type=int, default=100, help="demonstrations per task (data.episodes_per_task)")
    ap.add_argument("--train-threads", type=int, default=1, help="torch threads while training (run lanes side by side)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--rows", nargs="*", default=None, help="row slugs to run (default: all)")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the finished runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.table_only:
        write_table(args)
        return
    generate_job(load_config("train", ["policy=diffusion_vla", "data=mt10",
                                        f"data.episodes_per_task={args.demos}"])["data"])
    ROOT.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seed-major: every row gets its first seed before any gets its second
        for row, (slug, overrides) in VARIANTS.items():
            if args.rows and slug not in args.rows:
                continue
            policy_dir = train(slug, overrides, seed, args.steps, args.demos, args.train_threads)
            for phrasing in ("train", "heldout"):
                cached(ROOT / "results" / f"{run_name(slug, args.steps, args.demos, seed)}-{phrasing}.json",
                       lambda: evaluate(policy_dir, phrasing, args.episodes))
            if slug == "vla":
                for phrasing in ("train", "heldout"):
                    cached(ROOT / "results" / f"{run_name('gt', args.steps, args.demos, seed)}-{phrasing}.json",
                           lambda: evaluate(policy_dir, phrasing, args.episodes, given_reasoning=True))
                cached(ROOT / "results" / f"{run_name('vla', args.steps, args.demos, seed)}-torch.json",
                       lambda: torch_speed(policy_dir))
            write_table(args)


RESULT = re.compile(r"^(?P<slug>[a-z][a-z0-9-]*?)-(?P<steps>\d+)st-(?P<demos>\d+)ep-s(?P<seed>\d+)-(?P<phrasing>train|heldout)\.json$")


def finished() -> dict[tuple[str, int, int], dict[int, dict[str, Any]]]:
    """(slug, steps, demos) -> seed -> {"train": summary, "heldout": summary}, for runs with both phrasing sets."""
    out: dict[tuple[str, int, int], dict[int, dict[str, Any]]] = {}
    for path in sorted((ROOT / "results").glob("*.json")):
        m = RESULT.match(path.name)
        if m:
            key = (m["slug"], int(m["steps"]), int(m["demos"]))
            out.setdefault(key, {}).setdefault(int(m["seed"]), {})[m["phrasing"]] = json.loads(path.read_text())
    return {k: {s: v for s, v in seeds.items() if len(v) == 2} for k, seeds in out.items()
            if any(len(v) == 2 for v in seeds.values())}


def write_table(args: argparse.Namespace) -> None:
    rows = []
    per_task_rows = []
    order = [*(s for s, _ in VARIANTS.values()), "gt"]
    names = {**{s: r for r, (s, _) in VARIANTS.items()}, "gt": GT_ROW}
    runs = finished()
    budgets = sorted({(steps, demos) for _, steps, demos in runs}, key=lambda b: (-b[0] * b[1], -b[0]))
    for steps, demos in budgets:
        for slug in order:
            found = runs.get((slug, steps, demos))
            if not found:
                continue
            row = names[slug]
            train_slug = "vla" if slug == "gt" else slug
            done = [ROOT / run_name(train_slug, steps, demos, s) / "done" for s in found]
            train_s = [t for d in done if d.exists() and (t := json.loads(d.read_text()).get("train_s")) is not None]

            def stat(phrasing: str, key: str) -> tuple[float | None, float | None]:
                vals = [r[phrasing][key] for r in found.values() if r[phrasing].get(key) is not None]
                return (float(np.mean(vals)), float(np.std(vals))) if vals else (None, None)

            succ_tr, sd_tr = stat("train", "success")
            succ_ho, sd_ho = stat("heldout", "success")
            acc, _ = stat("heldout", "reasoning_accuracy")
            acc_tr, _ = stat("train", "reasoning_accuracy")
            dps, _ = stat("train", "decisions_per_s")
            r_ms, _ = stat("train", "reason_ms_per_replan")
            a_ms, _ = stat("train", "action_ms_per_replan")
            out: dict[str, Any] = {
                "row": row, "train_steps": steps, "demos_per_task": demos, "seeds": len(found),
                "success_train_phrasings": succ_tr, "std_train": sd_tr,
                "success_heldout_phrasings": succ_ho, "std_heldout": sd_ho,
                "reasoning_accuracy_train": acc_tr, "reasoning_accuracy_heldout": acc,
                "decisions_per_s": dps, "reason_ms_per_replan": r_ms, "action_ms_per_replan": a_ms,
                "runtime": "torch" if slug == "gt" else "onnxruntime",
                "train_s": float(np.mean(train_s)) if train_s else None,
            }
            torch_files = ([ROOT / "results" / f"{run_name('vla', steps, demos, s)}-torch.json" for s in found]
                           if slug == "vla" else [])
            speeds = [json.loads(f.read_text()) for f in torch_files if f.exists()]
            if speeds:
                out["torch_decisions_per_s"] = float(np.mean([s["decisions_per_s"] for s in speeds]))
                out["torch_reason_ms_per_replan"] = float(np.mean([s["reason_ms_per_replan"] for s in speeds]))
                out["torch_action_ms_per_replan"] = float(np.mean([s["action_ms_per_replan"] for s in speeds]))
            rows.append(out)
            tasks = list(next(iter(found.values()))["train"]["per_task"])
            per_task_rows.append({"row": row, "train_steps": steps, "demos_per_task": demos,
                                  **{t: float(np.mean([r["train"]["per_task"][t] for r in found.values()]))
                                     for t in tasks}})
    notes = (f"Meta-World MT10 (metaworld 3.1.1, mujoco 3.3.0), scripted-expert demonstrations "
             f"(`demos_per_task` per task, 64 px frames every 4 steps); `train_steps` gradient steps at batch 64, "
             f"lr 1e-3 (cosine) per model; {args.episodes} episodes per task and phrasing set, "
             "evaluation seeds disjoint from the demonstrations', at most 200 steps per episode; one 64 px frame per "
             "replan (8 actions of each 16-action chunk executed); reasoning regenerated every 8 replans. "
             "Decisions/s = replans per second of policy time (rendering excluded), batch 1, 1 thread, on a "
             "shared 2-core CPU (timings may be contended). Reasoning accuracy = generated sub-goal equals the "
             "expert annotation at that moment. Per-task success (training phrasings) is in per_task.")
    previous = RESULTS / f"{NAME}.json"
    old = json.loads(previous.read_text()) if previous.exists() else {}
    rows, per_task_rows = _keep_missing(rows, old.get("rows", [])), _keep_missing(per_task_rows, old.get("per_task", []))
    if per_task_rows:
        notes += "\n\nSuccess per task (training phrasings, mean over seeds):\n\n" + markdown_table(per_task_rows)
    seeds: dict[tuple[int, int], int] = {}  # budget -> most seeds of any row, largest budget first
    slugs: dict[tuple[int, int], set[str]] = {}  # budget -> the variants run at it
    for r in rows:
        budget = (r["train_steps"], r["demos_per_task"])
        seeds[budget] = max(seeds.get(budget, 0), r["seeds"])
        slugs.setdefault(budget, set()).add(VARIANTS[r["row"]][0] if r["row"] in VARIANTS else "vla")  # GT_ROW: vla's
    every = [slug for slug, _ in VARIANTS.values()]
    command = " ; ".join(f"python benchmarks/vla.py --steps {steps} --demos {demos} --seeds "
                         f"{' '.join(map(str, range(n)))} --episodes {args.episodes}"
                         + ("" if slugs[steps, demos] == set(every)
                            else " --rows " + " ".join(s for s in every if s in slugs[steps, demos]))
                         for (steps, demos), n in seeds.items())
    quiet = old.get("quiet_speed")  # vla_speed.py's
    write_results(NAME, command, rows, notes=notes, per_task=per_task_rows, **({"quiet_speed": quiet} if quiet else {}))


def _keep_missing(new: list[dict[str, Any]], old: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``new`` plus the rows of the written table that this machine has no runs for (same row and budget).

    Trained models live under ``runs/`` and are not committed; a fresh clone that trains one more row
    keeps the rows measured before instead of dropping them. Largest budget first, rows in table order.
    """
    key = lambda r: (r["row"], r.get("train_steps"), r.get("demos_per_task"))  # noqa: E731
    have = {key(r) for r in new}
    merged = new + [r for r in old if key(r) not in have]
    order = {r: i for i, r in enumerate([*VARIANTS, GT_ROW])}
    return sorted(merged, key=lambda r: (-(r.get("train_steps") or 0) * (r.get("demos_per_task") or 0),
                                         -(r.get("train_steps") or 0), order.get(r["row"], len(order))))


if __name__ == "__main__":
    main()
