"""Meta-World MT10: instructions, scripted-expert demonstrations with images and reasoning text, and their file.

The ten tasks (:data:`MT10_TASKS`) run in goal-observable Meta-World v3
with each episode's own random object and goal positions (the episode seed
fixes them, :func:`diffpilot.data.mt10_env.reset_episode`). Every episode
is driven by Meta-World's scripted expert; each step carries the expert's
sub-goal and a reasoning sentence (:mod:`diffpilot.data.mt10_reasoning`),
and each episode one natural-language instruction drawn from the task's
training phrasings (:func:`load_instructions`, ``conf/instructions/``).
Frames are rendered only at the steps a policy observes
(``step % obs_every == 0``). Only successful episodes are kept; a failed
attempt is retried with the next attempt seed and counted.

Generation (:func:`generate_mt10`) is cut into shards of
:data:`SHARD_EPISODES` episodes of one task. A shard is a pure function of
the configuration and (task, chunk), written as one HDF5 file into a cache
folder beside the output named by the configuration's hash, so an
interrupted run resumes where it stopped, and ``workers > 1`` (Ray, or a
cluster through ``ray_address``) writes the same bytes as one worker. The
merged file is written atomically and the shards are then removed; a rerun
with the same configuration returns the file untouched.

The HDF5 layout (``format="diffpilot.mt10"``, ``version=1``; README section
"MT10 demonstrations: the HDF5 layout"). Your own recorded demonstrations
can fill it (:func:`write_episodes`); :func:`load_mt10` checks it.

Root attributes: ``format`` (``"diffpilot.mt10"``), ``version`` (1),
``image_size`` (H = W), ``camera`` (name), ``obs_every`` (frames exist at
steps where ``step % obs_every == 0``), ``tasks`` (JSON list of task names;
the ``task`` columns index it). Written by the generator besides:
``seed``, ``episodes_per_task``, ``max_steps``, ``attempts`` and ``failed``
(JSON: task -> count), ``instructions`` (JSON: task -> phrasings used),
``config_hash``.

Per step (N rows = every env step of every episode, episodes contiguous, in
order; row *t* of an episode is the state the expert saw and the action it
took):

=============== ================= ===================================================
``actions``     float32 [N, 4]    dx, dy, dz, grip in [-1, 1]
``state``       float32 [N, 39]   Meta-World state (hand, gripper, object, previous frame, goal)
``proprio``     float32 [N, 4]    hand xyz + gripper opening (``state[:, :4]``)
``goal``        float32 [N, 3]    goal xyz (``state[:, 36:39]``)
``episode``     int32 [N]         episode index (row of ``episodes/``)
``task``        int32 [N]         index into the ``tasks`` attribute
``step``        int32 [N]         step within the episode, from 0
``image_index`` int32 [N]         row of ``images``, -1 where no frame was rendered
``reasoning``   vlen UTF-8 [N]    reasoning sentence (sub-goal ; object relation , near/far ...)
``subgoal``     vlen UTF-8 [N]    the sentence's sub-goal
``images``      uint8 [M, H, W, 3] the rendered frames, in step order
=============== ================= ===================================================

Per episode (group ``episodes/``, E rows): ``instruction`` vlen UTF-8 [E],
``task`` int32 [E], ``seed`` int64 [E] (the episode seed:
``MT10Env(task).reset(seed)`` restores its layout), ``start`` int64 [E]
(first row), ``length`` int32 [E] (rows), ``success`` bool [E].
"""

from __future__ import annotations

from diffpilot.data.mt10_env import (  # first: sets MUJOCO_GL before anything imports mujoco
    DEFAULT_CAMERA,
    MAX_STEPS,
    MT10_TASKS,
    FrameRenderer,
    check_camera,
    check_task,
    make_env,
    RENDER_SETTINGS,
    make_expert,
    reset_episode,
)

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from diffpilot.data.errors import DatasetError  # noqa: E402
from diffpilot.data.mt10_reasoning import SUBGOALS, Annotation, annotate, subgoal_of  # noqa: E402
from diffpilot.fileio import atomic_path, cache_dir, hdf5_shard_done  # noqa: E402
from diffpilot.parallel import ray_session  # noqa: E402

