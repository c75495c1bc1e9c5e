"""Decisions per second of the exported DiffusionVLA (onnxruntime, batch 1, 1 thread) on a quiet machine.

The benchmark's evaluation timings run beside other work; this reruns the timing alone on every exported
DiffusionVLA and one-step-head policy of ``benchmarks/vla.py`` (2 MT10 episodes per task, training
phrasings, reasoning every 8 replans) and adds the figures to ``results/vla.json`` as ``quiet_speed``.

Run: python benchmarks/vla_speed.py (after benchmarks/vla.py)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffpilot.data.mt10 import TRAIN_INSTRUCTIONS, load_instructions
from diffpilot.export.runtime import load_runtime
from diffpilot.fileio import atomic_write_text
from diffpilot.sim.mt10_runner import run_mt10, summarize_mt10

ROOT = Path("runs/bench/vla")
RESULTS = Path(__file__).resolve().parent / "results" / "vla.json"


def main() -> None:
    out = {}
    for path in sorted([*ROOT.glob("vla-*/onnx/policy.onnx"), *ROOT.glob("onestep-*/onnx/policy.onnx")]):
        run = path.parent.parent.name
        runtime = load_runtime(path, threads=1)
        summary = summarize_mt10(run_mt10(runtime, runtime.tasks, load_instructions(TRAIN_INSTRUCTIONS), episodes=2,
                                          seed=3000, exec_horizon=runtime.cfg["exec_horizon"], progress=False))
        out[run] = {k: summary[k] for k in ("decisions_per_s", "reason_ms_per_replan", "action_ms_per_replan")}
        out[run]["load_average_1min"] = os.getloadavg()[0]
        print(run, out[run], flush=True)
    payload = json.loads(RESULTS.read_text())
    payload["quiet_speed"] = out
    atomic_write_text(RESULTS, json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
