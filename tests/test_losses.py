"""The objectives against their closed forms: L_simple (DDPM eq. 14) in every parameterization, and Min-SNR-gamma
(Hang et al. 2023) as the x0-MSE clipped at gamma."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddpmlab.diffusion import Denoiser, GaussianDiffusion, cosine_betas
from ddpmlab.objectives import MinSNRLoss, SimpleLoss, mean_flat


class AffineNet(nn.Module):
    """out = a * x_t + b_t: a network whose output depends on x_t and t, with no training needed."""

    def __init__(self, T: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(1, generator=g))
        self.b = nn.Parameter(torch.randn(T, generator=g))

    def forward(self, x_t, t):
        return self.a * x_t + self.b[t][:, None, None, None]


def batch(diffusion, generator, n=64):
    g = generator(3)
    x0 = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
    t = torch.randint(0, diffusion.T, (n,), generator=g)
    return x0, t, torch.randn(x0.shape, generator=g)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_simple_loss_is_the_mse_to_what_the_network_predicts(diffusion, generator, prediction):
    den = Denoiser(AffineNet(diffusion.T), diffusion, prediction)
    x0, t, eps = batch(diffusion, generator)
    x_t = diffusion.q_sample(x0, t, eps)
    ab = diffusion.alpha_bar[t][:, None, None, None]
    target = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]  # v: Salimans & Ho
    expected = mean_flat((den.net(x_t, t) - target) ** 2)
    loss = SimpleLoss()(den, x0, t, eps)
    assert loss.shape == (64,) and torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 5.0, 1e6])
def test_min_snr_is_the_x0_error_weighted_by_min_snr_gamma(generator, gamma):
    """For eps prediction, x0_hat - x0 = -(eps_hat - eps) / sqrt(snr_t), so the weighted eps-MSE
    min(snr, gamma) / snr * ||eps_hat - eps||^2 equals min(snr, gamma) * ||x0_hat - x0||^2."""
    diffusion = GaussianDiffusion(cosine_betas(200))  # snr from ~1e4 down to ~1e-6: both sides of gamma
    den = Denoiser(AffineNet(diffusion.T), diffusion, "eps")
    x0, t, eps = batch(diffusion, generator, n=256)
    x_t = diffusion.q_sample(x0, t, eps)
    ab = diffusion.alpha_bar64[t].float()[:, None, None, None]
    x0_hat = (x_t - (1 - ab).sqrt() * den.net(x_t, t)) / ab.sqrt()  # DDPM eq. (4) inverted
    snr = ab.flatten() / (1 - ab.flatten())
    expected = snr.clamp(max=gamma) * mean_flat((x0_hat - x0) ** 2)
    loss = MinSNRLoss(gamma)(den, x0, t, eps)
    assert torch.allclose(loss, expected, rtol=2e-3, atol=1e-7)
    if gamma == 1e6:  # gamma above every snr: no weighting, the plain eps loss
        assert torch.allclose(loss, SimpleLoss()(den, x0, t, eps), rtol=1e-5)
    else:  # the batch has samples on both sides of gamma: clipped and unclipped weights are both checked
        assert (snr < gamma).any() and (snr > gamma).any()


def test_min_snr_refuses_other_parameterizations(diffusion, generator):
    x0, t, eps = batch(diffusion, generator)
    with pytest.raises(ValueError, match="prediction='eps'"):
        MinSNRLoss()(Denoiser(AffineNet(diffusion.T), diffusion, "v"), x0, t, eps)
