"""TransDiffuser plan latency in onnxruntime (batch 1, 1 thread): scene memory shared by the sampler's steps vs
projected again at every step (the previous graph), side by side in one run, at 10 and 5 DDIM steps.

The exported graph runs the encoder once, the decoder once per sampler step on all candidates, then the
score head, the clearance check and the selection. The decoder's cross-attention keys and values depend on
the scene only; the graph now projects them once per plan (``TransDiffuserNet.denoiser``) instead of at
each of the sampler's steps. This times both graphs of the same weights on the same scenes, rounds
interleaved so machine load hits both alike, checks that they plan the same, and writes
``benchmarks/results/transdiffuser_latency.{json,md}``. Latency does not depend on the weights: without
``--checkpoint`` the default config is built untrained. ``--one-step`` also times the one-step MeanFlow
graph of the same architecture and of a one-decoder-layer student (the distilled one-step row's shape) in the
same rounds (the one-step target: >= 5x lower than the DDIM default). ``--clearance-before`` also times the
default graph with the clearance check's box test in its previous form (one pass per separating axis).

Run: python benchmarks/transdiffuser_latency.py [--checkpoint runs/.../policy] [--plans 100] [--rounds 5] [--one-step]
     [--clearance-before]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import yaml

from plan_timing import interleaved_plan_ms
from results_io import write_results

from diffpilot.data.scene_sample import example_scene_arrays, scene_samples_from_arrays
from diffpilot.export.onnx import export_by_kind
from diffpilot.export.runtime import load_runtime
from diffpilot.policy import plan_guards
from diffpilot.policy.registry import build_policy, load_policy
from diffpilot.policy.transdiffuser import TransDiffuserNet

NAME = "transdiffuser_latency"
CONFIG = Path(__file__).resolve().parents[1] / "diffpilot" / "conf" / "policy" / "transdiffuser.yaml"


def planner(checkpoint: str | None, **changes: Any) -> Any:
    if checkpoint:
        return load_policy(checkpoint, kind="transdiffuser")
    torch.manual_seed(0)
    policy = build_policy({**yaml.safe_load(CONFIG.read_text()), **changes})
    policy.fit_to_batch(policy.example_batch(32, torch.Generator().manual_seed(0)))
    return policy.eval()


def export(policy: Any, path: Path, per_step: bool, steps: int) -> Path:
    """The planner's graph at ``steps`` DDIM steps; ``per_step`` rebuilds the previous form (keys and values
    projected at every step)."""
    shared = TransDiffuserNet.denoiser
    if per_step:
        TransDiffuserNet.denoiser = lambda net, cond: net  # type: ignore[method-assign]
    try:
        export_by_kind(policy, path, sampler={"name": policy.cfg.sampler, "num_steps": steps})
    finally:
        TransDiffuserNet.denoiser = shared  # type: ignore[method-assign]
    return path


def obb_overlap_per_axis(pa: torch.Tensor, ha: torch.Tensor, pb: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
    """The box test's previous form: one projection pass per candidate separating axis (same result)."""
    ca, sa, cb, sb = torch.cos(pa[..., 2]), torch.sin(pa[..., 2]), torch.cos(pb[..., 2]), torch.sin(pb[..., 2])
    dx, dy = pb[..., 0] - pa[..., 0], pb[..., 1] - pa[..., 1]
    apart = torch.zeros_like(dx, dtype=torch.bool)
    for ux, uy in ((ca, sa), (-sa, ca), (cb, sb), (-sb, cb)):
        ra = ha[..., 0] * (ca * ux + sa * uy).abs() + ha[..., 1] * (-sa * ux + ca * uy).abs()
        rb = hb[..., 0] * (cb * ux + sb * uy).abs() + hb[..., 1] * (-sb * ux + cb * uy).abs()
        apart = apart | ((dx * ux + dy * uy).abs() > ra + rb)
    return ~apart


