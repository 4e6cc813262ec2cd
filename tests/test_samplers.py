"""Samplers: the grid they visit, equivalences between them, the Gaussian oracle, clipping, golden tables."""

import math

import pytest
import torch
from torch import nn

from ddpmlab.diffusion import Denoiser, GaussianDiffusion, cosine_betas, linear_betas, make_timesteps
from ddpmlab.diffusion.timesteps import SPACINGS
from ddpmlab.errors import ConfigError
from ddpmlab.samplers import (
    ALGORITHMS,
    Sampler,
    ddim_sample_progressive,
    ddpm_sample_progressive,
    dpm_solver_sample,
    dpm_solver_sample_progressive,
)


class GaussianOracle(nn.Module):
    """The optimal eps-predictor for data x0 ~ N(m, s^2 I): x_t ~ N(sqrt(a) m, a s^2 + 1 - a) with a = alpha_bar_t,
    so E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / (a s^2 + 1 - a)."""

    def __init__(self, diffusion: GaussianDiffusion, m: float, s: float):
        super().__init__()
        self.alpha_bar, self.m, self.s = torch.cumprod(1 - diffusion.beta64, 0), m, s

    def forward(self, x, t):
        a = self.alpha_bar[t].view(-1, *[1] * (x.dim() - 1))
        return ((1 - a).sqrt() * (x - a.sqrt() * self.m) / (a * self.s**2 + 1 - a)).to(x.dtype)

    def flow_map(self, x_T, t_start):
        """The probability-flow ODE's exact solution from x at t_start to t = 0 and then x_0 (alpha_bar = 1):
        the affine map that keeps (x_t - sqrt(a) m) / sqrt(a s^2 + 1 - a) fixed."""
        a = self.alpha_bar[t_start]
        return self.m + self.s * (x_T - a.sqrt() * self.m) / (a * self.s**2 + 1 - a).sqrt()


