"""Export chunk policies to ONNX, verified against torch before anything is written.

Three forms:

- ``export_policy``: the whole inference path in one graph, raw observations
  and noise in, actions in environment units out. The normalizers and the
  fixed-step sampler (its schedule as constants) are inside, so the runtime
  (``diffpilot.export.runtime``) needs nothing but the file. Noise is an
  input, never a ``RandomNormal`` node: such nodes cannot be seeded and an
  optimizer may fold them into constants.
- ``export_warm_start``: the full denoise and the warm-started replan
  (RTI-DP) side by side in one graph, the previous chunk as an input.
- ``export_actor``: a single-step offline-RL actor (OFQL's one-step MeanFlow
  actor, flow BC) as a chunk of one, run by the same runtime.
- ``export_denoiser``: the network alone, for users who run their own loop.

Every export runs the written graph in onnxruntime at batch 1 and 3 against
torch and refuses to publish a file whose outputs differ by more than
``atol + rtol * |torch output|`` (float32 rounding scales with the output);
the file appears in one rename only after that check passes. Both are
measured against the same graph run by torch in float64, and onnxruntime
may be off it by ``nfe * (atol + rtol |output|)`` plus twice torch fp32's
own error: rounding compounds through ``nfe`` chained network calls, and a
sampler can be ill-conditioned in fp32 (epsilon-prediction divides by
sqrt(alpha_bar) at its noisiest step), which no export can do better than.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

import diffpilot
from diffpilot.export.runtime import (
    EXPORT_FORMAT,
    KIND_DENOISER,
    KIND_POLICY,
    ExportedModelError,
    open_session,
)
from diffpilot.fileio import atomic_path
from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy
from diffpilot.policy.generative import DDIMSampler, DDPMSampler, build_sampler
from diffpilot.policy.generative.warm_start import WarmStartConfig, WarmStarter

MIN_OPSET = 17
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5
CHECK_BATCHES = (1, 3)
MAX_BATCH = 4096


class ExportCheckError(RuntimeError):
    """The exported graph disagrees with torch; nothing was written."""


# ----------------------------------------------------------------------- graphs
class _PolicyGraph(nn.Module):
    """obs (B, To, obs_dim) + noise (B, H, A) [+ step_noise (K, B, H, A)] -> actions (B, H, A)."""

    def __init__(self, policy: ChunkDiffusionPolicy, sampler: Any) -> None:
        super().__init__()
        self.policy = policy
        self.sampler = sampler

    def forward(self, obs: Tensor, noise: Tensor, step_noise: Tensor | None = None) -> Tensor:
        cond = self.policy.condition(obs)
        sample = self.sampler.sample(self.policy.net, noise, cond, step_noise=step_noise).sample
        return self.policy.to_actions(sample)


class _ColdChunkGraph(nn.Module):
    """obs + noise -> (actions, model-space chunk): the first plan of an episode."""

    def __init__(self, policy: ChunkDiffusionPolicy, sampler: Any) -> None:
        super().__init__()
        self.policy, self.sampler = policy, sampler

    def forward(self, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        chunk = self.sampler.sample(self.policy.net, noise, self.policy.condition(obs)).sample
        return self.policy.to_actions(chunk), chunk


class _WarmChunkGraph(nn.Module):
    """obs + noise + previous chunk -> (actions, chunk): shift, place at t_start, denoise the rest."""

    def __init__(self, policy: ChunkDiffusionPolicy, warm: WarmStarter) -> None:
        super().__init__()
        self.policy, self.warm = policy, warm

    def forward(self, obs: Tensor, noise: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
        guess = self.policy.warm_guess(previous)
        chunk = self.warm.sample(self.policy.net, guess, self.policy.exec_horizon, noise, self.policy.condition(obs)).sample
        return self.policy.to_actions(chunk), chunk


class _Switch(nn.Module):
    """Eager reference for the exported ``If``: the warm branch when ``warm`` is true, else the cold one."""

    def __init__(self, cold: _ColdChunkGraph, warm: _WarmChunkGraph) -> None:
        super().__init__()
        self.cold, self.warm = cold, warm

    def forward(self, obs: Tensor, noise: Tensor, previous: Tensor, warm: Tensor) -> tuple[Tensor, Tensor]:
        return self.warm(obs, noise, previous) if bool(warm) else self.cold(obs, noise)


class _ActorGraph(nn.Module):
    """A single-step offline-RL actor as a chunk of one: obs (B, 1, obs_dim) + noise (B, 1, A) -> actions (B, 1, A)."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, obs: Tensor, noise: Tensor) -> Tensor:
        p = self.policy
        cond = p.obs_normalizer.normalize(obs[:, 0])
        action = p.sample(p.actor_ema, cond, noise=noise[:, 0]).sample
        return p.action_normalizer.unnormalize(action)[:, None]