def export_clearance_before(policy: Any, path: Path, steps: int) -> Path:
    now = plan_guards.obb_overlap
    plan_guards.obb_overlap = obb_overlap_per_axis  # type: ignore[assignment]
    try:
        return export(policy, path, False, steps)
    finally:
        plan_guards.obb_overlap = now  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None, help="a trained transdiffuser policy folder (default: untrained)")
    ap.add_argument("--plans", type=int, default=100, help="plans timed per graph and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sampler-steps", type=int, nargs="+", default=[10, 5], help="DDIM steps of the graphs timed")
    ap.add_argument("--one-step", action="store_true",
                    help="also time the one-step MeanFlow graphs, 2 and 1 decoder layers (untrained weights)")
    ap.add_argument("--clearance-before", action="store_true",
                    help="also time the default graph with the box test's previous per-axis form")
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy = planner(args.checkpoint)
    arrays = example_scene_arrays(args.plans, seed=0)
    samples = [scene_samples_from_arrays(arrays, i) for i in range(args.plans)]
    variants = {(f"{label}, {n} DDIM steps"): (per_step, n) for n in args.sampler_steps
                for label, per_step in (("shared scene memory (now)", False), ("projected at every step (before)", True))}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: export(policy, Path(tmp) / f"g{i}.onnx", *form) for i, (name, form) in enumerate(variants.items())}
        nodes = {name: len(onnx.load(str(p)).graph.node) for name, p in paths.items()}
        runtimes = {name: load_runtime(p, threads=1) for name, p in paths.items()}
        noise = np.random.default_rng(1).standard_normal(runtimes[next(iter(runtimes))].noise_shape).astype(np.float32)
        plans = {name: rt.plan(samples[0], noise=noise[None]) for name, rt in runtimes.items()}
        gap = max(float(np.abs(plans[a] - plans[b]).max()) for a, b in zip(list(plans)[::2], list(plans)[1::2]))
        extra: dict[str, tuple[Path, int]] = {}
        if args.clearance_before:
            n = args.sampler_steps[-1]
            extra[f"box test per axis (before), {n} DDIM steps"] = (
                export_clearance_before(policy, Path(tmp) / "clear_before.onnx", n), n)
        if args.one_step:
            for name, layers in (("one-step MeanFlow, shared scene memory", None), ("one-step MeanFlow, 1 decoder layer", 1)):
                shape = {} if layers is None else {"layers": layers}
                one = planner(None, objective="meanflow", sampler="meanflow", sampler_steps=1, **shape)
                extra[name] = (export(one, Path(tmp) / f"one_step_{layers}.onnx", False, 1), 1)
        for name, (path, n) in extra.items():
            variants[name] = (False, n)
            paths[name] = path
            nodes[name] = len(onnx.load(str(path)).graph.node)
            runtimes[name] = load_runtime(path, threads=1)
        box_gap = None
        if args.clearance_before:  # the two box tests must plan alike, scene by scene
            n = args.sampler_steps[-1]
            a, b = runtimes[f"shared scene memory (now), {n} DDIM steps"], runtimes[f"box test per axis (before), {n} DDIM steps"]
            box_gap = max(float(np.abs(a.plan(s, noise=noise[None]) - b.plan(s, noise=noise[None])).max()) for s in samples)
        times = interleaved_plan_ms(runtimes, samples, args.rounds)
    base = float(np.median(times[f"projected at every step (before), {args.sampler_steps[0]} DDIM steps"]))
    default = float(np.median(times[f"shared scene memory (now), {args.sampler_steps[-1]} DDIM steps"]))
    rows = [{"graph": name, "plan_ms_p50": float(np.median(t)), "plan_ms_p90": float(np.percentile(t, 90)),
             "speedup_vs_before": base / float(np.median(t)),
             f"speedup_vs_{args.sampler_steps[-1]}_ddim_steps": default / float(np.median(t)), "graph_nodes": nodes[name],
             "sampler_steps": variants[name][1], "candidates": int(policy.cfg.num_candidates)}
            for name, t in times.items()]
    notes = (f"onnxruntime, batch 1, 1 thread, {args.plans} plans x {args.rounds} interleaved rounds per graph, "
             f"{'weights of ' + args.checkpoint if args.checkpoint else 'default config, untrained weights'}; "
             f"scenes from example_scene_arrays. `speedup_vs_before`: against the previous graph at "
             f"{args.sampler_steps[0]} DDIM steps; `speedup_vs_{args.sampler_steps[-1]}_ddim_steps`: against the shared "
             f"graph at {args.sampler_steps[-1]} steps. Largest waypoint difference between the two forms' plans at the "
             f"same steps for the same scene and noise: {gap:.2e} m. Plan time includes the runtime's feature building "
             "and plan memory (consistency)."
             + ("" if box_gap is None else f" Largest waypoint difference between the two box tests' plans over the "
                f"{args.plans} scenes: {box_gap:.2e} m."))
    command = "python benchmarks/transdiffuser_latency.py" + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "") \
        + f" --plans {args.plans} --rounds {args.rounds} --sampler-steps {' '.join(map(str, args.sampler_steps))}" \
        + (" --one-step" if args.one_step else "") + (" --clearance-before" if args.clearance_before else "")
    write_results(NAME, command, rows, notes=notes)
    for r in rows:
        print(f"{r['graph']:55s} p50 {r['plan_ms_p50']:.2f} ms  x{r['speedup_vs_before']:.2f}  {r['graph_nodes']} nodes")


if __name__ == "__main__":
    main()
