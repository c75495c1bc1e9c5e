"""Figures for reports: rollouts drawn over the maze, training curves."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffpilot.fileio import save_figure  # noqa: E402
from diffpilot.sim.runner import EpisodeRecord  # noqa: E402


def plot_maze_rollouts(maze_map: Sequence[Sequence[int]], scaling: float, records: Sequence[EpisodeRecord], path: str | Path) -> Path:
    """Top view of the maze with each episode's (x, y) path; goal = observation columns 4:6."""
    grid = np.array([[1 if c == 1 else 0 for c in row] for row in maze_map])
    rows, cols = grid.shape
    fig, ax = plt.subplots(figsize=(1.2 * cols + 1, 1.2 * rows + 0.5))
    extent = (-cols * scaling / 2, cols * scaling / 2, -rows * scaling / 2, rows * scaling / 2)
    ax.imshow(grid, cmap="Greys", vmin=0, vmax=1.6, extent=extent, origin="upper")
    colors = plt.cm.viridis(np.linspace(0, 1, max(len(records), 1)))
    for rec, color in zip(records, colors):
        if rec.observations is None:
            continue
        xy = rec.observations[:, :2]
        ax.plot(xy[:, 0], xy[:, 1], color=color, lw=1.2, alpha=0.9, label=f"ep {rec.episode}{' ✓' if rec.success else ''}")
        ax.plot(*xy[0], "o", color=color, ms=5)
        if rec.observations.shape[1] >= 6:
            ax.plot(*rec.observations[0, 4:6], "*", color="crimson", ms=16, mec="k")
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("closed-loop rollouts (o start, * goal)")
    if len(records) <= 12:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_training_curve(log_csv: str | Path, path: str | Path) -> Path:
    """Smoothed training loss against step, log scale."""
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.semilogy(steps, loss)
    ax.set_xlabel("gradient step")
    ax.set_ylabel("loss (EMA)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