class _DenoiserGraph(nn.Module):
    """The bare network with MeanFlow's ``r`` as an explicit input when it is used."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, r: Tensor | None = None) -> Tensor:
        return self.net(x, t, cond, r)


def _is_stochastic(sampler: Any) -> bool:
    """Samplers that draw fresh noise at each step (DDPM ancestral, DDIM with eta > 0)."""
    return isinstance(sampler, DDPMSampler) or (isinstance(sampler, DDIMSampler) and sampler.eta > 0)


# ------------------------------------------------------------------ public API
def export_policy(
    policy: ChunkDiffusionPolicy,
    path: str | os.PathLike[str],
    sampler: dict[str, Any] | None = None,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    fp32_slack: float = 2.0,
    seed: int = 0,
) -> Path:
    """Write ``policy``'s whole inference path to ``path`` as one verified ONNX graph.

    The check: |onnxruntime - float64 torch| <= nfe (atol + rtol |output|) + 2 max|fp32 torch - float64 torch|.

    ``sampler`` (e.g. ``{"name": "ddim", "num_steps": 10}``) overrides the
    policy's own sampler for this export only. Stochastic samplers get a
    ``step_noise`` input of shape (K, B, H, A). Raises ``ExportCheckError``
    (and writes nothing) when onnxruntime and torch differ by more than
    ``atol + rtol * |torch output|`` anywhere.
    """
    _check_policy(policy)
    sampler_cfg = dict(sampler) if sampler is not None else dict(policy.config["sampler"])
    if "name" not in sampler_cfg:
        raise ValueError(
            f"sampler override needs a 'name' key, e.g. {{'name': 'ddim', 'num_steps': 10}}; got {sampler_cfg}"
        )
    options = {k: v for k, v in sampler_cfg.items() if k != "name"}
    built = build_sampler(sampler_cfg["name"], policy.objective, **options)
    stochastic = _is_stochastic(built)
    k_steps = built.num_steps if stochastic else 0
    h, a, to, od = policy.action_horizon, policy.action_dim, policy.obs_horizon, policy.obs_dim

    def feeds(b: int, g: torch.Generator) -> dict[str, Tensor]:
        # Observations whose normalized values are standard normal, i.e. near the range the normalizer maps data to.
        z = torch.randn(b, to, od, generator=g)
        out = {
            "obs": (z - policy.obs_normalizer.offset) / policy.obs_normalizer.scale,
            "noise": torch.randn(b, h, a, generator=g),
        }
        if stochastic:
            out["step_noise"] = torch.randn(k_steps, b, h, a, generator=g)
        return out

    graph = _PolicyGraph(policy, built)
    with torch.no_grad():
        probe = feeds(1, torch.Generator().manual_seed(seed))
        cond = policy.condition(probe["obs"])
        nfe = built.sample(policy.net, probe["noise"], cond, step_noise=probe.get("step_noise")).nfe
    names = list(probe)
    meta = _common_metadata(policy) | {
        "kind": KIND_POLICY,
        "form": "one_step" if nfe == 1 else "multi_step",
        "inputs": ",".join(names),
        "outputs": "actions",
        "sampler": json.dumps(sampler_cfg, sort_keys=True),
        "nfe": str(nfe),
        "t_start": "1.0",
        "step_noise_steps": str(k_steps),
    }
    return _export_verified(graph, feeds, names, ["actions"], meta, path, atol=atol * nfe, rtol=rtol * nfe, fp32_slack=fp32_slack, seed=seed)


def export_warm_start(
    policy: ChunkDiffusionPolicy,
    path: str | os.PathLike[str],
    warm_start: dict[str, Any] | None = None,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    fp32_slack: float = 2.0,
    seed: int = 0,
) -> Path:
    """Write the warm-started inference path (form ``warm_start``), verified like ``export_policy``.

    Inputs: obs (B, To, obs_dim), noise (B, H, A), previous (B, H, A) the
    model-space chunk of the last plan, and ``warm`` (a bool scalar). One
    ``If`` node runs the full denoise when ``warm`` is false and the warm
    start (shift ``previous`` by exec_horizon, denoise from ``t_start``)
    when true, so a warm replan costs only its own network calls. Outputs:
    ``actions`` (environment units) and ``chunk`` (model space, the next
    call's ``previous``). Both branches are checked against torch.
    ``warm_start`` (``WarmStartConfig`` fields) defaults to the policy's own.
    The policy's sampler must be deterministic (DDIM with eta 0, Euler,
    Heun, MeanFlow): the warm path re-uses its steps below ``t_start``.
    """
    _check_policy(policy)
    ws_cfg = dict(warm_start) if warm_start is not None else policy.config["warm_start"]
    if not ws_cfg:
        raise ValueError("the policy has no warm_start config; pass warm_start={'t_start': 0.3, 'renoise': True}")
    sampler = policy.sampler
    if _is_stochastic(sampler):
        raise ValueError(
            f"warm-start export needs a deterministic sampler, the policy uses {type(sampler).__name__}; "
            "call policy.set_sampler('ddim', num_steps=10) first"
        )
    warm = WarmStarter(policy.objective, sampler, WarmStartConfig(**ws_cfg))
    h, a, to, od = policy.action_horizon, policy.action_dim, policy.obs_horizon, policy.obs_dim

    def feeds(b: int, g: torch.Generator) -> dict[str, Tensor]:
        z = torch.randn(b, to, od, generator=g)
        obs = (z - policy.obs_normalizer.offset) / policy.obs_normalizer.scale
        noise = torch.randn(b, h, a, generator=g)
        with torch.no_grad():  # a realistic previous chunk: the policy's own plan for nearby observations
            previous = sampler.sample(policy.net, torch.randn(b, h, a, generator=g), policy.condition(obs)).sample
        return {"obs": obs, "noise": noise, "previous": previous}

    with torch.no_grad():
        probe = feeds(1, torch.Generator().manual_seed(seed))
        cold_nfe = sampler.sample(policy.net, probe["noise"], policy.condition(probe["obs"])).nfe
    meta = _common_metadata(policy) | {
        "kind": KIND_POLICY,
        "form": "warm_start",
        "inputs": "obs,noise,previous,warm",
        "outputs": "actions,chunk",
        "sampler": json.dumps(policy.config["sampler"], sort_keys=True),
        "nfe": str(cold_nfe),
        "warm_nfe": str(warm.nfe),
        "t_start": repr(float(warm.t_start)),
        "warm_start": json.dumps(ws_cfg, sort_keys=True),
        "step_noise_steps": "0",
    }
    cold_graph, warm_graph = _ColdChunkGraph(policy, sampler), _WarmChunkGraph(policy, warm)
    switch = _Switch(cold_graph, warm_graph)
    path = Path(path)
    modes = [(m, m.training) for m in switch.modules()]
    switch.eval()
    try:
        example = feeds(2, torch.Generator().manual_seed(seed))
        with atomic_path(path) as tmp:
            cold_model = _export_model(cold_graph, {k: example[k] for k in ("obs", "noise")}, ["actions", "chunk"])
            warm_model = _export_model(warm_graph, example, ["actions", "chunk"])
            model = _if_model(cold_model, warm_model)
            _set_metadata(model, meta)
            onnx.save(model, str(tmp))
            error = 0.0
            for flag in (False, True):
                def flagged(b: int, g: torch.Generator, flag: bool = flag) -> dict[str, Tensor]:
                    return feeds(b, g) | {"warm": torch.tensor(flag)}
                nfe = warm.nfe if flag else cold_nfe
                error = max(error, _verify(switch, tmp, flagged, atol=atol * nfe, rtol=rtol * nfe, fp32_slack=fp32_slack, seed=seed))
            _set_metadata(model, meta | {"check_max_abs_error": repr(error)})
            onnx.save(model, str(tmp))
    finally:
        for module, training in modes:
            module.training = training
    return path


def export_actor(
    policy: Any,
    path: str | os.PathLike[str],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    fp32_slack: float = 2.0,
    seed: int = 0,
) -> Path:
    """Write a single-step offline-RL actor (OFQL's one-step MeanFlow actor, flow BC) as a ``one_step``/``multi_step`` policy.

    The graph is the EMA actor with its normalizers and its deterministic
    sampler, shaped as a chunk of one (obs horizon 1, one action executed),
    so :class:`~diffpilot.export.runtime.OnnxChunkPolicy` runs it unchanged.
    Candidate selection by Q (DQL's softmax over 50 samples) and stochastic
    samplers stay in torch: such a policy is refused with the reason.
    """
    from diffpilot.policy.bc import SingleStepPolicy

    if not isinstance(policy, SingleStepPolicy):
        raise TypeError(f"export_actor takes DQL/OFQL/BC policies, got {type(policy).__name__}; use export_policy for chunk policies")
    sel = policy.config["action_selection"]
    if int(sel["samples"]) > 1 and sel["mode"] != "first":
        raise ValueError(
            f"this actor picks among {sel['samples']} candidates by Q ({sel['mode']}), which needs the critic; "
            "export it with action_selection samples=1 (the one-step actor alone)"
        )
    if policy.step_noise_shape(1) is not None:
        raise ValueError("this actor's sampler draws fresh noise at every step (DDPM); export a deterministic one (OFQL, flow BC)")
    devices = {p.device.type for p in policy.parameters()} | {b.device.type for b in policy.buffers()}
    if devices != {"cpu"}:
        raise ValueError(f"export runs on the CPU; the policy is on {sorted(devices)}: call policy.cpu() first")
    od, a = policy.obs_dim, policy.action_dim

    def feeds(b: int, g: torch.Generator) -> dict[str, Tensor]:
        z = torch.randn(b, 1, od, generator=g)
        return {"obs": policy.obs_normalizer.unnormalize(z), "noise": torch.randn(b, 1, a, generator=g)}

    with torch.no_grad():
        probe = feeds(1, torch.Generator().manual_seed(seed))
        nfe = policy.sample(policy.actor_ema, policy.obs_normalizer.normalize(probe["obs"][:, 0]), noise=probe["noise"][:, 0]).nfe
    meta = _metadata(policy.KIND, policy.config, 1, 1, 1) | {
        "kind": KIND_POLICY,
        "form": "one_step" if nfe == 1 else "multi_step",
        "inputs": "obs,noise",
        "outputs": "actions",
        "sampler": json.dumps(policy.config["sampler"], sort_keys=True),
        "nfe": str(nfe),
        "t_start": "1.0",
        "step_noise_steps": "0",
    }
    return _export_verified(_ActorGraph(policy), feeds, ["obs", "noise"], ["actions"], meta, path,
                            atol=atol * nfe, rtol=rtol * nfe, fp32_slack=fp32_slack, seed=seed)


def export_by_kind(policy: Any, path: str | os.PathLike[str], sampler: dict[str, Any] | None = None) -> Path:
    """Export any exportable policy in the form its kind runs on board, verified against torch.

    A chunk policy exports its whole inference path (the warm-start form when
    the policy has a warm start configured); a single-step actor (OFQL, flow
    BC) exports as a chunk of one. Other kinds are refused with the reason.
    """
    kind = getattr(policy, "KIND", type(policy).__name__)
    if kind == "chunk_diffusion":
        if policy.config.get("warm_start"):
            if sampler:
                policy.set_sampler(sampler.pop("name"), **sampler)
            return export_warm_start(policy, path, policy.config["warm_start"])
        return export_policy(policy, path, sampler)
    if kind in ("ofql", "flow_bc", "diffusion_bc", "dql"):
        if sampler:
            raise ValueError(f"sampler= does not apply to a {kind!r} policy (its sampler is fixed at training); drop it")
        return export_actor(policy, path)
    raise ValueError(f"a {kind!r} policy has no ONNX export; exportable kinds: chunk_diffusion, ofql, flow_bc")


def export_denoiser(
    policy: ChunkDiffusionPolicy,
    path: str | os.PathLike[str],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    fp32_slack: float = 2.0,
    seed: int = 0,
) -> Path:
    """Write the denoiser ``net(x, t, cond[, r])`` alone to ``path``, verified like ``export_policy``.

    Inputs: x (B, H, A) normalized sample, t (B,) in [0, 1], cond (B, To*obs_dim)
    normalized condition, and r (B,) for MeanFlow networks. The metadata names
    the objective so a hand-written loop can interpret the output.
    """
    _check_policy(policy)
    use_r = bool(getattr(policy.net, "use_r", False))
    h, a = policy.action_horizon, policy.action_dim
    c = policy.obs_horizon * policy.obs_dim

    def feeds(b: int, g: torch.Generator) -> dict[str, Tensor]:
        out = {
            "x": torch.randn(b, h, a, generator=g),
            "t": torch.rand(b, generator=g),
            "cond": torch.randn(b, c, generator=g),
        }
        if use_r:
            out["r"] = out["t"] * torch.rand(b, generator=g)
        return out

    names = ["x", "t", "cond"] + (["r"] if use_r else [])
    meta = _common_metadata(policy) | {
        "kind": KIND_DENOISER,
        "form": "network",
        "inputs": ",".join(names),
        "outputs": "out",
        "sampler": json.dumps(policy.config["sampler"], sort_keys=True),
        "nfe": "1",
        "t_start": "1.0",
        "step_noise_steps": "0",
    }
    graph = _DenoiserGraph(policy.net)
    return _export_verified(graph, feeds, names, ["out"], meta, path, atol=atol, rtol=rtol, fp32_slack=fp32_slack, seed=seed)


def quantize_dynamic_int8(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, max_error: float | None = None, seed: int = 0
) -> Path:
    """Dynamic int8 quantization of ``src``'s MatMul/Gemm weights into ``dst``, metadata kept.

    Convolutions stay fp32: onnxruntime's CPU int8 convolutions are slower
    than fp32 ones. The max abs difference to the fp32 model on random inputs
    (batch 1 and 3) is stored as ``quantization_max_abs_error``; with
    ``max_error`` set, a larger difference raises and nothing is written.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    fp32, info = open_session(src)
    with atomic_path(dst) as tmp, tempfile.TemporaryDirectory(prefix=".quantize.", dir=dst.parent) as work:
        # The quantizer re-runs onnx shape inference, which can disagree with the
        # exporter's intermediate shape annotations; they are optional, so drop them.
        plain = onnx.load(str(src))
        del plain.graph.value_info[:]
        stripped, raw = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        onnx.save(plain, str(stripped))
        try:
            quantize_dynamic(
                str(stripped),
                str(raw),
                op_types_to_quantize=["MatMul", "Gemm"],
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
            int8 = _session(raw)
        except Exception as err:  # the quantizer reports failures as bare RuntimeErrors
            raise ExportCheckError(
                f"onnxruntime's dynamic quantizer could not quantize {src} ({str(err)[:200]}); keep the fp32 model"
            ) from err
        rng = np.random.default_rng(seed)
        error = 0.0
        for b in CHECK_BATCHES:
            feed = _random_feeds(fp32, b, rng)
            (want,) = fp32.run(None, feed)
            (got,) = int8.run(None, feed)
            if not np.isfinite(got).all():
                raise ExportCheckError(
                    f"the int8 model of {src} gives non-finite outputs at batch {b}; keep the fp32 model"
                )
            error = max(error, float(np.abs(got - want).max()))
        if max_error is not None and error > max_error:
            raise ExportCheckError(
                f"int8 outputs differ from fp32 by {error:.3g} > max_error={max_error:g}; keep the fp32 model "
                "or raise max_error"
            )
        model = onnx.load(str(raw))
        quant = {"quantization": "dynamic_int8_matmul_gemm", "quantization_max_abs_error": repr(error)}
        _set_metadata(model, info.raw | quant)
        onnx.save(model, str(tmp))
        open_session(tmp)  # the published file must load with its metadata
    return dst


# ------------------------------------------------------------------ internals
def _as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _check_policy(policy: ChunkDiffusionPolicy) -> None:
    if not isinstance(policy, ChunkDiffusionPolicy):
        raise TypeError(f"expected a ChunkDiffusionPolicy, got {type(policy).__name__}")
    devices = {p.device.type for p in policy.parameters()} | {b.device.type for b in policy.buffers()}
    if devices != {"cpu"}:
        raise ValueError(f"export runs on the CPU; the policy is on {sorted(devices)}: call policy.cpu() first")


def _common_metadata(policy: ChunkDiffusionPolicy) -> dict[str, str]:
    cfg = policy.config
    return _metadata(policy.KIND, cfg, cfg["obs_horizon"], cfg["action_horizon"], cfg["exec_horizon"])


def _metadata(kind: str, cfg: dict[str, Any], obs_horizon: int, action_horizon: int, exec_horizon: int) -> dict[str, str]:
    """The metadata every export carries (see diffpilot.export.runtime for the schema)."""
    return {
        "diffpilot_format": str(EXPORT_FORMAT),
        "diffpilot_version": diffpilot.__version__,
        "policy_kind": kind,
        "obs_dim": str(cfg["obs_dim"]),
        "action_dim": str(cfg["action_dim"]),
        "obs_horizon": str(obs_horizon),
        "action_horizon": str(action_horizon),
        "exec_horizon": str(exec_horizon),
        "network": json.dumps(cfg["network"], sort_keys=True),
        "objective": json.dumps(cfg["objective"], sort_keys=True),
    }


def _set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    del model.metadata_props[:]
    for key, value in sorted(meta.items()):
        model.metadata_props.add(key=key, value=value)


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug records: most of a small model's bytes, and they embed source paths."""
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        del node.metadata_props[:]
        node.doc_string = ""


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _random_feeds(session: ort.InferenceSession, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs for any exported graph: symbolic dims become ``batch``; times are drawn in [0, 1]."""
    feeds = {}
    for inp in session.get_inputs():
        shape = tuple(d if isinstance(d, int) else batch for d in inp.shape)
        if inp.name in ("t", "r"):
            feeds[inp.name] = rng.uniform(0.0, 1.0, shape).astype(np.float32)
        else:
            feeds[inp.name] = rng.standard_normal(shape, dtype=np.float32)
    if "r" in feeds:
        feeds["r"] = feeds["r"] * feeds["t"]
    return feeds


def _export_model(graph: nn.Module, example: dict[str, Tensor], outputs: list[str]) -> onnx.ModelProto:
    """torch.onnx.export (dynamo, dynamic batch axis) of ``graph`` called with ``example`` as keywords."""
    names = list(example)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = {n: ({1: batch} if n == "step_noise" else {0: batch}) for n in names}
    with tempfile.TemporaryDirectory(prefix="diffpilot-export-") as work:
        raw = Path(work) / "graph.onnx"
        with torch.no_grad():
            torch.onnx.export(
                graph, (), str(raw), kwargs=example, dynamo=True, dynamic_shapes=dynamic,
                input_names=names, output_names=outputs, verbose=False,
            )
        model = onnx.load(str(raw))
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    if opset < MIN_OPSET:
        raise ExportCheckError(f"exported opset {opset} < {MIN_OPSET}; upgrade torch/onnxscript")
    _strip_debug_info(model)
    return model


def _if_model(cold: onnx.ModelProto, warm: onnx.ModelProto) -> onnx.ModelProto:
    """One model whose ``If`` on the bool input ``warm`` runs ``warm``'s graph or ``cold``'s.

    Each graph becomes a branch: its names get a prefix, and its inputs are
    read from the outer graph's inputs of the same name (``warm`` has them all).
    """
    branches = {}
    for tag, model in (("cold", cold), ("warm", warm)):
        g = onnx.compose.add_prefix_graph(model.graph, f"{tag}/")
        bridges = [onnx.helper.make_node("Identity", [i.name[len(tag) + 1 :]], [i.name]) for i in g.input]
        branches[tag] = onnx.helper.make_graph(
            bridges + list(g.node), f"{tag}_branch", [], list(g.output),
            initializer=list(g.initializer), value_info=list(g.value_info),
        )
    outputs = [copy.deepcopy(o) for o in warm.graph.output]
    flag = onnx.helper.make_tensor_value_info("warm", onnx.TensorProto.BOOL, [])
    node = onnx.helper.make_node(
        "If", ["warm"], [o.name for o in outputs], then_branch=branches["warm"], else_branch=branches["cold"]
    )
    graph = onnx.helper.make_graph([node], "warm_start_policy", [*warm.graph.input, flag], outputs)
    functions = {(f.domain, f.name, f.overload): f for m in (cold, warm) for f in m.functions}
    opsets: dict[str, int] = {}
    for o in [*cold.opset_import, *warm.opset_import]:
        opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    merged = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()], functions=list(functions.values())
    )
    merged.ir_version = max(cold.ir_version, warm.ir_version)
    onnx.checker.check_model(merged)
    return merged


def _export_verified(
    graph: nn.Module,
    make_feeds: Callable[[int, torch.Generator], dict[str, Tensor]],
    names: list[str],
    outputs: list[str],
    meta: dict[str, str],
    path: str | os.PathLike[str],
    *,
    atol: float,
    rtol: float,
    fp32_slack: float,
    seed: int,
) -> Path:
    """torch.onnx.export (dynamo, dynamic batch) to a scratch file, stamp metadata, verify, then publish."""
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
    path = Path(path)
    modes = [(m, m.training) for m in graph.modules()]  # the wrapped policy's own mode comes back after export
    graph.eval()
    try:
        example = make_feeds(2, torch.Generator().manual_seed(seed))
        if list(example) != names:
            raise ValueError(f"feeds {list(example)} do not match the input names {names}")
        with atomic_path(path) as tmp:
            model = _export_model(graph, example, outputs)
            _set_metadata(model, meta)
            onnx.save(model, str(tmp))
            error = _verify(graph, tmp, make_feeds, atol=atol, rtol=rtol, fp32_slack=fp32_slack, seed=seed)
            _set_metadata(model, meta | {"check_max_abs_error": repr(error)})
            onnx.save(model, str(tmp))
    finally:
        for module, training in modes:
            module.training = training
    return path


def _verify(
    graph: nn.Module,
    path: Path,
    make_feeds: Callable[[int, torch.Generator], dict[str, Tensor]],
    *,
    atol: float,
    rtol: float,
    fp32_slack: float,
    seed: int,
) -> float:
    """Max abs difference onnxruntime vs fp32 torch over batches 1 and 3.

    Raises when onnxruntime's distance to a float64 torch run exceeds
    ``atol + rtol * |output|`` plus ``fp32_slack`` times fp32 torch's own distance to it.
    """
    try:
        session, _ = open_session(path)
    except ExportedModelError as err:
        raise ExportCheckError(f"the exported graph does not load in onnxruntime: {err}") from None
    worst = 0.0
    exact_graph = copy.deepcopy(graph).double()
    g = torch.Generator().manual_seed(seed + 1)
    for b in CHECK_BATCHES:
        feeds = make_feeds(b, g)
        with torch.no_grad():
            wants = _as_tuple(graph(**feeds))
            exacts = _as_tuple(exact_graph(**{k: v.double() for k, v in feeds.items()}))
        gots = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        for name, got, want_t, exact_t in zip([o.name for o in session.get_outputs()], gots, wants, exacts):
            want, exact = want_t.numpy(), exact_t.numpy()
            if got.shape != want.shape:
                raise ExportCheckError(f"onnxruntime output {name!r} shape {got.shape} != torch {want.shape} at batch {b}")
            error = float(np.abs(got.astype(np.float64) - want).max()) if np.isfinite(got).all() else float("inf")
            worst = max(worst, error)
            torch_error = float(np.abs(want - exact).max())
            ort_error = np.abs(got - exact)
            if not (ort_error <= atol + rtol * np.abs(exact) + fp32_slack * torch_error).all():
                raise ExportCheckError(
                    f"onnxruntime output {name!r} is off the float64 result by up to {float(ort_error.max()):.3g}, "
                    f"torch fp32 by {torch_error:.3g} (atol={atol:g}, rtol={rtol:g}, largest output "
                    f"{float(np.abs(exact).max()):.3g}) at batch {b}; nothing was written. "
                    "Check the network for ops that export inexactly, "
                    "or pass a larger atol/rtol if the difference is expected"
                )
    return worst
