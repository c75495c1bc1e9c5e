"""The jobs behind the CLI: generate data, train, evaluate, and the end-to-end demo.

Each job takes a resolved config (plain dict-like), does one thing, and
leaves its outputs in a folder, so the CLI, the demo and the benchmarks
share one code path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from diffpilot.data.d4rl import read_d4rl
from diffpilot.data.errors import DatasetError
from diffpilot.data.maze2d import generate_maze2d
from diffpilot.data.recovery import RecoverySpec
from diffpilot.data.scenario import SampleSpec
from diffpilot.data.pick_place import generate_pick_place
from diffpilot.data.windows import ChunkWindows
from diffpilot.fileio import atomic_write_text, cache_dir
from diffpilot.policy.registry import build_policy, load_policy, policy_class, policy_options
from diffpilot.sim.plots import plot_maze_rollouts, plot_training_curve
from diffpilot.sim.report import markdown_table, write_report
from diffpilot.sim.runner import EpisodeRecord, run_episodes, summarize
from diffpilot.sim.tasks import Task, dataset_reference, get_task
from diffpilot.train.offline_rl import OFFLINE_RL_KINDS, train_offline_rl
from diffpilot.train import distributed
from diffpilot.train.trainer import TensorRows, Trainer, TrainerConfig, check_settings


def dataset_path(data: dict[str, Any]) -> Path:
    """The data set's file: ``data.path`` when given (it must exist), else its place in the cache."""
    if data.get("path"):
        path = Path(data["path"]).expanduser()
        if not path.is_file():
            raise DatasetError(
                f"data.path={data['path']} does not exist or is not a file; pass an existing D4RL-format HDF5 file, "
                f"or drop data.path to generate the {data.get('name', 'configured')} data set"
            )
        return path
    if data["kind"] == "pick_place":
        name = f"{data['name']}-{data['episodes']}ep-noise{data['noise']}-s{data['seed']}.hdf5"
    else:
        segments = int(data.get("segments", 1) or 1)
        name = f"{data['name']}-{data['reward']}-{data['num_steps']}-s{data['seed']}{f'-seg{segments}' if segments > 1 else ''}.hdf5"
    return cache_dir() / "datasets" / name


def generate_job(data: dict[str, Any], progress: bool = True) -> Path:
    """Generate the data set ``data`` describes, unless it is already on disk."""
    if data["kind"] == "mt10":
        return mt10_data_job(data, progress)
    if data["kind"] == "locomotion" and not data.get("path"):
        from diffpilot.data.locomotion import build_locomotion_dataset  # SAC and stable-baselines3 only when needed

        return build_locomotion_dataset(
            data["env"], data["dataset"], None, data.get("sac_steps"), data.get("transitions"), int(data["seed"]),
            eval_interval=data.get("eval_interval"), eval_episodes=int(data["eval_episodes"]),
            reference_episodes=int(data["reference_episodes"]), progress=progress,
            segments=int(data.get("segments", 1) or 1), workers=int(data.get("workers", 1) or 1),
            ray_address=data.get("ray_address"),
        )
    path = dataset_path(data)
    if path.exists():
        return path
    if data["kind"] not in ("maze2d", "pick_place"):
        raise ValueError(f"unknown data kind {data['kind']!r}; this version generates 'maze2d' and 'pick_place'")
    path.parent.mkdir(parents=True, exist_ok=True)
    if data["kind"] == "pick_place":
        return generate_pick_place(
            path, episodes=int(data["episodes"]), noise=float(data["noise"]), seed=int(data["seed"]),
            reference_episodes=int(data["reference_episodes"]), progress=progress,
        )
    generate_maze2d(
        data["maze"], int(data["num_steps"]), seed=int(data["seed"]), reward=data["reward"],
        episode_len=int(data["episode_len"]), path=path, progress=progress,
        reference_episodes=int(data["reference_episodes"]), segments=int(data.get("segments", 1) or 1),
        workers=int(data.get("workers", 1) or 1), ray_address=data.get("ray_address"),
    )
    return path


MT10_DATA_KEYS = ("episodes_per_task", "image_size", "camera", "obs_every", "max_steps", "seed", "tasks",
                  "instructions", "workers", "ray_address")


