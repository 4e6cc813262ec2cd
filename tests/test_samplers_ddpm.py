"""DDPM ancestral sampling (Algorithm 2) and the respaced process (improved-diffusion, Sec. 4)."""

import pytest
import torch

from ddpmlab.diffusion import Denoiser, make_timesteps
from ddpmlab.samplers import (
    Sampler,
)
from sampler_helpers import TinyNet, gen, linear, x_T


def reference_ancestral(den, betas, x, generator, respaced_grid=None):
    """DDPM Algorithm 2 written from eq. (11) in float64, independent of the library's tables:
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) + sigma_t z, sigma_t^2 = beta_tilde_t.
    With ``respaced_grid``, the betas are first rebuilt over the kept steps as
    1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}."""
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
    ours = Sampler("ddpm", T, "trailing", clip_x0=False)(den, x_T(), generator=gen())  # goes through respace()
    plain = reference_ancestral(den, d.beta64, x_T(), gen())
    assert torch.allclose(ours, plain, atol=1e-5, rtol=1e-5), (ours - plain).abs().max()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "quadratic"])
def test_respaced_ancestral_sampling_uses_the_betas_rebuilt_from_the_kept_alpha_bar(spacing):
    T = 1000
    d = linear(T)
    den = Denoiser(TinyNet(d), d)
    grid = make_timesteps(T, 25, spacing)
    ours = Sampler("ddpm", 25, spacing, clip_x0=False)(den, x_T(), generator=gen())
    ref = reference_ancestral(den, d.beta64, x_T(), gen(), respaced_grid=grid.tolist())
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()