__all__ = [
    "DEFAULT_CAMERA", "FORMAT", "FORMAT_VERSION", "HELDOUT_INSTRUCTIONS", "LAYOUT_SECTION", "MT10_TASKS",
    "SHARD_EPISODES", "SUBGOALS", "TRAIN_INSTRUCTIONS", "Annotation", "MT10Demos", "annotate", "default_path",
    "episode_seed", "generate_mt10", "load_instructions", "load_mt10", "run_shard", "subgoal_of", "write_episodes",
    "write_mt10",
]

FORMAT = "diffpilot.mt10"
FORMAT_VERSION = 1
LAYOUT_SECTION = 'README section "MT10 demonstrations: the HDF5 layout"'
SHARD_EPISODES = 10
DEFAULT_EPISODES_PER_TASK = 100
"""Successful episodes kept per task by default (``conf/data/mt10.yaml`` says the same)."""
"""Episodes of one task per shard file."""
MAX_ATTEMPTS = 10
"""Attempts (each with its own seed) per kept episode before the slot is given up."""
_INSTRUCTIONS_DIR = Path(__file__).resolve().parent.parent / "conf" / "instructions"
TRAIN_INSTRUCTIONS = _INSTRUCTIONS_DIR / "mt10_train.yaml"
"""Phrasings the demonstrations use (at least 5 per task)."""
HELDOUT_INSTRUCTIONS = _INSTRUCTIONS_DIR / "mt10_heldout.yaml"
"""Phrasings kept out of every demonstration, for testing generalization to new wording."""

STEP_FIELDS: dict[str, tuple[str, tuple[int, ...] | None]] = {  # name -> (dtype kind, trailing shape)
    "actions": ("float32", (4,)), "state": ("float32", (39,)), "proprio": ("float32", (4,)),
    "goal": ("float32", (3,)), "episode": ("int32", ()), "task": ("int32", ()), "step": ("int32", ()),
    "image_index": ("int32", ()), "reasoning": ("str", ()), "subgoal": ("str", ()),
}
EPISODE_FIELDS: dict[str, tuple[str, tuple[int, ...] | None]] = {
    "instruction": ("str", ()), "task": ("int32", ()), "seed": ("int64", ()), "start": ("int64", ()),
    "length": ("int32", ()), "success": ("bool", ()),
}
ROOT_ATTRS = ("format", "version", "image_size", "camera", "obs_every", "tasks")


# --------------------------------------------------------------------------- instructions


