"""The variational bound (DDPM eq. 5) in bits/dim: each term against its closed form, the estimator over t, and
the bound against the true entropy of discretised Gaussian data."""

import math

import pytest
import torch
from torch import nn

from ddpmlab.diffusion import Denoiser
from ddpmlab.errors import ConfigError
from ddpmlab.metrics.nll import bits_per_dim, evaluate_bpd, mean_stderr, strata
from ddpmlab.objectives.likelihood import discretized_gaussian_log_likelihood, normal_kl, prior_bpd, vb_terms_bpd
from sampler_helpers import GaussianOracle, TinyNet

LEVELS = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 data values of [-1, 1]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the pieces
def test_normal_kl_is_the_gaussian_kl():
    g = gen()
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10)


@pytest.mark.parametrize("mean,scale", [(0.0, 0.5), (0.37, 1e-3), (-0.99, 0.02), (1.4, 0.3), (-5.0, 2.0), (0.2, 1e-5)])
def test_the_decoder_is_a_distribution_over_the_256_levels(mean, scale):
    """DDPM eq. (13): the bins [x - 1/255, x + 1/255] tile the line once the edge bins reach -inf and +inf."""
    logp = discretized_gaussian_log_likelihood(LEVELS, torch.full((256,), mean), torch.full((256,), math.log(scale)))
    assert torch.isfinite(logp).all() and (logp <= 0).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_the_decoder_bins_and_tails():
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    h = 1 / 255
    x, mean, scale = LEVELS[100].item(), 0.05, 0.2  # an interior bin
    f64 = dict(dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(
        torch.tensor([x], **f64), torch.tensor([mean], **f64), torch.tensor([math.log(scale)], **f64)
    )
    assert got.item() == pytest.approx(math.log(Phi((x + h - mean) / scale) - Phi((x - h - mean) / scale)), rel=1e-9)
    # Edge bins: x = -1 takes (-inf, -1 + 1/255], x = 1 takes [1 - 1/255, inf)
    got = discretized_gaussian_log_likelihood(
        torch.tensor([-1.0, 1.0], **f64), torch.tensor([-1.2, 1.3], **f64), torch.full((2,), math.log(0.1), **f64)
    )
    assert got[0].item() == pytest.approx(math.log(Phi((-1 + h + 1.2) / 0.1)), rel=1e-9)
    assert got[1].item() == pytest.approx(math.log(1 - Phi((1 - h - 1.3) / 0.1)), rel=1e-9)
    # Far in a tail (30 standard deviations), where Phi(b) - Phi(a) underflows to 0 in float64: still exact
    far = discretized_gaussian_log_likelihood(
        torch.tensor([0.5]), torch.tensor([0.5 - 30 * 0.01]), torch.tensor([math.log(0.01)])
    )
    lower = torch.special.log_ndtr(
        torch.tensor([-(30 - h / 0.01)], dtype=torch.float64)
    )  # log P(Z > 30 - h/sigma) ~ the bin
    assert torch.isfinite(far).all() and far.item() == pytest.approx(lower.item(), abs=0.7)


def test_prior_term_is_the_closed_form_kl(diffusion):
    x0 = torch.tensor([-1.0, -0.2, 0.0, 0.6, 1.0]).view(5, 1, 1, 1)
    a = torch.cumprod(1 - diffusion.beta64, 0)[-1].item()
    ref = [0.5 * (a * v**2 + (1 - a) - 1 - math.log(1 - a)) / math.log(2) for v in x0.flatten().tolist()]
    assert prior_bpd(diffusion, x0).tolist() == pytest.approx(ref, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_the_kl_terms_are_ddpm_eq_12_for_an_eps_network(diffusion, variance):
    """DDPM eq. (12): with sigma_t^2 fixed,
    L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)) E||eps - eps_hat||^2 + C, where C = KL between two
    zero-mean Gaussians of variances beta_tilde_t and sigma_t^2 (0 for sigma_t^2 = beta_tilde_t)."""
    net = TinyNet(diffusion)
    den = Denoiser(net, diffusion)
    x0 = torch.rand((6, 1, 2, 4), generator=gen(1)) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen(2))
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    got = vb_terms_bpd(den, x0, t, eps, variance=variance, clip_x0=False)
    beta = diffusion.beta64
    alpha_bar = torch.cumprod(1 - beta, 0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    sigma2 = beta_tilde if variance == "small" else beta
    eps_hat = net(diffusion.q_sample(x0, t, eps), t).double()
    mse = (eps.double() - eps_hat).pow(2).flatten(1).mean(1)
    weight = beta[t] ** 2 / (2 * sigma2[t] * (1 - beta[t]) * (1 - alpha_bar[t]))
    C = 0.5 * (beta_tilde[t] / sigma2[t] - 1 - torch.log(beta_tilde[t] / sigma2[t]))
    ref = (weight * mse + C) / math.log(2)
    assert torch.allclose(got.double(), ref, rtol=2e-3, atol=1e-6), (got, ref)


# ------------------------------------------------------------------------------------------------ a point mass
class Constant(nn.Module):
    """x0-prediction of a point mass: x0_hat = c whatever x_t (the optimal denoiser when every image is c)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t):
        return torch.full_like(x, self.c)


def point_mass_bound(diffusion, c: float) -> dict:
    """Closed form of every term for data = c and x0_hat = c, with sigma_t^2 = beta_t (float64)."""
    beta = diffusion.beta64
    alpha_bar = torch.cumprod(1 - beta, 0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    ratio = (beta * (1 - alpha_bar_prev) / (1 - alpha_bar))[1:] / beta[1:]  # beta_tilde / beta, t >= 1
    kl = (0.5 * (ratio - 1 - ratio.log())).sum().item()  # equal means: only the variances differ
    sigma_1 = (
        (beta[1] * (1 - alpha_bar[0]) / (1 - alpha_bar[1])).sqrt().item()
    )  # decoder: log variance clipped to beta_tilde_1
    z = (1 / 255) / sigma_1
    decoder = -math.log(math.erf(z / math.sqrt(2)))  # P(|N(0, sigma_1^2)| < 1/255)
    a = alpha_bar[-1].item()
    prior = 0.5 * (a * c**2 + (1 - a) - 1 - math.log(1 - a))
    ln2 = math.log(2)
    return {"kl": kl / ln2, "decoder": decoder / ln2, "prior": prior / ln2}


def test_stride_1_is_the_exact_sum_over_t(diffusion):
    c = LEVELS[150].item()
    den = Denoiser(Constant(c), diffusion, "x0")
    x0 = torch.full((3, 1, 2, 2), c)
    r = bits_per_dim(den, x0, stride=1, variance="large", generator=gen())
    ref = point_mass_bound(diffusion, c)
    assert r.kl.tolist() == pytest.approx([ref["kl"]] * 3, rel=1e-4)
    assert r.decoder.tolist() == pytest.approx([ref["decoder"]] * 3, rel=1e-4)
    assert r.prior.tolist() == pytest.approx([ref["prior"]] * 3, rel=1e-4, abs=1e-9)
    assert torch.allclose(r.total, r.prior + r.kl + r.decoder)
    small = bits_per_dim(den, x0, stride=1, variance="small", generator=gen())
    assert small.kl.abs().max() < 1e-5  # the model's step is the true posterior: every KL vanishes


def test_strided_sums_are_unbiased(diffusion):
    c = LEVELS[40].item()
    den = Denoiser(Constant(c), diffusion, "x0")
    exact = point_mass_bound(diffusion, c)["kl"]
    x0 = torch.full((4000, 1, 1, 1), c)
    for stride in (7, 100):
        kl = bits_per_dim(den, x0, stride=stride, variance="large", generator=gen(stride)).kl
        mean, stderr = mean_stderr(kl)
        assert stderr > 1e-4  # the t really are drawn at random ...
        assert abs(mean - exact) < 4 * stderr  # ... and their weighted sum has the exact expectation


def test_strata_cover_every_kl_term_once():
    for T, stride in [(1000, 1), (1000, 7), (1000, 999), (1000, 5000), (10, 3)]:
        covered = [t for start, stop in strata(T, stride) for t in range(start, stop)]
        assert covered == list(range(1, T))
    with pytest.raises(ConfigError, match="stride"):
        strata(1000, 0)


# ------------------------------------------------------------------------------------------------ Gaussian data
def test_the_bound_is_above_the_true_entropy_and_close_to_it(diffusion):
    """Data: N(m, s^2) discretised to the 256 levels, whose entropy H (bits/dim) is exact. Any model's NLL is >= H
    and the bound >= NLL, so the bound must not fall below H (beyond noise). With the optimal continuous denoiser and
    sigma_t^2 = beta_t it stays within 0.15 bits of H: the remaining gap is the fixed variance (the true reverse
    variance lies between beta_tilde_t and beta_t) and the Gaussian decoder; measured ~0.06. With beta_tilde_t the
    bound is valid too but looser on this wide (s = 0.3 >> 1/255) data."""
    m, s = 0.1, 0.3
    edges = torch.cat([torch.tensor([-math.inf]), (LEVELS[:-1] + LEVELS[1:]) / 2, torch.tensor([math.inf])])
    p = torch.special.ndtr((edges[1:] - m) / s) - torch.special.ndtr((edges[:-1] - m) / s)
    H = -(p * torch.log2(p.clamp_min(1e-300))).sum().item()
    x0 = LEVELS[torch.multinomial(p, 512 * 16, replacement=True, generator=gen(5))].float().view(512, 1, 4, 4)
    den = Denoiser(GaussianOracle(diffusion, m, s), diffusion)
    large = bits_per_dim(den, x0, stride=1, variance="large", clip_x0=False, generator=gen(6))
    value, stderr = mean_stderr(large.total)
    assert value > H - 3 * stderr
    assert value < H + 0.15
    small_value, small_stderr = mean_stderr(
        bits_per_dim(den, x0, stride=4, variance="small", clip_x0=False, generator=gen(7)).total
    )
    assert small_value > H - 3 * small_stderr and small_value > value


# ------------------------------------------------------------------------------------------------ the dataset loop
def test_evaluate_bpd_reports_mean_stderr_and_protocol(diffusion):
    den = Denoiser(TinyNet(diffusion), diffusion)
    images = LEVELS[torch.randint(0, 256, (10, 1, 2, 4), generator=gen(3))].float()
    batches = [(images[:4], torch.zeros(4)), (images[4:8], torch.zeros(4)), (images[8:], torch.zeros(2))]
    r = evaluate_bpd(den, batches, num_images=7, stride=100, seed=3)
    assert r["n"] == 7 and r["seconds"] > 0 and r["stderr"] > 0
    assert r["value"] == pytest.approx(sum(r["terms"].values()), rel=1e-5)
    assert r["protocol"]["timesteps_per_image"] == 1 + 10 and r["protocol"]["variance"] == "sigma_t^2 = beta_t"
    again = evaluate_bpd(den, batches, num_images=7, stride=100, seed=3)
    assert again["value"] == r["value"]  # one seeded generator: the same numbers
    assert evaluate_bpd(den, batches, num_images=None, stride=100, seed=4)["n"] == 10
    with pytest.raises(ConfigError, match="only 10"):
        evaluate_bpd(den, batches, num_images=11, stride=100)
    with pytest.raises(ConfigError, match="variance"):
        evaluate_bpd(den, batches, variance="learned")
