"""Export policies to ONNX, verified against torch before anything is written.

Every exportable kind describes its own inference path as an
:class:`~diffpilot.policy.export_spec.ExportSpec` (``policy.export_spec()``:
graph, inputs, outputs, metadata, NFE); :func:`export_by_kind` writes any
spec, so ``diffpilot export checkpoint=...`` works for every exportable kind
and nothing here switches on kind names. The forms (metadata ``kind``/``form``):

- ``chunk_policy`` ``multi_step``/``one_step`` (:func:`export_policy`): the
  whole inference path in one graph, raw observations and noise in, actions
  in environment units out. The normalizers and the fixed-step sampler (its
  schedule as constants) are inside, so the runtime
  (``diffpilot.export.runtime``) needs nothing but the file. Noise is an
  input, never a ``RandomNormal`` node: such nodes cannot be seeded and an
  optimizer may fold them into constants.
- ``chunk_policy`` ``warm_start`` (:func:`export_warm_start`): the full
  denoise and the warm-started replan (RTI-DP) side by side in one graph,
  the previous chunk as an input.
- single-step offline-RL actors (:func:`export_actor`: OFQL's one-step
  MeanFlow actor, flow BC) as a chunk of one, run by the same runtime.
- ``planner`` ``states``: a parameter-conditioned driving planner (STL flow,
  its DDIM and conditional-VAE baselines): scene tensors, raw rule-parameter
  features, mode and noise in, states out; ``predict`` without guidance
  (guidance needs autograd and stays in torch). ``OnnxPlanner`` runs it.
- ``denoiser`` (:func:`export_denoiser`): the network alone, for users who
  run their own loop.

Every export runs the written graph in onnxruntime at batch 1 and 3 (or at the batch size an export fixes) against
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
from diffpilot.export.runtime import EXPORT_FORMAT, ExportedModelError, open_session
from diffpilot.fileio import atomic_path
from diffpilot.policy.chunk_diffusion import ChunkDiffusionPolicy
from diffpilot.policy.export_spec import RUNTIME_DENOISER, ExportSpec, chunk_metadata

MIN_OPSET = 17
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5
CHECK_BATCHES = (1, 3)
MAX_BATCH = 4096

class ExportCheckError(RuntimeError):
    """The exported graph disagrees with torch; nothing was written."""


class _DenoiserGraph(nn.Module):
    """The bare network with MeanFlow's ``r`` as an explicit input when it is used."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, r: Tensor | None = None) -> Tensor:
        return self.net(x, t, cond, r)


# ------------------------------------------------------------------ public API
def export_by_kind(
    policy: Any,
    path: str | os.PathLike[str],
    sampler: dict[str, Any] | None = None,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    fp32_slack: float = 2.0,
    seed: int = 0,
    batch: int | None = None,
    **options: Any,
) -> Path:
    """Export any exportable policy in the form its kind runs on board, verified against torch.

    The policy describes the graph (``policy.export_spec(sampler, **options)``):
    a chunk policy its whole inference path (the warm-start form when it has a
    warm start configured), a single-step actor (OFQL, flow BC) a chunk of
    one, a driving planner its unguided ``predict``. A kind or configuration
    without an ONNX form raises ``ValueError`` with the reason, and nothing
    is written. ``sampler`` overrides the policy's sampler where the kind allows it.
    ``batch`` fixes the graph's batch size (None: a dynamic batch axis); see :func:`export_from_spec`.
    """
    describe = getattr(policy, "export_spec", None)
    if describe is None:
        raise ValueError(f"a {type(policy).__name__} is not a registered policy; it has no ONNX export")
    _check_cpu(policy)
    spec = describe(dict(sampler) if sampler else None, **options)
    return export_from_spec(spec, path, atol=atol, rtol=rtol, fp32_slack=fp32_slack, seed=seed, batch=batch)


