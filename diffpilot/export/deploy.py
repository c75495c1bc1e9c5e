"""`diffpilot deploy`: an exported policy in a fixed-rate loop, with a latency report. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffpilot.export.control_loop import run_fixed_rate  # noqa: E402
from diffpilot.export.runtime import OnnxChunkPolicy  # noqa: E402
from diffpilot.fileio import atomic_write_text, save_figure  # noqa: E402
from diffpilot.sim.report import markdown_table, write_report  # noqa: E402
from diffpilot.sim.tasks import get_task  # noqa: E402


def latency_histogram(latencies_ms: np.ndarray, period_ms: float, path: Path) -> Path:
    """Histogram of act() latency on a log axis with the deadline marked."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    lo = max(latencies_ms.min(), 1e-3)
    bins = np.logspace(np.log10(lo), np.log10(max(latencies_ms.max(), period_ms) * 1.2), 50)
    ax.hist(latencies_ms, bins=bins, color="tab:blue")
    ax.axvline(period_ms, color="crimson", ls="--", label=f"deadline {period_ms:.1f} ms")
    for q, style in ((50, ":"), (99, "-.")):
        ax.axvline(np.percentile(latencies_ms, q), color="k", ls=style, lw=1, label=f"p{q}")
    ax.set_xscale("log")
    ax.set_xlabel("act() latency (ms)")
    ax.set_ylabel("ticks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def deploy_job(cfg: dict[str, Any]) -> Path:
    """Run ``cfg["model"]`` at ``cfg["hz"]``; writes deploy.json, latency.png and report.md."""
    model = Path(cfg["model"])
    policy = OnnxChunkPolicy(model, threads=int(cfg["threads"]), graph_optimization=cfg["graph_optimization"])
    task = get_task(cfg["sim"]["task"])
    stats, lat = run_fixed_rate(task.make_env, policy, hz=float(cfg["hz"]), episodes=int(cfg["sim"]["episodes"]),
                                seed=int(cfg["sim"]["seed"]))
    out = Path(cfg["out"]) if cfg.get("out") else model.parent / "deploy"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "deploy.json", json.dumps({"model": str(model), **stats.row()}, indent=2))
    latency_histogram(lat, 1e3 / stats.hz, out / "latency.png")
    row = {k: v for k, v in stats.row().items() if k != "episode_returns"}
    return write_report(out, f"Fixed-rate control: {model.name} at {stats.hz:g} Hz", [
        ("Loop", markdown_table([row]) + f"\nonnxruntime, {cfg['threads']} thread(s), task {task.name}, "
                                       f"{cfg['sim']['episodes']} episode(s); returns {stats.episode_returns}.\n"),
        ("Latency", "![latency histogram](latency.png)\n"),
        ("Reproduce", f"```\ndiffpilot deploy model={model} hz={cfg['hz']} threads={cfg['threads']}\n```\n"),
    ])
