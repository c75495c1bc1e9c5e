"""Sampler interface: per-step hooks (guidance) and structured conditions (masked token sets)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from diffpilot.policy.generative import (
    StepInfo,
    TokenSets,
    build_objective,
    build_sampler,
    cond_batch_size,
    cond_index,
    cond_repeat_interleave,
    cond_to,
)
from diffpilot.policy.generative.warm_start import WarmStartConfig, WarmStarter
from diffpilot.policy.networks.mlp import MLPDenoiser
from diffpilot.policy.networks.transformer import TransformerDenoiser

B, D, C = 6, 2, 3

# (sampler name, objective name, num_steps, extra sampler kwargs)
SAMPLERS = [
    ("ddpm", "ddpm", None, {}),
    ("ddim", "ddpm", 4, {}),
    ("ddim", "ddpm", 4, {"eta": 0.7}),
    ("euler", "flow", 3, {}),
    ("heun", "flow", 3, {}),
    ("heun", "flow", 3, {"final_euler": True}),
    ("meanflow", "meanflow", 2, {}),
]


def _objective(name: str):
    return build_objective(name, num_train_steps=12, clip_sample=1.0) if name == "ddpm" else build_objective(name)


def _model(use_r: bool) -> MLPDenoiser:
    torch.manual_seed(0)
    return MLPDenoiser(D, cond_dim=C, hidden=32, depth=2, time_dim=16, use_r=use_r).eval()


def _inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=g), torch.randn(B, C, generator=g)


class Recorder:
    """A hook that leaves the sample alone and records what it was called with."""

    def __init__(self) -> None:
        self.calls: list[StepInfo] = []
        self.samples: list[Tensor] = []

    def __call__(self, x: Tensor, step: StepInfo) -> Tensor:
        self.calls.append(step)
        self.samples.append(x)
        return x


def _expected_times(sampler, t_start: float = 1.0) -> list[tuple[float, float]]:
    if hasattr(sampler, "timesteps"):
        ts = sampler.timesteps
        return list(zip(ts, ts[1:] + [0.0]))
    grid = [t_start * (1.0 - i / sampler.num_steps) for i in range(sampler.num_steps + 1)]
    return list(zip(grid[:-1], grid[1:]))


@pytest.mark.parametrize("name, objective, steps, kwargs", SAMPLERS)
def test_an_identity_hook_is_called_once_per_step_and_changes_nothing(name, objective, steps, kwargs):
    sampler = build_sampler(name, _objective(objective), steps, **kwargs)
    model, (noise, cond) = _model(objective == "meanflow"), _inputs()
    with torch.no_grad():
        torch.manual_seed(3)  # stochastic samplers draw their step noise from the global RNG
        plain = sampler.sample(model, noise, cond)
        torch.manual_seed(3)
        rec = Recorder()
        hooked = sampler.sample(model, noise, cond, hook=rec)
    assert torch.equal(plain.sample, hooked.sample)  # bit-identical
    assert hooked.nfe == plain.nfe
    times = _expected_times(sampler)
    assert [c.index for c in rec.calls] == list(range(len(times)))
    assert [(c.t_from, c.t_to) for c in rec.calls] == times
    assert all(c.num_steps == len(times) for c in rec.calls)
    assert rec.calls[-1].t_to == 0.0
    assert torch.equal(rec.samples[-1], hooked.sample)
    for prev, step in zip(rec.samples, rec.calls[1:]):
        assert step.x_from is prev  # each step starts where the hook left the last one
    # redo without changes is the step's own update
    torch.testing.assert_close(rec.calls[0].redo(), rec.samples[0], rtol=0, atol=0)


def _reference(name: str, objective, steps: int | None, kwargs: dict, model, noise: Tensor, cond: Tensor,
               step_noise: Tensor) -> Tensor:
    """The sampling loops as they were before hooks, written out plainly."""
    x = noise
    if objective == "ddpm":
        ddpm = _objective("ddpm")
        big_t = ddpm.num_train_steps
        ks = list(range(big_t - 1, -1, -1)) if name == "ddpm" else [int(round(big_t - i * big_t / steps)) - 1 for i in range(steps)]
        abar = ddpm._abar
        for i, (k, p) in enumerate(zip(ks, ks[1:] + [-1])):
            a, ap = abar[k], (abar[p] if p >= 0 else 1.0)
            x0, eps = ddpm.split_prediction(model(x, x.new_full((B,), (k + 1) / big_t), cond), x, a)
            if name == "ddpm":
                beta, denom = 1.0 - a / ap, 1.0 - a
                mean = (math.sqrt(ap) * beta / denom) * x0 + (math.sqrt(a / ap) * (1.0 - ap) / denom) * x
                var = beta * (1.0 - ap) / denom
                x = mean if var <= 0.0 else mean + math.sqrt(var) * step_noise[i]
            else:
                sigma = kwargs.get("eta", 0.0) * math.sqrt((1.0 - ap) / (1.0 - a)) * math.sqrt(1.0 - a / ap)
                x = math.sqrt(ap) * x0 + math.sqrt(max(1.0 - ap - sigma**2, 0.0)) * eps
                x = x if sigma <= 0.0 else x + sigma * step_noise[i]
        return x
    grid = [1.0 - i / steps for i in range(steps + 1)]
    for i, (t, tn) in enumerate(zip(grid[:-1], grid[1:])):
        if name == "meanflow":
            x = x - (t - tn) * model(x, x.new_full((B,), t), cond, x.new_full((B,), tn))
        elif name == "euler" or (kwargs.get("final_euler") and i == steps - 1):
            x = x + (tn - t) * model(x, x.new_full((B,), t), cond)
        else:
            v = model(x, x.new_full((B,), t), cond)
            v2 = model(x + (tn - t) * v, x.new_full((B,), tn), cond)
            x = x + (tn - t) * 0.5 * (v + v2)
    return x


@pytest.mark.parametrize("name, objective, steps, kwargs", SAMPLERS)
def test_without_a_hook_samplers_run_the_loops_they_ran_before(name, objective, steps, kwargs):
    sampler = build_sampler(name, _objective(objective), steps, **kwargs)
    model, (noise, cond) = _model(objective == "meanflow"), _inputs()
    step_noise = torch.randn(sampler.num_steps, B, D, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = sampler.sample(model, noise, cond, step_noise=step_noise)
        ref = _reference(name, objective, sampler.num_steps, kwargs, model, noise, cond, step_noise)
        hooked = sampler.sample(model, noise, cond, step_noise=step_noise, hook=lambda x, step: x)
    assert torch.equal(out.sample, ref)  # bit-identical
    assert torch.equal(hooked.sample, ref)


@pytest.mark.parametrize("name, objective, steps, kwargs", SAMPLERS)
def test_a_hook_that_moves_the_sample_steers_the_rest_of_the_run(name, objective, steps, kwargs):
    sampler = build_sampler(name, _objective(objective), steps, **kwargs)
    model, (noise, cond) = _model(objective == "meanflow"), _inputs()
    target = torch.full((B, D), 0.5)

    def pull(x: Tensor, step: StepInfo) -> Tensor:  # guidance: half-way to the target, every step
        return step.redo(x0_hat=step.x0_hat + 0.5 * (target - step.x0_hat))

    def last_only(x: Tensor, step: StepInfo) -> Tensor:
        return torch.zeros_like(x) if step.index == step.num_steps - 1 else x

    with torch.no_grad():
        torch.manual_seed(3)
        plain = sampler.sample(model, noise, cond).sample
        torch.manual_seed(3)
        guided = sampler.sample(model, noise, cond, hook=pull)
        zeroed = sampler.sample(model, noise, cond, hook=last_only).sample
    assert (guided.sample - target).norm() < 0.8 * (plain - target).norm()
    assert guided.nfe == sampler.sample(model, noise, cond).nfe  # the hook costs no network evaluations
    assert torch.equal(zeroed, torch.zeros_like(zeroed))


def test_redo_holds_the_network_output_fixed():
    model, (noise, cond) = _model(False), _inputs()
    d = torch.full((B, D), 0.1)
    # flow: the velocity is held, so moving the estimate moves the sample by as much
    seen: dict[str, Tensor] = {}

    def flow_hook(x: Tensor, step: StepInfo) -> Tensor:
        if step.index == 0:
            seen["x"] = x
            seen["by_x"] = step.redo(x_from=step.x_from + d)
            seen["by_x0"] = step.redo(x0_hat=step.x0_hat + d)
            with pytest.raises(ValueError, match="not both"):
                step.redo(x_from=step.x_from, x0_hat=step.x0_hat)
        return x

    with torch.no_grad():
        build_sampler("euler", build_objective("flow"), 2).sample(model, noise, cond, hook=flow_hook)
    torch.testing.assert_close(seen["by_x"], seen["x"] + d)
    torch.testing.assert_close(seen["by_x0"], seen["x"] + d)

    # DDIM: the noise estimate is held, so a moved estimate moves the sample by sqrt(abar_prev) times as much
    ddpm = build_objective("ddpm", num_train_steps=12)
    sampler = build_sampler("ddim", ddpm, 3)

    def ddim_hook(x: Tensor, step: StepInfo) -> Tensor:
        if step.index == 0:
            k_next = round(step.t_to * ddpm.num_train_steps) - 1
            gain = float(ddpm.alphas_cumprod[k_next].double().sqrt())
            torch.testing.assert_close(step.redo(x0_hat=step.x0_hat + d), x + gain * d)
            torch.testing.assert_close(step.redo(x_from=step.x_from + d), x)  # DDIM's update does not read x
        return x

    with torch.no_grad():
        sampler.sample(model, noise, cond, hook=ddim_hook)


def test_a_hook_must_return_a_tensor_shaped_like_x():
    model, (noise, cond) = _model(False), _inputs()
    for name, objective in (("ddim", "ddpm"), ("euler", "flow")):
        sampler = build_sampler(name, _objective(objective), 2)
        with pytest.raises(ValueError, match="step hook must return a tensor shaped like x"):
            sampler.sample(model, noise, cond, hook=lambda x, step: x[:1])
        with pytest.raises(ValueError, match="step hook must return a tensor"):
            sampler.sample(model, noise, cond, hook=lambda x, step: None)


@pytest.mark.parametrize("sampler_name, objective", [("ddim", "ddpm"), ("euler", "flow"), ("heun", "flow"), ("meanflow", "meanflow")])
def test_warm_start_passes_the_hook_and_numbers_steps_like_the_sampler(sampler_name, objective):
    obj = _objective(objective)
    policy_sampler = build_sampler(sampler_name, obj, 6 if sampler_name == "ddim" else None)
    warm = WarmStarter(obj, policy_sampler, WarmStartConfig(t_start=0.5, num_steps=2))
    g = torch.Generator().manual_seed(2)
    previous, noise, cond = torch.randn(B, 4, 1, generator=g), torch.randn(B, 4, 1, generator=g), None
    torch.manual_seed(0)
    model = MLPDenoiser(4, hidden=16, depth=1, time_dim=8, use_r=objective == "meanflow").eval()

    def flat(x, t, cond=None, r=None):  # chunks (B, 4, 1) through the MLP
        return model(x.flatten(1), t, cond, r).reshape(x.shape)

    rec = Recorder()
    with torch.no_grad():
        plain = warm.sample(flat, previous, 1, noise, cond)
        hooked = warm.sample(flat, previous, 1, noise, cond, hook=rec)
    assert torch.equal(plain.sample, hooked.sample) and plain.nfe == hooked.nfe == warm.nfe
    assert rec.calls[0].t_from == pytest.approx(warm.t_start) and rec.calls[-1].t_to == 0.0
    if sampler_name == "ddim":  # the full list's numbering: a warm start runs its last steps
        assert [c.index for c in rec.calls] == list(range(6 - warm.nfe, 6))
        assert all(c.num_steps == 6 for c in rec.calls)
    else:
        assert [c.index for c in rec.calls] == [0, 1]


# --------------------------------------------------------------------------- structured conditions


def _token_sets(b: int = 4, dim: int = 5) -> TokenSets:
    g = torch.Generator().manual_seed(4)
    agents_mask = torch.zeros(b, 3, dtype=torch.bool)
    agents_mask[0, 1:] = True
    agents_mask[2, :] = True  # a scene with no agents at all
    lanes_mask = torch.zeros(b, 2, dtype=torch.bool)
    lanes_mask[1, 0] = True
    return TokenSets({
        "ego": torch.randn(b, 1, dim, generator=g),  # a bare tensor: no mask
        "agents": (torch.randn(b, 3, dim, generator=g), agents_mask),
        "lanes": (torch.randn(b, 2, dim, generator=g), lanes_mask),
    })


def test_token_sets_validate_and_concatenate_with_their_masks():
    sets = _token_sets()
    assert list(sets) == ["ego", "agents", "lanes"] and len(sets) == 3 and sets.batch_size == 4
    assert sets["ego"][1] is None
    tokens, mask = sets.concat()
    assert tokens.shape == (4, 6, 5) and mask.shape == (4, 6) and mask.dtype == torch.bool
    assert torch.equal(tokens[:, 1:4], sets["agents"][0])
    assert not mask[:, 0].any() and torch.equal(mask[:, 1:4], sets["agents"][1])
    unmasked = TokenSets({"a": torch.zeros(2, 1, 3), "b": (torch.zeros(2, 2, 3), None)})
    assert unmasked.concat()[1] is None
    with pytest.raises(ValueError, match="batch size 3"):
        TokenSets({"a": torch.zeros(2, 1, 3), "b": torch.zeros(3, 1, 3)})
    with pytest.raises(ValueError, match=r"mask must be a bool \(B, N\)"):
        TokenSets({"a": (torch.zeros(2, 2, 3), torch.zeros(2, 2))})
    with pytest.raises(ValueError, match=r"tokens must be a \(B, N, D\)"):
        TokenSets({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="one feature size"):
        TokenSets({"a": torch.zeros(2, 1, 3), "b": torch.zeros(2, 1, 4)}).concat()


def test_condition_batch_helpers_work_for_every_form():
    sets = _token_sets()
    rep = cond_repeat_interleave(sets, 3)
    assert isinstance(rep, TokenSets) and rep.batch_size == 12
    assert torch.equal(rep["agents"][1], sets["agents"][1].repeat_interleave(3, dim=0))
    picked = cond_index(sets, torch.tensor([2, 0]))
    assert torch.equal(picked["lanes"][0], sets["lanes"][0][[2, 0]])
    assert cond_index(sets, -1).batch_size == 1 and torch.equal(cond_index(sets, -1)["ego"][0], sets["ego"][0][-1:])
    moved = cond_to(sets, dtype=torch.float64)
    assert moved["agents"][0].dtype == torch.float64 and moved["agents"][1].dtype == torch.bool
    vec = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(cond_repeat_interleave(vec, 2), vec.repeat_interleave(2, dim=0))
    assert torch.equal(cond_index(vec, 1), vec[1:2])
    assert cond_to(vec, dtype=torch.float64).dtype == torch.float64
    assert cond_batch_size(vec) == 3 and cond_batch_size(sets) == 4 and cond_batch_size(None) is None
    assert cond_index(None, 0) is None and cond_repeat_interleave(None, 2) is None and cond_to(None) is None


def _transformer(use_r: bool = False) -> TransformerDenoiser:
    torch.manual_seed(0)
    return TransformerDenoiser(action_dim=2, cond_dim=5, horizon=4, d_model=16, n_heads=2, n_layers=2, use_r=use_r).eval()


@pytest.mark.parametrize("name, objective, steps", [("ddim", "ddpm", 3), ("euler", "flow", 3), ("meanflow", "meanflow", 2)])
def test_structured_condition_samples_like_the_concatenated_tokens_and_masks(name, objective, steps):
    net = _transformer(objective == "meanflow")
    sets = _token_sets()
    tokens, mask = sets.concat()
    noise = torch.randn(4, 4, 2, generator=torch.Generator().manual_seed(5))
    sampler = build_sampler(name, _objective(objective), steps)

    def with_mask(x, t, cond=None, r=None):
        return net(x, t, cond, r, cond_mask=mask)

    with torch.no_grad():
        structured = sampler.sample(net, noise, sets)
        flat = sampler.sample(with_mask, noise, tokens)
        # candidates: the helper repeats the structured condition like the tensor one
        many = sampler.sample(net, noise.repeat_interleave(2, dim=0), cond_repeat_interleave(sets, 2))
    assert torch.equal(structured.sample, flat.sample) and structured.nfe == flat.nfe
    torch.testing.assert_close(many.sample[::2], structured.sample)


@pytest.mark.parametrize("objective", ["ddpm", "flow", "meanflow"])
def test_objectives_pass_a_structured_condition_to_the_network(objective):
    net = _transformer(objective == "meanflow")
    sets = _token_sets()
    tokens, mask = sets.concat()
    x0 = torch.randn(4, 4, 2, generator=torch.Generator().manual_seed(6))
    obj = _objective(objective)

    def with_mask(x, t, cond=None, r=None):
        return net(x, t, cond, r, cond_mask=mask)

    a = obj.loss(net, x0, sets, generator=torch.Generator().manual_seed(7))
    b = obj.loss(with_mask, x0, tokens, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    a.backward()  # gradients reach the network through the structured path
    assert net.cond_in.weight.grad is not None


def test_transformer_takes_token_sets_but_not_with_a_separate_mask():
    net = _transformer()
    sets = _token_sets()
    x, t = torch.zeros(4, 4, 2), torch.full((4,), 0.5)
    with pytest.raises(ValueError, match="cond_mask must be None when cond is a TokenSets"):
        net(x, t, sets, cond_mask=torch.zeros(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="cond must be"):
        net(x, t, TokenSets({"a": torch.zeros(4, 2, 3)}))  # wrong feature size reaches the usual check


def test_vector_condition_networks_reject_token_sets_clearly():
    from diffpilot.policy.networks.unet1d import ConditionalUnet1D

    sets = _token_sets()
    mlp = MLPDenoiser(2, cond_dim=5, hidden=8, depth=1, time_dim=8)
    with pytest.raises(ValueError, match="MLPDenoiser takes a condition tensor, got TokenSets"):
        mlp(torch.zeros(4, 2), torch.zeros(4), sets)
    unet = ConditionalUnet1D(action_dim=2, cond_dim=5, down_dims=[8, 16], kernel_size=3, n_groups=4)
    with pytest.raises(ValueError, match="ConditionalUnet1D takes a condition vector, got TokenSets"):
        unet(torch.zeros(4, 4, 2), torch.zeros(4), sets)
