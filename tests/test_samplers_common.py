"""Every sampler alike: the grid it visits, validation, clipping, determinism, the Gaussian oracle, chains, and
the golden values of the linear schedule."""

import inspect
import math

import pytest
import torch
from torch import nn

from ddpmlab.diffusion import Denoiser, GaussianDiffusion, linear_betas, make_timesteps
from ddpmlab.diffusion.timesteps import SPACINGS
from ddpmlab.errors import ConfigError
from ddpmlab.objectives import HybridLoss, SimpleLoss, VLBLoss
from ddpmlab.samplers import (
    ALGORITHMS,
    SAMPLERS,
    Sampler,
    ddim_sample_progressive,
    steps_for_nfe,
)
from sampler_helpers import SD, M, Recorder, TinyNet, gen, linear, x_T


# ------------------------------------------------------------------------------------------------ the grid
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T,S", [(10, 1), (10, 3), (10, 10), (50, 7), (50, 50), (1000, 13), (1000, 40)])
def test_every_sampler_visits_exactly_the_grid(algorithm, spacing, T, S):
    d = linear(T)
    sampler = Sampler(algorithm, S, spacing)
    try:
        grid = sampler.timesteps(d)
    except ConfigError:
        assert spacing == "quadratic"  # floor(i^2 ...) repeats for some (T, S): no grid, so nothing to visit
        return
    assert grid.tolist() == make_timesteps(T, S, spacing, alpha_bar=torch.cumprod(1 - d.beta64, 0)).tolist()
    net = Recorder(TinyNet(d))
    steps = list(sampler.steps(Denoiser(net, d), x_T(), generator=gen()))
    visits = grid.tolist()  # the network saw these t, in this order, once each ...
    if algorithm == "heun":  # ... and Heun each t but the first once more, for the correction of the step before
        visits = visits[:1] + [t for t in visits[1:] for _ in range(2)]
    assert net.seen == visits == [s.t for s in steps]  # one yield per network evaluation
    assert len(steps) == sampler.num_evaluations(d)
    assert all(s.x.shape == (3, 1, 2, 4) and torch.isfinite(s.x).all() for s in steps)


def test_the_progressive_twin_ends_where_the_final_sampler_ends():
    d = linear(100)
    den = Denoiser(TinyNet(d), d)
    for algorithm in ALGORITHMS:
        sampler = Sampler(algorithm, 17, "trailing")
        last = list(sampler.steps(den, x_T(), generator=gen()))[-1].x
        assert torch.equal(sampler(den, x_T(), generator=gen()), last)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(algorithm="lms"), "unknown sampler"),
        (dict(algorithm="ddim", eta_typo=0.0), "no option"),
        (dict(algorithm="ddpm", eta=0.5), "no option"),
        (dict(algorithm="ddim", spacing="uniform"), "unknown sampler.spacing"),
        (dict(algorithm="ddim", num_steps=0), "positive integer"),
        (dict(algorithm="ddim", num_steps=5, eta=-1.0), "eta"),  # options are checked where the config enters
        (dict(algorithm="ddpm", num_steps=5, variance="medium"), "variance"),
        (dict(algorithm="dpm_solver", order=4), r"sampler.order=4 must be 2 or 3"),
        (dict(algorithm="unipc", order=1), r"sampler.order=1 must be 2 or 3"),
        (dict(algorithm="unipc", solver_type="bh1"), r"sampler 'unipc' has no option\(s\) \['solver_type'\]"),
        (dict(algorithm="ddim", order=3), "no option"),
        (dict(algorithm="heun", S_churn=-1.0), r"sampler.S_churn=-1.0 must be a number >= 0"),
        (dict(algorithm="euler", S_noise=0.0), r"sampler.S_noise=0.0 must be a number > 0"),
        (dict(algorithm="heun", S_tmin=2.0, S_tmax=1.0), r"sampler.S_tmin=2.0 is above sampler.S_tmax=1.0"),
        (dict(algorithm="heun", S_tmax="inf"), r"sampler.S_tmax='inf' must be a number >= 0, or null"),
        (dict(algorithm="heun", spacing="edm"), "unknown sampler.spacing"),
    ],
)
def test_bad_sampler_configs_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Sampler(**kwargs)


