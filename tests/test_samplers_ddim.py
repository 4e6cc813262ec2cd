"""DDIM (eq. 12): with eta = 1 on the full grid it is ancestral sampling with beta_tilde."""

import pytest
import torch

from ddpmlab.diffusion import Denoiser, make_timesteps
from ddpmlab.samplers import (
    ddim_sample_progressive,
    ddpm_sample_progressive,
)
from sampler_helpers import TinyNet, gen, linear, x_T


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_with_eta_1_on_the_full_grid_is_ancestral_sampling_with_beta_tilde(clip):
    """DDIM eq. (16) with eta = 1 is the posterior variance beta_tilde, and the eq. (12) mean is the posterior mean:
    step for step, with the same noise, the two samplers agree."""
    T = 200
    d = linear(T)
    den = Denoiser(TinyNet(d), d)
    grid = make_timesteps(T)
    ddim = list(ddim_sample_progressive(den, x_T(), grid, generator=gen(), eta=1.0, clip_x0=clip))
    ddpm = list(ddpm_sample_progressive(den, x_T(), grid, generator=gen(), variance="small", clip_x0=clip))
    assert len(ddim) == len(ddpm) == T
    for a, b in zip(ddim, ddpm, strict=True):
        assert a.t == b.t
        assert torch.allclose(a.x, b.x, atol=2e-5, rtol=1e-5), (a.t, (a.x - b.x).abs().max())
        assert torch.allclose(a.x0_hat, b.x0_hat, atol=2e-4, rtol=1e-5)
