"""The driving jobs behind the CLI: get a driving data set, and evaluate driving planners on it.

Each job takes a config dict shaped like ``conf/driving.yaml`` (missing keys
take its defaults, unknown keys are an error) and returns a path. Scores come
from :mod:`diffpilot.sim.driving.evaluate`; every file is written atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffpilot.data.errors import DatasetError
from diffpilot.data.scenario import SampleSpec, ScenarioLog
from diffpilot.conf import with_defaults
from diffpilot.fileio import atomic_write_text

__all__ = ["DEFAULTS_FILE", "driving_anchors_job", "driving_config", "driving_data_job", "driving_eval_job",
           "embedded_data_path"]

DEFAULTS_FILE = Path(__file__).resolve().parent / "conf" / "driving.yaml"
MODES = {"non_reactive": False, "reactive": True}
NAVSIM_ANCHORS = "NAVSIM (navtest) PDMS: constant velocity 20.6, ego-status MLP 65.6, human 94.8"
TABLE_COLUMNS = ["method", "mode", "pdms", "nc", "dac", "ttc", "ep", "comfort", "l2_1s", "l2_2s", "l2_3s",
                 "collision_1s", "collision_2s", "collision_3s", "progress_m", "out_of_lane_rate", "plan_ms_p50"]


def driving_config(cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cfg`` over the defaults of ``conf/driving.yaml``; an unknown key raises ValueError naming it."""
    return with_defaults("driving", cfg)


# --------------------------------------------------------------------------- data


def embedded_data_path(data: dict[str, Any]) -> Path:
    """Where the embedded data set of these settings lives: ``cache_dir()/driving/<version>-<num_scenes>-s<seed>``."""
    from diffpilot.fileio import cache_dir

    return cache_dir() / "driving" / f"{data['version']}-{int(data['num_scenes'])}-s{int(data['seed'])}"


def driving_data_job(cfg: dict[str, Any]) -> Path:
    """The root of the driving data set ``cfg`` names; generates the embedded set unless it is on disk.

    ``cfg`` is the ``data`` section of ``conf/driving.yaml`` or the whole
    config. With ``root`` set, that nuScenes root is checked and returned.
    Generation writes to a temporary folder renamed into place, so an
    interrupted run leaves nothing that looks complete.
    """
    data = driving_config({"data": dict(cfg.get("data", cfg))})["data"]
    version = str(data["version"])
    if data.get("root"):
        from diffpilot.data.nuscenes import check_nuscenes_root

        return check_nuscenes_root(data["root"], version)  # as fully as the reader checks it
    path = embedded_data_path(data)
    if (path / version / "scene.json").is_file():
        return path
    from diffpilot.data.traffic.generate import generate_driving_dataset

    return Path(generate_driving_dataset(path, num_scenes=int(data["num_scenes"]), seed=int(data["seed"]), version=version,
                                         val_fraction=float(data["val_fraction"]), workers=int(data["workers"]),
                                         ray_address=data.get("ray_address")))


