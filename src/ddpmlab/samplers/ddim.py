"""DDIM (Song et al. 2020), eq. (12), with stochasticity eta and any timestep grid."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ddpmlab.diffusion.parameterization import Denoiser, Prediction
from ddpmlab.samplers.base import SamplerStep, as_grid, final, grid_alpha_bar, predict, randn_like


def ddim_sigma(alpha_bar_t: Tensor, alpha_bar_prev: Tensor, eta: float) -> Tensor:
    """DDIM eq. (16): sigma_t(eta) = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev).
    With eta = 1 this is the posterior's beta_tilde of the respaced process (DDPM eq. 7)."""
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()


def ddim_step(
    pred: Prediction, alpha_bar_prev: Tensor | float, sigma_t: Tensor | float, noise: Tensor | None
) -> Tensor:
    """DDIM eq. (12): x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps_hat + sigma_t eps."""
    alpha_bar_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    sigma_t = torch.as_tensor(sigma_t, dtype=torch.float64)
    c_x0 = float(alpha_bar_prev.sqrt())
    c_eps = float((1 - alpha_bar_prev - sigma_t**2).clamp(min=0).sqrt())
    x_prev = c_x0 * pred.x0_hat + c_eps * pred.eps_hat
    return x_prev if noise is None else x_prev + float(sigma_t) * noise


@torch.no_grad()
def ddim_sample_progressive(
    denoiser: Denoiser,
    x_T: Tensor,
    timesteps: Tensor | list[int],
    *,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    clip_x0: bool = True,
    cond: Tensor | None = None,
) -> Iterator[SamplerStep]:
    """Yield x_{t_prev} for every t of ``timesteps``. alpha_bar_prev is alpha_bar at the next grid entry (1 after
    the last), never arithmetic on t; coefficients are computed in float64. eta = 0 is the deterministic DDIM,
    eta = 1 on the full grid is DDPM ancestral sampling with beta_tilde."""
    assert eta >= 0, eta  # Sampler checks the configuration
    ts = as_grid(timesteps, denoiser.diffusion.T)
    alpha_bar, alpha_bar_prev = grid_alpha_bar(denoiser.diffusion, ts)
    sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)
    S = ts.numel()
    x = x_T
    for i, t in enumerate(ts.tolist()):
        pred = predict(denoiser, x, t, cond, clip_x0)
        # sigma = 0 at the last step (a_prev = 1); no noise is drawn there, as in ancestral sampling.
        noise = randn_like(x, generator) if eta > 0 and i < S - 1 else None
        x = ddim_step(pred, alpha_bar_prev[i], sigma[i], noise)
        yield SamplerStep(t, x, pred.x0_hat)


def ddim_sample(*args, **kwargs) -> Tensor:
    """x_0 from :func:`ddim_sample_progressive` (same arguments)."""
    return final(ddim_sample_progressive(*args, **kwargs))