def mt10_data_job(data: dict[str, Any], progress: bool = True) -> Path:
    """Meta-World MT10 demonstrations (``data=mt10``): ``data.path`` when given, else generated (cached, resumable)."""
    if data.get("path"):
        path = Path(data["path"]).expanduser()
        if not path.is_file():
            raise DatasetError(f"data.path={data['path']} does not exist or is not a file; pass an MT10 demonstration "
                               "file, or drop data.path to generate one with `diffpilot data mt10`")
        return path
    from diffpilot.data.mt10 import generate_mt10  # Meta-World and the renderer only when needed

    return generate_mt10(None, progress=progress, **{k: data[k] for k in MT10_DATA_KEYS})


def trainer_config(cfg: dict[str, Any]) -> TrainerConfig:
    """The ``train`` block as :class:`TrainerConfig`; an unknown key is refused by name."""
    train = dict(cfg["train"])
    fields = set(TrainerConfig.__dataclass_fields__) - {"seed", "progress"}
    unknown = sorted(set(train) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {['train.' + k for k in unknown]}; valid: {sorted('train.' + k for k in fields)}")
    return TrainerConfig(**train, seed=int(cfg["seed"]), progress=bool(cfg.get("progress", True)))


def train_job(cfg: dict[str, Any], on_log: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Train the configured policy kind on the configured data set; returns the saved policy folder.

    Every key reaches the code that uses it or is refused: the policy block
    maps onto the kind's Config, the train block onto :class:`TrainerConfig`. ``on_log(row)`` sees every
    row of the training log (a sweep reports them to Ray Tune).
    """
    data_cfg = cfg["data"]
    task_name = data_cfg["name"] if data_cfg["kind"] == "locomotion" else cfg["sim"]["task"]
    kind, options = policy_options(cfg["policy"], data_cfg["name"])
    tcfg = trainer_config(cfg)
    dist = distributed.setup(tcfg.device)  # under torchrun: join the process group; else one process
    check_settings(policy_class(kind), tcfg)
    out = Path(cfg["out"])
    driving = hasattr(policy_class(kind), "plan")
    if driving != (data_cfg["kind"] == "driving"):
        raise ValueError(
            f"policy {kind!r} {'plans drives and trains on data=driving' if driving else 'acts in gym tasks and cannot train on data=driving'}; "
            f"pick a matching data= option"
        )
    if driving:
        return _train_driving(cfg, kind, options, tcfg, out, on_log)
    if (kind == "diffusion_vla") != (data_cfg["kind"] == "mt10"):
        raise ValueError(f"policy {kind!r} and data={data_cfg['name']} do not fit: diffusion_vla trains on data=mt10 "
                         "(language-instructed demonstrations) and only it does")
    if kind == "diffusion_vla":
        from diffpilot.vla_jobs import train_vla

        return train_vla(cfg, generate_job(data_cfg, tcfg.progress), options, tcfg, out)
    with distributed.rank_zero_first():  # rank 0 generates (cached), the others read it
        data_path = generate_job(data_cfg, tcfg.progress and dist.main)
    ds = read_d4rl(data_path)
    resume = bool(cfg.get("resume", True))
    if kind in OFFLINE_RL_KINDS:
        summary = train_offline_rl(kind, ds, task_name, out, tcfg.steps, tcfg.eval_every, int(cfg["sim"]["episodes"]),
                                   tcfg.seed, config=tcfg, policy_config=options, eval_seed=int(cfg["sim"]["seed"]),
                                   resume=resume, on_log=on_log)
        return Path(summary["best"] or summary["last"])
    task = get_task(task_name, data_cfg.get("reward", "sparse"))
    obs = task.observations(ds)
    torch.manual_seed(tcfg.seed)
    policy = build_policy({"name": kind, **options}, obs.shape[1], ds.act_dim)
    policy.fit_normalizers(obs, ds.actions)
    windows = ChunkWindows(obs, ds.actions, ds.episode_slices(), policy.obs_horizon, policy.action_horizon)
    evaluator = None
    if tcfg.eval_every:
        ref, _ = reference_for(task, data_path)
        episodes, seed = int(cfg["sim"]["episodes"]), int(cfg["sim"]["seed"])

        def evaluator(acting: Any) -> dict[str, float]:
            return summarize(run_episodes(task.make_env, acting, episodes, seed=seed, ref_scores=ref, progress=False))

    trainer = Trainer(policy, windows, tcfg, out, evaluator=evaluator,
                      fingerprint={"rows": len(ds), "obs_dim": int(obs.shape[1]), "act_dim": ds.act_dim}, on_log=on_log)
    out.mkdir(parents=True, exist_ok=True)
    if dist.main:
        atomic_write_text(out / "run.yaml", yaml.safe_dump({**cfg, "data_path": str(data_path)}, sort_keys=False))
    trainer.run(resume=resume)
    return out / "policy"


DRIVING_DATA_KEYS = ("root", "version", "num_scenes", "seed", "val_fraction", "workers", "ray_address")


def _train_driving(cfg: dict[str, Any], kind: str, options: dict[str, Any], tcfg: TrainerConfig, out: Path,
                   on_log: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A driving kind on the scene samples of the data set's train split, through the same trainer."""
    from diffpilot.data.nuscenes import load_scene_samples
    from diffpilot.driving_jobs import driving_data_job

    data_cfg = cfg["data"]
    torch.manual_seed(tcfg.seed)
    policy = build_policy({"name": kind, **options})
    _check_driving_extras(policy, data_cfg)
    if hasattr(policy, "load_teacher"):
        policy.load_teacher()  # a distillation teacher that is missing or of another kind fails before any data work
        policy.start_from_teacher()
    with distributed.rank_zero_first():
        root = driving_data_job({k: data_cfg[k] for k in DRIVING_DATA_KEYS})
    spec = SampleSpec(past_steps=int(policy.config.get("past_steps", SampleSpec.past_steps)),
                      future_steps=int(policy.config.get("future_steps", policy.config.get("horizon", SampleSpec.future_steps))))
    version, split = str(data_cfg["version"]), str(data_cfg["train_split"])
    arrays = load_scene_samples(root, version, split, spec, progress=tcfg.progress)
    extras = _driving_extras(policy, data_cfg, root, version, split, arrays, tcfg)
    arrays, extras = _with_recovery(arrays, extras, data_cfg, root, version, split, spec, tcfg)
    rows = policy.training_rows(arrays, **extras)
    policy.fit_to_batch(rows)
    source = TensorRows(rows) if isinstance(rows, dict) else rows
    trainer = Trainer(policy, source, tcfg, out, fingerprint={"root": str(root), "split": str(data_cfg["train_split"]),
                                                              "rows": len(source)}, on_log=on_log)
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        atomic_write_text(out / "run.yaml", yaml.safe_dump({**cfg, "data_root": str(root)}, sort_keys=False))
    trainer.run(resume=bool(cfg.get("resume", True)))
    return out / "policy"


def _check_driving_extras(policy: Any, data_cfg: dict[str, Any]) -> None:
    """Refuse, before any work, a data option the policy cannot use or a path that is not there."""
    import inspect

    aug = data_cfg.get("augmented")
    if aug:
        if "augmented" not in inspect.signature(policy.training_rows).parameters:
            raise ValueError(f"data.augmented does not apply to a {policy.KIND!r} policy (it trains on the logs only); drop it")
        if not (Path(str(aug)).expanduser() / "augment.json").is_file():
            raise DatasetError(f"data.augmented={aug} is no augmentation output (no augment.json); pass the folder "
                               "diffpilot.planning.augment wrote for this data set's train split")
    if int(data_cfg.get("score_every", 1)) < 1 or int(data_cfg.get("score_candidates", 8)) < 1:
        raise ValueError("data.score_every and data.score_candidates must be >= 1")
    try:
        _recovery_spec(data_cfg)
    except ValueError as e:
        raise ValueError(f"data.recovery_*: {e}") from None


def _driving_extras(policy: Any, data_cfg: dict[str, Any], root: Path, version: str, split: str,
                    arrays: dict[str, Any], tcfg: TrainerConfig) -> dict[str, Any]:
    """What a driving kind's ``training_rows`` takes beside the logs: augmented trajectories
    (``data.augmented=<dir>``) and simulator-scored candidates for a learned selection head."""
    extras: dict[str, Any] = {}
    if data_cfg.get("augmented"):
        from diffpilot.planning.augment import read_augmented

        extras["augmented"] = read_augmented(Path(str(data_cfg["augmented"])).expanduser())
    if getattr(policy, "wants_scored_candidates", False):
        from diffpilot.sim.driving.candidates import scored_candidates

        every = int(data_cfg.get("score_every", 1))
        W = len(arrays["command"])
        rows = np.arange(0, W, every)
        bank = scored_candidates(root, version, split, {k: np.asarray(v)[rows] for k, v in arrays.items()},
                                 num_candidates=int(data_cfg.get("score_candidates", 8)), seed=int(data_cfg.get("seed", 0)),
                                 workers=int(data_cfg.get("workers", 1)), progress=tcfg.progress)
        full = {k: np.zeros((W, *v.shape[1:]), v.dtype) for k, v in bank.items()}
        for k, v in bank.items():
            full[k][rows] = v
        full["valid"] = np.zeros(W, bool)
        full["valid"][rows] = True
        extras["candidates"] = full
    return extras


def _recovery_spec(data_cfg: dict[str, Any]) -> RecoverySpec:
    """The :class:`~diffpilot.data.recovery.RecoverySpec` of a driving data config (``recovery_*`` keys)."""
    return RecoverySpec(copies=int(data_cfg.get("recovery_copies", 0)), lateral_m=float(data_cfg.get("recovery_lateral_m", 1.5)),
                        heading_deg=float(data_cfg.get("recovery_heading_deg", 6.0)),
                        recover_s=float(data_cfg.get("recovery_s", 2.5)), seed=int(data_cfg.get("seed", 0)))


def _with_recovery(arrays: dict[str, Any], extras: dict[str, Any], data_cfg: dict[str, Any], root: Path, version: str,
                   split: str, spec: SampleSpec, tcfg: TrainerConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The logged windows followed by ``data.recovery_copies`` recovery windows per keyframe (none: unchanged).

    Augmented trajectories index the logged windows, which keep their
    places; the scored candidates cover the logged windows only, so the
    recovery rows are marked unscored.
    """
    recovery = _recovery_spec(data_cfg)
    if recovery.copies == 0:
        return arrays, extras
    from diffpilot.data.nuscenes import load_scene_samples

    extra = load_scene_samples(root, version, split, spec, progress=tcfg.progress, recovery=recovery)
    R = len(extra["command"])
    merged = {k: np.concatenate([np.asarray(v), np.asarray(extra[k])]) for k, v in arrays.items()}
    if "candidates" in extras:
        extras = {**extras, "candidates": {k: np.concatenate([v, np.zeros((R, *v.shape[1:]), v.dtype)])
                                           for k, v in extras["candidates"].items()}}
    return merged, extras


def reference_for(task: Task, data_path: str | Path | None, episodes: int = 100) -> tuple[tuple[float, float], str]:
    """Reference (min, max) returns and where they came from: the data set's metadata or a fresh local run."""
    if data_path and Path(data_path).exists():
        ref = dataset_reference(read_d4rl(data_path))
        if ref is not None:
            return ref, f"local reference stored in {Path(data_path).name}"
    return task.local_reference(episodes), f"local reference recomputed over {episodes} episodes"


def evaluate(
    policy: Any, task: Task, episodes: int, seed: int, ref: tuple[float, float], progress: bool = True,
    workers: int = 1, ray_address: str | None = None,
) -> tuple[dict[str, Any], list[EpisodeRecord]]:
    records = run_episodes(task.make_env, policy, episodes, seed=seed, ref_scores=ref, progress=progress,
                           workers=workers, ray_address=ray_address)
    return summarize(records), records


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def eval_job(cfg: dict[str, Any]) -> Path:
    """Evaluate a saved policy closed loop; writes eval.json and report.md next to it."""
    ckpt = Path(cfg["checkpoint"])
    policy = load_policy(ckpt)
    if hasattr(policy, "plan"):
        return _eval_driving(cfg, ckpt)
    if policy.KIND == "diffusion_vla":
        from diffpilot.vla_jobs import eval_vla_job

        return eval_vla_job(cfg, ckpt)
    if cfg.get("sampler"):
        if not hasattr(policy, "set_sampler"):
            raise ValueError(f"sampler= does not apply to a {policy.KIND!r} policy (its sampler is fixed at training); drop it")
        sampler = dict(cfg["sampler"])
        policy.set_sampler(sampler.pop("name"), **sampler)
    out = Path(cfg["out"]) if cfg.get("out") else ckpt.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    run_yaml = ckpt.parent / "run.yaml"
    data_path = cfg.get("data_path") or (yaml.safe_load(run_yaml.read_text()).get("data_path") if run_yaml.exists() else None)
    task = get_task(cfg["sim"]["task"])
    ref, ref_source = reference_for(task, data_path)
    summary, records = evaluate(policy, task, int(cfg["sim"]["episodes"]), int(cfg["sim"]["seed"]), ref, cfg.get("progress", True),
                                workers=int(cfg.get("workers", 1)), ray_address=cfg.get("ray_address"))
    _write_json(out / "eval.json", {"summary": summary, "reference": list(ref), "reference_source": ref_source,
                                   "episodes": [r.row() for r in records]})
    figure = _rollout_figure(task, records, out / "rollouts.png")
    write_report(out, f"Closed-loop evaluation: {task.name}", [
        ("Summary", markdown_table([summary]) + f"\nReference returns (min, max) = {ref[0]:.2f}, {ref[1]:.2f} ({ref_source}).\n"),
        *([("Rollouts", "![rollouts](rollouts.png)\n")] if figure else []),
        ("Episodes", markdown_table([r.row() for r in records], ["episode", "seed", "episode_return", "normalized_score", "success", "latency_ms_p50", "latency_ms_p99"])),
    ])
    return out


def _eval_driving(cfg: dict[str, Any], ckpt: Path) -> Path:
    """A driving policy: closed loop (both modes), open loop and one-shot PDMS beside the lane follower,
    on the data set it was trained on (from its run.yaml; else the embedded default)."""
    from diffpilot.driving_jobs import driving_eval_job

    run_yaml = ckpt.parent / "run.yaml"
    run = (yaml.safe_load(run_yaml.read_text()) or {}) if run_yaml.is_file() else {}
    data = run.get("data") or {}
    data = {k: data[k] for k in DRIVING_DATA_KEYS if k in data} if data.get("kind") == "driving" else {}
    out = Path(cfg["out"]) if cfg.get("out") else ckpt.parent / "eval"
    return driving_eval_job({"data": data, "planners": ["lane_follower", str(ckpt)],
                             "out": str(out), "progress": bool(cfg.get("progress", True))})


def export_job(cfg: dict[str, Any]) -> Path:
    """Export a saved policy to ONNX (self-checked against torch); optionally an int8 copy beside it."""
    from diffpilot.export.onnx import export_by_kind, quantize_dynamic_int8

    ckpt = Path(cfg["checkpoint"])
    policy = load_policy(ckpt)
    out = Path(cfg["out"]) if cfg.get("out") else ckpt.parent / "policy.onnx"
    path = export_by_kind(policy, out, dict(cfg["sampler"]) if cfg.get("sampler") else None, batch=cfg.get("batch"))
    if cfg.get("int8"):
        quantize_dynamic_int8(path, path.with_suffix(".int8.onnx"))
    return path


def _rollout_figure(task: Task, records: list[EpisodeRecord], path: Path) -> bool:
    """Top-down rollouts for maze tasks; False (no figure) for the others."""
    env = task.make_env()
    try:
        maze = getattr(env.unwrapped, "maze", None)
        if maze is None:
            return False
        plot_maze_rollouts(maze.maze_map, maze.maze_size_scaling, records, path)
        return True
    finally:
        env.close()


def demo_job(cfg: dict[str, Any]) -> Path:
    """Generate data, train briefly, evaluate closed loop with two samplers, write the report."""
    t0 = time.perf_counter()
    out = Path(cfg["out"])
    policy_dir = train_job(cfg)
    train_s = time.perf_counter() - t0
    policy = load_policy(policy_dir, kind="chunk_diffusion")
    data_path = dataset_path(cfg["data"])
    task = get_task(cfg["sim"]["task"], cfg["data"].get("reward", "sparse"))
    ref, ref_source = reference_for(task, data_path)
    rows, all_records = [], {}
    for spec in cfg["eval_samplers"]:
        spec = dict(spec)
        name = spec.pop("name")
        policy.set_sampler(name, **spec)
        summary, records = evaluate(policy, task, int(cfg["sim"]["episodes"]), int(cfg["sim"]["seed"]), ref, cfg.get("progress", True))
        label = f"{name}-{policy.last_nfe}"
        rows.append({"sampler": label, "nfe_per_chunk": policy.last_nfe, **summary})
        all_records[label] = records
    if cfg.get("export_onnx", True):
        from diffpilot.export.onnx import export_policy
        from diffpilot.export.runtime import OnnxChunkPolicy

        first = dict(cfg["eval_samplers"][0])
        onnx_path = export_policy(policy, out / "policy.onnx", first)
        runtime = OnnxChunkPolicy(onnx_path, threads=1)
        summary, records = evaluate(runtime, task, int(cfg["sim"]["episodes"]), int(cfg["sim"]["seed"]), ref, cfg.get("progress", True))
        label = f"{first['name']}-{runtime.nfe} (onnxruntime)"
        rows.append({"sampler": label, "nfe_per_chunk": runtime.nfe, **summary})
        all_records[label] = records
    _write_json(out / "eval.json", {"reference": list(ref), "reference_source": ref_source, "rows": rows,
                                    "episodes": {k: [r.row() for r in v] for k, v in all_records.items()}})
    driving_sections = _demo_driving(cfg["driving"], out / "driving") if cfg.get("driving") else []
    if cfg.get("stl"):
        data = (cfg.get("driving") or {}).get("data") or {}
        driving_sections += _demo_stl({"data": data, **cfg["stl"]}, out / "stl")
    _rollout_figure(task, all_records[rows[0]["sampler"]], out / "rollouts.png")
    plot_training_curve(out / "train_log.csv", out / "train_loss.png")
    ds = read_d4rl(data_path)
    cols = ["sampler", "nfe_per_chunk", "normalized_score", "normalized_score_std", "success_rate", "return_mean", "latency_ms_mean", "latency_ms_p99"]
    return write_report(out, "diffpilot demo: chunk diffusion policy on maze2d-umaze", [
        ("What ran", (
            f"- data: `{data_path.name}`: {len(ds)} transitions, {len(ds.episode_slices())} episodes, generated by the D4RL maze2d recipe on PointMaze\n"
            f"- policy: ConditionalUnet1D chunk diffusion policy, obs horizon {policy.obs_horizon}, chunk {policy.action_horizon}, executed {policy.exec_horizon}; "
            f"{sum(p.numel() for p in policy.parameters())} parameters\n"
            f"- training: {cfg['train']['steps']} steps, batch {cfg['train']['batch_size']} ({train_s:.0f} s including data generation)\n"
            f"- evaluation: {cfg['sim']['episodes']} episodes in MuJoCo per sampler, seeds from {cfg['sim']['seed']}\n"
            f"- reference returns (min, max) = {ref[0]:.2f}, {ref[1]:.2f} ({ref_source})\n"
            + ("- `policy.onnx`: the policy exported to ONNX (normalizers + unrolled sampler, checked against torch), "
               "evaluated by the torch-free onnxruntime runtime in the last row\n" if cfg.get("export_onnx", True) else "")
        )),
        ("Closed-loop results", markdown_table(rows, cols) + (
            "\n`latency_ms_mean` is the policy's time per executed action (a chunk is planned every "
            f"{policy.exec_horizon} steps); `latency_ms_p99` is dominated by the planning steps.\n")),
        (f"Rollouts ({rows[0]['sampler']})", "![rollouts](rollouts.png)\n"),
        ("Training loss", "![training loss](train_loss.png)\n"),
        *driving_sections,
        ("Reproduce", f"```\ndiffpilot demo out={out}\n```\n"),
    ])


def _demo_stl(stl: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """The demo's STL part: the compliance report of the demo's STL flow planner on the driving data; report sections."""
    from diffpilot.stl_jobs import stl_report_job

    folder = stl_report_job({**stl, "out": str(out)})
    summary = json.loads((folder / "compliance.json").read_text())
    pictures = "![controllability](stl/controllability.png)\n" if (folder / "controllability.png").exists() else ""
    return [(
        "STL rule compliance of the demo planner",
        f"The STL-conditioned flow planner, trained on the driving set's train split, samples plans for "
        f"{summary['windows']} val windows ({summary['trajectories']} trajectories) under the rule parameters shown in "
        f"the full report: [stl/report.md](stl/report.md). Share of trajectories that satisfy each rule where it applies:\n\n"
        + markdown_table(summary["rules"]) + "\n" + pictures,
    )]


def _demo_driving(driving: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """The demo's driving part: a small embedded scenario set, the baselines closed loop; report sections."""
    from diffpilot.driving_jobs import driving_eval_job

    folder = driving_eval_job({**driving, "out": str(out)})
    results = json.loads((folder / "results.json").read_text())
    cols = ["method", "mode", "pdms", "nc", "dac", "ttc", "ep", "comfort", "progress_m", "out_of_lane_rate", "l2_3s", "collision_3s"]
    pictures = [f for f in results["figures"] if f.startswith("route_")] + results["figures"][:1]
    gif = f"![closed-loop episode]({folder.name}/{results['gif']})\n" if results.get("gif") else ""
    return [
        ("Driving baselines, closed loop", (
            f"{len(results['scenes'])} val scenes of a {driving['data']['num_scenes']}-scene embedded set (simulated traffic "
            "written in the nuScenes format, read back through nuscenes-devkit); PDM sub-scores on [0, 1]; "
            f"full report: [{folder.name}/report.md]({folder.name}/report.md).\n\n"
            + markdown_table(results["summary"], cols)
        )),
        ("Driving pictures", "".join(f"![{p}]({folder.name}/{p})\n" for p in pictures) + gif),
    ]