@pytest.mark.parametrize(
    "sampler,match",
    [
        (Sampler("ddim", 51), "sampler.num_steps=51 is more than the schedule's T=50"),
    ],
)
def test_bad_values_are_config_errors_at_sampling_time(sampler, match):
    d = linear(50)
    with pytest.raises(ConfigError, match=match):
        sampler(Denoiser(TinyNet(d), d), x_T())


def test_a_grid_that_is_not_strictly_descending_is_the_callers_mistake():
    d = linear(50)
    with pytest.raises(AssertionError, match="strictly descending"):
        list(ddim_sample_progressive(Denoiser(TinyNet(d), d), x_T(), [3, 10, 20]))


@pytest.mark.parametrize(
    "algorithm,options",
    [("ddim", dict(eta=-1.0)), ("ddpm", dict(variance="medium")), ("repaint", dict(variance="medium"))],
)
def test_the_sampling_functions_assert_what_the_sampler_checks(algorithm, options):
    """Sampler is where a configuration is checked (a ConfigError, above); a bad value that reaches an algorithm
    directly is a programmer's mistake there."""
    d = linear(50)
    inputs = dict(x0=torch.zeros(1, 1, 2, 4), keep=torch.ones(2, 4)) if algorithm == "repaint" else {}
    with pytest.raises(ConfigError):
        Sampler(algorithm, 5, **options)
    with pytest.raises(AssertionError):
        list(SAMPLERS[algorithm](Denoiser(TinyNet(d), d), x_T(), [40, 20, 0], **options, **inputs))


def test_samplers_and_losses_take_the_diffusion_from_the_denoiser():
    """No (denoiser, diffusion) pair to get wrong: every sampler is f(denoiser, x_T, timesteps, ...), every loss
    f(denoiser, x0, t, eps, cond), and each reads denoiser.diffusion (here a schedule no other object holds)."""
    for fn in SAMPLERS.values():
        assert list(inspect.signature(fn).parameters)[:3] == ["denoiser", "x_T", "timesteps"], fn
    for loss in (SimpleLoss(), HybridLoss(), VLBLoss()):
        assert list(inspect.signature(loss).parameters) == ["denoiser", "x0", "t", "eps", "cond"], loss
    own = GaussianDiffusion(torch.linspace(1e-3, 0.3, 20))
    den = Denoiser(TinyNet(own), own)
    x0 = Sampler("ddpm", 5, "trailing", clip_x0=False)(den, x_T(), generator=gen())
    grid = make_timesteps(20, 5, "trailing")
    process = own.respace(grid)  # the ancestral steps by hand, on the denoiser's own respaced process
    x, g = x_T(), gen()
    for i, t in enumerate(grid.tolist()):
        j = torch.full((3,), len(grid) - 1 - i)
        p = process.p_mean_variance(den(x, torch.full((3,), t)).x0_hat, x, j, "small")
        x = p.mean + (0.5 * p.log_variance).exp() * torch.randn(x.shape, generator=g) if i < len(grid) - 1 else p.mean
    torch.testing.assert_close(x0, x)


def test_deterministic_samplers_ignore_the_generator_and_ancestral_ones_use_it():
    d = linear(100)
    den = Denoiser(TinyNet(d), d)
    for algorithm, options in [("ddim", dict(eta=0.0)), ("dpm_solver", {})]:
        s = Sampler(algorithm, 10, **options)
        assert torch.equal(s(den, x_T(), generator=gen(1)), s(den, x_T(), generator=gen(2)))
    for algorithm, options in [("ddim", dict(eta=0.5)), ("ddpm", {})]:
        s = Sampler(algorithm, 10, **options)
        assert torch.equal(s(den, x_T(), generator=gen(1)), s(den, x_T(), generator=gen(1)))
        assert not torch.allclose(s(den, x_T(), generator=gen(1)), s(den, x_T(), generator=gen(2)))


