"""The ``diffpilot`` command: ``data``, ``train``, ``eval``, ``export``, ``deploy``, ``demo``, ``driving`` and ``stl``, configured by hydra.

Every sub-command takes hydra overrides (``key=value``, ``group=option``),
e.g. ``diffpilot train policy=chunk_flow data=maze2d-medium sim=maze2d-medium
train.steps=20000``. ``--cfg`` prints the resolved config instead of running.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

COMMANDS = {
    "data": ("generate", "generate a data set (positional: a data config name, e.g. maze2d-medium)"),
    "train": ("train", "train a policy on a data set"),
    "eval": ("eval", "evaluate a saved policy closed loop (needs checkpoint=PATH)"),
    "export": ("export", "export a saved policy to ONNX for the onnxruntime runtime (needs checkpoint=PATH)"),
    "deploy": ("deploy", "run an exported policy at a fixed rate with onnxruntime only (needs model=PATH)"),
    "demo": ("demo", "generate, train, evaluate and write a report (what `make demo` runs)"),
    "driving": ("driving", "driving planners: `driving data` gets the nuScenes-format set, `driving eval` scores the baselines, "
                           "`driving anchors` clusters k anchor trajectories"),
    "stl": ("stl", "STL rules: `stl report source=data|planner|rollouts` writes a compliance report"),
    "sweep": ("sweep", "grid or random search over train./policy. settings on Ray Tune with ASHA; results table + plot in out"),
}
DRIVING_ACTIONS = ("data", "anchors", "eval")
SUB_ACTIONS = {"driving": DRIVING_ACTIONS, "stl": ("report",)}
# The error types our code raises for bad input (DatasetError, CheckpointError, STLError are ValueErrors);
# each message names the problem and the fix. DIFFPILOT_DEBUG=1 shows the traceback instead.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def load_config(name: str, overrides: list[str]) -> dict[str, Any]:
    """Compose ``conf/<name>.yaml`` with ``overrides``; unknown keys or missing values are errors.

    The policy's ``per_task`` entry for the data set is merged in here, below
    the explicit ``policy.*`` overrides: what the user typed wins.
    """
    with initialize_config_module(config_module="diffpilot.conf", version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"missing required setting(s) {missing}: pass them as key=value, e.g. {missing[0]}=...")
    out: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    if isinstance(out.get("policy"), dict) and isinstance(out.get("data"), dict):
        from diffpilot.policy.registry import apply_per_task

        # The task's per_task values apply now, under the user's own policy.* overrides (which win).
        keep = {o.split("=", 1)[0].lstrip("+~").removeprefix("policy.") for o in overrides
                if o.lstrip("+~").startswith("policy.") and "=" in o}
        out["policy"] = apply_per_task(out["policy"], out["data"].get("name"), keep)
    return out


SIM_CONF = Path(__file__).parent / "conf" / "sim"


def _trained_task(checkpoint: str) -> str | None:
    """The task a saved policy was trained for, from the ``run.yaml`` beside it (None: not known)."""
    run_yaml = Path(checkpoint).parent / "run.yaml"
    try:
        run = yaml.safe_load(run_yaml.read_text()) if run_yaml.is_file() else None
    except (OSError, yaml.YAMLError):
        return None  # loading the checkpoint itself reports what is wrong with it
    if not isinstance(run, dict):
        return None
    sim = run.get("sim")
    task = sim.get("task") if isinstance(sim, dict) else run.get("task")
    return task if isinstance(task, str) else None


def implied_groups(command: str, overrides: list[str]) -> list[str]:
    """Config groups a setting implies (never over what the user gave): ``policy=diffusion_vla`` trains
    on ``data=mt10``; ``data=X`` trains (or sweeps) with ``sim=X`` where a sim of that name exists
    (``data=maze2d-medium`` is evaluated in maze2d-medium, not the default maze);
    ``sim.instructions=`` / ``sim.given_reasoning=`` evaluate on ``sim=mt10``; and ``eval checkpoint=P``
    evaluates in the task P was trained for (its ``run.yaml``)."""
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    extra = []
    if command == "train" and given.get("policy") == "diffusion_vla":
        extra += [g for g in ("data=mt10", "sim=mt10") if g.split("=")[0] not in given]
    data = given.get("data")
    if command in ("train", "sweep") and data and "sim" not in given and not any(e.startswith("sim=") for e in extra) \
            and (SIM_CONF / f"{data}.yaml").is_file():
        extra.append(f"sim={data}")
    if command == "eval" and "sim" not in given and given.keys() & {"sim.instructions", "sim.given_reasoning", "sim.tasks"}:
        extra.append("sim=mt10")
    elif command == "eval" and "sim" not in given and "sim.task" not in given and "checkpoint" in given:
        trained = _trained_task(given["checkpoint"])
        if trained:  # evaluated where it was trained, not in the default maze
            extra.append(f"sim={trained}" if (SIM_CONF / f"{trained}.yaml").is_file() else f"sim.task={trained}")
    return extra + overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffpilot", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(cmd, help=help_text)
        p.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", help="hydra overrides, key=value")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.command == "data" and overrides and "=" not in overrides[0]:
        overrides[0] = f"data={overrides[0]}"
    overrides = implied_groups(args.command, overrides)
    action = None
    if args.command in SUB_ACTIONS:
        actions = SUB_ACTIONS[args.command]
        if not overrides or overrides[0] not in actions:
            print(f"diffpilot {args.command}: say what to do first: one of {list(actions)}, "
                  f"e.g. `diffpilot {args.command} {actions[-1]}`", file=sys.stderr)
            return 2
        action = overrides.pop(0)
    try:
        cfg = load_config(COMMANDS[args.command][0], overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        print(f"diffpilot {args.command}: bad configuration: {e}", file=sys.stderr)
        return 2
    if args.cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    out = Path(cfg["out"]) if isinstance(cfg.get("out"), str) else None
    existed = out is not None and out.exists()
    try:
        return _run(args.command, action, cfg)
    except USER_ERRORS as e:
        if os.environ.get("DIFFPILOT_DEBUG"):
            raise
        # A mistake in what the user passed: one line naming it, no traceback, no empty output folder left behind.
        if out is not None and not existed:
            _remove_if_empty(out)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"diffpilot {args.command}: {message}", file=sys.stderr)
        return 2


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` when nothing but empty folders is inside (a failed run keeps what it wrote)."""
    if folder.is_dir() and not any(f for _, _, files in os.walk(folder) for f in files):
        shutil.rmtree(folder, ignore_errors=True)




def _run(command: str, action: str | None, cfg: dict[str, Any]) -> int:
    if command == "driving":
        from diffpilot import driving_jobs

        if action == "data":
            print(driving_jobs.driving_data_job(cfg["data"]))
        elif action == "anchors":
            print(driving_jobs.driving_anchors_job(cfg))
        else:
            print(driving_jobs.driving_eval_job(cfg) / "report.md")
        return 0
    if command == "sweep":
        from diffpilot.sweep import sweep_job

        print(sweep_job(cfg) / "results.md")
        return 0
    if command == "stl":
        from diffpilot import stl_jobs

        print(stl_jobs.stl_report_job(cfg) / "report.md")
        return 0
    if command != "deploy":
        from diffpilot import jobs  # heavy imports only once the config is valid
    if command == "data":
        print(jobs.generate_job(cfg["data"], cfg.get("progress", True)))
    elif command == "train":
        print(jobs.train_job(cfg))
    elif command == "eval":
        print(jobs.eval_job(cfg) / "report.md")
    elif command == "export":
        print(jobs.export_job(cfg))
    elif command == "deploy":
        from diffpilot.export.deploy import deploy_job  # torch-free path: does not import jobs

        print(deploy_job(cfg))
    else:
        print(jobs.demo_job(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