def export_from_spec(
    spec: ExportSpec,
    path: str | os.PathLike[str],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    fp32_slack: float = 2.0,
    seed: int = 0,
    batch: int | None = None,
) -> Path:
    """Write ``spec`` to ``path`` as one verified ONNX graph (see the module docstring for the check).

    ``batch`` fixes the batch size of every input (verified at that size only); None keeps a dynamic batch
    axis. A car plans one scene at a time: at ``batch=1`` the graph carries no shape bookkeeping (the ops
    that read and rebuild the batch size), which a small graph pays for on every call.
    """
    if batch is not None and not (isinstance(batch, int) and not isinstance(batch, bool) and 1 <= batch <= MAX_BATCH):
        raise ValueError(f"batch must be null (a dynamic batch axis) or an integer in [1, {MAX_BATCH}], got {batch!r}")
    return _export_verified(spec, path, atol=atol, rtol=rtol, fp32_slack=fp32_slack, seed=seed, batch=batch)


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
    """Write ``policy``'s whole inference path to ``path`` as one verified ONNX graph (form ``chunk``).

    The check: |onnxruntime - float64 torch| <= nfe (atol + rtol |output|) + 2 max|fp32 torch - float64 torch|.

    ``sampler`` (e.g. ``{"name": "ddim", "num_steps": 10}``) overrides the
    policy's own sampler for this export only. Stochastic samplers get a
    ``step_noise`` input of shape (K, B, H, A). Raises ``ExportCheckError``
    (and writes nothing) when onnxruntime and torch differ by more than
    ``atol + rtol * |torch output|`` anywhere.
    """
    _check_policy(policy)
    spec = policy.export_spec(sampler, form="chunk")
    return export_from_spec(spec, path, atol=atol, rtol=rtol, fp32_slack=fp32_slack, seed=seed)


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
    spec = policy.export_spec(form="warm_start", warm_start=warm_start)
    return export_from_spec(spec, path, atol=atol, rtol=rtol, fp32_slack=fp32_slack, seed=seed)


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
    _check_cpu(policy)
    spec = policy.export_spec()
    return export_from_spec(spec, path, atol=atol, rtol=rtol, fp32_slack=fp32_slack, seed=seed)


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

    cfg = policy.config
    meta = {"kind": RUNTIME_DENOISER, **chunk_metadata(policy.KIND, cfg, policy.obs_horizon, policy.action_horizon,
                                                      policy.exec_horizon)} | {
        "form": "network",
        "sampler": json.dumps(cfg["sampler"], sort_keys=True),
        "t_start": "1.0",
        "step_noise_steps": "0",
    }
    spec = ExportSpec(_DenoiserGraph(policy.net), feeds, ("out",), meta, nfe=1)
    return export_from_spec(spec, path, atol=atol, rtol=rtol, fp32_slack=fp32_slack, seed=seed)


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
    _check_cpu(policy)


def _check_cpu(policy: nn.Module) -> None:
    devices = {p.device.type for p in policy.parameters()} | {b.device.type for b in policy.buffers()}
    if devices - {"cpu"}:
        raise ValueError(f"export runs on the CPU; the policy is on {sorted(devices)}: call policy.cpu() first")


def _stamp(spec: ExportSpec, inputs: tuple[str, ...]) -> dict[str, str]:
    """The spec's metadata plus what the exporter owns: format, version, inputs, outputs, NFE."""
    return dict(spec.metadata) | {
        "diffpilot_format": str(EXPORT_FORMAT),
        "diffpilot_version": diffpilot.__version__,
        "inputs": ",".join(inputs),
        "outputs": ",".join(spec.outputs),
        "nfe": str(spec.nfe),
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
    """Inputs for any exported graph: symbolic dims become ``batch``; times are drawn in [0, 1].

    Integer inputs (modes, commands, categories) are 0 and bool ones (validity masks) True: valid everywhere.
    """
    feeds = {}
    for inp in session.get_inputs():
        shape = tuple(d if isinstance(d, int) else batch for d in inp.shape)
        if inp.type == "tensor(bool)":
            feeds[inp.name] = np.ones(shape, dtype=bool)
        elif inp.type == "tensor(int64)":
            feeds[inp.name] = np.zeros(shape, dtype=np.int64)
        elif inp.name in ("t", "r"):
            feeds[inp.name] = rng.uniform(0.0, 1.0, shape).astype(np.float32)
        else:
            feeds[inp.name] = rng.standard_normal(shape, dtype=np.float32)
    if "r" in feeds:
        feeds["r"] = feeds["r"] * feeds["t"]
    return feeds


def _export_model(graph: nn.Module, example: dict[str, Tensor], outputs: list[str] | tuple[str, ...],
                  batch_axes: dict[str, int | None] | None = None,
                  extra_axes: dict[str, dict[int, str]] | None = None, fixed_batch: bool = False) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) of ``graph`` called with ``example`` as keywords: a dynamic batch axis, or the
    example's batch size with ``fixed_batch``."""
    names = list(example)
    batch = None if fixed_batch else torch.export.Dim("batch", min=1, max=MAX_BATCH)
    axes = dict(batch_axes or {})
    dims: dict[str, Any] = {}
    dynamic: dict[str, Any] = {}
    for n in names:
        axis = axes.get(n, 0)
        spec = {} if axis is None or batch is None else {axis: batch}
        for extra_axis, dim_name in (extra_axes or {}).get(n, {}).items():
            spec[extra_axis] = dims.setdefault(dim_name, torch.export.Dim(dim_name, min=2, max=4096))
        dynamic[n] = spec or None
    with tempfile.TemporaryDirectory(prefix="diffpilot-export-") as work:
        raw = Path(work) / "graph.onnx"
        with torch.no_grad():
            torch.onnx.export(
                graph, (), str(raw), kwargs=example, dynamo=True, dynamic_shapes=dynamic,
                input_names=names, output_names=list(outputs), verbose=False,
            )
        model = onnx.load(str(raw))
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    if opset < MIN_OPSET:
        raise ExportCheckError(f"exported opset {opset} < {MIN_OPSET}; upgrade torch/onnxscript")
    _strip_debug_info(model)
    return model


