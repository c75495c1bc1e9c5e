"""The training log: a CSV with whatever columns the policy and the evaluator report, and its plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from diffpilot.fileio import atomic_path, save_figure


def columns(log: list[dict[str, Any]]) -> list[str]:
    """``step`` first, then every other key in the order it first appeared."""
    cols: list[str] = ["step"]
    for row in log:
        cols.extend(k for k in row if k not in cols)
    return cols


def write_log(path: Path, log: list[dict[str, Any]]) -> Path:
    """The log as CSV (empty cells where a row lacks a column), written atomically."""
    cols = columns(log)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for row in log:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
    return path


def plot_log(log: list[dict[str, Any]], path: Path, max_panels: int = 6) -> Path | None:
    """One panel per logged quantity against the step (evaluation columns drawn with markers); None if nothing to plot."""
    keys = [k for k in columns(log) if k not in ("step", "lr", "train_s") and any(isinstance(r.get(k), (int, float)) for r in log)]
    if not keys:
        return None
    keys = keys[:max_panels]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in log if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, ms=3)
            if "loss" in key and min(ys) > 0 and max(ys) / min(ys) > 20:
                ax.set_yscale("log")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("gradient step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)