def load_instructions(path: str | Path) -> dict[str, list[str]]:
    """A YAML mapping task -> list of phrasings, checked: MT10 task names, non-empty lists of non-empty strings."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"instructions file {path} does not exist; pass a YAML mapping task -> phrasings "
                                f"like {TRAIN_INSTRUCTIONS}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"instructions file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"instructions file {path} must map task names to lists of phrasings, "
                         f"e.g. 'reach: [reach the goal]'; valid tasks: {list(MT10_TASKS)}")
    out: dict[str, list[str]] = {}
    for task, phrasings in raw.items():
        if str(task) not in MT10_TASKS:
            raise ValueError(f"instructions file {path}: unknown task {task!r}; valid tasks: {list(MT10_TASKS)}")
        if not isinstance(phrasings, list) or not phrasings:
            raise ValueError(f"instructions file {path}: task {task!r} needs a non-empty list of phrasings, "
                             f"got {phrasings!r}")
        bad = [p for p in phrasings if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"instructions file {path}: task {task!r} has phrasing(s) that are not non-empty "
                             f"strings: {bad!r}")
        out[str(task)] = [" ".join(p.split()) for p in phrasings]
    return out


# --------------------------------------------------------------------------- one shard


def episode_seed(seed: int, task: str, episode: int, attempt: int = 0) -> int:
    """The environment seed of a task's episode slot and attempt: fixed by (seed, task, episode, attempt)."""
    digest = hashlib.sha256(f"mt10/{int(seed)}/{task}/{int(episode)}/{int(attempt)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _instruction_index(seed: int, task: str, episode: int, count: int) -> int:
    digest = hashlib.sha256(f"mt10-instruction/{int(seed)}/{task}/{int(episode)}".encode()).digest()
    return int(np.random.default_rng(int.from_bytes(digest[:8], "little")).integers(count))


def _rollout(env: Any, expert: Any, renderer: FrameRenderer, task: str, seed: int, obs_every: int,
             max_steps: int, timing: dict[str, float]) -> dict[str, Any]:
    """One expert episode from episode seed ``seed``: per-step arrays, frames at observed steps, success."""
    states, actions, texts, subgoals, frames = [], [], [], [], []
    t0 = time.perf_counter()
    obs = reset_episode(env, seed)
    timing["sim"] += time.perf_counter() - t0
    success = False
    for t in range(max_steps):
        state = obs.copy()  # the expert may write into what it is given
        if t % obs_every == 0:
            t1 = time.perf_counter()
            frames.append(renderer.render())
            timing["render"] += time.perf_counter() - t1
        t1 = time.perf_counter()
        action = np.clip(np.asarray(expert.get_action(obs.copy()), dtype=np.float64), -1.0, 1.0)
        note = annotate(task, state)
        obs, _, _, _, info = env.step(action)
        obs = np.asarray(obs, dtype=np.float64)
        timing["sim"] += time.perf_counter() - t1
        timing["steps"] += 1
        states.append(state)
        actions.append(action)
        texts.append(note.text)
        subgoals.append(note.subgoal)
        if info.get("success"):
            success = True
            break
    timing["frames"] += len(frames)
    return {"state": np.asarray(states, np.float32), "actions": np.asarray(actions, np.float32),
            "reasoning": texts, "subgoal": subgoals, "frames": frames, "success": success}


def run_shard(config: Mapping[str, Any], task: str, chunk: int) -> dict[str, Any]:
    """Episodes ``chunk * SHARD_EPISODES ...`` of ``task``: a pure function of ``config``, ``task`` and ``chunk``.

    Returns per-step arrays (``actions``, ``state``, ``step``, ``frame_index``
    local to the shard, ``reasoning``, ``subgoal``), per-episode ones
    (``seed``, ``length``, ``instruction``, ``slot``), ``images`` and
    ``failed`` (attempts that did not succeed), plus timings.
    """
    size, camera, obs_every = int(config["image_size"]), str(config["camera"]), int(config["obs_every"])
    max_steps, seed, per_task = int(config["max_steps"]), int(config["seed"]), int(config["episodes_per_task"])
    phrasings = config["instructions"][task]
    env = make_env(task, max_steps)
    expert = make_expert(task)
    renderer = FrameRenderer(env, size, camera)
    timing = {"sim": 0.0, "render": 0.0, "steps": 0, "frames": 0}
    eps: list[dict[str, Any]] = []
    failed = 0
    try:
        for slot in range(chunk * SHARD_EPISODES, min((chunk + 1) * SHARD_EPISODES, per_task)):
            for attempt in range(MAX_ATTEMPTS):
                s = episode_seed(seed, task, slot, attempt)
                ep = _rollout(env, expert, renderer, task, s, obs_every, max_steps, timing)
                if ep["success"]:
                    ep["seed"], ep["slot"] = s, slot
                    ep["instruction"] = phrasings[_instruction_index(seed, task, slot, len(phrasings))]
                    eps.append(ep)
                    break
                failed += 1
    finally:
        renderer.close()
        env.close()
    frames = [f for ep in eps for f in ep["frames"]]
    frame_index, offset = [], 0
    for ep in eps:
        n = len(ep["actions"])
        idx = np.full(n, -1, np.int32)
        idx[::obs_every] = np.arange(offset, offset + len(ep["frames"]), dtype=np.int32)
        frame_index.append(idx)
        offset += len(ep["frames"])

    def cat(key: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate([ep[key] for ep in eps]).astype(dtype) if eps else np.zeros((0, *shape), dtype)

    return {
        "actions": cat("actions", np.float32, (4,)), "state": cat("state", np.float32, (39,)),
        "step": np.concatenate([np.arange(len(ep["actions"]), dtype=np.int32) for ep in eps]) if eps
        else np.zeros(0, np.int32),
        "frame_index": np.concatenate(frame_index) if eps else np.zeros(0, np.int32),
        "reasoning": [t for ep in eps for t in ep["reasoning"]], "subgoal": [t for ep in eps for t in ep["subgoal"]],
        "seed": np.array([ep["seed"] for ep in eps], np.int64), "slot": np.array([ep["slot"] for ep in eps], np.int64),
        "length": np.array([len(ep["actions"]) for ep in eps], np.int32),
        "instruction": [ep["instruction"] for ep in eps],
        "images": np.stack(frames).astype(np.uint8) if frames else np.zeros((0, size, size, 3), np.uint8),
        "failed": int(failed), "timing": timing,
    }


# --------------------------------------------------------------------------- shard files

_STR = h5py.string_dtype("utf-8")
_SHARD_ARRAYS = ("actions", "state", "step", "frame_index", "seed", "slot", "length", "images")
_SHARD_TEXTS = ("reasoning", "subgoal", "instruction")


def _strings(h5: h5py.Group, name: str, values: Sequence[str]) -> None:
    h5.create_dataset(name, shape=(len(values),), dtype=_STR, data=np.array(list(values), dtype=object))


def _write_shard(path: Path, data: Mapping[str, Any], config_hash: str) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            for k in _SHARD_ARRAYS:
                h5.create_dataset(k, data=data[k])
            for k in _SHARD_TEXTS:
                _strings(h5, k, data[k])
            h5.attrs["failed"] = int(data["failed"])
            h5.attrs["timing"] = json.dumps(data["timing"])
            h5.attrs["config_hash"] = config_hash
            h5.attrs["complete"] = True


def _read_shard(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as h5:
        out: dict[str, Any] = {k: h5[k][()] for k in _SHARD_ARRAYS}
        out.update({k: list(h5[k].asstr()[()]) for k in _SHARD_TEXTS})
        out["failed"] = int(h5.attrs["failed"])
        out["timing"] = json.loads(h5.attrs["timing"])
    return out


# --------------------------------------------------------------------------- the merged file


def write_mt10(path: str | Path, shards: Sequence[Mapping[str, Any]], shard_tasks: Sequence[str],
               attrs: Mapping[str, Any]) -> Path:
    """Merge shards (in order; ``shard_tasks[i]`` is shard i's task) into the documented layout, atomically."""
    tasks = list(json.loads(attrs["tasks"]))
    cols: dict[str, list[Any]] = {k: [] for k in ("actions", "state", "episode", "task", "step", "image_index")}
    texts: dict[str, list[str]] = {"reasoning": [], "subgoal": []}
    ep_cols: dict[str, list[Any]] = {"task": [], "seed": [], "start": [], "length": [], "success": []}
    instructions: list[str] = []
    images: list[np.ndarray] = []
    rows = frames = episodes = 0
    for data, task in zip(shards, shard_tasks, strict=True):
        n, e, m = len(data["actions"]), len(data["length"]), len(data["images"])
        ti = tasks.index(task)
        cols["actions"].append(data["actions"])
        cols["state"].append(data["state"])
        cols["step"].append(data["step"])
        cols["task"].append(np.full(n, ti, np.int32))
        cols["episode"].append(np.repeat(np.arange(episodes, episodes + e, dtype=np.int32), data["length"]))
        fi = np.asarray(data["frame_index"], np.int32)
        cols["image_index"].append(np.where(fi >= 0, fi + frames, -1).astype(np.int32))
        texts["reasoning"] += list(data["reasoning"])
        texts["subgoal"] += list(data["subgoal"])
        starts = rows + np.concatenate([[0], np.cumsum(data["length"])[:-1]]) if e else np.zeros(0)
        ep_cols["start"].append(np.asarray(starts, np.int64))
        ep_cols["length"].append(np.asarray(data["length"], np.int32))
        ep_cols["seed"].append(np.asarray(data["seed"], np.int64))
        ep_cols["task"].append(np.full(e, ti, np.int32))
        ep_cols["success"].append(np.asarray(data.get("success", np.ones(e, bool)), bool).reshape(e))
        instructions += list(data["instruction"])
        images.append(data["images"])
        rows, frames, episodes = rows + n, frames + m, episodes + e
    state = np.concatenate(cols["state"]).astype(np.float32)
    size = int(attrs["image_size"])
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            for k, v in attrs.items():
                h5.attrs[k] = v
            h5.create_dataset("actions", data=np.concatenate(cols["actions"]).astype(np.float32))
            h5.create_dataset("state", data=state)
            h5.create_dataset("proprio", data=state[:, :4])
            h5.create_dataset("goal", data=state[:, 36:39])
            for k in ("episode", "task", "step", "image_index"):
                h5.create_dataset(k, data=np.concatenate(cols[k]).astype(np.int32))
            for k, v in texts.items():
                _strings(h5, k, v)
            img = np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)
            h5.create_dataset("images", data=img, chunks=(min(max(len(img), 1), 64), size, size, 3) if len(img)
                              else None, compression="gzip" if len(img) else None, compression_opts=4 if len(img)
                              else None, shuffle=False)
            g = h5.create_group("episodes")
            _strings(g, "instruction", instructions)
            g.create_dataset("task", data=np.concatenate(ep_cols["task"]).astype(np.int32))
            g.create_dataset("seed", data=np.concatenate(ep_cols["seed"]).astype(np.int64))
            g.create_dataset("start", data=np.concatenate(ep_cols["start"]).astype(np.int64))
            g.create_dataset("length", data=np.concatenate(ep_cols["length"]).astype(np.int32))
            g.create_dataset("success", data=np.concatenate(ep_cols["success"]).astype(bool))
    return path


def write_episodes(path: str | Path, episodes: Sequence[Mapping[str, Any]], image_size: int,
                   camera: str = DEFAULT_CAMERA, obs_every: int = 4, tasks: Sequence[str] | None = None) -> Path:
    """Write demonstrations you recorded yourself in the documented layout (atomically); returns ``path``.

    Each episode is a mapping with ``task``, ``instruction``, ``seed`` (int,
    -1 if unknown), ``state`` (L, 39), ``actions`` (L, 4) and ``images``
    (uint8, one frame per step ``t % obs_every == 0``: ``ceil(L / obs_every)``
    frames of ``image_size`` pixels); optional ``reasoning`` (L strings),
    else :func:`annotate` writes it; optional ``success`` (default True). ``tasks`` (default: the MT10 tasks the
    episodes use, in MT10 order) is the ``tasks`` attribute.
    """
    names = [check_task(ep["task"]) for ep in episodes]
    tasks = [t for t in MT10_TASKS if t in names] if tasks is None else [check_task(t) for t in tasks]
    shards = []
    for ep, task in zip(episodes, names, strict=True):
        if task not in tasks:
            raise ValueError(f"episode task {task!r} is not in tasks={tasks}")
        state = np.asarray(ep["state"], np.float32)
        actions = np.asarray(ep["actions"], np.float32)
        n = len(state)
        if state.shape != (n, 39) or actions.shape != (n, 4) or n < 1:
            raise ValueError(f"an episode needs state (L, 39) and actions (L, 4) with L >= 1, got "
                             f"{list(state.shape)} and {list(actions.shape)}")
        images = np.asarray(ep["images"])
        frames = -(-n // int(obs_every))
        if images.dtype != np.uint8 or images.shape != (frames, image_size, image_size, 3):
            raise ValueError(f"an episode of {n} steps with obs_every={obs_every} needs images uint8 "
                             f"[{frames}, {image_size}, {image_size}, 3], got {images.dtype} {list(images.shape)}")
        texts = list(ep["reasoning"]) if ep.get("reasoning") is not None else [annotate(task, s).text for s in state]
        if len(texts) != n:
            raise ValueError(f"reasoning has {len(texts)} sentences for {n} steps")
        idx = np.full(n, -1, np.int32)
        idx[::int(obs_every)] = np.arange(frames, dtype=np.int32)
        shards.append({
            "actions": actions, "state": state, "step": np.arange(n, dtype=np.int32), "frame_index": idx,
            "reasoning": texts, "subgoal": [subgoal_of(t) for t in texts], "seed": np.array([int(ep["seed"])]),
            "length": np.array([n], np.int32), "instruction": [str(ep["instruction"])], "images": images,
            "success": np.array([bool(ep.get("success", True))]),
        })
    attrs = {"format": FORMAT, "version": FORMAT_VERSION, "image_size": int(image_size), "camera": str(camera),
             "obs_every": int(obs_every), "tasks": json.dumps(tasks)}
    return write_mt10(path, shards, names, attrs)


# --------------------------------------------------------------------------- the job


def default_path(episodes_per_task: int = DEFAULT_EPISODES_PER_TASK, image_size: int = 64, obs_every: int = 4, seed: int = 0,
                 camera: str = DEFAULT_CAMERA, tasks: Sequence[str] | None = None,
                 instructions: str | Path | None = None) -> Path:
    """Where :func:`generate_mt10` writes by default: ``<cache>/datasets/mt10-...hdf5``."""
    name = f"mt10-{int(episodes_per_task)}ep-{int(image_size)}px-every{int(obs_every)}-s{int(seed)}"
    if camera != DEFAULT_CAMERA:
        name += f"-{camera}"
    if tasks is not None and list(tasks) != list(MT10_TASKS):
        name += "-" + hashlib.sha256(",".join(tasks).encode()).hexdigest()[:8]
    if instructions is not None and Path(instructions).expanduser().resolve() != TRAIN_INSTRUCTIONS:
        name += "-i" + hashlib.sha256(Path(instructions).expanduser().read_bytes()).hexdigest()[:8]
    return cache_dir() / "datasets" / f"{name}.hdf5"


def _config(tasks: Sequence[str], episodes_per_task: int, image_size: int, camera: str, obs_every: int, seed: int,
            max_steps: int, instructions: dict[str, list[str]]) -> dict[str, Any]:
    import metaworld
    import mujoco

    return {
        "format_version": FORMAT_VERSION, "tasks": list(tasks), "episodes_per_task": int(episodes_per_task),
        "image_size": int(image_size), "camera": camera, "obs_every": int(obs_every), "seed": int(seed),
        "max_steps": int(max_steps), "shard_episodes": SHARD_EPISODES, "max_attempts": MAX_ATTEMPTS,
        "instructions": {t: instructions[t] for t in tasks},
        "subgoals": {t: SUBGOALS[t] for t in tasks}, "render": dict(RENDER_SETTINGS),
        "versions": {"metaworld": getattr(metaworld, "__version__", "3.1.1"), "mujoco": mujoco.__version__},
    }


def _file_hash(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as h5:
            value = h5.attrs.get("config_hash")
            return str(value) if value is not None else None
    except OSError:
        return None


def generate_mt10(
    out: str | Path | None = None,
    episodes_per_task: int = DEFAULT_EPISODES_PER_TASK,
    image_size: int = 64,
    camera: str = DEFAULT_CAMERA,
    obs_every: int = 4,
    seed: int = 0,
    workers: int = 1,
    ray_address: str | None = None,
    instructions: str | Path | None = None,
    max_steps: int = MAX_STEPS,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """Scripted-expert MT10 demonstrations in the documented layout; returns the file (see the module docstring).

    ``out=None`` writes to :func:`default_path`. ``instructions`` is a YAML
    file of training phrasings (default :data:`TRAIN_INSTRUCTIONS`);
    ``tasks`` a subset of :data:`MT10_TASKS` (default all ten). Cached:
    the same configuration returns the existing file; an interrupted run
    resumes from its finished shards.
    """
    tasks = list(MT10_TASKS) if tasks is None else [check_task(t) for t in tasks]
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct MT10 tasks, got {tasks}; valid tasks: {list(MT10_TASKS)}")
    for name, value, low in (("episodes_per_task", episodes_per_task, 1), ("image_size", image_size, 8),
                             ("obs_every", obs_every, 1), ("max_steps", max_steps, 1), ("workers", workers, 1)):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    check_camera(camera)
    phrasings = load_instructions(instructions if instructions is not None else TRAIN_INSTRUCTIONS)
    missing = [t for t in tasks if t not in phrasings]
    if missing:
        raise ValueError(f"instructions file {instructions or TRAIN_INSTRUCTIONS} has no phrasings for task(s) "
                         f"{missing}; add them")
    out = Path(out).expanduser() if out is not None else default_path(
        episodes_per_task, image_size, obs_every, seed, camera, tasks, instructions)
    config = _config(tasks, episodes_per_task, image_size, camera, obs_every, seed, max_steps, phrasings)
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    if out.is_file() and _file_hash(out) == config_hash:
        return out
    shard_dir = out.parent / f"{out.name}.shards-{config_hash}"
    shard_dir.mkdir(parents=True, exist_ok=True)
    chunks = -(-int(episodes_per_task) // SHARD_EPISODES)
    jobs = [(t, c) for t in tasks for c in range(chunks)]
    paths = [shard_dir / f"{t}-{c:03d}.h5" for t, c in jobs]
    todo = [i for i in range(len(jobs)) if not hdf5_shard_done(paths[i], config_hash)]

    from tqdm.auto import tqdm

    start = time.perf_counter()
    bar = tqdm(total=len(jobs) * min(SHARD_EPISODES, int(episodes_per_task)), desc="mt10 demos", unit="episode",
               disable=not progress, initial=(len(jobs) - len(todo)) * min(SHARD_EPISODES, int(episodes_per_task)))
    try:
        with ray_session(int(workers), ray_address) as use_ray:
            if not use_ray:
                for i in todo:
                    data = run_shard(config, *jobs[i])
                    _write_shard(paths[i], data, config_hash)
                    bar.update(len(data["length"]))
            else:
                import ray

                remote = ray.remote(num_cpus=1)(run_shard)
                pending = {remote.remote(config, *jobs[i]): i for i in todo}
                waiting = list(pending)
                while waiting:
                    done, waiting = ray.wait(waiting, num_returns=1)
                    for ref in done:
                        data = ray.get(ref)
                        _write_shard(paths[pending[ref]], data, config_hash)
                        bar.update(len(data["length"]))
    finally:
        bar.close()
    shards = [_read_shard(p) for p in paths]
    failed = {t: 0 for t in tasks}
    for (t, _), data in zip(jobs, shards, strict=True):
        failed[t] += data["failed"]
    kept = {t: 0 for t in tasks}
    for (t, _), data in zip(jobs, shards, strict=True):
        kept[t] += len(data["length"])
    attrs = {
        "format": FORMAT, "version": FORMAT_VERSION, "image_size": int(image_size), "camera": camera,
        "obs_every": int(obs_every), "tasks": json.dumps(tasks), "seed": int(seed),
        "episodes_per_task": int(episodes_per_task), "max_steps": int(max_steps),
        "attempts": json.dumps({t: kept[t] + failed[t] for t in tasks}), "failed": json.dumps(failed),
        "instructions": json.dumps(config["instructions"]), "config_hash": config_hash,
    }
    write_mt10(out, shards, [t for t, _ in jobs], attrs)
    shutil.rmtree(shard_dir, ignore_errors=True)
    if progress:
        timing = {k: sum(d["timing"][k] for d in shards) for k in ("sim", "render", "steps", "frames")}
        wall = time.perf_counter() - start
        print(f"mt10: {sum(kept.values())} episodes kept, {sum(failed.values())} failed attempts "
              f"({', '.join(f'{t} {n}' for t, n in failed.items() if n) or 'none'}); "
              f"{int(timing['steps'])} env steps, {int(timing['frames'])} frames; {wall:.1f} s total "
              f"({len(todo)} of {len(jobs)} shards generated now, {workers} worker(s)), "
              f"{1000 * timing['render'] / max(timing['frames'], 1):.1f} ms per rendered frame, "
              f"{1000 * timing['sim'] / max(timing['steps'], 1):.2f} ms per env step (expert and annotation included)",
              file=sys.stderr)
    return out


# --------------------------------------------------------------------------- the reader


@dataclass
class MT10Demos:
    """An MT10 demonstration file in memory (the layout of the module docstring)."""

    tasks: list[str]
    image_size: int
    camera: str
    obs_every: int
    actions: np.ndarray
    state: np.ndarray
    proprio: np.ndarray
    goal: np.ndarray
    episode: np.ndarray
    task: np.ndarray
    step: np.ndarray
    image_index: np.ndarray
    reasoning: list[str]
    subgoal: list[str]
    images: np.ndarray
    episode_instruction: list[str]
    episode_task: np.ndarray
    episode_seed: np.ndarray
    episode_start: np.ndarray
    episode_length: np.ndarray
    episode_success: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_start)

    @property
    def observed_rows(self) -> np.ndarray:
        """The steps that carry a frame (the ones a policy observes): the training rows, in order."""
        return np.flatnonzero(self.image_index >= 0)

    def episode_slice(self, i: int) -> slice:
        s = int(self.episode_start[i])
        return slice(s, s + int(self.episode_length[i]))


def _fail(path: Path, what: str) -> DatasetError:
    return DatasetError(f"{path} is not a valid MT10 demonstration file: {what}; see the {LAYOUT_SECTION}")


def load_mt10(path: str | Path) -> MT10Demos:
    """Read and check an MT10 demonstration file (format ``diffpilot.mt10`` version 1)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MT10 demonstration file {path} does not exist; generate it with "
                                f"`diffpilot data mt10` (or pass the path of your own file in the {LAYOUT_SECTION})")
    try:
        h5 = h5py.File(path, "r")
    except OSError as e:
        raise _fail(path, f"not an HDF5 file ({e})") from None
    with h5:
        missing_attrs = [a for a in ROOT_ATTRS if a not in h5.attrs]
        if missing_attrs:
            raise _fail(path, f"missing root attribute(s) {missing_attrs}")
        if str(h5.attrs["format"]) != FORMAT:
            raise _fail(path, f"format attribute is {str(h5.attrs['format'])!r}, expected {FORMAT!r}")
        if int(h5.attrs["version"]) != FORMAT_VERSION:
            raise _fail(path, f"version {int(h5.attrs['version'])} is not supported (this reader reads "
                              f"version {FORMAT_VERSION})")
        missing = [k for k in [*STEP_FIELDS, "images"] if k not in h5]
        missing += [f"episodes/{k}" for k in EPISODE_FIELDS if "episodes" not in h5 or k not in h5["episodes"]]
        if missing:
            raise _fail(path, f"missing field(s) {missing}")
        try:
            tasks = [str(t) for t in json.loads(str(h5.attrs["tasks"]))]
        except (TypeError, ValueError):
            raise _fail(path, "the tasks attribute is not a JSON list of task names") from None
        for t in tasks:
            if t not in MT10_TASKS:
                raise _fail(path, f"unknown task {t!r} in the tasks attribute; valid tasks: {list(MT10_TASKS)}")
        size = int(h5.attrs["image_size"])
        images = h5["images"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise _fail(path, f"images must be uint8 [M, {size}, {size}, 3] (image_size={size}), "
                              f"got {images.dtype} {list(images.shape)}")
        data: dict[str, Any] = {}
        n = len(h5["actions"])
        for k, (kind, shape) in STEP_FIELDS.items():
            data[k] = _read_field(path, h5[k], k, kind, shape, n)
        e = len(h5["episodes/start"])
        ep = {k: _read_field(path, h5["episodes"][k], f"episodes/{k}", kind, shape, e)
              for k, (kind, shape) in EPISODE_FIELDS.items()}
        imgs = images[()]
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
    m = len(imgs)
    ii = data["image_index"]
    if len(ii) and (ii.min() < -1 or ii.max() >= m):
        raise _fail(path, f"image_index must be -1 or a row of images (0..{m - 1})")
    for name, col in (("task", data["task"]), ("episodes/task", ep["task"])):
        if len(col) and (col.min() < 0 or col.max() >= len(tasks)):
            raise _fail(path, f"{name} must index the tasks attribute (0..{len(tasks) - 1})")
    if len(ep["start"]) and (ep["start"].min() < 0 or (ep["start"] + ep["length"]).max() > n):
        raise _fail(path, f"episodes/start + episodes/length run past the {n} step rows")
    return MT10Demos(
        tasks=tasks, image_size=size, camera=str(attrs["camera"]), obs_every=int(attrs["obs_every"]),
        actions=data["actions"], state=data["state"], proprio=data["proprio"], goal=data["goal"],
        episode=data["episode"], task=data["task"], step=data["step"], image_index=data["image_index"],
        reasoning=data["reasoning"], subgoal=data["subgoal"], images=imgs,
        episode_instruction=ep["instruction"], episode_task=ep["task"], episode_seed=ep["seed"],
        episode_start=ep["start"], episode_length=ep["length"], episode_success=ep["success"], attrs=attrs,
    )


def _read_field(path: Path, ds: Any, name: str, kind: str, shape: tuple[int, ...], rows: int) -> Any:
    if not isinstance(ds, h5py.Dataset):
        raise _fail(path, f"{name} must be a dataset")
    if len(ds.shape) == 0 or ds.shape[0] != rows or tuple(ds.shape[1:]) != shape:
        raise _fail(path, f"{name} must have shape {[rows, *shape]}, got {list(ds.shape)}")
    if kind == "str":
        if h5py.check_string_dtype(ds.dtype) is None:
            raise _fail(path, f"{name} must hold UTF-8 strings, got {ds.dtype}")
        return [str(s) for s in ds.asstr()[()]]
    value = ds[()]
    if kind == "bool":
        if value.dtype != np.bool_ and not np.issubdtype(value.dtype, np.integer):
            raise _fail(path, f"{name} must be bool, got {value.dtype}")
        return value.astype(bool)
    want = np.dtype(kind)
    if want.kind == "f" and value.dtype.kind != "f" or want.kind == "i" and value.dtype.kind not in "iu":
        raise _fail(path, f"{name} must be {kind}, got {value.dtype}")
    return value.astype(want)
