"""TransDiffuser plan latency in onnxruntime (batch 1, 1 thread): scene memory shared by the sampler's steps vs
projected again at every step (the previous graph), side by side in one run, at 10 and 5 DDIM steps.

The exported graph runs the encoder once, the decoder once per sampler step on all candidates, then the
score head, the clearance check and the selection. The decoder's cross-attention keys and values depend on
the scene only; the graph now projects them once per plan (``TransDiffuserNet.denoiser``) instead of at
each of the sampler's steps, and once per scene rather than for each candidate's copy of it (a scene's
candidates query its memory together). This times both graphs of the same weights on the same scenes, rounds
interleaved so machine load hits both alike, checks that they plan the same, and writes
``benchmarks/results/transdiffuser_latency.{json,md}``. Latency does not depend on the weights: without
``--checkpoint`` the default config is built untrained (random output layers, so candidates differ).
``--one-step`` also times, in the same rounds, the one-step MeanFlow graph of the same architecture, of a
one-decoder-layer student and of a one-layer student with joint fusion (one cross-attention over all the
scene's tokens); the one-step target is >= 5x lower than the DDIM default. ``--memory-before`` also times
the default graph (and the one-layer one-step graph) with the scene memory projected for every
candidate's copy of the scene, its previous form.

Run: python benchmarks/transdiffuser_latency.py [--checkpoint runs/.../policy] [--plans 100] [--rounds 5] [--one-step]
     [--memory-before]
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
from diffpilot.policy.generative import cond_repeat_interleave
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
    with torch.no_grad():  # zero-initialised output and time layers would make every candidate the same plan
        for layer in (policy.net.out, *(block.film for block in policy.net.layers)):
            torch.nn.init.normal_(layer.weight, std=0.1)
    return policy.eval()


def export(policy: Any, path: Path, form: str, steps: int) -> Path:
    """The planner's graph at ``steps`` sampler steps. ``form``: how its decoder gets the scene's cross-attention
    keys and values: ``shared``, projected once per scene (now); ``per_candidate``, once per plan but for every
    candidate's copy of the scene (before); ``per_step``, again at every step for every copy (earlier)."""
    shared = TransDiffuserNet.denoiser

    def per_candidate(net: TransDiffuserNet, cond: Any, candidates: int = 1) -> Any:
        inner = shared(net, cond_repeat_interleave(cond, candidates))
        return lambda x, t, _cond, r=None: inner(x, t, inner.cond, r)

    def per_step(net: TransDiffuserNet, cond: Any, candidates: int = 1) -> Any:
        rep = cond_repeat_interleave(cond, candidates)
        return lambda x, t, _cond, r=None: net(x, t, rep, r)

    if form != "shared":
        TransDiffuserNet.denoiser = {"per_candidate": per_candidate, "per_step": per_step}[form]  # type: ignore[method-assign]
    try:
        export_by_kind(policy, path, sampler={"name": policy.cfg.sampler, "num_steps": steps})
    finally:
        TransDiffuserNet.denoiser = shared  # type: ignore[method-assign]
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None, help="a trained transdiffuser policy folder (default: untrained)")
    ap.add_argument("--plans", type=int, default=100, help="plans timed per graph and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sampler-steps", type=int, nargs="+", default=[10, 5], help="DDIM steps of the graphs timed")
    ap.add_argument("--one-step", action="store_true",
                    help="also time the one-step MeanFlow graphs, 2 and 1 decoder layers (untrained weights)")
    ap.add_argument("--memory-before", action="store_true",
                    help="also time the default (and with --one-step the 1-layer one-step) graph with the scene memory "
                         "projected for every candidate's copy of the scene (the previous form)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy = planner(args.checkpoint)
    arrays = example_scene_arrays(args.plans, seed=0)
    samples = [scene_samples_from_arrays(arrays, i) for i in range(args.plans)]
    variants = {(f"{label}, {n} DDIM steps"): (form, n) for n in args.sampler_steps
                for label, form in (("shared scene memory (now)", "shared"), ("projected at every step (before)", "per_step"))}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: export(policy, Path(tmp) / f"g{i}.onnx", *form) for i, (name, form) in enumerate(variants.items())}
        nodes = {name: len(onnx.load(str(p)).graph.node) for name, p in paths.items()}
        runtimes = {name: load_runtime(p, threads=1) for name, p in paths.items()}
        noise = np.random.default_rng(1).standard_normal(runtimes[next(iter(runtimes))].noise_shape).astype(np.float32)
        plans = {name: rt.plan(samples[0], noise=noise[None]) for name, rt in runtimes.items()}
        gap = max(float(np.abs(plans[a] - plans[b]).max()) for a, b in zip(list(plans)[::2], list(plans)[1::2]))
        extra: dict[str, tuple[Path, int]] = {}
        if args.memory_before:
            n = args.sampler_steps[-1]
            extra[f"scene memory per candidate (before), {n} DDIM steps"] = (
                export(policy, Path(tmp) / "memory_before.onnx", "per_candidate", n), n)
        if args.one_step:
            for i, (name, shape) in enumerate((("one-step MeanFlow, shared scene memory", {}),
                                               ("one-step MeanFlow, 1 decoder layer", {"layers": 1}),
                                               ("one-step MeanFlow, 1 decoder layer, joint fusion",
                                                {"layers": 1, "fusion": "joint"}))):
                one = planner(None, objective="meanflow", sampler="meanflow", sampler_steps=1, **shape)
                extra[name] = (export(one, Path(tmp) / f"one_step_{i}.onnx", "shared", 1), 1)
                if args.memory_before and shape == {"layers": 1}:
                    extra[name + ", scene memory per candidate (before)"] = (
                        export(one, Path(tmp) / "one_step_1_before.onnx", "per_candidate", 1), 1)
        for name, (path, n) in extra.items():
            variants[name] = ("shared", n)
            paths[name] = path
            nodes[name] = len(onnx.load(str(path)).graph.node)
            runtimes[name] = load_runtime(path, threads=1)

        def plan_gap(a: str, b: str) -> float:  # two forms of one graph must plan alike, scene by scene
            ra, rb = runtimes[a], runtimes[b]
            n = np.random.default_rng(2).standard_normal(ra.noise_shape).astype(np.float32)[None]
            return max(float(np.abs(ra.plan(s, noise=n) - rb.plan(s, noise=n)).max()) for s in samples)

        n = args.sampler_steps[-1]
        gaps = {}
        if args.memory_before:
            gaps["the two scene-memory forms"] = plan_gap(
                f"shared scene memory (now), {n} DDIM steps", f"scene memory per candidate (before), {n} DDIM steps")
            if args.one_step:
                gaps["the one-step graph's two scene-memory forms"] = plan_gap(
                    "one-step MeanFlow, 1 decoder layer", "one-step MeanFlow, 1 decoder layer, scene memory per candidate (before)")
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
             + "".join(f" Largest waypoint difference between {what}' plans over the {args.plans} scenes: {g:.2e} m."
                       for what, g in gaps.items()))
    command = "python benchmarks/transdiffuser_latency.py" + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "") \
        + f" --plans {args.plans} --rounds {args.rounds} --sampler-steps {' '.join(map(str, args.sampler_steps))}" \
        + (" --one-step" if args.one_step else "") \
        + (" --memory-before" if args.memory_before else "")
    write_results(NAME, command, rows, notes=notes)
    for r in rows:
        print(f"{r['graph']:55s} p50 {r['plan_ms_p50']:.2f} ms  x{r['speedup_vs_before']:.2f}  {r['graph_nodes']} nodes")


if __name__ == "__main__":
    main()