def _if_model(cold: onnx.ModelProto, warm: onnx.ModelProto, flag_name: str = "warm") -> onnx.ModelProto:
    """One model whose ``If`` on the bool input ``flag_name`` runs ``warm``'s graph (true) or ``cold``'s (false).

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
    flag = onnx.helper.make_tensor_value_info(flag_name, onnx.TensorProto.BOOL, [])
    node = onnx.helper.make_node(
        "If", [flag_name], [o.name for o in outputs], then_branch=branches["warm"], else_branch=branches["cold"]
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


def companion_path(path: str | os.PathLike[str], name: str) -> Path:
    """Where a companion graph of the export at ``path`` lives: ``<stem>.<name>.onnx`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{name}.onnx")


def _export_verified(
    spec: ExportSpec,
    path: str | os.PathLike[str],
    *,
    atol: float,
    rtol: float,
    fp32_slack: float,
    seed: int,
    batch: int | None = None,
) -> Path:
    """torch.onnx.export (dynamo; dynamic batch unless ``batch`` fixes it) of ``spec`` to a scratch file, stamp
    metadata, verify, then publish.

    A spec with a switch becomes one ``If`` over its two graphs, each branch
    checked with its own flag value and NFE.
    """
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
    path = Path(path)
    graph, switch = spec.graph, spec.switch
    modes = [(m, m.training) for m in graph.modules()]  # the wrapped policy's own mode comes back after export
    graph.eval()
    try:
        example = spec.feeds(batch or 2, torch.Generator().manual_seed(seed))
        checks = CHECK_BATCHES if batch is None else (batch,)
        names = tuple(example) + ((switch.flag,) if switch is not None else ())
        meta = _stamp(spec, names)
        for name, companion in spec.companions.items():
            _export_verified(companion, companion_path(path, name), atol=atol, rtol=rtol, fp32_slack=fp32_slack,
                             seed=seed, batch=batch)
        with atomic_path(path) as tmp:
            if switch is None:
                model = _export_model(graph, example, spec.outputs, dict(spec.batch_axes),
                                      {k: dict(v) for k, v in spec.extra_axes.items()}, fixed_batch=batch is not None)
            else:
                off = _export_model(switch.off, {k: example[k] for k in switch.off_inputs}, spec.outputs,
                                    dict(spec.batch_axes), fixed_batch=batch is not None)
                on = _export_model(switch.on, example, spec.outputs, dict(spec.batch_axes), fixed_batch=batch is not None)
                model = _if_model(off, on, switch.flag)
            _set_metadata(model, meta)
            onnx.save(model, str(tmp))
            if switch is None:
                error = _verify(graph, tmp, spec.feeds, atol=atol * spec.nfe, rtol=rtol * spec.nfe,
                                fp32_slack=fp32_slack, seed=seed, batches=checks)
            else:
                error = 0.0
                for flag in (False, True):
                    def flagged(b: int, g: torch.Generator, flag: bool = flag) -> dict[str, Tensor]:
                        return spec.feeds(b, g) | {switch.flag: torch.tensor(flag)}
                    nfe = switch.on_nfe if flag else spec.nfe
                    error = max(error, _verify(graph, tmp, flagged, atol=atol * nfe, rtol=rtol * nfe,
                                               fp32_slack=fp32_slack, seed=seed, batches=checks))
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
    batches: tuple[int, ...] = CHECK_BATCHES,
) -> float:
    """Max abs difference onnxruntime vs fp32 torch over ``batches`` (1 and 3 for a dynamic batch axis).

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
    for b in batches:
        feeds = make_feeds(b, g)
        with torch.no_grad():
            wants = _as_tuple(graph(**feeds))
            exacts = _as_tuple(exact_graph(**{k: v.double() if v.is_floating_point() else v for k, v in feeds.items()}))
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