class TinyNet(nn.Module):
    """A fixed random network that depends on x and t, so every step of a sampler matters: the Gaussian oracle of
    N(0, 0.5^2) data plus a random perturbation, which keeps the samples O(1) as a trained network would."""

    def __init__(self, diffusion: GaussianDiffusion, dim: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.oracle = GaussianOracle(diffusion, 0.0, 0.5)
        self.W = torch.randn(dim, dim, generator=g) / dim**0.5
        self.emb = torch.randn(diffusion.T, dim, generator=g)

    def forward(self, x, t):
        return self.oracle(x, t) + 0.3 * torch.tanh(x @ self.W + self.emb[t].view(-1, 1, 1, self.W.shape[0]))


class Recorder(nn.Module):
    """Wraps a network and records the timesteps it is called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x, t):
        assert (t == t[0]).all()
        self.seen.append(int(t[0]))
        return self.net(x, t)


def linear(T=1000):
    return GaussianDiffusion(linear_betas(T) if T >= 20 else cosine_betas(T))


def x_T(n=3, seed=0, shape=(1, 2, 4)):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


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
    steps = list(sampler.steps(Denoiser(net, d), d, x_T(), generator=gen()))
    assert net.seen == grid.tolist()  # the network saw these t, in this order, once each
    assert [s.t for s in steps] == grid.tolist()
    assert all(s.x.shape == (3, 1, 2, 4) and torch.isfinite(s.x).all() for s in steps)


def test_the_progressive_twin_ends_where_the_final_sampler_ends():
    d = linear(100)
    den = Denoiser(TinyNet(d), d)
    for algorithm in ALGORITHMS:
        sampler = Sampler(algorithm, 17, "trailing")
        last = list(sampler.steps(den, d, x_T(), generator=gen()))[-1].x
        assert torch.equal(sampler(den, d, x_T(), generator=gen()), last)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(algorithm="euler"), "unknown sampler"),
        (dict(algorithm="ddim", eta_typo=0.0), "no option"),
        (dict(algorithm="ddpm", eta=0.5), "no option"),
        (dict(algorithm="ddim", spacing="uniform"), "unknown sampler.spacing"),
        (dict(algorithm="ddim", num_steps=0), "positive integer"),
        (dict(algorithm="ddim", num_steps=5, eta=-1.0), "eta"),  # options are checked where the config enters
        (dict(algorithm="ddpm", num_steps=5, variance="medium"), "variance"),
    ],
)
def test_bad_sampler_configs_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Sampler(**kwargs)


@pytest.mark.parametrize(
    "sampler,match",
    [
        (Sampler("ddim", 51), "between 1 and the schedule's T=50"),
    ],
)
def test_bad_values_are_config_errors_at_sampling_time(sampler, match):
    d = linear(50)
    with pytest.raises(ConfigError, match=match):
        sampler(Denoiser(TinyNet(d), d), d, x_T())


def test_a_grid_that_is_not_strictly_descending_is_refused():
    d = linear(50)
    with pytest.raises(ConfigError, match="strictly descending"):
        list(ddim_sample_progressive(Denoiser(TinyNet(d), d), d, x_T(), [3, 10, 20]))


# ------------------------------------------------------------------------------------------------ equivalences
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_with_eta_1_on_the_full_grid_is_ancestral_sampling_with_beta_tilde(clip):
    """DDIM eq. (16) with eta = 1 is the posterior variance beta_tilde, and the eq. (12) mean is the posterior mean:
    step for step, with the same noise, the two samplers agree."""
    T = 200
    d = linear(T)
    den = Denoiser(TinyNet(d), d)
    grid = make_timesteps(T)
    ddim = list(ddim_sample_progressive(den, d, x_T(), grid, generator=gen(), eta=1.0, clip_x0=clip))
    ddpm = list(ddpm_sample_progressive(den, d, x_T(), grid, generator=gen(), variance="small", clip_x0=clip))
    assert len(ddim) == len(ddpm) == T
    for a, b in zip(ddim, ddpm):
        assert a.t == b.t
        assert torch.allclose(a.x, b.x, atol=2e-5, rtol=1e-5), (a.t, (a.x - b.x).abs().max())
        assert torch.allclose(a.x0_hat, b.x0_hat, atol=2e-4, rtol=1e-5)


def reference_ancestral(den, betas, x, generator, respaced_grid=None):
    """DDPM Algorithm 2 written from eq. (11) in float64, independent of the library's tables:
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) + sigma_t z, sigma_t^2 = beta_tilde_t.
    With ``respaced_grid``, the betas are first rebuilt over the kept steps as 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}."""
    alpha_bar = torch.cumprod(1 - betas, 0)
    ts = list(range(betas.numel() - 1, -1, -1)) if respaced_grid is None else respaced_grid
    kept = torch.tensor(sorted(ts))
    ab = alpha_bar[kept]
    beta = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    x = x.double()
    for i, t in enumerate(ts):
        j = len(ts) - 1 - i
        eps_hat = den.net(x.float(), torch.full((x.shape[0],), t)).double()
        mean = (x - beta[j] / (1 - ab[j]).sqrt() * eps_hat) / (1 - beta[j]).sqrt()  # DDPM eq. (11)
        if j > 0:
            beta_tilde = beta[j] * (1 - ab[j - 1]) / (1 - ab[j])  # DDPM eq. (7)
            x = mean + beta_tilde.sqrt() * torch.randn(x.shape, generator=generator).double()
        else:
            x = mean
    return x.float()


def test_respaced_ancestral_sampling_with_S_equal_T_is_plain_ancestral_sampling():
    T = 300
    d = linear(T)
    den = Denoiser(TinyNet(d), d)
    ours = Sampler("ddpm", T, "trailing", clip_x0=False)(den, d, x_T(), generator=gen())  # goes through respace()
    plain = reference_ancestral(den, d.beta64, x_T(), gen())
    assert torch.allclose(ours, plain, atol=1e-5, rtol=1e-5), (ours - plain).abs().max()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "quadratic"])
def test_respaced_ancestral_sampling_uses_the_betas_rebuilt_from_the_kept_alpha_bar(spacing):
    T = 1000
    d = linear(T)
    den = Denoiser(TinyNet(d), d)
    grid = make_timesteps(T, 25, spacing)
    ours = Sampler("ddpm", 25, spacing, clip_x0=False)(den, d, x_T(), generator=gen())
    ref = reference_ancestral(den, d.beta64, x_T(), gen(), respaced_grid=grid.tolist())
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()


def test_dpm_solver_first_step_is_a_ddim_step_and_one_step_returns_x0_hat():
    """DPM-Solver++(1) is DDIM (Lu et al. 2022, Sec. 4); with one step the solver jumps straight to x0_hat."""
    d = linear(1000)
    den = Denoiser(TinyNet(d), d)
    grid = make_timesteps(1000, 10, "linspace")
    first_dpm = next(iter(dpm_solver_sample_progressive(den, d, x_T(), grid)))
    first_ddim = next(iter(ddim_sample_progressive(den, d, x_T(), grid)))
    assert torch.allclose(first_dpm.x, first_ddim.x, atol=1e-5)
    one = list(dpm_solver_sample_progressive(den, d, x_T(), [500]))
    assert len(one) == 1 and torch.allclose(one[0].x, one[0].x0_hat, atol=1e-6)


def test_deterministic_samplers_ignore_the_generator_and_ancestral_ones_use_it():
    d = linear(100)
    den = Denoiser(TinyNet(d), d)
    for algorithm, options in [("ddim", dict(eta=0.0)), ("dpm_solver", {})]:
        s = Sampler(algorithm, 10, **options)
        assert torch.equal(s(den, d, x_T(), generator=gen(1)), s(den, d, x_T(), generator=gen(2)))
    for algorithm, options in [("ddim", dict(eta=0.5)), ("ddpm", {})]:
        s = Sampler(algorithm, 10, **options)
        assert torch.equal(s(den, d, x_T(), generator=gen(1)), s(den, d, x_T(), generator=gen(1)))
        assert not torch.allclose(s(den, d, x_T(), generator=gen(1)), s(den, d, x_T(), generator=gen(2)))


# ------------------------------------------------------------------------------------------------ clipping
class Wild(nn.Module):
    """A network whose x0_hat leaves [-1, 1] at every step."""

    def forward(self, x, t):
        return 3.0 * torch.ones_like(x) + x


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_clipping_keeps_x0_hat_in_the_data_range_and_eps_consistent_with_it(algorithm):
    d = linear(1000)
    den = Denoiser(Wild(), d)
    steps = list(Sampler(algorithm, 10, "linspace", clip_x0=True).steps(den, d, x_T(), generator=gen()))
    assert all(s.x0_hat.abs().max() <= 1 for s in steps)
    unclipped = list(Sampler(algorithm, 10, "linspace", clip_x0=False).steps(den, d, x_T(), generator=gen()))
    assert max(s.x0_hat.abs().max() for s in unclipped) > 1.5
    # The DDIM step uses the eps re-derived from the clipped x0_hat: x_prev = sqrt(a') x0c + sqrt(1 - a') eps(x0c).
    if algorithm == "ddim":
        t, t_next = 999, 888
        x0c = (den(x_T(), torch.full((3,), t)).x0_hat).clamp(-1, 1)
        eps_c = d.eps_from_x0(x_T(), torch.full((3,), t), x0c)
        a_next = torch.cumprod(1 - d.beta64, 0)[t_next]
        assert torch.allclose(steps[0].x, a_next.sqrt().float() * x0c + (1 - a_next).sqrt().float() * eps_c, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the Gaussian oracle
M, SD = 0.1, 0.3


@pytest.fixture(scope="module")
def oracle():
    d = linear(1000)
    net = GaussianOracle(d, M, SD)
    return d, net, Denoiser(net, d), x_T(4000, seed=3, shape=(1, 2, 2))


@pytest.mark.parametrize(
    "sampler,tol_std",
    [
        (Sampler("ddpm", None, variance="small", clip_x0=False), 0.03),
        (Sampler("ddpm", None, variance="large", clip_x0=False), 0.015),
        (Sampler("ddim", None, eta=0.0, clip_x0=False), 0.02),
        (Sampler("ddim", 50, "quadratic", eta=0.0, clip_x0=False), 0.06),
        (Sampler("dpm_solver", 20, "logsnr", clip_x0=False), 0.035),
        (Sampler("dpm_solver", 10, "logsnr", clip_x0=False), 0.05),
    ],
    ids=repr,
)
def test_samplers_recover_the_mean_and_variance_of_gaussian_data(oracle, sampler, tol_std):
    """With the analytic optimal denoiser each sampler's output has the data's mean m and standard deviation s.
    16,000 values: the sampling error of the mean is ~0.0024, of the std ~0.6%. On top of that, each sampler has its
    own bias: ancestral sampling with a fixed variance is not the exact reverse kernel (whose variance lies between
    beta_tilde and beta, DDPM Sec. 3.2: beta_tilde gives a std ~2% low on this data, beta ~0.5%); the ODE samplers
    have their discretisation error (DDIM with 50 quadratic steps ~3-4% low, DPM-Solver++ with 20 logsnr steps 1-2%,
    with 10 steps 2-3%)."""
    d, _, den, x = oracle
    x0 = sampler(den, d, x, generator=gen())
    assert x0.mean().item() == pytest.approx(M, abs=0.012)
    assert x0.std().item() == pytest.approx(SD, rel=tol_std)


def test_dpm_solver_follows_the_exact_probability_flow_better_than_ddim(oracle):
    """For Gaussian data the probability-flow ODE has a closed-form solution. DDIM is a first-order solver of it (the
    error halves with the step), DPM-Solver++(2M) second order (the error falls at least fourfold once the steps are
    fine; the final first-order jump to sigma = 0 costs little). The logsnr grid is what makes 2M accurate at 20 steps:
    on the time-uniform linspace grid its extrapolation overshoots (the dpm_solver config's choice)."""
    d, net, den, x = oracle

    def rms_error(algorithm, S, spacing="logsnr"):
        grid = make_timesteps(1000, S, spacing, alpha_bar=net.alpha_bar)
        *_, last = ALGORITHMS[algorithm](den, d, x, grid, clip_x0=False)
        return (last.x.double() - net.flow_map(x.double(), int(grid[0]))).pow(2).mean().sqrt().item() / SD

    ddim = {S: rms_error("ddim", S) for S in (20, 40)}
    dpm = {S: rms_error("dpm_solver", S) for S in (20, 40, 80)}
    assert 1.7 < ddim[20] / ddim[40] < 2.3  # first order
    assert dpm[40] / dpm[80] > 3.5 and dpm[20] / dpm[40] > 3.5  # second order (or better)
    assert dpm[20] < 0.03 and dpm[20] * 5 < ddim[20]
    assert dpm[20] * 5 < rms_error("dpm_solver", 20, "linspace")


def test_dpm_solver_recovers_the_flow_map_on_a_cosine_schedule_too():
    d = GaussianDiffusion(cosine_betas(1000))
    net = GaussianOracle(d, M, SD)
    x = x_T(1000, seed=4, shape=(1, 2, 2))
    grid = make_timesteps(1000, 20, "quadratic")
    out = dpm_solver_sample(Denoiser(net, d), d, x, grid, clip_x0=False)
    err = (out.double() - net.flow_map(x.double(), int(grid[0]))).pow(2).mean().sqrt().item() / SD
    assert err < 0.05


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
        for name, g, v in zip(("alpha_bar", "beta_tilde", "coef_x0", "coef_xt"), got, values):
            assert g.item() == pytest.approx(v, rel=2e-6), (t, name)
    assert d.beta_tilde[0] == 0 and d.mu_tilde_coef_x0[0] == 1 and d.mu_tilde_coef_xt[0] == 0  # x_0 is known at t=0
    # The 50-step leading grid's respaced process (improved-diffusion): beta_0 = 1 - alpha_bar_0, beta_i = 1 - ab[20i]/ab[20(i-1)]
    r = d.respace(make_timesteps(1000, 50, "leading"))
    assert r.beta[0].item() == pytest.approx(1.0e-4, rel=1e-5)
    assert r.beta[1].item() == pytest.approx(1 - math.prod(1 - (1e-4 + (0.02 - 1e-4) * k / 999) for k in range(1, 21)), rel=1e-5)


# ------------------------------------------------------------------------------------------------ chains
def test_the_chain_runs_from_x_T_to_the_final_sample():
    d = linear(100)
    den = Denoiser(TinyNet(d), d)
    sampler = Sampler("ddpm", 30, "trailing")
    frames = sampler.chain(den, d, x_T(), num_frames=7, generator=gen())
    assert frames.shape == (3, 7, 1, 2, 4)
    assert torch.equal(frames[:, 0], x_T())
    assert torch.equal(frames[:, -1], sampler(den, d, x_T(), generator=gen()))
    steps = [s.x for s in sampler.steps(den, d, x_T(), generator=gen())]
    assert torch.equal(frames[:, 3], steps[15 - 1])  # frame k is the state after round(k * 30 / 6) steps
    assert Sampler("ddim", 3).chain(den, d, x_T(), num_frames=10).shape[1] == 4  # never more frames than states
    with pytest.raises(ConfigError, match="at least 2 frames"):
        sampler.chain(den, d, x_T(), num_frames=1)
