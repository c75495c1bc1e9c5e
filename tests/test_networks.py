"""Chunk denoiser networks: shapes, conditioning, gradients, errors, fitting, ONNX parity."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from diffpilot.policy.networks import (
    NETWORKS,
    ConditionalUnet1D,
    MLPDenoiser,
    TransformerDenoiser,
    build_network,
)

ACTION_DIM, COND_DIM, N_TOKENS = 3, 6, 5


def small_unet(horizon: int | None = None, **kwargs) -> ConditionalUnet1D:
    return ConditionalUnet1D(ACTION_DIM, COND_DIM, down_dims=(16, 32, 64), time_dim=32, horizon=horizon, **kwargs)


def small_transformer(horizon: int, **kwargs) -> TransformerDenoiser:
    return TransformerDenoiser(ACTION_DIM, COND_DIM, horizon, d_model=32, n_heads=4, n_layers=2, **kwargs)


def make_net(kind: str, horizon: int, **kwargs) -> nn.Module:
    return small_unet(**kwargs) if kind == "unet1d" else small_transformer(horizon, **kwargs)


def make_inputs(kind: str, batch: int, horizon: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, horizon, ACTION_DIM, generator=g)
    t = torch.rand(batch, generator=g)
    cond_shape = (batch, COND_DIM) if kind == "unet1d" else (batch, N_TOKENS, COND_DIM)
    return x, t, torch.randn(*cond_shape, generator=g)


def perturb_(model: nn.Module, scale: float = 0.1, seed: int = 1) -> nn.Module:
    """Add noise to every weight so zero-initialized FiLM/adaLN layers are active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def one_adam_step(model: nn.Module, x, t, cond) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = (model(x, t, cond) - torch.randn_like(x)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


KINDS = ["unet1d", "transformer"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("horizon", [8, 16, 32])
@pytest.mark.parametrize("batch", [1, 4])
def test_output_has_the_input_shape(kind: str, horizon: int, batch: int) -> None:
    torch.manual_seed(0)
    net = make_net(kind, horizon)
    x, t, cond = make_inputs(kind, batch, horizon)
    out = net(x, t, cond)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_transformer_takes_a_global_condition_vector_as_one_token() -> None:
    torch.manual_seed(0)
    net = small_transformer(8)
    x, t, _ = make_inputs("transformer", 2, 8)
    cond = torch.randn(2, COND_DIM)
    torch.testing.assert_close(net(x, t, cond), net(x, t, cond[:, None, :]))


@pytest.mark.parametrize("kind", KINDS)
def test_time_only_networks(kind: str) -> None:
    torch.manual_seed(0)
    net = (
        ConditionalUnet1D(ACTION_DIM, 0, down_dims=(16, 32), time_dim=32)
        if kind == "unet1d"
        else TransformerDenoiser(ACTION_DIM, 0, 8, d_model=32, n_layers=1)
    )
    x = torch.randn(2, 8, ACTION_DIM)
    assert net(x, torch.rand(2)).shape == x.shape
    with pytest.raises(ValueError, match="cond_dim=0"):
        net(x, torch.rand(2), torch.randn(2, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_condition_and_time_change_the_output_after_one_step(kind: str) -> None:
    torch.manual_seed(0)
    net = make_net(kind, 16)
    x, t, cond = make_inputs(kind, 4, 16)
    one_adam_step(net, x, t, cond)
    with torch.no_grad():
        base = net(x, t, cond)
        other_cond = net(x, t, cond + 1.0)
        other_t = net(x, (t + 0.3) % 1.0, cond)
    assert (base - other_cond).abs().max() > 1e-4
    assert (base - other_t).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_meanflow_r_changes_the_output(kind: str) -> None:
    torch.manual_seed(0)
    net = make_net(kind, 8, use_r=True)
    x, t, cond = make_inputs(kind, 3, 8)
    one_adam_step(net, x, t, cond)
    with torch.no_grad():
        assert torch.equal(net(x, t, cond), net(x, t, cond, r=t))  # r defaults to t
        assert (net(x, t, cond, r=t * 0.5) - net(x, t, cond, r=t)).abs().max() > 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind: str) -> None:
    torch.manual_seed(0)
    extra = {"n_cond_tokens": N_TOKENS} if kind == "transformer" else {}
    net = make_net(kind, 16, **extra)
    x, t, cond = make_inputs(kind, 4, 16)
    # Time enters only through zero-initialized FiLM/adaLN, so the time MLP gets
    # its first gradient once one step has opened that path.
    one_adam_step(net, x, t, cond)
    net.zero_grad()
    (net(x, t, cond) - torch.randn_like(x)).square().mean().backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


@pytest.mark.parametrize("kind", KINDS)
def test_overfits_a_fixed_batch(kind: str) -> None:
    torch.manual_seed(0)
    net = make_net(kind, 8)
    x, t, cond = make_inputs(kind, 8, 8)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = (net(x, t, cond) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# --- padding masks (variable numbers of agents) ------------------------------


def test_masked_tokens_are_ignored_as_if_absent() -> None:
    torch.manual_seed(0)
    net = perturb_(small_transformer(8))
    x, t, cond = make_inputs("transformer", 2, 8)
    mask = torch.zeros(2, N_TOKENS, dtype=torch.bool)
    mask[:, 3:] = True
    garbage = cond.clone()
    garbage[:, 3:] = 1e3 * torch.randn(2, N_TOKENS - 3, COND_DIM)
    with torch.no_grad():
        masked = net(x, t, cond, cond_mask=mask)
        torch.testing.assert_close(masked, net(x, t, garbage, cond_mask=mask))
        torch.testing.assert_close(masked, net(x, t, cond[:, :3]))


def test_fully_masked_rows_give_finite_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    net = perturb_(small_transformer(8))
    x, t, cond = make_inputs("transformer", 3, 8)
    cond.requires_grad_(True)
    mask = torch.zeros(3, N_TOKENS, dtype=torch.bool)
    mask[0] = True  # a scene with no agents
    out = net(x, t, cond, cond_mask=mask)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert torch.equal(cond.grad[0], torch.zeros_like(cond.grad[0]))
    with torch.no_grad():  # the empty scene's output does not depend on its padded tokens
        moved = net(x, t, cond + 5.0, cond_mask=mask)
    torch.testing.assert_close(moved[0], out[0].detach())
    assert (moved[1:] - out[1:]).abs().max() > 1e-4


# --- bad input -----------------------------------------------------------------


def test_unet_rejects_wrong_shapes() -> None:
    net = small_unet()
    x, t, cond = make_inputs("unet1d", 2, 16)
    with pytest.raises(ValueError, match=r"x must be \(B, H, action_dim=3\), got \(2, 16, 4\)"):
        net(torch.randn(2, 16, 4), t, cond)
    with pytest.raises(ValueError, match=r"H=10 .* divisible by 4"):
        net(torch.randn(2, 10, ACTION_DIM), t, cond)
    with pytest.raises(ValueError, match=r"t must be \(B,\) = \(2,\), got \(2, 1\)"):
        net(x, t[:, None], cond)
    with pytest.raises(ValueError, match=r"cond must be \(B, cond_dim\) = \(2, 6\), got \(2, 5\)"):
        net(x, t, cond[:, :5])
    with pytest.raises(ValueError, match=r"got None"):
        net(x, t)
    with pytest.raises(ValueError, match="use_r=False"):
        net(x, t, cond, r=t)
    with pytest.raises(ValueError, match=r"H=8"):
        small_unet(horizon=8)(x, t, cond)


def test_unet_rejects_bad_construction() -> None:
    with pytest.raises(ValueError, match=r"horizon 10 is not divisible by .* = 4"):
        small_unet(horizon=10)
    with pytest.raises(ValueError, match=r"n_groups=8 must divide .* \[12\]"):
        ConditionalUnet1D(2, 0, down_dims=(16, 12))
    with pytest.raises(ValueError, match="odd"):
        ConditionalUnet1D(2, 0, kernel_size=4)


def test_transformer_rejects_wrong_shapes() -> None:
    net = small_transformer(8)
    x, t, cond = make_inputs("transformer", 2, 8)
    with pytest.raises(ValueError, match=r"x must be \(B, horizon=8, action_dim=3\), got \(2, 16, 3\)"):
        net(torch.randn(2, 16, ACTION_DIM), t, cond)
    with pytest.raises(ValueError, match=r"t must be \(B,\) = \(2,\), got \(3,\)"):
        net(x, torch.rand(3), cond)
    with pytest.raises(ValueError, match=r"cond must be .*\(2, N, 6\).*got \(2, 5, 7\)"):
        net(x, t, torch.randn(2, N_TOKENS, 7))
    with pytest.raises(ValueError, match=r"cond_mask must be a bool \(B, N\) = \(2, 5\).*\(2, 4\)"):
        net(x, t, cond, cond_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cond_mask must be a bool .*torch.float32"):
        net(x, t, cond, cond_mask=torch.zeros(2, N_TOKENS))
    with pytest.raises(ValueError, match=r"\(2, 3, 6\).*got \(2, 5, 6\)"):
        small_transformer(8, n_cond_tokens=3)(x, t, cond)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        TransformerDenoiser(2, 2, 8, d_model=30, n_heads=4)


def test_build_network_by_name() -> None:
    assert isinstance(build_network("unet1d", action_dim=2, cond_dim=0, down_dims=(16, 32)), ConditionalUnet1D)
    assert isinstance(build_network("transformer", action_dim=2, cond_dim=3, horizon=8), TransformerDenoiser)
    assert isinstance(build_network("mlp", x_dim=2), MLPDenoiser)
    assert set(NETWORKS) == {"mlp", "unet1d", "transformer"}
    with pytest.raises(ValueError, match=r"unknown network 'unet'; valid names: mlp, transformer, unet1d"):
        build_network("unet")


# --- ONNX export ------------------------------------------------------------------


def _export_and_compare(model: nn.Module, make_feeds, tmp_path) -> None:
    """Export with a dynamic batch axis, then compare onnxruntime with torch at batch 1 and 3."""
    model.eval()
    example = make_feeds(2)
    names = list(example)
    batch = torch.export.Dim("batch", min=1, max=4096)
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        model,
        (),
        str(path),
        kwargs=example,
        dynamo=True,
        dynamic_shapes={name: {0: batch} for name in names},
        input_names=names,
        output_names=["out"],
    )
    opset = {entry.domain: entry.version for entry in onnx.load(str(path)).opset_import}[""]
    assert opset >= 17
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == names
    for n in (1, 3):
        feeds = make_feeds(n)
        with torch.no_grad():
            expected = model(**feeds).numpy()
        (got,) = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5
        assert np.abs(expected).max() > 1e-2  # the compared function is not trivially ~0


def test_unet_onnx_parity(tmp_path) -> None:
    torch.manual_seed(0)
    model = perturb_(small_unet())

    def feeds(n: int) -> dict[str, Tensor]:
        x, t, cond = make_inputs("unet1d", n, 16, seed=n)
        return {"x": x, "t": t, "cond": cond}

    _export_and_compare(model, feeds, tmp_path)


def test_transformer_onnx_parity_with_mask(tmp_path) -> None:
    torch.manual_seed(0)
    model = perturb_(small_transformer(8))

    def feeds(n: int) -> dict[str, Tensor]:
        x, t, cond = make_inputs("transformer", n, 8, seed=n)
        mask = torch.rand(n, N_TOKENS, generator=torch.Generator().manual_seed(n)) < 0.4
        mask[0] = True  # one empty scene in every batch
        return {"x": x, "t": t, "cond": cond, "cond_mask": mask}

    _export_and_compare(model, feeds, tmp_path)


def test_mlp_onnx_parity(tmp_path) -> None:
    torch.manual_seed(0)
    model = perturb_(MLPDenoiser(x_dim=4, cond_dim=COND_DIM, hidden=64, depth=2, time_dim=32))

    def feeds(n: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(n)
        return {
            "x": torch.randn(n, 4, generator=g),
            "t": torch.rand(n, generator=g),
            "cond": torch.randn(n, COND_DIM, generator=g),
        }

    _export_and_compare(model, feeds, tmp_path)


def test_mish_matches_torch_in_value_gradient_and_forward_mode() -> None:
    from diffpilot.policy.networks.mlp import Mish

    x = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    m = Mish().train()
    assert torch.autograd.gradcheck(m, (x,))
    assert torch.autograd.gradcheck(m, (x,), check_forward_ad=True, check_backward_ad=False, check_batched_grad=False)
    v = torch.randn_like(x)
    y, dy = torch.func.jvp(m, (x.detach(),), (v,))
    y_ref, dy_ref = torch.func.jvp(torch.nn.functional.mish, (x.detach(),), (v,))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dy, dy_ref)
    torch.testing.assert_close(m.eval()(x), torch.nn.Mish()(x))


@pytest.mark.parametrize("use_r", [True, False])
@pytest.mark.parametrize("activation", ["mish", "silu"])
def test_concat_mlp_jvp_detached_equals_forward_mode_ad(use_r: bool, activation: str) -> None:
    from diffpilot.policy.networks import ConcatMLP

    torch.manual_seed(0)
    net = ConcatMLP(3, cond_dim=5, hidden=32, depth=3, time_dim=16, use_r=use_r, activation=activation).double().train()
    f64 = dict(dtype=torch.float64)
    z, v, cond = torch.randn(7, 3, **f64), torch.randn(7, 3, **f64), torch.randn(7, 5, **f64)
    t = torch.rand(7, **f64)
    r = t * torch.rand(7, **f64)
    dt, dr = torch.rand(7, **f64), torch.rand(7, **f64)  # any direction, not only MeanFlow's (v, 0, 1)
    r_in, dr_in = (r, dr) if use_r else (None, None)
    u_ref, du_ref = torch.func.jvp(lambda z_, r_, t_: net(z_, t_, cond, r_ if use_r else None), (z, r, t), (v, dr, dt))
    u, du = net.jvp_detached(z, t, cond, r_in, v, dt, dr_in)
    torch.testing.assert_close(u, u_ref)
    torch.testing.assert_close(du, du_ref)
    assert u.requires_grad and not du.requires_grad  # the output trains, the tangent is a stop-gradient target
    assert du.abs().max() > 1e-3


def test_fast_mish_value_matches_torch_in_float32_over_its_whole_range() -> None:
    from diffpilot.policy.networks.mlp import Mish

    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-1e4, 1e4, 0.0, 19.99, 20.01])])
    torch.testing.assert_close(Mish().train()(x), torch.nn.functional.mish(x), rtol=2e-6, atol=1e-6)