def driving_anchors_job(cfg: dict[str, Any]) -> Path:
    """K-means anchors of the logged ego futures of ``train_split``: ``<out>/anchors.npz`` (+ ``anchors.png``).

    The file is what the ``diffusiondrive_planner`` kind's ``anchors=`` option
    reads, so every run trained on it starts from the same anchors.
    """
    from diffpilot.data.nuscenes import load_scene_samples
    from diffpilot.policy.diffusiondrive import cluster_anchors, plot_anchors, save_anchors

    cfg = driving_config(cfg)
    k = cfg["k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer (the number of anchors), got k={k!r}; e.g. k=20")
    out = Path(str(cfg["out"])).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={out} is a file; pass a folder to write anchors.npz and anchors.png into")
    root = driving_data_job(cfg["data"])
    arrays = load_scene_samples(root, str(cfg["data"]["version"]), str(cfg["train_split"]), SampleSpec(),
                                progress=bool(cfg["progress"]))
    anchors = cluster_anchors(arrays, k=k, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    path = save_anchors(out / "anchors.npz", anchors)
    complete = np.asarray(arrays["ego_future_valid"], dtype=bool).all(axis=1)
    plot_anchors(anchors, out / "anchors.png", futures=np.asarray(arrays["ego_future"])[complete])
    return path


# --------------------------------------------------------------------------- evaluation


def _select_logs(reader: Any, cfg: dict[str, Any]) -> list[ScenarioLog]:
    names = sorted(reader.scene_names(cfg["split"]))
    if cfg.get("scenes"):
        unknown = [s for s in cfg["scenes"] if s not in names]
        if unknown:
            raise DatasetError(f"scenes {unknown[:5]} are not in split {cfg['split']!r}; it has e.g. {names[:5]}")
        names = sorted(dict.fromkeys(cfg["scenes"]))
    if cfg.get("max_scenes") is not None:
        if int(cfg["max_scenes"]) < 1:
            raise ValueError(f"max_scenes must be >= 1 or null, got {cfg['max_scenes']}")
        names = names[: int(cfg["max_scenes"])]
    return [reader.scenario_log(n) for n in names]


def _subset(arrays: dict[str, np.ndarray], scene_tokens: set[str]) -> dict[str, np.ndarray]:
    keep = np.isin(np.asarray(arrays["scene_token"]).astype(str), sorted(scene_tokens))
    if not keep.any():
        raise DatasetError("none of the selected scenes has a keyframe with full history and a future for open-loop scoring")
    return {k: np.asarray(v)[keep] for k, v in arrays.items()}


def _train_ego_mlp(cfg: dict[str, Any], root: Path, version: str, spec: SampleSpec, out: Path) -> tuple[Path, dict[str, Any]]:
    """Train the ego-status MLP on the train split; returns its folder and what was done."""
    from diffpilot.data.nuscenes import load_scene_samples
    from diffpilot.policy.ego_mlp import EgoStatusMLPPlanner
    from diffpilot.train import fit

    m = cfg["ego_mlp"]
    arrays = load_scene_samples(root, version, cfg["train_split"], spec, progress=bool(cfg["progress"]))
    planner = EgoStatusMLPPlanner(future_steps=spec.future_steps, past_steps=spec.past_steps, hidden=int(m["hidden"]),
                                  depth=int(m["depth"]), lr=float(m["lr"]), seed=int(m["seed"]))
    tic = time.perf_counter()
    losses = fit(planner, arrays, steps=int(m["steps"]), batch_size=int(m["batch_size"]), seed=int(m["seed"]),
                 out=out / "ego_mlp_train")  # resumable: a rerun continues from its last checkpoint
    info = {"train_split": cfg["train_split"], "train_samples": int(len(arrays["token"])), "steps": int(m["steps"]),
            "batch_size": int(m["batch_size"]), "final_loss": float(np.mean(losses[-min(50, len(losses)):])),
            "train_s": time.perf_counter() - tic}
    return planner.save(out / "ego_mlp"), info


def _factories(cfg: dict[str, Any], root: Path, version: str, spec: SampleSpec, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from diffpilot.sim.driving.evaluate import planner_factory

    names = [str(n) for n in cfg["planners"]]
    if not names:
        raise ValueError("planners is empty; name at least one of log_replay, constant_velocity, ego_mlp, lane_follower, "
                         "trajopt, or a saved driving policy folder")
    factories, ego_info = {}, {}
    for name in dict.fromkeys(names):
        if Path(name).expanduser().is_dir():  # a saved policy of any driving kind, labelled <kind>:<run folder>
            from diffpilot.policy.registry import stored_kind

            folder = Path(name).expanduser()
            label = f"{stored_kind(folder)}:{folder.parent.name if folder.name in ('policy', 'best') else folder.name}"
            factories[label] = planner_factory(name)
        elif name == "ego_mlp":
            ckpt = cfg["ego_mlp"].get("checkpoint")
            if ckpt:
                ego_info = {"checkpoint": str(ckpt)}
            else:
                path, ego_info = _train_ego_mlp(cfg, root, version, spec, out)
                ckpt = str(path)
                ego_info["checkpoint"] = ckpt
            factories[name] = planner_factory("ego_mlp", checkpoint=str(ckpt))
        else:
            factories[name] = planner_factory(name)
    return factories, ego_info


def _figures(cfg: dict[str, Any], logs: list[ScenarioLog], factories: dict[str, Any], spec: SampleSpec, out: Path) -> tuple[list[str], str | None]:
    """Bird's-eye PNGs of each planner's plan on a few scenes, and one GIF of a closed-loop episode."""
    from diffpilot.data.scene_sample import build_scene_sample
    from diffpilot.sim.driving.evaluate import planner_factory
    from diffpilot.sim.driving.plots import animate_rollout, plot_log, plot_scene
    from diffpilot.sim.driving.simulator import DrivingSimulator

    fig = cfg["figures"]
    pngs: list[str] = []
    for log in logs[: int(fig["scenes"])]:
        lo, hi = spec.past_steps, max(log.num_frames - 1 - spec.future_steps, spec.past_steps)
        frame = min((lo + hi) // 2, log.num_frames - 2)
        sample = build_scene_sample(log, frame, spec)
        for name, factory in factories.items():
            planner = factory()
            planner.reset()
            path = out / f"bev_{log.scene_name}_{name}.png"
            plot_scene(sample, path, planned=planner.plan(sample), title=f"{name} @ {log.scene_name} frame {frame}",
                       m_per_px=spec.raster_m_per_px)
            pngs.append(path.name)
    gif = None
    if logs and fig.get("gif_planner"):
        name, mode = str(fig["gif_planner"]), str(fig["gif_mode"])
        if mode not in MODES:
            raise ValueError(f"figures.gif_mode must be one of {sorted(MODES)}, got {mode!r}")
        factory = factories.get(name) or planner_factory(name)
        log = logs[0]
        rollout = DrivingSimulator(spec, reactive=MODES[mode]).run(log, factory())
        path = animate_rollout(rollout, log, out / f"episode_{name}_{mode}_{log.scene_name}.gif", every=int(fig["gif_every"]))
        plot_log(log, out / f"route_{name}_{mode}_{log.scene_name}.png", frame=rollout.start_frame, rollout=rollout)
        pngs.append(f"route_{name}_{mode}_{log.scene_name}.png")
        gif = path.name
    return pngs, gif


def driving_eval_job(cfg: dict[str, Any]) -> Path:
    """Evaluate the configured planners on ``split``; returns the output folder.

    Writes ``results.json`` (per-method summary, per-scene rows, NAVSIM-style
    rows, settings), ``report.md`` / ``report.html`` with the per-method
    table, bird's-eye PNGs of each planner's plan and one GIF of a
    closed-loop episode. The ego-status MLP, unless a checkpoint is given, is
    first trained on ``train_split`` and saved in ``<out>/ego_mlp``; Ray
    tasks load it from there, so on a cluster ``out`` must be on storage
    every node sees.
    """
    from diffpilot.data.nuscenes import NuScenesReader, load_scene_samples
    from diffpilot.sim.driving.evaluate import evaluate_planner, navsim_scores, open_loop, ray_session, summarize_rows
    from diffpilot.sim.report import markdown_table, write_report

    cfg = driving_config(cfg)
    start = time.perf_counter()
    progress = bool(cfg["progress"])
    modes = list(cfg["modes"])
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty list of {sorted(MODES)}, got {modes}")
    out = Path(cfg["out"]).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    spec = SampleSpec()
    root = driving_data_job(cfg["data"])
    version = str(cfg["data"]["version"])
    reader = NuScenesReader(root, version)
    logs = _select_logs(reader, cfg)
    if not logs:
        raise DatasetError(f"split {cfg['split']!r} of {root / version} has no scenes to evaluate")
    factories, ego_info = _factories(cfg, root, version, spec, out)
    arrays = _subset(load_scene_samples(root, version, cfg["split"], spec, progress=progress), {lg.scene_token for lg in logs})

    reference = cfg["reference"]
    ref_cache: dict[Any, float] = {}
    summary, per_scene, navsim_rows, navsim_scene = [], {}, [], {}
    with ray_session(int(cfg["workers"]), cfg["ray_address"]):
        for name, factory in factories.items():
            ol = open_loop(factory, root, version, cfg["split"], spec, arrays=arrays, progress=progress)
            per_scene[name] = {}
            for mode in modes:
                rows = evaluate_planner(factory, root, version, cfg["split"], reactive=MODES[mode], reference=reference,
                                        workers=int(cfg["workers"]), ray_address=cfg["ray_address"], progress=progress,
                                        spec=spec, reference_cache=ref_cache, logs=logs)
                per_scene[name][mode] = rows
                s = summarize_rows(rows)
                summary.append({"method": name, "mode": mode.replace("_", "-"), **{k: s[k] for k in s},
                                **{k: v for k, v in ol.items() if k != "num_samples"}, "open_loop_samples": ol["num_samples"]})
            frames = int(cfg["navsim"]["frames_per_scene"])
            if frames > 0:
                rows = navsim_scores(factory, root, version, cfg["split"], frames, reference=reference, spec=spec,
                                     progress=progress, logs=logs)
                navsim_scene[name] = rows
                s = summarize_rows(rows)
                navsim_rows.append({"method": name, **{k: s[k] for k in ("pdms", "nc", "dac", "ttc", "ep", "comfort", "progress_m")},
                                    "samples": len(rows)})
    pngs, gif = _figures(cfg, logs, factories, spec, out)

    ref_text = (f"EP reference: the `{reference}` baseline's closed-loop progress on the same scene and mode "
                "(our stand-in for NAVSIM's PDM-Closed; its progress counts times its NC·DAC, so where it collides or "
                "leaves the road every planner gets EP = 1)"
                if reference else "EP reference: the logged human drive's progress over the same span")
    data_text = (f"{len(logs)} scenes of split `{cfg['split']}` of `{root}` (version `{version}`), "
                 f"{int(len(arrays['token']))} open-loop keyframes")
    results = {
        "data_root": str(root), "version": version, "split": cfg["split"], "scenes": [lg.scene_name for lg in logs],
        "reference": reference, "ego_mlp": ego_info, "summary": summary, "navsim": navsim_rows,
        "per_scene": per_scene, "navsim_per_scene": navsim_scene, "figures": pngs, "gif": gif,
        "wall_s": time.perf_counter() - start, "config": cfg,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float) + "\n")
    sections = [
        ("What ran", (
            f"- data: {data_text}\n"
            f"- planners: {', '.join(factories)}; modes: {', '.join(modes)} (non-reactive: agents replay the log, "
            "as in NAVSIM; reactive: agents follow their logged paths with IDM braking)\n"
            f"- {ref_text}\n"
            + (f"- ego-status MLP: {ego_info.get('steps', '?')} training steps on {ego_info.get('train_samples', '?')} "
               f"samples of `{cfg['train_split']}` (final loss {ego_info.get('final_loss', float('nan')):.4g}), saved in "
               f"`{ego_info.get('checkpoint')}`\n" if "train_samples" in ego_info else
               (f"- ego-status MLP loaded from `{ego_info['checkpoint']}`\n" if ego_info else ""))
            + "- open-loop L2 / collision are at the horizon (UniAD convention) on every keyframe; they do not depend on the mode\n"
        )),
        ("Closed-loop PDM score per method", markdown_table(summary, TABLE_COLUMNS)),
    ]
    if navsim_rows:
        sections.append(("NAVSIM-style one-shot PDMS", markdown_table(navsim_rows) + (
            f"\nOne 4-s plan per keyframe ({int(cfg['navsim']['frames_per_scene'])} per scene), tracked by LQR with "
            f"agents replaying the log. Published anchors, on a different data set: {NAVSIM_ANCHORS}.\n")))
    if gif:
        sections.append((f"Closed-loop episode ({cfg['figures']['gif_planner']}, {cfg['figures']['gif_mode']})",
                         f"![episode]({gif})\n"))
    if pngs:
        sections.append(("Bird's-eye views: each planner's plan", "\n".join(f"![{p}]({p})\n" for p in pngs)))
    sections.append(("Per-scene scores", "\n".join(
        f"### {name}, {mode}\n\n" + markdown_table(rows, ["scene", "pdms", "nc", "dac", "ttc", "ep", "comfort", "progress_m",
                                                           "reference_progress_m", "out_of_lane_rate"])
        for name, by_mode in per_scene.items() for mode, rows in by_mode.items())))
    write_report(out, "Driving evaluation", sections)
    return out