# ------------------------------------------------------------------------------------------------ clipping
class Wild(nn.Module):
    """A network whose x0_hat leaves [-1, 1] at every step."""

    def forward(self, x, t):
        return 3.0 * torch.ones_like(x) + x


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_clipping_keeps_x0_hat_in_the_data_range_and_eps_consistent_with_it(algorithm):
    d = linear(1000)
    den = Denoiser(Wild(), d)
    steps = list(Sampler(algorithm, 10, "linspace", clip_x0=True).steps(den, x_T(), generator=gen()))
    assert all(s.x0_hat.abs().max() <= 1 for s in steps)
    unclipped = list(Sampler(algorithm, 10, "linspace", clip_x0=False).steps(den, x_T(), generator=gen()))
    assert max(s.x0_hat.abs().max() for s in unclipped) > 1.5
    # The DDIM step uses the eps re-derived from the clipped x0_hat: x_prev = sqrt(a') x0c + sqrt(1 - a') eps(x0c).
    if algorithm == "ddim":
        t, t_next = 999, 888
        x0c = (den(x_T(), torch.full((3,), t)).x0_hat).clamp(-1, 1)
        eps_c = d.eps_from_x0(x_T(), torch.full((3,), t), x0c)
        a_next = torch.cumprod(1 - d.beta64, 0)[t_next]
        assert torch.allclose(steps[0].x, a_next.sqrt().float() * x0c + (1 - a_next).sqrt().float() * eps_c, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the Gaussian oracle
@pytest.mark.parametrize(
    "sampler,tol_std",
    [
        (Sampler("ddpm", None, variance="small", clip_x0=False), 0.03),
        (Sampler("ddpm", None, variance="large", clip_x0=False), 0.015),
        (Sampler("ddim", None, eta=0.0, clip_x0=False), 0.02),
        (Sampler("ddim", 50, "quadratic", eta=0.0, clip_x0=False), 0.06),
        (Sampler("dpm_solver", 20, "logsnr", clip_x0=False), 0.035),
        (Sampler("dpm_solver", 10, "logsnr", clip_x0=False), 0.05),
        (Sampler("dpm_solver", 20, "logsnr", order=3, clip_x0=False), 0.02),
        (Sampler("unipc", 10, "logsnr", clip_x0=False), 0.07),
        (Sampler("euler", 50, "karras", clip_x0=False), 0.07),
        (Sampler("heun", 35, "karras", clip_x0=False), 0.035),
    ],
    ids=repr,
)
def test_samplers_recover_the_mean_and_variance_of_gaussian_data(oracle, sampler, tol_std):
    """With the analytic optimal denoiser each sampler's output has the data's mean m and standard deviation s.
    16,000 values: the sampling error of the mean is ~0.0024, of the std ~0.6%. On top of that, each sampler has its
    own bias: ancestral sampling with a fixed variance is not the exact reverse kernel (whose variance lies between
    beta_tilde and beta, DDPM Sec. 3.2: beta_tilde gives a std ~2% low on this data, beta ~0.5%); the ODE samplers
    have their discretisation error (DDIM with 50 quadratic steps ~3-4% low, DPM-Solver++ with 20 logsnr steps 1-2%,
    with 10 steps 2-3%, 3M with 20 steps 0.7%; UniPC with 10 logsnr steps ~6% high; EDM's Euler with 50 karras steps
    ~6% low, Heun with 35 (69 evaluations) ~2% high)."""
    d, _, den, x = oracle
    x0 = sampler(den, x, generator=gen())
    assert x0.mean().item() == pytest.approx(M, abs=0.012)
    assert x0.std().item() == pytest.approx(SD, rel=tol_std)


# ------------------------------------------------------------------------------------------------ golden values
def test_golden_values_of_the_linear_schedule_at_T_1000():
    """DDPM's linear schedule (beta from 1e-4 to 0.02, T = 1000): values computed once in float64 from eqs. (4), (7)."""
    d = GaussianDiffusion(linear_betas(1000))
    golden = {  # index: (alpha_bar, beta_tilde, mu_tilde_coef_x0, mu_tilde_coef_xt)
        1: (9.997801e-01, 5.453188e-05, 5.452915e-01, 4.547085e-01),
        487: (8.858573e-02, 9.791572e-03, 3.216439e-03, 9.941301e-01),
        999: (4.035830e-05, 1.999998e-02, 1.283515e-04, 9.899487e-01),
    }
    for t, values in golden.items():
        got = (d.alpha_bar[t], d.beta_tilde[t], d.mu_tilde_coef_x0[t], d.mu_tilde_coef_xt[t])
        for name, g, v in zip(("alpha_bar", "beta_tilde", "coef_x0", "coef_xt"), got, values, strict=True):
            assert g.item() == pytest.approx(v, rel=2e-6), (t, name)
    assert d.beta_tilde[0] == 0 and d.mu_tilde_coef_x0[0] == 1 and d.mu_tilde_coef_xt[0] == 0  # x_0 is known at t=0
    # The 50-step leading grid's respaced process (improved-diffusion):
    # beta_0 = 1 - alpha_bar_0, beta_i = 1 - ab[20i]/ab[20(i-1)]
    r = d.respace(make_timesteps(1000, 50, "leading"))
    assert r.beta[0].item() == pytest.approx(1.0e-4, rel=1e-5)
    assert r.beta[1].item() == pytest.approx(
        1 - math.prod(1 - (1e-4 + (0.02 - 1e-4) * k / 999) for k in range(1, 21)), rel=1e-5
    )


# ------------------------------------------------------------------------------------------------ chains
def test_the_chain_runs_from_x_T_to_the_final_sample():
    d = linear(100)
    den = Denoiser(TinyNet(d), d)
    sampler = Sampler("ddpm", 30, "trailing")
    frames = sampler.chain(den, x_T(), num_frames=7, generator=gen())
    assert frames.shape == (3, 7, 1, 2, 4)
    assert torch.equal(frames[:, 0], x_T())
    assert torch.equal(frames[:, -1], sampler(den, x_T(), generator=gen()))
    steps = [s.x for s in sampler.steps(den, x_T(), generator=gen())]
    assert torch.equal(frames[:, 3], steps[15 - 1])  # frame k is the state after round(k * 30 / 6) steps
    assert Sampler("ddim", 3).chain(den, x_T(), num_frames=10).shape[1] == 4  # never more frames than states
    with pytest.raises(ConfigError, match="at least 2 frames"):
        sampler.chain(den, x_T(), num_frames=1)


@pytest.mark.parametrize(
    "algorithm,options,nfe,S",
    [("ddim", {}, 10, 10), ("unipc", {}, 7, 7), ("heun", {}, 9, 5), ("heun", {}, 35, 18), ("heun", {}, 1, 1),
     ("repaint", dict(jump_length=2, jump_n_sample=2), 18, 10)],
)  # fmt: skip
def test_a_target_number_of_evaluations_picks_the_grid(algorithm, options, nfe, S):
    d = linear(50)
    sampler = Sampler(algorithm, 3, "trailing", **options).for_nfe(nfe)
    assert sampler.num_steps == S and sampler.num_evaluations(d) == nfe
    assert steps_for_nfe(algorithm, nfe, options) == S
    if algorithm != "repaint":  # the count is what the sampler does
        net = Recorder(TinyNet(d))
        list(sampler.steps(Denoiser(net, d), x_T(), generator=gen()))
        assert len(net.seen) == nfe


@pytest.mark.parametrize(
    "algorithm,nfe,match",
    [
        ("heun", 10, r"^heun takes 2S-1 evaluations: nfe=10 is not reachable; use nfe=9 \(S=5\) or 11 \(S=6\)$"),
        ("heun", 2, r"use nfe=1 \(S=1\) or 3 \(S=2\)$"),
        ("ddim", 0, r"nfe=0 must be a positive integer"),
        ("lms", 5, "unknown sampler"),
        (
            "repaint",
            19,
            r"^repaint takes S \+ its resampling's evaluations: nfe=19 is not reachable; use nfe=18 \(S=10\)",
        ),
    ],
)
def test_an_unreachable_number_of_evaluations_is_a_config_error_naming_the_nearest(algorithm, nfe, match):
    options = dict(jump_length=2, jump_n_sample=2) if algorithm == "repaint" else {}
    with pytest.raises(ConfigError, match=match):
        steps_for_nfe(algorithm, nfe, options)
    if algorithm in SAMPLERS:
        with pytest.raises(ConfigError, match=match):
            Sampler(algorithm, 4, **options).for_nfe(nfe)
