"""Bird's-eye pictures of driving: one planner input, one scene's map, one closed-loop episode as a GIF.

``plot_scene`` draws what a planner saw (ego frame, forward is up) so a bad
plan can be told apart from a bad input; ``plot_log`` and
``animate_rollout`` draw the global frame so a rollout can be checked
against the map and the logged human drive. Every file is written
atomically (complete or absent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import shapely  # noqa: E402
from matplotlib.animation import PillowWriter  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import PathPatch, Polygon  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

from diffpilot.data.geometry import box_corners
from diffpilot.data.scenario import CATEGORIES, COMMANDS, EGO_SIZE, SceneSample, ScenarioLog  # noqa: E402
from diffpilot.fileio import atomic_path, save_figure  # noqa: E402

__all__ = ["CATEGORY_COLORS", "animate_rollout", "plot_log", "plot_scene"]

CATEGORY_COLORS = {"vehicle": "tab:blue", "pedestrian": "tab:orange", "bicycle": "tab:green", "other": "tab:purple"}
_EGO_COLOR = "tab:red"
_LOG_COLOR = "black"
_DRIVABLE_CMAP = ListedColormap(["white", "#dcdcdc"])


def _category_color(index: int) -> str:
    return CATEGORY_COLORS[CATEGORIES[index]] if 0 <= index < len(CATEGORIES) else "grey"


def _corners(pose: np.ndarray, length: float, width: float) -> np.ndarray:
    """Box corners (4, 2) around a centre pose, from the shared box geometry."""
    return box_corners(np.asarray(pose, dtype=np.float64), np.array([length, width], dtype=np.float64))


# --------------------------------------------------------------------------- ego frame


def _up(xy: np.ndarray) -> np.ndarray:
    """Ego-frame (x forward, y left) to plot coordinates with forward up and left on the left."""
    xy = np.asarray(xy)
    return np.stack([-xy[..., 1], xy[..., 0]], axis=-1)


def plot_scene(
    sample: SceneSample, path: str | Path, planned: np.ndarray | None = None, title: str = "", *, m_per_px: float = 1.0
) -> Path:
    """A planner's input in the ego frame (forward up): raster, lanes, agents, logged and planned futures.

    ``m_per_px`` is the raster's scale (the sample does not store it; pass
    ``SampleSpec.raster_m_per_px`` when it is not the default 1 m).
    """
    fig, ax = plt.subplots(figsize=(6, 6))
    raster = np.asarray(sample.drivable)
    half = 32.0
    if raster.ndim == 2 and raster.size:
        half = raster.shape[0] * float(m_per_px) / 2.0
        ax.imshow(raster > 0, cmap=_DRIVABLE_CMAP, vmin=0, vmax=1, extent=(-half, half, -half, half), origin="upper", zorder=0)
    lanes = np.asarray(sample.lanes)
    for lane, ok in zip(lanes, np.asarray(sample.lanes_valid, dtype=bool)):
        if not ok:
            continue
        p = _up(lane[:, :2])
        ax.plot(p[:, 0], p[:, 1], color="tab:cyan", lw=1.0, alpha=0.8, zorder=1)
        m = len(lane) // 2
        d = _up(np.array([np.cos(lane[m, 2]), np.sin(lane[m, 2])]))
        ax.annotate("", xy=p[m] + 1.5 * d, xytext=p[m], arrowprops=dict(arrowstyle="->", color="tab:cyan", lw=1.0), zorder=1)
    now = int(np.shape(sample.ego_past)[0]) - 1
    poses = np.asarray(sample.agents_pose)
    valid = np.asarray(sample.agents_valid, dtype=bool)
    sizes = np.asarray(sample.agents_size)
    for a in range(len(poses)):
        color = _category_color(int(sample.agents_category[a]))
        fut = valid[a, now + 1 :]
        if fut.any():
            f = _up(poses[a, now + 1 :][fut, :2])
            ax.plot(f[:, 0], f[:, 1], color=color, lw=1.0, alpha=0.3, zorder=2)
        if valid[a, now]:
            ax.add_patch(Polygon(_up(_corners(poses[a, now], *sizes[a])), closed=True, fc=color, ec="k", lw=0.5, alpha=0.8, zorder=3))
    ax.add_patch(Polygon(_up(_corners(np.zeros(3), *EGO_SIZE)), closed=True, fc=_EGO_COLOR, ec="k", lw=0.8, zorder=4))
    past = _up(np.asarray(sample.ego_past)[:, :2])
    ax.plot(past[:, 0], past[:, 1], color=_LOG_COLOR, lw=1.0, alpha=0.4, zorder=4)
    fv = np.asarray(sample.ego_future_valid, dtype=bool)
    if fv.any():
        logged = _up(np.concatenate([np.zeros((1, 2)), np.asarray(sample.ego_future)[fv, :2]]))
        ax.plot(logged[:, 0], logged[:, 1], "--o", color=_LOG_COLOR, lw=1.2, ms=2.5, label="logged", zorder=5)
    if planned is not None:
        plan = np.asarray(planned, dtype=np.float64)
        if plan.ndim != 2 or plan.shape[1] < 2:
            raise ValueError(f"planned must be (H, 3) ego-frame poses, got shape {plan.shape}")
        pl = _up(np.concatenate([np.zeros((1, 2)), plan[:, :2]]))
        ax.plot(pl[:, 0], pl[:, 1], "-o", color=_EGO_COLOR, lw=1.8, ms=3, label="planned", zorder=6)
    command = COMMANDS[int(sample.command)] if 0 <= int(sample.command) < len(COMMANDS) else str(sample.command)
    speed = float(np.asarray(sample.ego_status)[0])
    ax.set_title(f"{title + '  ' if title else ''}command: {command}, {speed:.1f} m/s", fontsize=10)
    ax.set_xlim(-half, half)
    ax.set_ylim(-half, half)
    ax.set_aspect("equal")
    ax.set_xlabel("← left   lateral (m)   right →")
    ax.set_ylabel("forward (m)")
    handles = [plt.Line2D([], [], color=c, marker="s", ls="", label=n) for n, c in CATEGORY_COLORS.items()]
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- global frame


def _geometry_patch(geom: shapely.Geometry, **kwargs: Any) -> PathPatch | None:
    """A patch for a (multi)polygon, holes included."""
    polys = [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, shapely.Polygon) and not g.is_empty]
    verts, codes = [], []
    for poly in polys:
        for ring in [poly.exterior, *poly.interiors]:
            xy = np.asarray(ring.coords)[:, :2]
            if len(xy) < 3:
                continue
            verts.append(xy)
            codes.append([MplPath.MOVETO] + [MplPath.LINETO] * (len(xy) - 2) + [MplPath.CLOSEPOLY])
    if not verts:
        return None
    return PathPatch(MplPath(np.concatenate(verts), np.concatenate(codes)), **kwargs)


def _draw_map(ax: Any, log: ScenarioLog) -> None:
    geom = log.map.drivable
    if geom is not None and not geom.is_empty:
        patch = _geometry_patch(geom, fc="#dcdcdc", ec="#b0b0b0", lw=0.5, zorder=0)
        if patch is not None:
            ax.add_patch(patch)
    for poly in list(log.map.crosswalks):
        patch = _geometry_patch(poly, fc="none", ec="#999999", hatch="///", lw=0.5, zorder=0)
        if patch is not None:
            ax.add_patch(patch)
    for poly in list(log.map.stop_lines):
        patch = _geometry_patch(poly, fc="#f4a3a3", ec="none", alpha=0.8, zorder=1)
        if patch is not None:
            ax.add_patch(patch)
    connector = np.asarray(log.map.lane_is_connector, dtype=bool)
    for i, lane in enumerate(log.map.lanes):
        lane = np.asarray(lane)
        if len(lane) < 2:
            continue
        is_conn = bool(connector[i]) if i < len(connector) else False
        ax.plot(lane[:, 0], lane[:, 1], color="tab:cyan", lw=0.7, alpha=0.5 if is_conn else 0.9, ls=":" if is_conn else "-", zorder=1)


def _draw_agents(ax: Any, poses: np.ndarray, valid: np.ndarray, sizes: np.ndarray, categories: np.ndarray, alpha: float = 0.85) -> list[Any]:
    patches = []
    for a in np.flatnonzero(valid):
        patch = Polygon(_corners(poses[a], *sizes[a]), closed=True, fc=_category_color(int(categories[a])), ec="k", lw=0.5, alpha=alpha, zorder=3)
        ax.add_patch(patch)
        patches.append(patch)
    return patches


def plot_log(log: ScenarioLog, path: str | Path, frame: int = 0, rollout: Any = None) -> Path:
    """Global-frame map of a scene: drivable area, lanes, the logged ego route, agents at ``frame``, the driven route."""
    T = log.num_frames
    if not 0 <= frame < T:
        raise ValueError(f"frame {frame} is outside scene {log.scene_name!r} (0..{T - 1})")
    fig, ax = plt.subplots(figsize=(7, 7))
    _draw_map(ax, log)
    ego = np.asarray(log.ego_pose)
    ax.plot(ego[:, 0], ego[:, 1], "--", color=_LOG_COLOR, lw=1.2, label="logged ego", zorder=4)
    _draw_agents(ax, np.asarray(log.agents_pose)[:, frame], np.asarray(log.agents_valid, dtype=bool)[:, frame],
                 np.asarray(log.agents_size), np.asarray(log.agents_category))
    ax.add_patch(Polygon(_corners(ego[frame], *log.ego_size), closed=True, fc="none", ec=_LOG_COLOR, lw=1.2, zorder=5))
    pts = [ego[:, :2]]
    if rollout is not None:
        driven = np.asarray(rollout.ego_states)[:, :2]
        ax.plot(driven[:, 0], driven[:, 1], "-", color=_EGO_COLOR, lw=1.6, label="driven", zorder=5)
        pts.append(driven)
    allpts = np.concatenate(pts)
    lo, hi = allpts.min(0) - 30.0, allpts.max(0) + 30.0
    centre, span = (lo + hi) / 2, float(max(hi - lo))
    ax.set_xlim(centre[0] - span / 2, centre[0] + span / 2)
    ax.set_ylim(centre[1] - span / 2, centre[1] + span / 2)
    ax.set_aspect("equal")
    ax.set_title(f"{log.scene_name} ({log.location}), frame {frame}", fontsize=10)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path)


class _GifWriter(PillowWriter):
    """PillowWriter that names the format, so it can write to an atomic temporary file without a .gif suffix."""

    def finish(self) -> None:
        self._frames[0].save(self.outfile, format="GIF", save_all=True, append_images=self._frames[1:],
                             duration=int(1000 / self.fps), loop=0)


def animate_rollout(rollout: Any, log: ScenarioLog, path: str | Path, fps: int = 10, every: int = 1, window_m: float = 40.0) -> Path:
    """An animated GIF of a closed-loop episode in a window following the ego.

    One frame per ``every`` simulator steps (``len(range(0, N, every))``
    frames): map, agents, the driven ego (red), the current plan, the logged
    ego at the same time (outline) and the logged route (dashed).
    """
    if fps < 1 or every < 1:
        raise ValueError(f"fps and every must be >= 1, got {fps} and {every}")
    times = np.asarray(rollout.times, dtype=np.float64)
    states = np.asarray(rollout.ego_states, dtype=np.float64)
    if len(times) == 0 or states.shape != (len(times), 5):
        raise ValueError(f"rollout has {len(times)} times and ego_states {states.shape}; expected (N, 5) with N >= 1")
    frames = list(range(0, len(times), every))
    log_t = np.asarray(log.times, dtype=np.float64)
    log_ego = np.asarray(log.ego_pose, dtype=np.float64)
    plan_t = np.array([t for t, _ in rollout.plans]) if rollout.plans else np.zeros(0)
    a_pose, a_valid = np.asarray(rollout.agents_pose), np.asarray(rollout.agents_valid, dtype=bool)
    a_size, a_cat = np.asarray(rollout.agents_size), np.asarray(rollout.agents_category)
    ego_size = tuple(getattr(rollout, "ego_size", log.ego_size))

    fig, ax = plt.subplots(figsize=(5, 5))
    _draw_map(ax, log)
    ax.plot(log_ego[:, 0], log_ego[:, 1], "--", color=_LOG_COLOR, lw=0.8, alpha=0.6, zorder=2)
    driven_line, = ax.plot([], [], "-", color=_EGO_COLOR, lw=1.0, alpha=0.6, zorder=4)
    plan_line, = ax.plot([], [], "-o", color=_EGO_COLOR, lw=1.4, ms=2.5, zorder=6)
    logged_box = Polygon(np.zeros((4, 2)), closed=True, fc="none", ec=_LOG_COLOR, lw=1.0, ls="--", zorder=5)
    ego_box = Polygon(np.zeros((4, 2)), closed=True, fc=_EGO_COLOR, ec="k", lw=0.8, zorder=6)
    ax.add_patch(logged_box)
    ax.add_patch(ego_box)
    label = ax.text(0.02, 0.97, "", transform=ax.transAxes, va="top", fontsize=8,
                    bbox=dict(fc="white", ec="none", alpha=0.8), zorder=7)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{rollout.scene_name}", fontsize=9)
    fig.tight_layout()
    writer = _GifWriter(fps=fps)
    path = Path(path)
    agent_patches: list[Any] = []
    with atomic_path(path) as tmp:
        with writer.saving(fig, str(tmp), dpi=80):
            for n in frames:
                t, st = times[n], states[n]
                for p in agent_patches:
                    p.remove()
                agent_patches = _draw_agents(ax, a_pose[:, n], a_valid[:, n], a_size, a_cat) if a_pose.size else []
                ego_box.set_xy(_corners(st[:3], *ego_size))
                driven_line.set_data(states[: n + 1, 0], states[: n + 1, 1])
                if len(log_t) >= 2 and log_t[0] <= t <= log_t[-1]:
                    yaw = np.interp(t, log_t, np.unwrap(log_ego[:, 2]))
                    logged = np.array([np.interp(t, log_t, log_ego[:, 0]), np.interp(t, log_t, log_ego[:, 1]), yaw])
                    logged_box.set_xy(_corners(logged, *log.ego_size))
                    logged_box.set_visible(True)
                else:
                    logged_box.set_visible(False)
                k = int(np.searchsorted(plan_t, t + 1e-9, side="right")) - 1
                if k >= 0:
                    plan = np.concatenate([st[None, :2], rollout.plans[k][1][:, :2]])
                    plan_line.set_data(plan[:, 0], plan[:, 1])
                else:
                    plan_line.set_data([], [])
                ax.set_xlim(st[0] - window_m, st[0] + window_m)
                ax.set_ylim(st[1] - window_m, st[1] + window_m)
                label.set_text(f"t = {t - times[0]:4.1f} s   v = {st[3]:4.1f} m/s")
                writer.grab_frame()
    plt.close(fig)
    return path
