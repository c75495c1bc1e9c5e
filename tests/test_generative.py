"""Generative core: objectives, samplers, metrics, and the MLP denoiser on a 2-D mixture."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from diffpilot.data.toy import mixture_posterior_mean, sample_conditional_gaussian_mixture, sample_gaussian_mixture
from diffpilot.policy.generative import (
    DDIMSampler,
    DDPM,
    DDPMSampler,
    EulerSampler,
    FlowMatching,
    HeunSampler,
    MeanFlow,
    MeanFlowSampler,
    build_objective,
    build_sampler,
    energy_distance,
    make_schedule,
    mmd_rbf,
)
from diffpilot.policy.networks.mlp import MLPDenoiser

N_EVAL = 2000
HIDDEN = 64
# Energy distance a trained model must beat and an untrained one must miss; two
# independent draws of the target score ~1e-3 at N_EVAL points.
QUALITY = 0.04


def train(objective, model: nn.Module, steps: int, lr: float = 3e-3, cond_groups: int = 0) -> nn.Module:
    """Adam with cosine decay, batch 256, fresh toy samples each step."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        if cond_groups:
            x, cond = sample_conditional_gaussian_mixture(256, gen, num_groups=cond_groups)
        else:
            x, cond = sample_gaussian_mixture(256, gen), None
        loss = objective.loss(model, x, cond, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def fresh_model(use_r: bool = False, cond_dim: int = 0) -> MLPDenoiser:
    torch.manual_seed(0)
    return MLPDenoiser(2, cond_dim=cond_dim, hidden=HIDDEN, depth=3, time_dim=32, use_r=use_r)


@pytest.fixture(scope="module")
def target() -> Tensor:
    return sample_gaussian_mixture(N_EVAL, torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def noise() -> Tensor:
    return torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def ddpm() -> DDPM:
    return DDPM(100, "squaredcos_cap_v2", "epsilon", clip_sample=2.0)


@pytest.fixture(scope="module")
def ddpm_model(ddpm) -> nn.Module:
    return train(ddpm, fresh_model(), 800)


@pytest.fixture(scope="module")
def flow_model() -> nn.Module:
    return train(FlowMatching(), fresh_model(), 800)


@pytest.fixture(scope="module")
def meanflow_model() -> nn.Module:
    return train(MeanFlow(), fresh_model(use_r=True), 600, lr=2e-3)


def quality(sampler, model, noise: Tensor, target: Tensor, **sample_options) -> float:
    with torch.no_grad():
        return float(energy_distance(sampler.sample(model, noise, **sample_options).sample, target))


class CountingDenoiser(nn.Module):
    """A real network that also counts its forward calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x, t, cond=None, r=None):
        self.calls += 1
        return self.net(x, t, cond, r)


class ExactMixtureDenoiser:
    """Closed-form ideal denoiser of the toy mixture for a DDPM schedule or the flow path."""

    def __init__(self, ddpm: DDPM | None = None) -> None:
        self.ddpm = ddpm

    def __call__(self, x, t, cond=None, r=None):
        if self.ddpm is None:  # flow path: x = (1 - t) x0 + t eps
            x0 = mixture_posterior_mean(x, 1 - t, t)
            return (x - x0) / t[:, None]  # v = eps - x0 with eps = (x - (1 - t) x0) / t
        k = (t * self.ddpm.num_train_steps).round().long() - 1
        abar = self.ddpm.alphas_cumprod[k]
        x0 = mixture_posterior_mean(x, abar.sqrt(), (1 - abar).sqrt())
        return (x - abar.sqrt()[:, None] * x0) / (1 - abar).sqrt()[:, None]


# --- sample quality ---------------------------------------------------------


def test_exact_denoiser_validates_samplers_apart_from_training(ddpm, noise, target):
    exact_ddpm = ExactMixtureDenoiser(ddpm)
    ancestral = DDPMSampler(ddpm)
    # its per-step draws fixed, so the check does not depend on what ran before it in this process
    step_noise = torch.randn(ancestral.num_steps, *noise.shape, generator=torch.Generator().manual_seed(0))
    assert quality(ancestral, exact_ddpm, noise, target, step_noise=step_noise) < 0.005
    assert quality(DDIMSampler(ddpm, 10), exact_ddpm, noise, target) < 0.005
    assert quality(EulerSampler(20), ExactMixtureDenoiser(), noise, target) < 0.005
    # One DDIM step returns the posterior mean of pure noise (the origin), not the data.
    assert quality(DDIMSampler(ddpm, 1), exact_ddpm, noise, target) > 0.5


@pytest.mark.parametrize("sampler_name", ["ddpm", "ddim"])
def test_ddpm_samplers_beat_untrained(sampler_name, ddpm, ddpm_model, noise, target):
    sampler = build_sampler(sampler_name, ddpm, 10)
    assert quality(sampler, ddpm_model, noise, target) < QUALITY
    assert quality(sampler, fresh_model(), noise, target) > QUALITY


@pytest.mark.parametrize("sampler", [EulerSampler(10), HeunSampler(5)], ids=["euler10", "heun5"])
def test_flow_samplers_beat_untrained(sampler, flow_model, noise, target):
    assert quality(sampler, flow_model, noise, target) < QUALITY
    assert quality(sampler, fresh_model(), noise, target) > QUALITY


def test_meanflow_one_step_beats_untrained_and_is_close_to_50_step_flow(meanflow_model, flow_model, noise, target):
    one_step = quality(MeanFlowSampler(1), meanflow_model, noise, target)
    assert one_step < QUALITY
    assert quality(MeanFlowSampler(1), fresh_model(use_r=True), noise, target) > QUALITY
    euler50 = quality(EulerSampler(50), flow_model, noise, target)
    # Stated factor: 1 MeanFlow step is within 10x of 50 Euler steps, with the
    # flow's distance floored at 2e-3 (the estimator's noise at N_EVAL points).
    assert one_step < 10 * max(euler50, 2e-3)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_prediction_types_invert_exactly(prediction):
    ddpm = DDPM(50, "linear", prediction)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 2, generator=gen), torch.randn(64, 2, generator=gen)
    for k in (0, 17, 49):
        x_k = ddpm.add_noise(x0, eps, k)
        x0_hat, eps_hat = ddpm.split_prediction(ddpm.target(x0, eps, k), x_k, float(ddpm.alphas_cumprod[k]))
        torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
def test_other_prediction_types_train(prediction, noise, target):
    ddpm = DDPM(100, "squaredcos_cap_v2", prediction, clip_sample=2.0)
    model = train(ddpm, fresh_model(), 400)
    assert quality(DDIMSampler(ddpm, 10), model, noise, target) < 2 * QUALITY
    assert quality(DDIMSampler(ddpm, 10), fresh_model(), noise, target) > 2 * QUALITY


def test_conditioning_selects_the_modes():
    model = train(FlowMatching(), fresh_model(cond_dim=2), 500, cond_groups=2)
    n = 1000
    group = torch.arange(n) % 2
    x_true, cond = sample_conditional_gaussian_mixture(n, torch.Generator().manual_seed(5), group=group)
    with torch.no_grad():
        x = EulerSampler(10).sample(model, torch.randn(n, 2, generator=torch.Generator().manual_seed(6)), cond).sample
    angle = torch.atan2(x[:, 1], x[:, 0])
    mode = torch.round(angle / (2 * torch.pi / 8)).long() % 8
    assert (mode % 2 == group).float().mean() > 0.9
    assert float(energy_distance(x, x_true)) < QUALITY


# --- determinism --------------------------------------------------------------


def test_same_noise_same_samples_ddpm_with_step_noise(ddpm, ddpm_model):
    gen = torch.Generator().manual_seed(0)
    noise, other = torch.randn(200, 2, generator=gen), torch.randn(200, 2, generator=gen)
    step_noise = torch.randn(100, 200, 2, generator=gen)
    sampler = DDPMSampler(ddpm)
    with torch.no_grad():
        a = sampler.sample(ddpm_model, noise, step_noise=step_noise).sample
        b = sampler.sample(ddpm_model, noise.clone(), step_noise=step_noise.clone()).sample
        c = sampler.sample(ddpm_model, other, step_noise=step_noise).sample
        d = sampler.sample(ddpm_model, noise, step_noise=torch.randn(100, 200, 2, generator=gen)).sample
    assert torch.equal(a, b)
    # The capped last beta (0.999) of the cosine schedule keeps only ~3 % of
    # x_T after the first step, so the start noise moves samples a little and
    # the per-step noise a lot.
    assert (a - c).abs().mean() > 1e-4
    assert (a - d).abs().mean() > 0.1


@pytest.mark.parametrize("kind", ["ddim", "euler", "heun", "meanflow"])
def test_same_noise_same_samples_deterministic(kind, ddpm, ddpm_model, flow_model, meanflow_model):
    sampler, model = {
        "ddim": (DDIMSampler(ddpm, 10), ddpm_model),
        "euler": (EulerSampler(10), flow_model),
        "heun": (HeunSampler(5), flow_model),
        "meanflow": (MeanFlowSampler(1), meanflow_model),
    }[kind]
    gen = torch.Generator().manual_seed(0)
    noise, other = torch.randn(200, 2, generator=gen), torch.randn(200, 2, generator=gen)
    with torch.no_grad():
        a, b = sampler.sample(model, noise).sample, sampler.sample(model, noise.clone()).sample
        c = sampler.sample(model, other).sample
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.1


def test_ddim_eta_uses_step_noise(ddpm, ddpm_model):
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(200, 2, generator=gen)
    sampler = DDIMSampler(ddpm, 10, eta=1.0)
    s1, s2 = torch.randn(10, 200, 2, generator=gen), torch.randn(10, 200, 2, generator=gen)
    with torch.no_grad():
        a = sampler.sample(ddpm_model, noise, step_noise=s1).sample
        b = sampler.sample(ddpm_model, noise, step_noise=s1.clone()).sample
        c = sampler.sample(ddpm_model, noise, step_noise=s2).sample
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.01


# --- warm start ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "euler", "heun", "meanflow"])
def test_warm_start_from_lightly_noised_data_stays_near_it(kind, ddpm, ddpm_model, flow_model, meanflow_model, target):
    x0 = target[:500]
    eps = torch.randn(500, 2, generator=torch.Generator().manual_seed(11))
    t_start = 0.1
    if kind in ("ddpm", "ddim"):
        x_start = ddpm.add_noise(x0, eps, 9)  # step 9 is t = 10 / 100
        sampler = DDPMSampler(ddpm) if kind == "ddpm" else DDIMSampler(ddpm, 10)
        model = ddpm_model
    else:
        x_start = FlowMatching.interpolate(x0, eps, torch.full((500,), t_start))
        sampler = {"euler": EulerSampler(5), "heun": HeunSampler(3), "meanflow": MeanFlowSampler(1)}[kind]
        model = meanflow_model if kind == "meanflow" else flow_model
    with torch.no_grad():
        warm = sampler.sample(model, eps, x_start=x_start, t_start=t_start).sample
        cold = sampler.sample(model, eps).sample
    warm_err = (warm - x0).norm(dim=-1).mean()
    cold_err = (cold - x0).norm(dim=-1).mean()
    assert warm_err < 0.2
    assert warm_err < 0.2 * cold_err


# --- NFE ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "t_start", "use_r", "expected"),
    [
        (lambda d: DDPMSampler(d), 1.0, False, 20),
        (lambda d: DDPMSampler(d), 0.5, False, 10),
        (lambda d: DDIMSampler(d, 7), 1.0, False, 7),
        (lambda d: DDIMSampler(d, 10), 0.3, False, 3),
        (lambda d: EulerSampler(4), 1.0, False, 4),
        (lambda d: EulerSampler(4), 0.2, False, 4),
        (lambda d: HeunSampler(3), 1.0, False, 6),
        (lambda d: HeunSampler(3, final_euler=True), 1.0, False, 5),
        (lambda d: MeanFlowSampler(1), 1.0, True, 1),
        (lambda d: MeanFlowSampler(3), 0.5, True, 3),
    ],
)
def test_nfe_is_exact(make, t_start, use_r, expected):
    sampler = make(DDPM(20, "linear"))
    net = CountingDenoiser(MLPDenoiser(2, hidden=16, depth=1, time_dim=8, use_r=use_r))
    noise = torch.randn(4, 2)
    with torch.no_grad():
        result = sampler.sample(net, noise, x_start=noise if t_start < 1 else None, t_start=t_start)
    assert result.nfe == net.calls == expected
    assert result.sample.shape == noise.shape


# --- MeanFlow target ----------------------------------------------------------


def test_meanflow_jvp_target_matches_finite_differences(meanflow_model):
    gen = torch.Generator().manual_seed(4)
    z, v = torch.randn(256, 2, generator=gen), torch.randn(256, 2, generator=gen)
    r, t = MeanFlow(ratio_r_equals_t=0.0).sample_times(256, generator=gen)
    model = meanflow_model
    u, u_tgt = MeanFlow().target(model, z, r, t, v)
    with torch.no_grad():
        # Small step: the time features oscillate up to sin(1000 t), so larger
        # steps are dominated by truncation error (3e-5 is still far above float32 noise).
        h = 3e-5
        du = (model(z + h * v, t + h, None, r) - model(z - h * v, t - h, None, r)) / (2 * h)
        torch.testing.assert_close(u, model(z, t, None, r), atol=1e-5, rtol=1e-5)
    fd_target = v - (t - r)[:, None] * du
    assert du.abs().mean() > 0.1  # the check is not vacuous
    err = (u_tgt - fd_target).norm(dim=-1) / fd_target.norm(dim=-1).clamp(min=1e-3)
    assert err.median() < 1e-2
    # Dropping the z-direction from the tangent gives a clearly different target.
    wrong = v - (t - r)[:, None] * (model(z, t + h, None, r) - model(z, t - h, None, r)).detach() / (2 * h)
    assert (wrong - fd_target).norm(dim=-1).median() > 10 * (u_tgt - fd_target).norm(dim=-1).median()


def test_meanflow_loss_backpropagates_into_the_network():
    model = fresh_model(use_r=True)
    loss = MeanFlow().loss(model, sample_gaussian_mixture(64, torch.Generator().manual_seed(0)))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.out[-1].weight.grad.abs().sum() > 0


def test_meanflow_time_sampling_share_and_order():
    r, t = MeanFlow(ratio_r_equals_t=0.25).sample_times(1000, generator=torch.Generator().manual_seed(0))
    assert bool((r <= t).all()) and bool(((r >= 0) & (t <= 1)).all())
    assert int((r == t).sum()) == 250


def test_meanflow_uniform_times_reach_the_one_step_jump():
    """The one-step sampler jumps from t = 1 to r = 0: uniform draws train near that pair, logit-normal ones barely."""
    gen = torch.Generator().manual_seed(0)
    near = {}
    for sampling in ("uniform", "logit_normal"):
        r, t = MeanFlow(time_sampling=sampling, ratio_r_equals_t=0.0).sample_times(50_000, generator=gen)
        assert bool((r <= t).all())
        near[sampling] = float(((t > 0.9) & (r < 0.1)).float().mean())
    assert 0.015 < near["uniform"] < 0.025 and near["logit_normal"] < 0.001
    with pytest.raises(ValueError, match="unknown time sampling 'beta'"):
        MeanFlow(time_sampling="beta")


def test_meanflow_learns_the_one_step_map_of_a_given_coupling():
    """Distillation's premise: trained on pairs (R z, z) with R a quarter turn, the one-step jump maps z to R z.
    Trained on the same marginals drawn independently, it maps z near itself (a zero flow between equal laws)."""
    R = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(512, 2, generator=torch.Generator().manual_seed(2))
    agreement = {}
    for coupled in (True, False):
        model = fresh_model(use_r=True)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(300):
            z = torch.randn(256, 2, generator=gen)
            x0 = z @ R.T if coupled else torch.randn(256, 2, generator=gen)
            loss = MeanFlow(time_sampling="uniform").loss(model, x0, generator=gen, noise=z if coupled else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            jump = MeanFlowSampler(1).sample(model.eval(), probe).sample
        agreement[coupled] = float(torch.nn.functional.cosine_similarity(jump, probe @ R.T, dim=-1).mean())
    assert agreement[True] > 0.9 and abs(agreement[False]) < 0.3, agreement


# --- schedules, metrics --------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2", "vp"])
@pytest.mark.parametrize("steps", [5, 100])
def test_schedules_are_valid_and_end_near_noise(name, steps):
    sched = make_schedule(name, steps)
    assert sched.betas.dtype == torch.float32 and sched.betas.shape == (steps,)
    assert bool(((sched.betas > 0) & (sched.betas < 1)).all())
    assert bool((sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1]).all())
    assert float(sched.alphas_cumprod[-1]) < 0.01


def test_vp_schedule_matches_discretized_sde():
    # Diffusion-QL's T=5 chain: 1 - beta_k = exp(-0.1/5 - 9.9 (2k+1) / 50).
    betas = make_schedule("vp", 5).betas
    k = torch.arange(5, dtype=torch.float64)
    torch.testing.assert_close(betas, (1 - torch.exp(-0.02 - 9.9 * (2 * k + 1) / 50)).float())


def test_metrics_separate_distributions():
    gen = torch.Generator().manual_seed(0)
    a, b = sample_gaussian_mixture(1000, gen), sample_gaussian_mixture(1000, gen)
    c = torch.randn(1000, 2, generator=gen)
    assert abs(float(energy_distance(a, b))) < 0.01 < float(energy_distance(a, c))
    assert abs(float(mmd_rbf(a, b))) < 0.005 < float(mmd_rbf(a, c))
    assert float(mmd_rbf(a, c, bandwidth=0.5)) > 0


# --- errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: build_objective("gan"), "choose one of"),
        (lambda: build_objective("ddpm", prediction="x"), "prediction"),
        (lambda: build_objective("flow", steps=3), "bad arguments"),
        (lambda: build_sampler("rk4", FlowMatching()), "choose one of"),
        (lambda: build_sampler("ddim", FlowMatching()), "samplers that fit it: \\['euler', 'heun'\\]"),
        (lambda: build_sampler("meanflow", DDPM(10)), "MeanFlow"),
        (lambda: DDIMSampler(DDPM(10), 11), r"\[1, 10\]"),
        (lambda: DDPM(10, schedule="sigmoid"), "noise schedule"),
        (lambda: make_schedule("linear", 0), "positive integer"),
        (lambda: EulerSampler(0), "positive integer"),
        (lambda: MeanFlow(ratio_r_equals_t=1.5), "ratio_r_equals_t"),
        (lambda: FlowMatching(time_sampling="beta"), "uniform"),
        (lambda: MLPDenoiser(2, activation="tanhh"), "activation"),
        (lambda: energy_distance(torch.randn(5, 2), torch.randn(5, 3)), "feature size"),
        (lambda: mmd_rbf(torch.randn(5), torch.randn(5, 1)), r"\(N, D\)"),
        (lambda: sample_conditional_gaussian_mixture(4, num_groups=3), "divide"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_sampler_inputs_raise_clear_errors():
    ddpm = DDPM(10)
    net = MLPDenoiser(2, hidden=8, depth=1, time_dim=8)
    noise = torch.randn(4, 2)
    with pytest.raises(ValueError, match="t_start"):
        EulerSampler(2).sample(net, noise, t_start=0.0)
    with pytest.raises(ValueError, match="x_start shape"):
        EulerSampler(2).sample(net, noise, x_start=torch.randn(4, 3), t_start=0.5)
    with pytest.raises(ValueError, match="step_noise"):
        DDPMSampler(ddpm).sample(net, noise, step_noise=torch.randn(9, 4, 2))
    with pytest.raises(ValueError, match="cond_dim=0"):
        net(noise, torch.rand(4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="pass cond"):
        MLPDenoiser(2, cond_dim=3, hidden=8, depth=1, time_dim=8)(noise, torch.rand(4))
